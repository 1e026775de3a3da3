"""The words an administrator's input is checked against, shared by single changes and bulk files."""

from __future__ import annotations

import re
from typing import Any

from bootd.config import ROOT_MODES
from bootd.errors import BootdError

_VAR_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class Invalid(BootdError):
    """An administrator's request that is malformed: nothing of it was applied."""


def check_name(kind: str, value: str) -> None:
    if not _NAME.fullmatch(value):
        raise Invalid(f"{kind}: {value!r} is not a valid name (letters, digits, '.', '_', '-'; up to 63 characters, "
                      "starting with a letter or digit)")


def check_var(key: Any) -> None:
    if not isinstance(key, str) or not _VAR_KEY.fullmatch(key):
        raise Invalid(f"vars: {key!r} is not a valid variable name (a letter or '_', then letters, digits, "
                      "'_', '.', '-')")
    if key.lower() == "bmc.password":
        raise Invalid("vars: a BMC password is not a variable (variables are shown by `node show` and the API); "
                      "set it with `bootd bmc set-password NODE|@GROUP`")


def check_var_value(key: str, value: str) -> None:
    """Variables bootd itself reads are refused at once with a bad value, not at the node's next boot."""
    if key == "boot.root" and value not in ROOT_MODES:
        raise Invalid(f"vars: boot.root={value!r} is not a root mode; expected one of: {', '.join(ROOT_MODES)}")
