"""``show ID``: one stored message, its envelope and its header section, and
with ``--body`` its body, like Postfix's ``postcat -q``.

Readable by default: RFC 2047 encoded words decoded, folded headers unfolded,
text parts decoded from their transfer encoding and charset, attachments listed
(name, type, size), and every control character that could steer a terminal
shown as ``\\xNN``. ``--raw`` prints the stored bytes exactly, nothing added.
"""

from __future__ import annotations

import argparse
import base64
import email
import email.policy
import re
import sys
from typing import TYPE_CHECKING, Any, cast

import anyio

from mailstrom_async._cli._common import (
    EXIT_OK,
    add_store_options,
    age,
    load_config,
    message_id,
    open_store,
    opened,
    print_json,
    reply_text,
    state_text,
    status_json,
    table,
    timestamp,
    utcnow,
)

if TYPE_CHECKING:
    from email.message import EmailMessage, Message

    from mailstrom_async._cli._common import Parser
    from mailstrom_async._models import MessageStatus

__all__ = ["add_parser"]

_FORMATTER = argparse.RawDescriptionHelpFormatter

# C0 controls but tab and newline, DEL, and C1 controls: a Subject with ESC [
# sequences must not recolour or rewrite the operator's terminal.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add the show subcommand."""
    p = sub.add_parser(
        "show",
        help="show one stored message: envelope, headers, and the body with --body",
        description="Show a stored message, like 'postcat -q': the envelope (the "
        "sender, each recipient with its state and last reply) and the message's "
        "header section, RFC 2047 words decoded; with --body the body too, text "
        "parts decoded and attachments listed by name, type and size. --raw "
        "prints the stored bytes exactly instead (the header section, or with "
        "--body the whole message), with no envelope: 'show --raw --body ID > "
        "copy.eml' saves the message as it will be sent.",
        epilog="examples:\n  mailstrom-async show 1732712345.abc@example.com\n"
        "  mailstrom-async show --body '<1732712345.abc@example.com>'\n"
        "  mailstrom-async show --raw --body ID > copy.eml\n"
        "  mailstrom-async show --json --body ID | jq .headers",
        formatter_class=_FORMATTER,
    )
    p.add_argument(
        "message_id",
        metavar="ID",
        type=message_id,
        help="the id printed by 'send' (<> around it, as in a Message-ID header, are fine)",
    )
    p.add_argument(
        "--body", action="store_true", help="show the body too (after the headers)"
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="print the stored bytes exactly: no decoding, no envelope",
    )
    add_store_options(p)
    p.set_defaults(handler=_show)


def _show(args: argparse.Namespace) -> int:
    load_config(args)  # the same checks as every command, even if unused here
    store = open_store(args, create=False)

    async def run() -> tuple[MessageStatus, bytes]:
        async with opened(store):
            status = await store.status(args.message_id)
            return status, await store.message_data(args.message_id)

    status, data = anyio.run(run)
    if args.json:
        print_json(_as_json(status, data, body=args.body, raw=args.raw))
    elif args.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(data if args.body else _split(data)[0])
        sys.stdout.buffer.flush()
    else:
        _print_text(status, data, body=args.body)
    return EXIT_OK


