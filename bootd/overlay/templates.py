"""Jinja2 in its sandbox: config files as templates, with errors that say where.

Why these choices: ``StrictUndefined`` because a typo in a variable must stop
the render with its name rather than write an empty hostname to 5,000 nodes;
no autoescape because the output is config files, not HTML; the sandbox
because an overlay is data an admin imports from elsewhere and must not be
able to reach Python (``''.__class__.__mro__``, ``os``, private attributes).
The sandbox does not bound CPU or memory, so what allocates from a small
expression (``'x' * n``, ``2 ** n``, ``'x'.ljust(n)``) and the size of every
rendered file are bounded here. A template can still be slow (nested loops
over ``range``): overlays are written by admins, and this guards against
their mistakes and against imported overlays reaching Python, not against
every way to waste CPU.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterable
from typing import Any

import jinja2
from jinja2 import meta as jinja_meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from bootd.errors import TemplateError
from bootd.overlay.context import VARIABLES

MAX_OUTPUT = 16 * 1024 * 1024  # bytes one rendered file may have
MAX_REPEAT = 1024 * 1024  # longest string or list "x" * n may build


class _Env(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Refuse a string method asked to build something huge (``'x'.ljust(10**9)``, ``'{:>999999999}'``)."""
        owner = getattr(obj, "__self__", getattr(getattr(obj, "__wrapped__", None), "__self__", None))  # str.format
        if isinstance(owner, str | bytes):
            _check_widths(owner)
            for value in (*args, *kwargs.values()):
                if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_REPEAT:
                    raise SecurityError(f"{getattr(obj, '__name__', 'a string method')}({value}) is too large")
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "%":
            if isinstance(left, str | bytes):
                _check_widths(left)
            return left % right
        if operator == "**":
            if isinstance(right, int) and abs(right) > 64:
                raise SecurityError(f"exponent {right} is too large (at most 64)")
            return left ** right
        if isinstance(left, int) and not isinstance(left, bool):
            left, right = right, left
        if isinstance(left, str | list | tuple) and isinstance(right, int) and len(left) * right > MAX_REPEAT:
            raise SecurityError(f"repeating a sequence {right} times is too large")
        return left * right


def _check_widths(fmt: str | bytes) -> None:
    """A format string with a 7-digit width or precision would allocate megabytes from a few characters."""
    text = fmt.decode(errors="replace") if isinstance(fmt, bytes) else fmt
    if ("%" in text or "{" in text) and _HUGE_WIDTH.search(text):
        raise SecurityError("a format width or precision of a million or more is too large")


_HUGE_WIDTH = re.compile(r"[%:][^%{}]*?\d{7,}")


def _environment() -> _Env:
    env = _Env(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
               trim_blocks=True, lstrip_blocks=True, auto_reload=False, cache_size=0)
    return env


ENV = _environment()


def _line_of(exc: BaseException, filename: str) -> int | None:
    """Jinja rewrites tracebacks so template frames carry the template's file name and line."""
    line = getattr(exc, "lineno", None)
    if isinstance(line, int):
        return line
    tb: types.TracebackType | None = exc.__traceback__
    found = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            found = tb.tb_lineno
        tb = tb.tb_next
    return found


def compile_template(source: str, *, overlay: str, file: str) -> jinja2.Template:
    """Compile one template, refusing syntax errors and unknown top-level variables with file and line."""
    filename = f"{overlay}/{file}"
    try:
        tree = ENV.parse(source, name=file, filename=filename)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"syntax error: {exc.message}", overlay=overlay, file=file, line=exc.lineno) from None
    unknown = sorted(jinja_meta.find_undeclared_variables(tree) - set(VARIABLES) - set(ENV.globals))
    if unknown:
        line = next((n.lineno for n in tree.find_all(jinja2.nodes.Name) if n.name == unknown[0]), None)
        raise TemplateError(f"unknown variable {unknown[0]!r}; templates can use: {', '.join(VARIABLES)}",
                            overlay=overlay, file=file, line=line)
    code = ENV.compile(tree, name=file, filename=filename)
    return ENV.template_class.from_code(ENV, code, ENV.make_globals(None), None)


# Attributes whose values are secrets: a template reading them must be in an overlay marked secret.
SECRET_ATTRIBUTES = frozenset({"host_keys", "hash"})


def secret_reads(source: str) -> frozenset[str]:
    """Secret attributes a template names (``node.host_keys``, ``user.hash``): a guard against
    mistakes (an overlay that leaks keys to every admin), not against a template built to hide it."""
    tree = ENV.parse(source)
    names = {n.attr for n in tree.find_all(jinja2.nodes.Getattr)}
    names |= {n.arg.value for n in tree.find_all(jinja2.nodes.Getitem)
              if isinstance(n.arg, jinja2.nodes.Const) and isinstance(n.arg.value, str)}
    return frozenset(names & SECRET_ATTRIBUTES)


def used_variables(source: str) -> frozenset[str]:
    """The context parts a template reads (Jinja's own globals such as range are not context)."""
    return frozenset(jinja_meta.find_undeclared_variables(ENV.parse(source)) - set(ENV.globals))


def compile_expression(source: str, *, overlay: str, where: str) -> Callable[..., Any]:
    try:
        return ENV.compile_expression(source, undefined_to_none=False)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"bad expression {source!r}: {exc.message}", overlay=overlay, file=where,
                            line=None) from None


def describe(exc: BaseException) -> str:
    if isinstance(exc, jinja2.UndefinedError):
        return f"undefined: {exc.message}"
    if isinstance(exc, SecurityError):
        return f"refused by the sandbox: {exc}"
    return f"{type(exc).__name__}: {exc}"


def render_template(template: jinja2.Template, variables: dict[str, Any], *, overlay: str, file: str,
                    node: str | None) -> bytes:
    """Render to UTF-8 bytes, bounded in size; any failure becomes a TemplateError naming node, file and line."""
    filename = f"{overlay}/{file}"
    size = 0
    parts: list[str] = []
    try:
        for chunk in template.generate(variables):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise TemplateError(f"output is larger than {MAX_OUTPUT} bytes", overlay=overlay, file=file,
                                    line=None, node=node)
            parts.append(chunk)
    except TemplateError:
        raise
    except Exception as exc:  # a template may raise anything a filter raises; all of it is the template's fault
        raise TemplateError(describe(exc), overlay=overlay, file=file, line=_line_of(exc, filename),
                            node=node) from None
    return "".join(parts).encode()


def render_value(fn: Callable[..., Any], variables: dict[str, Any], *, overlay: str, where: str,
                 node: str | None) -> Any:
    """Evaluate a compiled expression (a directory's ``each``); an undefined result is an error, not a value."""
    try:
        value = fn(**variables)
        if isinstance(value, jinja2.Undefined):
            str(value)  # StrictUndefined raises here, with the name
        return value
    except Exception as exc:
        raise TemplateError(describe(exc), overlay=overlay, file=where, line=None, node=node) from None


def compile_template_any(source: str, *, overlay: str, file: str, extra: Iterable[str] = ("item",)) -> jinja2.Template:
    """A metadata field that may be a template (a directory's path, mode, owner), with the loop variable ``item``."""
    try:
        tree = ENV.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"syntax error: {exc.message}", overlay=overlay, file=file, line=None) from None
    unknown = sorted(jinja_meta.find_undeclared_variables(tree) - set(VARIABLES) - set(ENV.globals) - set(extra))
    if unknown:
        raise TemplateError(f"unknown variable {unknown[0]!r}", overlay=overlay, file=file, line=None)
    return ENV.from_string(tree)
