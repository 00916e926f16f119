"""An asyncio event loop on virtual time.

The loop's clock starts at 0 and jumps to the next timer whenever no
callback is ready and no file descriptor is readable, so ``anyio.sleep(60)``
returns at once in wall time while ``anyio.current_time()`` moves by 60.
Code under test runs unchanged: anyio timeouts, ``move_on_after`` and the
sampler's latency measurements all read the loop's clock.

Virtual time charges nothing for CPU work: a stage that burns a millisecond
of CPU takes zero simulated seconds. Benchmarks on this clock measure
scheduling and back-pressure behaviour, not the pipeline's own overhead.
Threads (``anyio.to_thread``) still work: when nothing else is scheduled the
loop blocks on real I/O until the thread wakes it.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class _VirtualSelector(selectors.BaseSelector):
    """A selector that advances the loop's virtual clock instead of sleeping."""

    def __init__(self, loop: VirtualTimeLoop, inner: selectors.BaseSelector) -> None:
        self._loop = loop
        self._inner = inner

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready:
            return ready
        if timeout is None:
            # No timer is scheduled: only a thread or real I/O can make progress.
            return self._inner.select(None)
        if timeout > 0:
            self._loop.advance(timeout)
        return []

    def get_map(self) -> Any:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is virtual seconds since creation."""

    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(selector=_VirtualSelector(self, selectors.DefaultSelector()))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self._virtual_now += seconds


def run_virtual(main: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``main(*args)`` to completion on a fresh :class:`VirtualTimeLoop`."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main(*args))
