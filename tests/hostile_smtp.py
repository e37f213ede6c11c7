"""A hostile SMTP server for chaos tests: seeded random faults at every stage.

:class:`HostileSMTP` is a script for the byte-level :class:`tests.smtpd.ScriptServer`
(127.0.0.1, an ephemeral port). It speaks enough SMTP for aiosmtplib (greeting,
EHLO/HELO, MAIL, RCPT, DATA and the final dot, RSET, NOOP, QUIT) and, with
probability *probability* at each step, misbehaves instead: a random 4xx/5xx
reply (421 then hangs up), an unparsable line, a reply whose text is invalid
UTF-8 or longer than 1,000 bytes (sometimes longer than aiosmtplib's 8,192-byte
limit), a short delay, a disconnect, or a stall until the client gives up. It
may hang up while the message is being sent; after the final dot it may also
hang up without replying, or "lose" its 250: the message is accepted but the
reply never leaves.

Recipients for which :attr:`HostileSMTP.rejected` says so are refused with
``550 5.1.1`` at RCPT, faults or not: mail that must end FAILED. When calm
(``calm()``) the server is a correct one, without delays.

Bookkeeping, per (Message-ID without angle brackets, lower-cased recipient):

* :attr:`~HostileSMTP.accepted` counts how many times the server took the message
  (a 2xx after the final dot, sent or lost);
* :attr:`~HostileSMTP.unconfirmed` holds those for which the server had read the
  final dot and gave no readable reply (hung up, stalled, lost or unreadable 250,
  garbage): the duplicate window, where the client cannot know the outcome.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio

from tests.smtpd import Conversation, ScriptServer, running_script_server

__all__ = [
    "Hangup",
    "HostileSMTP",
    "is_rejected",
    "message_id_of",
    "running_hostile_smtp",
]

#: aiosmtplib refuses a reply line longer than this (protocol.MAX_LINE_LENGTH).
CLIENT_LINE_LIMIT = 8192
_MESSAGE_ID = re.compile(
    rb"^message-id:[ \t]*<([^>\r\n]*)>", re.IGNORECASE | re.MULTILINE
)
_PATH = re.compile(r"^(?:FROM|TO):\s*<([^>]*)>", re.IGNORECASE)
#: Lines no SMTP client can read as a reply: none starts with three digits (and
#: none with what Python's int() would take for a number, such as " 25" or "+25").
_GARBAGE = (
    b"garbage",
    b"hello? is this thing on",
    b"ESMTP ready",
    b"x50 not a code",
    b"\xff\xfe\xfd\xfc",
    b"OK 250",
    b"",
)


#: Faults of a reply to a command (and of the greeting), with their weights. A
#: stall costs the client a whole command timeout: rarer than the rest.
_STEP_FAULTS = {
    "code": 3,
    "text": 2,
    "hangup": 1,
    "garbage": 1,
    "stall": 0.2,
    "delay": 2,
}
#: Faults of the reply to the final dot, with their weights.
_DOT_FAULTS = {
    "code": 3,
    "text": 2,
    "hangup": 1,
    "lost": 1,
    "garbage": 1,
    "unreadable": 1,
    "stall": 0.2,
    "delay": 2,
}


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    [kind] = rng.choices(list(weights), weights=list(weights.values()))
    return kind


class Hangup(Exception):  # noqa: N818 - control flow inside the script
    """The script hangs up: the conversation ends, the socket closes."""


def is_rejected(address: str) -> bool:
    """The default policy: local parts starting with ``reject`` do not exist."""
    return address.lower().startswith("reject")


def message_id_of(data: bytes) -> str | None:
    """The Message-ID (without angle brackets) in the header of *data*."""
    header = data.split(b"\r\n\r\n", 1)[0]
    match = _MESSAGE_ID.search(header)
    return match.group(1).decode("ascii", "replace") if match else None


@dataclass
class _Transaction:
    mail_from: str | None = None
    rcpts: list[str] = field(default_factory=list)


@dataclass
class HostileSMTP:
    """The state of one hostile server, shared by all its connections."""

    seed: int
    probability: float
    rejected: Callable[[str], bool] = is_rejected
    max_delay: float = 0.01
    """Longest delay of a delayed reply, in seconds (keep it below the client's
    timeouts: a stall is its own fault)."""
    accepted: Counter[tuple[str, str]] = field(default_factory=Counter)
    unconfirmed: set[tuple[str, str]] = field(default_factory=set)
    faults: Counter[str] = field(default_factory=Counter)
    """Injected faults by stage and kind (``"RCPT/code"``)."""
    transactions: int = 0
    """Final dots read."""
    server: ScriptServer | None = None
    _calm: bool = False

    @property
    def port(self) -> int:
        assert self.server is not None, "not running"
        return self.server.port

    @property
    def is_calm(self) -> bool:
        return self._calm

    def calm(self) -> None:
        """Behave as a correct server from the next step on."""
        self._calm = True

    def rage(self) -> None:
        self._calm = False

    def report(self) -> str:
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(self.faults.items()))
        return (
            f"{self.transactions} final dots, {sum(self.accepted.values())} "
            f"acceptances, {len(self.unconfirmed)} unconfirmed; faults: "
            f"{counts or 'none'}"
        )

    # -- the script --------------------------------------------------------------

    async def converse(self, conv: Conversation) -> None:
        """The script of one connection (a :data:`tests.smtpd.Script`)."""
        rng = random.Random(f"{self.seed}:{conv.index}")
        with contextlib.suppress(Hangup):
            await self._converse(conv, rng)

    async def _converse(self, conv: Conversation, rng: random.Random) -> None:
        await self._reply(conv, rng, "greeting", 220, "hostile.test ESMTP")
        txn = _Transaction()
        while (line := await conv.readline()) is not None:
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                txn = _Transaction()
                await self._reply(
                    conv,
                    rng,
                    "EHLO",
                    250,
                    "hostile.test",
                    "8BITMIME",
                    "SMTPUTF8",
                    "SIZE 100000000",
                )
            elif verb == "HELO":
                txn = _Transaction()
                await self._reply(conv, rng, "HELO", 250, "hostile.test")
            elif verb == "MAIL":
                await self._mail(conv, rng, txn, arg)
            elif verb == "RCPT":
                await self._rcpt(conv, rng, txn, arg)
            elif verb == "DATA":
                await self._data(conv, rng, txn)
                txn = _Transaction()
            elif verb == "RSET":
                txn = _Transaction()
                await self._reply(conv, rng, "RSET", 250, "2.0.0 reset")
            elif verb == "NOOP":
                await self._reply(conv, rng, "NOOP", 250, "2.0.0 OK")
            elif verb == "QUIT":
                await conv.send("221 2.0.0 bye")
                return
            else:
                await conv.send("502 5.5.2 command not implemented")

    async def _mail(
        self, conv: Conversation, rng: random.Random, txn: _Transaction, arg: str
    ) -> None:
        match = _PATH.match(arg)
        if txn.mail_from is not None:
            await conv.send("503 5.5.1 nested MAIL command")
        elif match is None:
            await conv.send("501 5.5.4 syntax: MAIL FROM:<address>")
        elif await self._reply(conv, rng, "MAIL", 250, "2.1.0 sender OK"):
            txn.mail_from = match.group(1)

    async def _rcpt(
        self, conv: Conversation, rng: random.Random, txn: _Transaction, arg: str
    ) -> None:
        match = _PATH.match(arg)
        if txn.mail_from is None:
            await conv.send("503 5.5.1 need MAIL first")
        elif match is None:
            await conv.send("501 5.5.4 syntax: RCPT TO:<address>")
        elif self.rejected(match.group(1)):
            await self._reply(conv, rng, "RCPT", 550, "5.1.1 no such user", ok=False)
        elif await self._reply(conv, rng, "RCPT", 250, "2.1.5 recipient OK"):
            txn.rcpts.append(match.group(1))

    async def _data(
        self, conv: Conversation, rng: random.Random, txn: _Transaction
    ) -> None:
        if not txn.rcpts:
            await conv.send("554 5.5.1 no valid recipients")
            return
        if not await self._reply(
            conv, rng, "DATA", 354, "end data with <CR><LF>.<CR><LF>"
        ):
            return
        if self._strikes(rng) and rng.random() < 0.3:
            self.faults["body/hangup"] += 1
            raise Hangup  # while the client sends the message: before the dot
        body = await conv.read_data()
        if body is None:
            raise Hangup  # the client hung up before the final dot
        self.transactions += 1
        message_id = message_id_of(body) or "<no Message-ID>"
        keys = [(message_id, r.lower()) for r in txn.rcpts]
        await self._final_reply(conv, rng, keys)

    async def _final_reply(
        self, conv: Conversation, rng: random.Random, keys: list[tuple[str, str]]
    ) -> None:
        """Reply to the final dot; book what was accepted and what is unknown."""
        if not self._strikes(rng):
            self.accepted.update(keys)
            await conv.send("250 2.0.0 queued")
            return
        kind = _pick(rng, _DOT_FAULTS)
        self.faults[f"dot/{kind}"] += 1
        if kind == "delay":
            await anyio.sleep(rng.uniform(0, self.max_delay))
            self.accepted.update(keys)
            await conv.send("250 2.0.0 queued after a while")
        elif kind == "code":
            code = rng.choice([251, 421, 450, 451, 452, 552, 554])
            if 200 <= code < 300:
                self.accepted.update(keys)
            await self._send_code(
                conv, code, "5.0.0 random reply" if code >= 500 else ""
            )
        elif kind == "text":
            self.accepted.update(keys)
            await conv.send_raw(b"250 " + _readable_text(rng) + b"\r\n")
        elif kind in ("lost", "unreadable"):
            self.accepted.update(keys)
            self.unconfirmed.update(keys)
            if kind == "unreadable":
                await conv.send_raw(b"250 " + b"x" * rng.randint(9000, 12000) + b"\r\n")
            raise Hangup
        else:  # hangup, garbage, stall: the message is not taken
            self.unconfirmed.update(keys)
            if kind == "garbage":
                await conv.send_raw(rng.choice(_GARBAGE) + b"\r\n")
            elif kind == "stall":
                await conv.wait_closed()
            raise Hangup

    # -- replies -----------------------------------------------------------------

    def _strikes(self, rng: random.Random) -> bool:
        # Draw even when calm, so the stream of fates does not depend on timing.
        strikes = rng.random() < self.probability
        return strikes and not self._calm

    async def _reply(
        self,
        conv: Conversation,
        rng: random.Random,
        stage: str,
        code: int,
        text: str,
        *more: str,
        ok: bool = True,
    ) -> bool:
        """Send the reply *code text* (lines *more* after it) or a fault instead.

        Returns whether the intended reply was given (its text may be odd, or it
        may come late); a fault that hangs up raises :class:`Hangup`.
        """
        if not self._strikes(rng):
            await conv.send(*_lines(code, [text, *more]))
            return ok
        kind = _pick(rng, _STEP_FAULTS)
        self.faults[f"{stage}/{kind}"] += 1
        if kind == "delay":
            await anyio.sleep(rng.uniform(0, self.max_delay))
            await conv.send(*_lines(code, [text, *more]))
            return ok
        if kind == "text":
            lines = [_readable_text(rng), *(m.encode() for m in more)]
            await conv.send_raw(b"".join(_raw_lines(code, lines)))
            return ok
        if kind == "code":
            choices = [421, 450, 451, 452, 500, 501, 550, 552, 554]
            if stage == "DATA":
                choices.append(250)  # nonsense: 250 to DATA instead of 354
            picked = rng.choice(choices)
            await self._send_code(conv, picked, "random reply")
            if stage == "greeting" and picked != 421:
                # A 4xx/5xx greeting: the session goes on refusing everything.
                await self._refuse_all(conv)
            return False
        if kind == "garbage":
            await conv.send_raw(rng.choice(_GARBAGE) + b"\r\n")
            if stage == "greeting":
                raise Hangup
            return False
        if kind == "stall":
            await conv.wait_closed()
        raise Hangup

    async def _send_code(self, conv: Conversation, code: int, text: str) -> None:
        await conv.send(f"{code} {text}".rstrip())
        if code == 421:
            raise Hangup

    async def _refuse_all(self, conv: Conversation) -> None:
        while (line := await conv.readline()) is not None:
            if line.upper().startswith("QUIT"):
                await conv.send("221 2.0.0 bye")
                break
            await conv.send("503 5.5.1 go away")
        raise Hangup


def _lines(code: int, texts: list[str]) -> list[str]:
    return [
        f"{code}{'-' if i < len(texts) - 1 else ' '}{t}" for i, t in enumerate(texts)
    ]


def _raw_lines(code: int, texts: list[bytes]) -> list[bytes]:
    return [
        b"%d%s%s\r\n" % (code, b"-" if i < len(texts) - 1 else b" ", t)
        for i, t in enumerate(texts)
    ]


def _readable_text(rng: random.Random) -> bytes:
    """Reply text a client can read, if oddly: invalid UTF-8, or over 1,000 bytes."""
    kind = rng.choice(["latin1", "invalid", "long", "long-invalid"])
    if kind == "latin1":
        return "2.0.0 caf\xe9 d\xe9j\xe0 vu".encode("latin-1")
    if kind == "invalid":
        return b"2.0.0 ok \xff\xfe\xc3\x28 \xed\xa0\x80 " + rng.randbytes(8).replace(
            b"\r", b"?"
        ).replace(b"\n", b"?")
    size = rng.randint(1001, 4000)  # RFC 5321 §4.5.3.1.5: 512 octets at most
    filler = b"\xe9" if kind == "long-invalid" else b"y"
    return b"2.0.0 " + filler * size


@contextlib.asynccontextmanager
async def running_hostile_smtp(
    *,
    seed: int,
    probability: float,
    rejected: Callable[[str], bool] = is_rejected,
    max_delay: float = 0.01,
) -> AsyncIterator[HostileSMTP]:
    """Run a :class:`HostileSMTP` on 127.0.0.1, an ephemeral port."""
    hostile = HostileSMTP(
        seed=seed, probability=probability, rejected=rejected, max_delay=max_delay
    )
    async with running_script_server(hostile.converse) as server:
        hostile.server = server
        yield hostile
