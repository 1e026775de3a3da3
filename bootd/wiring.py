"""Which components run, built from the configuration.

Kept apart from daemon.py so the lifecycle code (signals, shutdown, notify)
does not change each time a transport is added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bootd.daemon import Daemon


async def build(daemon: Daemon) -> None:
    """Append (name, component) pairs and background jobs to the daemon; start nothing."""
    return None
