"""A fault-injecting HTTP proxy for loopback model servers.

``FaultProxy`` listens on a 127.0.0.1 port, forwards each HTTP/1.1 request
to one upstream server and can be switched, from any thread, between

    up      forward every request
    down    close the listening socket and every open connection, so clients
            see refused or broken connections (an outage)
    storm   return 500 or 503 for a share of requests without forwarding them

It handles what the mopd HTTP client sends: requests with a Content-Length
body and keep-alive connections. It is a test tool for the chaos run and
tests, not a general proxy: no chunked bodies, no TLS.
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass

import httpx

STORM_STATUSES = (500, 503)


@dataclass
class FaultCounters:
    """Counts of forwarded requests, injected errors and faults started."""

    forwarded: int = 0
    injected: int = 0
    outages: int = 0
    storms: int = 0


@dataclass
class _Mode:
    name: str = "up"
    error_rate: float = 0.0


class FaultProxy:
    """One proxy in front of one upstream base URL, run on its own event loop thread.

    :param upstream: base URL of the server, e.g. ``http://127.0.0.1:8001``.
    :param seed: seed of the storm's random choices.
    """

    def __init__(self, upstream: str, *, seed: int = 0, name: str = "proxy") -> None:
        self.upstream = upstream.rstrip("/")
        self.name = name
        self.counters = FaultCounters()
        self._mode = _Mode()
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fault-proxy-{name}", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._client: httpx.AsyncClient | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        """Bind a free port and start serving."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=httpx.Limits(max_connections=64))
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def set_up(self) -> None:
        """Forward every request again (ends an outage or a storm)."""
        self._call(self._set_up())

    def set_down(self) -> None:
        """Start an outage: refuse new connections and break open ones."""
        self._call(self._set_down())

    def set_storm(self, error_rate: float) -> None:
        """Start a storm: return 500 or 503 for ``error_rate`` of the requests."""
        self._call(self._set_storm(error_rate))

    @property
    def mode(self) -> str:
        return self._mode.name

    def stop(self) -> None:
        """Close the proxy and its thread."""
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coroutine) -> None:  # noqa: ANN001 - a coroutine object
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _set_up(self) -> None:
        self._mode = _Mode("up")
        if self._server is None:
            await self._listen()

    async def _set_down(self) -> None:
        if self._mode.name != "down":
            self.counters.outages += 1
        self._mode = _Mode("down")
        await self._close_listener()
        for writer in list(self._writers):
            writer.transport.abort()

    async def _set_storm(self, error_rate: float) -> None:
        if self._server is None:
            await self._listen()
        self.counters.storms += 1
        self._mode = _Mode("storm", error_rate)

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _close(self) -> None:
        await self._close_listener()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._client is not None:
            await self._client.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                # 1. Read one request: head, then a Content-Length body.
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        key, value = line.split(":", 1)
                        headers[key.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))

                # 2. Return an injected error, or forward.
                mode = self._mode
                if mode.name == "down":
                    writer.transport.abort()
                    return
                if mode.name == "storm" and self._rng.random() < mode.error_rate:
                    self.counters.injected += 1
                    status = self._rng.choice(STORM_STATUSES)
                    payload = b'{"error": {"message": "injected by the fault proxy"}}'
                else:
                    status, payload = await self._forward(method, path, body, headers)
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\n\r\n".encode() + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _forward(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        assert self._client is not None  # noqa: S101 - set in _start
        forwarded = {"content-type": headers.get("content-type", "application/json")}
        try:
            response = await self._client.request(method, self.upstream + path, content=body, headers=forwarded)
        except httpx.HTTPError as exc:
            return 502, f'{{"error": {{"message": "upstream failed: {type(exc).__name__}"}}}}'.encode()
        self.counters.forwarded += 1
        return response.status_code, response.content
