"""One asyncio event loop on a background thread, for synchronous callers of async clients.

The gRPC server of every service runs handlers on a thread pool, and the Kafka stage is a plain
loop; tritonclient's async gRPC client (``tritonclient.grpc.aio``) needs a running event loop. All
its calls go to this single loop, so concurrent handler threads share one HTTP/2 channel to Triton
and their requests arrive together, which is what Triton's dynamic batcher batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


class EventLoopThread:
    """A daemon thread running an event loop until :meth:`stop`."""

    def __init__(self, name: str = "spr-aio") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop (e.g. for ``call_soon_threadsafe``)."""
        return self._loop

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self) -> EventLoopThread:
        """Start the thread (idempotent)."""
        with self._lock:
            if not self._started:
                self._thread.start()
                self._started = True
        return self

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule ``coro`` on the loop; cancelling the returned future cancels the task."""
        self.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and join the thread; pending tasks are cancelled first."""
        if not self._started or self._loop.is_closed():
            return

        async def _cancel_pending() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        # Stopping anyway: a stuck task must not block shutdown.
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(_cancel_pending(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()
