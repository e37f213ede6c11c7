"""Three ways to hand mailstrom_async a message.

``Deliverer.submit()`` (and ``prepare()``) accept the ``Email`` builder, a ready
``email.message.EmailMessage``, or raw RFC 5322 bytes with an explicit envelope.
"""

from email.message import EmailMessage

from mailstrom_async import Attachment, Deliverer, Email, SubmitHandle


def invoice_email(logo_png: bytes, invoice_pdf: bytes) -> Email:
    return Email(
        sender="Shop <shop@example.com>",
        to=["Ada Lovelace <ada@example.org>"],
        bcc=["archive@example.com"],  # in the envelope, not in the headers
        reply_to="support@example.com",
        subject="Your invoice",
        text="Hello Ada,\n\nyour invoice is attached.\n",
        html='<p>Hello Ada,</p><p>your invoice is attached.</p><img src="cid:logo">',
        attachments=[
            # Shown inside the HTML, as <img src="cid:logo">.
            Attachment(filename="logo.png", content=logo_png, content_id="logo"),
            # (filename, content): the content type is guessed from the name.
            ("invoice.pdf", invoice_pdf),
        ],
        headers={"X-Invoice": "2024-0042"},
    )


def newsletter_email(to: str, unsubscribe_url: str) -> Email:
    return Email(
        sender="News <news@example.com>",
        to=to,
        subject="What's new in March",
        text="Three things we shipped this month...\n",
        list_unsubscribe=unsubscribe_url,  # RFC 2369
        precedence="bulk",  # asks auto-responders to stay quiet
    )


def standard_library_message() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Shop <shop@example.com>"
    message["To"] = "ada@example.org"
    message["Subject"] = "Made with the standard library"
    message.set_content("Hello Ada!\n")
    return message


async def forward_raw(deliverer: Deliverer, raw: bytes) -> SubmitHandle:
    # Raw bytes carry no envelope that can be trusted: give it explicitly.
    return await deliverer.submit(
        raw, mail_from="bounces@example.com", rcpt_to=["ada@example.org"]
    )
