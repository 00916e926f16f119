"""HTTP calls to one deployment: replicas, balancing, retries, error translation.

A deployment is one served model (the student, or one teacher) behind one or
more replicas that serve the same weights. Every call goes through
:meth:`Deployment.post_json`, which

1. picks the replica with the fewest requests in flight,
2. sends the request with connect, read and pool timeouts,
3. retries connect errors, timeouts, 408, 429 and 5xx with exponential
   backoff and jitter, waiting at least the delay ``Retry-After`` requests,
4. raises :class:`~mopd.errors.BackendError` with a reason code when the
   retries run out or the server rejects the request (other 4xx).

Error reasons (``BackendError.reason``):

    timeout          connect, read, write or pool timeout, or HTTP 408/504
    connect_failed   the connection could not be made or broke mid-response
    overloaded       HTTP 429 or 503
    http_5xx         any other 5xx
    http_4xx         any other 4xx (not retried: the request itself is wrong)
    bad_response     a 2xx whose body is not the JSON object the caller expects

A request is sent again only when no usable response arrived, and only the one
response that is returned is ever turned into samples, so a retry never makes
a sample count twice.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import orjson
import structlog
from pydantic import SecretStr

from mopd.errors import BackendError

log = structlog.get_logger(__name__)

# Response headers that report server-side queueing, in seconds or milliseconds
# (Fireworks-style servers send ``prefill-queue-duration``).
QUEUE_HEADERS = ("prefill-queue-duration", "fireworks-prefill-queue-duration", "fireworks-server-processing-time")

RETRY_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """httpx timeouts of one deployment, in seconds."""

    connect: float = 5.0
    read: float = 120.0
    pool: float = 30.0

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.read, pool=self.pool)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    :param max_retries: retries after the first attempt; 0 sends each request once.
    :param base_seconds: backoff before the first retry, doubled for each later one.
    :param max_seconds: cap on one wait, also on a ``Retry-After`` value.
    """

    max_retries: int = 4
    base_seconds: float = 0.5
    max_seconds: float = 30.0

    def delay(self, retry: int, *, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first)."""
        ceiling = min(self.max_seconds, self.base_seconds * (2 ** retry))
        backoff = ceiling / 2 + rng.uniform(0, ceiling / 2)
        if retry_after is not None:
            backoff = max(backoff, retry_after)
        return min(backoff, self.max_seconds)


@dataclass
class Replica:
    """One server of a deployment."""

    base_url: str
    inflight: int = 0
    """Requests this process has sent to the replica and not yet finished."""


@dataclass(frozen=True, slots=True)
class JsonResponse:
    """A 2xx response decoded as JSON."""

    body: Any
    replica: str
    """Base URL of the replica that sent the response."""
    attempts: int
    queue_seconds: dict[str, float] = field(default_factory=dict)
    """Server-side queue times reported in response headers, by header name."""


class Deployment:
    """The replicas of one served model and the HTTP client that reaches them.

    :param name: deployment name for logs (``student`` or the teacher's route).
    :param base_urls: replica base URLs, e.g. ``http://127.0.0.1:8000``; paths are appended.
    :param max_connections: connection pool size, shared by all replicas.
    :param transport: an httpx transport to use instead of the network (tests).
    """

    def __init__(
        self,
        *,
        name: str,
        base_urls: Sequence[str],
        api_key: SecretStr | None,
        timeouts: Timeouts,
        retry: RetryPolicy,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        seed: int = 0,
    ) -> None:
        if not base_urls:
            raise ValueError(f"deployment {name!r} has no base URL")
        self.name = name
        self.replicas = [Replica(base_url=url.rstrip("/")) for url in base_urls]
        self.retry = retry
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._next = 0
        headers = {"content-type": "application/json"}
        if api_key is not None and api_key.get_secret_value():
            headers["authorization"] = f"Bearer {api_key.get_secret_value()}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=timeouts.to_httpx(),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    def pick_replica(self, *, avoid: Replica | None = None) -> Replica:
        """Return the replica with the fewest requests in flight, rotating among ties.

        ``avoid`` (the replica that just failed) is skipped when another exists.
        """
        candidates = [r for r in self.replicas if r is not avoid] or self.replicas
        fewest = min(r.inflight for r in candidates)
        tied = [r for r in candidates if r.inflight == fewest]
        self._next += 1
        return tied[self._next % len(tied)]

    async def post_json(
        self, path: str, body: dict[str, Any], *, replica: Replica | None = None, expect_json: bool = True
    ) -> JsonResponse:
        """POST ``body`` as JSON under the retry policy and return the decoded 2xx body.

        :param replica: send only to this replica (weight updates); None balances.
        :param expect_json: False accepts a plain-text 2xx body (vLLM answers
            adapter loads with text) and returns it as a string.
        :raises BackendError: when the retries run out or the server rejects the request.
        """
        content = orjson.dumps(body)
        failed: Replica | None = None
        for attempt in range(self.retry.max_retries + 1):
            target = replica or self.pick_replica(avoid=failed)
            url = target.base_url + path
            retry_after: float | None = None
            started = time.monotonic()
            target.inflight += 1
            try:
                response = await self._client.post(url, content=content)
                raw = await response.aread()
            except httpx.TimeoutException as exc:
                reason, detail = "timeout", f"{type(exc).__name__}: {exc}"
            except httpx.TransportError as exc:
                reason, detail = "connect_failed", f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    decoded = self._decode(raw, url=url) if expect_json else raw.decode("utf-8", "replace")
                    return JsonResponse(
                        body=decoded, replica=target.base_url, attempts=attempt + 1,
                        queue_seconds=_queue_seconds(response.headers),
                    )
                reason = _status_reason(response.status_code)
                detail = f"HTTP {response.status_code}: {_snippet(raw)}"
                retry_after = _retry_after(response.headers.get("retry-after"))
                if response.status_code not in RETRY_STATUS:
                    log.warning("http_call_error", deployment=self.name, url=url, attempt=attempt + 1,
                                reason=reason, status=response.status_code, error=detail, will_retry=False)
                    raise BackendError(reason, f"{self.name}: POST {url} was rejected with {detail}; "
                                       "check the request settings (model name, dialect, max_tokens)")
            finally:
                target.inflight -= 1

            will_retry = attempt < self.retry.max_retries
            log.warning("http_call_error", deployment=self.name, url=url, attempt=attempt + 1, reason=reason,
                        error=detail, seconds=round(time.monotonic() - started, 3), will_retry=will_retry)
            if not will_retry:
                raise BackendError(
                    reason,
                    f"{self.name}: POST {url} failed after {attempt + 1} attempts ({detail}); check that the "
                    "server is up and sized for the load, or raise MOPD_OPENAI_MAX_RETRIES",
                )
            delay = self.retry.delay(attempt, retry_after=retry_after, rng=self._rng)
            log.info("http_call_retry", deployment=self.name, path=path, retry=attempt + 1,
                     delay_seconds=round(delay, 3), retry_after=retry_after, reason=reason)
            failed = target
            await self._sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    async def post_each(self, path: str, body: dict[str, Any], *, expect_json: bool = True) -> list[JsonResponse]:
        """POST ``body`` to every replica in turn (weight updates must reach all of them)."""
        return [
            await self.post_json(path, body, replica=replica, expect_json=expect_json) for replica in self.replicas
        ]

    def _decode(self, raw: bytes, *, url: str) -> Any:
        if not raw.strip():
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        # Python-based servers may write NaN or Infinity, which orjson rejects and the
        # standard library reads; the alignment checks then reject those values.
        try:
            return json.loads(raw)
        except ValueError as exc:
            log.warning("http_call_error", deployment=self.name, url=url, reason="bad_response",
                        error=f"invalid JSON: {exc}", will_retry=False)
            raise BackendError(
                "bad_response", f"{self.name}: {url} returned a body that is not valid JSON ({exc}): {_snippet(raw)}"
            ) from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def _status_reason(status: int) -> str:
    if status in (408, 504):
        return "timeout"
    if status in (429, 503):
        return "overloaded"
    if status >= 500:
        return "http_5xx"
    return "http_4xx"


def _retry_after(value: str | None) -> float | None:
    """Parse ``Retry-After``: delay seconds or an HTTP date; None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _queue_seconds(headers: httpx.Headers) -> dict[str, float]:
    found = {}
    for name in QUEUE_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        try:
            number = float(value.removesuffix("ms").removesuffix("s"))
        except ValueError:
            continue
        # A bare number is seconds; an "ms" suffix marks milliseconds.
        if value.endswith("ms"):
            number /= 1000.0
        found[name] = number
    return found


def _snippet(raw: bytes, limit: int = 300) -> str:
    text = raw[:limit].decode("utf-8", errors="replace")
    return text + ("..." if len(raw) > limit else "")
