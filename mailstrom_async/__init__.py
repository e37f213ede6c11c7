"""mailstrom_async: asyncio-native email delivery with a durable queue."""

from __future__ import annotations

from importlib.metadata import version as _version

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
)
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
from mailstrom_async._models import (
    DeliveryEvent,
    MessageStatus,
    RecipientState,
    RecipientStatus,
    SMTPReply,
)

__version__ = _version("mailstrom-async")

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "DEFAULT_TIMEOUTS",
    "Config",
    "ConfigError",
    "ConnectError",
    "DNSTemporaryError",
    "DelivererClosedError",
    "DeliveryError",
    "DeliveryEvent",
    "DeliveryExpiredError",
    "DeliveryTimeoutError",
    "InvalidAddressError",
    "InvalidMessageError",
    "Limits",
    "MXConfig",
    "MXTLSPolicy",
    "MailstromError",
    "MessageStatus",
    "NoMailServerError",
    "PermanentDeliveryError",
    "PermanentRejectionError",
    "ProtocolError",
    "RecipientState",
    "RecipientStatus",
    "RelayConfig",
    "RelayTLS",
    "RetryPolicy",
    "SMTPReply",
    "StoreError",
    "TLSRequiredError",
    "TemporaryRejectionError",
    "Timeouts",
    "TransientDeliveryError",
    "UnknownMessageError",
    "__version__",
]


def _fixup_module_metadata() -> None:
    # Reprs and docs say mailstrom_async.Config, not mailstrom_async._config.Config.
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("mailstrom_async._"):
            try:
                obj.__module__ = __name__
            except (AttributeError, TypeError):  # pragma: no cover - builtins
                pass


_fixup_module_metadata()
del _fixup_module_metadata
