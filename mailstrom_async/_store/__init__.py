"""Persistence backends: the Store contract and its in-memory, SQLite and PostgreSQL stores."""

from __future__ import annotations

from mailstrom_async._store._base import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    BatchRecordingStore,
    ChangeWatchingStore,
    Job,
    JobRecord,
    LeaseInfo,
    NewMessage,
    QueueShape,
    QueueSummary,
    Store,
    StoreChange,
)
from mailstrom_async._store._memory import MemoryStore
from mailstrom_async._store._postgres import PostgresStore
from mailstrom_async._store._sqlite import SQLiteStore
from mailstrom_async._store._url import store_from_url

__all__ = [
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "BatchRecordingStore",
    "ChangeWatchingStore",
    "Job",
    "JobRecord",
    "LeaseInfo",
    "MemoryStore",
    "NewMessage",
    "PostgresStore",
    "QueueShape",
    "QueueSummary",
    "SQLiteStore",
    "Store",
    "StoreChange",
    "store_from_url",
]
