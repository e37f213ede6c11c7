"""Group commit: the outcomes of the jobs that finish together are written in
one store transaction.

Each job hands its outcome to :meth:`Recorder.record` and waits. When no batch
is being written, the job's own call writes at once (a batch of one: no delay
is ever added); while one is being written, the outcomes that come in wait,
and the next batch takes them all (up to ``max_batch``) in one
:meth:`~mailstrom_async.BatchRecordingStore.record_many`. So a busy worker
makes one commit for many messages, and a quiet one writes each outcome as
soon as it is known. Each call returns only once its outcome is committed: the
durability of one ``record()`` per job is kept.

The job whose call writes a batch (the *leader*) writes only that batch; the
next batch is written by the first call waiting in it, so no job waits for more
than the batch before its own. A batch that fails fails each of its calls with
that error (each job then tries again on its own, as with ``record()``), except
that a message the store does not hold, or a value it refuses, makes the batch
be written again one outcome at a time, so that one bad outcome does not fail
the others. A store without ``record_many`` is given one ``record()`` per job.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._exceptions import StoreError, UnknownMessageError
from mailstrom_async._store import BatchRecordingStore, JobRecord

if TYPE_CHECKING:
    from mailstrom_async._models import AttemptRecord, RecipientStatus
    from mailstrom_async._store import Store

__all__ = ["Recorder"]

MAX_BATCH = 256


class _Pending:
    __slots__ = ("error", "lead", "record", "result", "woken")

    def __init__(self, record: JobRecord) -> None:
        self.record = record
        self.woken = anyio.Event()  # done, or made the leader
        self.lead = False
        self.result: list[str] | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


class Recorder:
    """Writes jobs' outcomes, several jobs' in one transaction when they come
    in together (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        worker: str,
        history_limit: int,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._store = store
        self._batching = isinstance(store, BatchRecordingStore)
        self._worker = worker
        self._history_limit = history_limit
        self._max_batch = max_batch
        self._waiting: deque[_Pending] = deque()
        self._busy = False  # a leader is writing, or has been chosen
        self.batches = 0  # transactions written (for tests and the bench)
        self.records = 0  # outcomes written

    async def record(
        self,
        message_id: str,
        statuses: Sequence[RecipientStatus],
        *,
        history: Sequence[AttemptRecord],
        lease: str | None,
    ) -> list[str] | None:
        """Write one job's outcome as ``Store.record`` does; return what it
        returns (the addresses whose lease was lost; None from a store of the
        older contract). Raises what the store raised for this outcome."""
        if not self._batching:
            fence = {} if lease is None else {"lease": lease}
            return await self._store.record(
                message_id,
                statuses,
                worker=self._worker,
                history=history,
                history_limit=self._history_limit,
                **fence,
            )
        item = _Pending(
            JobRecord(
                message_id=message_id,
                statuses=tuple(statuses),
                lease=lease,
                history=tuple(history),
            )
        )
        self._waiting.append(item)
        try:
            if self._busy:
                await item.woken.wait()
            else:
                self._busy = item.lead = True
            if item.lead:
                await self._write_batch()
        finally:
            if not item.done and item in self._waiting:  # cancelled while waiting
                self._waiting.remove(item)
            if item.lead:
                self._pass_on()
        if item.error is not None:
            raise item.error
        if item.result is None:  # cancelled before its batch was written
            msg = "the outcome was not recorded: the write was cancelled"
            raise StoreError(msg)
        return item.result

    def _pass_on(self) -> None:
        """The leader is done: the first call still waiting writes the next batch."""
        while self._waiting:
            nxt = self._waiting[0]
            if not nxt.done:
                nxt.lead = True
                nxt.woken.set()
                return
            self._waiting.popleft()
        self._busy = False

    async def _write_batch(self) -> None:
        batch = [
            self._waiting.popleft()
            for _ in range(min(self._max_batch, len(self._waiting)))
        ]
        try:
            await self._write(batch)
        except BaseException as exc:  # cancelled (or worse): none is known written
            for item in batch:
                if not item.done:
                    item.error = StoreError(f"the outcome was not recorded: {exc!r}")
            raise
        finally:
            for item in batch:
                if not item.lead:
                    item.woken.set()

    async def _write(self, batch: list[_Pending]) -> None:
        store = self._store
        assert isinstance(store, BatchRecordingStore)  # noqa: S101 - see _batching
        try:
            results = await store.record_many(
                [item.record for item in batch],
                worker=self._worker,
                history_limit=self._history_limit,
            )
        except (UnknownMessageError, ValueError) as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            # One outcome the store refuses: the others are written without it.
            for item in batch:
                try:
                    [item.result] = await store.record_many(
                        [item.record],
                        worker=self._worker,
                        history_limit=self._history_limit,
                    )
                except Exception as one:
                    item.error = one
                else:
                    self.batches += 1
                    self.records += 1
            return
        except Exception as exc:
            for item in batch:
                item.error = exc
            return
        self.batches += 1
        self.records += len(batch)
        for item, result in zip(batch, results, strict=True):
            item.result = result
