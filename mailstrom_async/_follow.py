"""``Deliverer.follow()``: one message's status, then each change, until done.

The stream reads the status from the store, so it sees what any process did;
it learns of a change at once when this process made it (a delivery attempt
recorded here, a ``cancel()``), and otherwise by reading the store again every
``Config.poll_interval`` seconds. It reads the store only when its consumer asks
for the next status, so changes that come while the consumer is busy are
coalesced into one snapshot; the one that makes the message done is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Generator, Iterator
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from mailstrom_async._models import MessageStatus
    from mailstrom_async._watchers import Watch, Watchers

__all__ = ["StatusStream", "chain_signals"]

logger = logging.getLogger("mailstrom_async.deliverer")


class StatusStream:
    """The statuses of one message, from ``Deliverer.follow()``.

    Iterate over it with ``async for``: the message's status as it is now, then
    a new :class:`MessageStatus` each time it changes, ending after the status
    in which every recipient is DELIVERED or FAILED (``status.is_done``). It also
    ends, earlier, when the Deliverer closes or :meth:`Deliverer.stop_following`
    is called; the last status it gave is then not done.

    ``await`` it (or enter ``async with``) to read the first status at once, so
    that an unknown id raises there rather than on the first iteration; the
    status read is the first one the iteration gives. Leaving ``async with``, or
    :meth:`aclose`, stops following; a stream dropped unclosed costs nothing.
    """

    def __init__(
        self,
        message_id: str,
        *,
        read: Callable[[str], Awaitable[MessageStatus]],
        watchers: Watchers,
        poll_interval: float,
    ) -> None:
        self.message_id = message_id
        self._read = read
        self._watchers = watchers
        # Watching starts before the first read: a change in between then wakes
        # the stream, rather than being lost.
        self._watch: Watch = watchers.follow(message_id)
        self._poll_interval = poll_interval
        self._next: MessageStatus | None = None  # read, not yet given
        self._last: MessageStatus | None = None  # given last
        self._started = False
        self._finished = False

    def __repr__(self) -> str:
        return f"<StatusStream {self.message_id!r}>"

    def __await__(self) -> Generator[Any, None, Self]:
        return self._start().__await__()

    async def _start(self) -> Self:
        if not self._started:
            self._next = await self._read_now()
            self._started = True
        return self

    async def _read_now(self) -> MessageStatus:
        self._watch.clear()
        try:
            return await self._read(self.message_id)
        except BaseException:
            if not self._started:
                self._finish()
            raise

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> MessageStatus:
        if self._finished:
            raise StopAsyncIteration
        await self._start()
        if self._next is not None:
            status, self._next = self._next, None
            return self._give(status)
        while not self._ended():
            await self._watch.wait(self._poll_interval)
            if self._ended():
                break
            try:
                status = await self._read_now()
            except Exception:
                if self._ended():  # the Deliverer closed its store meanwhile
                    break
                raise
            if status != self._last:
                return self._give(status)
        self._finish()
        raise StopAsyncIteration

    def _ended(self) -> bool:
        """The Deliverer closed, or stop_following() was called."""
        return self._watch.ended

    def _give(self, status: MessageStatus) -> MessageStatus:
        self._last = status
        if status.is_done:
            self._finish()
        return status

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._watchers.unfollow(self.message_id, self._watch)

    async def aclose(self) -> None:
        """Stop following; the iteration ends."""
        self._finish()

    async def __aenter__(self) -> Self:
        return await self._start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


SignalHandler = Callable[[int, FrameType | None], Any] | int | None


@contextlib.contextmanager
def chain_signals(
    signals: tuple[int, ...], callback: Callable[[], object]
) -> Iterator[None]:
    """Call *callback* in the running loop when one of *signals* arrives, then
    hand the signal to the handler that was there before (a server's own).

    Python signal handlers run only in the main thread: elsewhere this does
    nothing. On exit each handler is put back, unless someone replaced ours.
    """
    if threading.current_thread() is not threading.main_thread():
        logger.debug("not the main thread: signals are not watched")
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, SignalHandler] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        # A signal handler may run between any two bytecodes of the loop's own
        # work: hand the callback to the loop rather than run it here.
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(callback)
        before = previous.get(signum)
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for signum in signals:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            if before is not None and signal.getsignal(signum) is handler:
                signal.signal(signum, before)
