"""Connection settings for tests that drive one SMTPConnection by hand."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailstrom_async import Timeouts
from mailstrom_async._smtp import ConnectionSettings

if TYPE_CHECKING:
    from tests.smtpd import SMTPDServer

TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5)


def plain_settings(server: SMTPDServer) -> ConnectionSettings:
    """Plain-text SMTP to *server*, with short timeouts."""
    return ConnectionSettings(
        host=server.host,
        port=server.port,
        tls="none",
        helo_name="client.example.test",
        timeouts=TIMEOUTS,
    )
