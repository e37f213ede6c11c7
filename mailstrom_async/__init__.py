"""mailstrom_async: asyncio-native email delivery with a durable queue."""

from __future__ import annotations

from importlib.metadata import version as _version

from mailstrom_async._classify import RecipientOutcome
from mailstrom_async._config import (
    DEFAULT_RETRY_POLICY,
    DEFAULT_TIMEOUTS,
    Config,
    Limits,
    MXConfig,
    MXTLSPolicy,
    RelayConfig,
    RelayTLS,
    RetryPolicy,
    Timeouts,
    TransportName,
)
from mailstrom_async._deliverer import (
    DEFAULT_STORE_PATH,
    Deliverer,
    DelivererMode,
    SubmitHandle,
)
from mailstrom_async._events import EventStream
from mailstrom_async._exceptions import (
    ConfigError,
    ConnectError,
    DelivererClosedError,
    DeliveryError,
    DeliveryExpiredError,
    DeliveryTimeoutError,
    DNSTemporaryError,
    InvalidAddressError,
    InvalidMessageError,
    LiveLeaseError,
    MailstromError,
    NoMailServerError,
    PermanentDeliveryError,
    PermanentRejectionError,
    ProtocolError,
    StoreError,
    TemporaryRejectionError,
    TLSRequiredError,
    TransientDeliveryError,
    UnknownMessageError,
)
from mailstrom_async._follow import StatusStream
from mailstrom_async._leases import LeaseOwner
from mailstrom_async._message import Attachment, Email, PreparedMessage, prepare
from mailstrom_async._models import (
    AttemptRecord,
    DeliveryEvent,
    MessageStatus,
    RecipientState,
    RecipientStatus,
    SMTPReply,
)
from mailstrom_async._owner import Liveness
from mailstrom_async._statistics import (
    AttemptCounters,
    DestinationStatistics,
    Statistics,
)
from mailstrom_async._store import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    BatchRecordingStore,
    ChangeWatchingStore,
    Job,
    JobRecord,
    LeaseInfo,
    MemoryStore,
    NewMessage,
    PostgresStore,
    QueueShape,
    QueueSummary,
    SQLiteStore,
    Store,
    StoreChange,
    store_from_url,
)
from mailstrom_async._telemetry import Telemetry
from mailstrom_async._transport import Connection, Transport
from mailstrom_async._transports import ConsoleTransport, NullTransport

__version__ = _version("mailstrom-async")

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "DEFAULT_STORE_PATH",
    "DEFAULT_TIMEOUTS",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "Attachment",
    "AttemptCounters",
    "AttemptRecord",
    "BatchRecordingStore",
    "ChangeWatchingStore",
    "Config",
    "ConfigError",
    "ConnectError",
    "Connection",
    "ConsoleTransport",
    "DNSTemporaryError",
    "Deliverer",
    "DelivererClosedError",
    "DelivererMode",
    "DeliveryError",
    "DeliveryEvent",
    "DeliveryExpiredError",
    "DeliveryTimeoutError",
    "DestinationStatistics",
    "Email",
    "EventStream",
    "InvalidAddressError",
    "InvalidMessageError",
    "Job",
    "JobRecord",
    "LeaseInfo",
    "LeaseOwner",
    "Limits",
    "LiveLeaseError",
    "Liveness",
    "MXConfig",
    "MXTLSPolicy",
    "MailstromError",
    "MemoryStore",
    "MessageStatus",
    "NewMessage",
    "NoMailServerError",
    "NullTransport",
    "PermanentDeliveryError",
    "PermanentRejectionError",
    "PostgresStore",
    "PreparedMessage",
    "ProtocolError",
    "QueueShape",
    "QueueSummary",
    "RecipientOutcome",
    "RecipientState",
    "RecipientStatus",
    "RelayConfig",
    "RelayTLS",
    "RetryPolicy",
    "SMTPReply",
    "SQLiteStore",
    "Statistics",
    "StatusStream",
    "Store",
    "StoreChange",
    "StoreError",
    "SubmitHandle",
    "TLSRequiredError",
    "Telemetry",
    "TemporaryRejectionError",
    "Timeouts",
    "TransientDeliveryError",
    "Transport",
    "TransportName",
    "UnknownMessageError",
    "__version__",
    "prepare",
    "store_from_url",
]


def _fixup_module_metadata() -> None:
    # Reprs and docs say mailstrom_async.Config, not mailstrom_async._config.Config.
    for name in __all__:
        obj = globals()[name]
        is_ours = getattr(obj, "__module__", "").startswith("mailstrom_async._")
        if is_ours and (isinstance(obj, type) or callable(obj)):
            obj.__module__ = __name__


_fixup_module_metadata()
del _fixup_module_metadata
