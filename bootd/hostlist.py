"""Hostlist expressions, as cluster administrators type them: ``n[0000-0015,0020],login1``.

Zero padding follows the width of the range's lower bound, like Slurm and
pdsh, so ``n[0000-0015]`` names n0000..n0015.
"""

from __future__ import annotations

import re

_MAX_HOSTS = 1_000_000
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class HostlistError(ValueError):
    pass


def _split_top(expr: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unbalanced ']' in {expr!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise HostlistError(f"unbalanced '[' in {expr!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_one(item: str, total: int) -> list[str]:
    start = item.find("[")
    if start < 0:
        if "]" in item:
            raise HostlistError(f"unbalanced ']' in {item!r}")
        return [item]
    end = item.find("]", start)
    prefix, body, rest = item[:start], item[start + 1 : end], item[end + 1 :]
    if not body:
        raise HostlistError(f"empty range in {item!r}")
    values: list[str] = []
    for piece in body.split(","):
        m = _RANGE.match(piece.strip())
        if not m:
            raise HostlistError(f"bad range {piece!r} in {item!r}; expected e.g. 0000-0015")
        lo_s, hi_s = m.group(1), m.group(2) or m.group(1)
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise HostlistError(f"range {piece!r} in {item!r} runs backwards")
        if total + len(values) + (hi - lo + 1) > _MAX_HOSTS:
            raise HostlistError(f"{item!r} expands to more than {_MAX_HOSTS} names")
        width = len(lo_s)
        values.extend(f"{i:0{width}d}" for i in range(lo, hi + 1))
    tails = _expand_one(rest, total) if rest else [""]
    return [f"{prefix}{v}{t}" for v in values for t in tails]


def expand(expr: str) -> list[str]:
    """Expand a hostlist into names, keeping order and dropping repeats."""
    out: list[str] = []
    seen: set[str] = set()
    for item in _split_top(expr):
        for name in _expand_one(item, len(out)):
            if name not in seen:
                seen.add(name)
                out.append(name)
    if not out:
        raise HostlistError(f"{expr!r} names no hosts")
    return out


def compress(names: list[str]) -> str:
    """The inverse of expand() for display: ``n0000,n0001,n0002`` -> ``n[0000-0002]``."""
    groups: dict[tuple[str, int, str], list[int]] = {}
    plain: list[str] = []
    for name in names:
        m = re.match(r"^(.*?)(\d+)(\D*)$", name)
        if not m:
            plain.append(name)
            continue
        groups.setdefault((m.group(1), len(m.group(2)), m.group(3)), []).append(int(m.group(2)))
    out = list(plain)
    for (prefix, width, suffix), nums in groups.items():
        nums = sorted(set(nums))
        ranges: list[str] = []
        lo = prev = nums[0]
        for n in [*nums[1:], None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            ranges.append(f"{lo:0{width}d}" if lo == prev else f"{lo:0{width}d}-{prev:0{width}d}")
            if n is not None:
                lo = prev = n
        if len(nums) == 1:
            out.append(f"{prefix}{nums[0]:0{width}d}{suffix}")
        else:
            out.append(f"{prefix}[{','.join(ranges)}]{suffix}")
    return ",".join(out)
