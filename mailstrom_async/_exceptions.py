"""Every exception mailstrom_async raises.

The tree, grouped by what a caller can do about it::

    MailstromError(Exception)
    ├── InvalidMessageError(ValueError)        bad input at submit()/prepare(); nothing is stored
    │   └── InvalidAddressError                  .address
    ├── ConfigError(ValueError)                bad configuration; .key names the setting
    ├── DelivererClosedError(RuntimeError)     submit() after close, entered twice, ...
    ├── UnknownMessageError(LookupError)       status() of an id the store does not know
    ├── LiveLeaseError(RuntimeError)           release_leases() of an owner that may still run
    ├── StoreError                             the store failed; __cause__ is the backend error
    └── DeliveryError                          one delivery attempt failed; .reply, .host
        ├── TransientDeliveryError             -> DEFERRED, retried by the scheduler
        │   ├── ConnectError(ConnectionError)    refused, unreachable, TLS handshake failed
        │   ├── DeliveryTimeoutError(TimeoutError)
        │   ├── ProtocolError                    garbled reply, connection dropped
        │   ├── DNSTemporaryError                SERVFAIL, REFUSED, resolver timeout
        │   ├── TemporaryRejectionError          4xx reply
        │   └── TLSRequiredError                 policy requires TLS and it was not had
        └── PermanentDeliveryError             -> FAILED, never retried
            ├── PermanentRejectionError          5xx reply
            ├── NoMailServerError                NXDOMAIN, null MX (RFC 7505)
            └── DeliveryExpiredError             retry lifetime or attempts used up

Per-recipient outcomes are data (:class:`~mailstrom_async.RecipientStatus`), not
exceptions: the ``DeliveryError`` tree is how a delivery path reports an attempt, and
what an opt-in helper that turns failed recipients into an exception (a planned
``MessageStatus.raise_for_failures()``) will raise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailstrom_async._text import clean

if TYPE_CHECKING:
    from mailstrom_async._models import SMTPReply

__all__ = [
    "ConfigError",
    "ConnectError",
    "DNSTemporaryError",
    "DelivererClosedError",
    "DeliveryError",
    "DeliveryExpiredError",
    "DeliveryTimeoutError",
    "InvalidAddressError",
    "InvalidMessageError",
    "LiveLeaseError",
    "MailstromError",
    "NoMailServerError",
    "PermanentDeliveryError",
    "PermanentRejectionError",
    "ProtocolError",
    "StoreError",
    "TLSRequiredError",
    "TemporaryRejectionError",
    "TransientDeliveryError",
    "UnknownMessageError",
]


class MailstromError(Exception):
    """Base class of every exception raised by mailstrom_async."""


class InvalidMessageError(MailstromError, ValueError):
    """A message cannot be accepted as given; nothing was stored."""


class InvalidAddressError(InvalidMessageError):
    """An address is not a valid mailbox; ``.address`` is the offending value."""

    def __init__(self, message: str, address: str) -> None:
        super().__init__(message)
        self.address = address


class ConfigError(MailstromError, ValueError):
    """A configuration value is wrong; ``.key`` names it (dotted path) when known."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DelivererClosedError(MailstromError, RuntimeError):
    """The Deliverer is not open (not entered yet, or already closed)."""


class LiveLeaseError(MailstromError, RuntimeError):
    """A lease owner may still be running, so its leases are not broken."""


class UnknownMessageError(MailstromError, LookupError):
    """The store knows no message with this id; ``.message_id`` is the id asked for."""

    def __init__(self, message_id: str) -> None:
        super().__init__(f"no message with id {message_id!r} in the store")
        self.message_id = message_id


class StoreError(MailstromError):
    """The store failed to read or write; ``__cause__`` is the backend's error."""


class DeliveryError(MailstromError):
    """A delivery attempt failed.

    ``reply`` is the SMTP reply that said so, if there was one; ``host`` the server
    (``None`` when no server was chosen) and ``ip`` the address tried, if known.
    The message is valid Unicode even when it quotes a server's bytes that are not
    UTF-8 (they show as ``\\xNN``), so it can be logged and stored as is.
    """

    #: RFC 3463 enhanced code used when the error carries no reply of its own.
    default_enhanced_code: str = "4.0.0"

    def __init__(
        self,
        message: str,
        *,
        reply: SMTPReply | None = None,
        host: str | None = None,
        ip: str | None = None,
    ) -> None:
        super().__init__(clean(message))
        self.reply = reply
        self.host = None if host is None else clean(host)
        self.ip = ip


class TransientDeliveryError(DeliveryError):
    """A temporary failure: the recipient is DEFERRED and retried later."""


class ConnectError(TransientDeliveryError, ConnectionError):
    """The connection could not be made or was lost (refused, reset, TLS handshake)."""

    default_enhanced_code = "4.4.1"


class DeliveryTimeoutError(TransientDeliveryError, TimeoutError):
    """A connect, command or DATA deadline passed."""

    default_enhanced_code = "4.4.2"


class ProtocolError(TransientDeliveryError):
    """The server's reply was garbled or out of sequence, or it hung up."""

    default_enhanced_code = "4.5.0"


class DNSTemporaryError(TransientDeliveryError):
    """DNS could not answer now (SERVFAIL, REFUSED, timeout); never a reason to fail."""

    default_enhanced_code = "4.4.3"


class TemporaryRejectionError(TransientDeliveryError):
    """The server answered 4xx."""


class TLSRequiredError(TransientDeliveryError):
    """The policy requires TLS and the server did not offer it or the handshake failed."""

    default_enhanced_code = "4.7.5"


class PermanentDeliveryError(DeliveryError):
    """A permanent failure: the recipient is FAILED and never retried."""

    default_enhanced_code = "5.0.0"


class PermanentRejectionError(PermanentDeliveryError):
    """The server answered 5xx."""


class NoMailServerError(PermanentDeliveryError):
    """The domain does not exist (NXDOMAIN) or accepts no mail (null MX, RFC 7505)."""

    default_enhanced_code = "5.1.2"


class DeliveryExpiredError(PermanentDeliveryError):
    """The retry lifetime or attempt budget ran out; ``__cause__`` is the last error."""

    default_enhanced_code = "5.4.7"
