"""The HTTP client a replica fetches objects with (aiohttp): it moves bytes and decides nothing.

What is fetched, how much, whether the bytes are right and where they go is the replica service's
(bootd/service/replica.py); this module only turns one GET into pieces handed to a sink, or into an
UpstreamError carrying the peer's status.  Bodies are taken as sent (no Content-Encoding is undone, so
a small compressed answer cannot grow into a large one) and never beyond ``limit`` bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from bootd import __version__
from bootd.service.replica import UpstreamError

PIECE = 256 * 1024


class HttpUpstream:
    """One peer bootd (or any HTTP server with its object routes), over at most ``connections`` connections."""

    def __init__(self, url: str, *, connections: int = 8, connect_timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.connections = connections
        self.connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections, limit_per_host=self.connections),
                auto_decompress=False, headers={"User-Agent": f"bootd/{__version__} (replica)"})
        return self._session

    async def get(self, path: str, sink: Callable[[bytes], None], *, limit: int, timeout: float) -> None:
        url = self.url + path
        t = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, self.connect_timeout))
        try:
            async with self._client().get(url, timeout=t, allow_redirects=False) as resp:
                if resp.status != 200:
                    text = (await resp.content.read(300)).decode("utf-8", "replace").strip()
                    reason = f"HTTP {resp.status}" + (f": {text}" if text else "")
                    retry = resp.headers.get("Retry-After", "")
                    wait = float(retry) if retry.isascii() and retry.isdigit() else None  # "²".isdigit() is True
                    raise UpstreamError(reason, resp.status, wait)
                if resp.headers.get("Content-Encoding", "identity").lower() != "identity":
                    raise UpstreamError(f"answered with Content-Encoding {resp.headers['Content-Encoding']!r}", 0)
                if resp.content_length is not None and resp.content_length > limit:
                    raise UpstreamError(f"announces {resp.content_length} bytes, more than the {limit} expected", 0)
                got = 0
                async for piece in resp.content.iter_chunked(PIECE):
                    got += len(piece)
                    if got > limit:
                        raise UpstreamError(f"sent more than the {limit} bytes expected", 0)
                    sink(piece)
        except TimeoutError:
            raise UpstreamError(f"no complete answer within {timeout:g} s", 0) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}", 0) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await asyncio.sleep(0)  # let the connector's transports close (aiohttp's advice)
