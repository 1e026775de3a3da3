"""How file responses leave: the header block, sendfile, and what happens when the client goes away.

Also the plain-text refusal every route uses.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web


class CapsuleReader(Protocol):
    """The part of bootd.capsule.store.CapsuleStore this transport reads."""

    def resolve(self, name: str) -> str | None: ...
    def manifest_path(self, vid: str) -> Path: ...
    def chunk_path(self, hexhash: str) -> Path: ...
    def kernel_path(self, hexhash: str) -> Path: ...
    def load_manifest(self, vid: str) -> Any: ...


def refuse(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Every refusal says why: the body is one line of plain text."""
    return web.Response(status=status, text=message + "\n", headers=headers)


class SentResponse(web.StreamResponse):
    """A response whose bytes the handler already wrote to the transport itself.

    aiohttp calls prepare() and write_eof() on whatever a handler returns; both
    are no-ops here, and ``keep_alive`` tells it whether the connection goes on.
    """

    def __init__(self, status: int) -> None:
        super().__init__(status=status)

    def set_keep_alive(self, keep_alive: bool) -> None:
        self._keep_alive = keep_alive

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def sendfile_now(transport: asyncio.Transport, fd: int, file: Any, offset: int, count: int) -> int:
    """One sendfile(2) to socket ``fd`` right away; returns bytes sent (0 if the socket is full).

    Only when the transport has nothing buffered (the headers went out at once), or the body
    would overtake them.  The event loop's ``sendfile`` sends whatever is left.
    """
    if transport.get_write_buffer_size():
        return 0
    try:
        return os.sendfile(fd, file.fileno(), offset, count)
    except (BlockingIOError, InterruptedError):
        return 0
