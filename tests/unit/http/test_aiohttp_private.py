"""The private aiohttp attributes the chunk fast path relies on still exist in the installed aiohttp.

bootd/net/http/chunkfast.py lists them (AIOHTTP_PRIVATES).  They are checked on real
instances, because aiohttp's classes use __slots__: a renamed slot that bootd writes to
would land in the subclass's __dict__ and silently do nothing.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from bootd.net.http.chunkfast import AIOHTTP_PRIVATES


def _missing(obj: object, names: tuple[str, ...]) -> list[str]:
    missing = []
    for name in names:
        try:
            getattr(obj, name)
        except AttributeError:
            missing.append(name)
    return missing


async def test_every_private_aiohttp_attribute_the_fast_path_uses_exists() -> None:
    runner = web.AppRunner(web.Application(), handle_signals=False)
    await runner.setup()
    try:
        server = runner.server
        assert server is not None
        kwargs = getattr(server, "_kwargs", {})
        instances: dict[str, object] = {
            "web_protocol.RequestHandler": RequestHandler(server, loop=asyncio.get_running_loop(), **kwargs),
            "web_server.Server": server,
            "web_runner.BaseRunner": runner,
            "web_runner.TCPSite": web.TCPSite(runner, "127.0.0.1", 0),
            "web_response.StreamResponse": web.StreamResponse(),
        }
        assert set(instances) == set(AIOHTTP_PRIVATES), "every class in AIOHTTP_PRIVATES needs an instance here"
        gone = [f"{where}.{name}" for where, names in AIOHTTP_PRIVATES.items()
                for name in _missing(instances[where], names)]
        assert not gone, (
            f"aiohttp {aiohttp.__version__} no longer has {', '.join(gone)}, which bootd/net/http/chunkfast.py "
            "relies on: adapt the fast path (or pin aiohttp below this version in pyproject.toml)"
        )
    finally:
        await runner.cleanup()


def test_a_missing_attribute_is_named() -> None:
    assert _missing(web.StreamResponse(), ("_keep_alive", "_no_such_attribute")) == ["_no_such_attribute"]


async def test_the_asyncio_privates_the_send_path_uses_exist() -> None:
    """send.py waits on the socket itself (send_timeout) and sends on the transport's own socket
    (one descriptor per connection); without these it falls back to slower, coarser paths."""
    loop = asyncio.get_running_loop()
    assert hasattr(loop, "_add_writer") and hasattr(loop, "_remove_writer")
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        try:
            assert hasattr(transport, "_make_empty_waiter") and hasattr(transport, "_reset_empty_waiter")
            assert isinstance(getattr(transport.get_extra_info("socket"), "_sock", None), socket.socket)
        finally:
            transport.close()
    finally:
        server.close()
        await server.wait_closed()
