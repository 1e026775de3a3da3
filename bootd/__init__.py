"""bootd: network boot service for stateless (diskless) clusters."""

from pathlib import Path

from bootd import _native

__version__ = "0.1.0"

# The DHCP path runs compiled (tools/compile.py, mypyc) when its build matches the sources, else from them.
COMPILED = _native.choose(Path(__file__).resolve().parent)
