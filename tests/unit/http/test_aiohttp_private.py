"""The private aiohttp attributes the chunk fast path relies on still exist in the installed aiohttp.

bootd/net/http/chunkfast.py lists them (AIOHTTP_PRIVATES).  They are checked on real
instances, because aiohttp's classes use __slots__: a renamed slot that bootd writes to
would land in the subclass's __dict__ and silently do nothing.
"""

from __future__ import annotations

import asyncio

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
