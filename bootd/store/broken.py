"""A NodeStore that fails on demand, to prove services turn store faults into clear refusals.

Modelled on matchbox's testfakes/broken_store.go: wrap a working store and
make the named methods raise, so a test can break exactly one step.
"""

from __future__ import annotations

import inspect
from typing import Any

from bootd.errors import StoreError
from bootd.store.base import NodeStore


class BrokenStore:
    def __init__(self, inner: Any, fail: set[str], message: str = "disk I/O error (injected)") -> None:
        self._inner = inner
        self.fail = set(fail)
        self.message = message
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        # Asked of the interface, not of the store: a compiled store's (tools/compile.py) coroutine methods are not
        # coroutine functions to inspect.
        if not inspect.iscoroutinefunction(getattr(NodeStore, name, None)):
            return attr  # plain attributes and status(), which does no I/O and so cannot fail this way

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if name in self.fail:
                raise StoreError(f"{name}: {self.message}")
            return await attr(*args, **kwargs)

        return call