def _split(data: bytes) -> tuple[bytes, bytes]:
    """The header section (with its last CRLF, without the empty line) and the
    body of stored bytes (always CRLF: the store keeps what submit() rendered)."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 2], data[end + 4 :]


def _parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    return message


def valid(text: str) -> str:
    """*text* as valid Unicode: each lone surrogate (a byte of a header that
    was not UTF-8) as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown(text: str) -> str:
    """*text* safe for a terminal: valid Unicode, and each control character
    but tab and newline as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", valid(text))


def _decoded_headers(message: Message) -> list[tuple[str, str]]:
    headers = []
    for name, raw in message.raw_items():
        value = raw
        # Only what needs decoding is decoded: the rest stays as it was written
        # (the parser would rewrite parameters and quoting), unfolded.
        if "=?" in raw or not raw.isascii():
            try:
                value = str(message.policy.header_fetch_parse(name, raw))
            except Exception:  # a header the parser cannot read: as stored
                value = raw
        headers.append((valid(name), valid(_unfold(value))))
    return headers


def _unfold(value: str) -> str:
    """RFC 5322 §2.2.3: unfolding removes each CRLF that comes before whitespace."""
    return re.sub(r"\r?\n(?=[ \t])", "", value).rstrip("\r\n")


def _raw_headers(message: Message) -> list[tuple[str, str]]:
    return [(valid(name), valid(raw)) for name, raw in message.raw_items()]


def _parts(message: Message) -> list[dict[str, Any]]:
    """Each leaf part of *message*: text parts decoded, the others (and every
    attachment) described by type, file name and decoded size."""
    if message.is_multipart():
        subs = cast("list[Message]", message.get_payload())  # multipart: its parts
        return [part for sub in subs for part in _parts(sub)]
    content_type = message.get_content_type()
    filename = message.get_filename()
    payload = message.get_payload(decode=True)
    size = len(payload) if isinstance(payload, bytes) else 0
    entry: dict[str, Any] = {"type": content_type, "filename": filename, "size": size}
    disposition = message.get_content_disposition()
    if message.get_content_maintype() == "text" and disposition != "attachment":
        charset = message.get_content_charset() or "us-ascii"
        entry["charset"] = charset
        text = _text(payload if isinstance(payload, bytes) else b"", charset)
        entry["text"] = text.replace("\r\n", "\n")
    return [entry]


def _text(payload: bytes, charset: str) -> str:
    try:
        return payload.decode(charset, "replace")
    except LookupError:  # an unknown charset: UTF-8 is the best guess
        return payload.decode("utf-8", "replace")


def _as_json(
    status: MessageStatus, data: bytes, *, body: bool, raw: bool
) -> dict[str, Any]:
    message = _parse(data)
    entry = status_json(status)
    entry["size"] = len(data)
    entry["headers"] = [
        list(h) for h in (_raw_headers(message) if raw else _decoded_headers(message))
    ]
    if raw:
        exact = data if body else _split(data)[0]
        entry["raw"] = base64.b64encode(exact).decode("ascii")
    elif body:
        entry["body"] = {"parts": [_part_json(p) for p in _parts(message)]}
    return entry


def _part_json(part: dict[str, Any]) -> dict[str, Any]:
    if "text" in part:
        return {**part, "attachment": False}
    return {**part, "attachment": True}


def _print_text(status: MessageStatus, data: bytes, *, body: bool) -> None:
    now = utcnow()
    print(f"message    {status.message_id}")
    print(f"from       {status.mail_from or '<>'}")
    print(
        f"submitted  {timestamp(status.submitted_at)} ({age(status.submitted_at, now)} ago)"
    )
    print(f"size       {len(data)} bytes")
    rows = table(
        ["", "", ""],
        [(r.address, state_text(r), reply_text(r)) for r in status],
    ).splitlines()[1:]
    for i, row in enumerate(rows):
        print(("rcpt       " if i == 0 else "           ") + row)
    message = _parse(data)
    print()
    for name, value in _decoded_headers(message):
        print(f"{shown(name)}: {shown(value)}")
    if not body:
        return
    print()
    parts = _parts(message)
    if not message.is_multipart() and "text" in parts[0]:
        _print_part_text(parts[0]["text"])
        return
    for n, part in enumerate(parts, 1):
        if n > 1:
            print()
        if "text" in part:
            print(f"[part {n}: {part['type']}; {shown(part['charset'])}]")
            _print_part_text(part["text"])
        else:
            name = shown(part["filename"]) if part["filename"] else "(no name)"
            print(f"[attachment {n}: {name}, {part['type']}, {part['size']} bytes]")


def _print_part_text(text: str) -> None:
    text = shown(text)
    print(text, end="" if text.endswith("\n") else "\n")
