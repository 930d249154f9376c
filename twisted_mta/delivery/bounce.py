"""
Delivery status notifications (RFC 3464): the bounce when recipients
failed, the warning when they have waited long.

One notification per call, to the original envelope sender, from the null
sender C{<>}, as a C{multipart/report; report-type=delivery-status}:

  1. a human-readable text, in Postfix's wording, a line per recipient
     with the remote reply;
  2. the C{message/delivery-status} part: per message C{Reporting-MTA},
     C{Arrival-Date}; per recipient C{Final-Recipient},
     C{Original-Recipient} (when a filter rewrote it), C{Action},
     C{Status}, C{Remote-MTA} (when known), C{Diagnostic-Code},
     C{Last-Attempt-Date} and, for a delay, C{Will-Retry-Until};
  3. the original message's header (C{text/rfc822-headers}), at most
     L{Bouncer.header_limit} bytes of it.

Addresses outside ASCII (SMTPUTF8) make it an RFC 6533 notification:
C{message/global-delivery-status} with C{utf-8} address types, and
C{message/global-headers} when the original header is UTF-8; the
notification is then queued with C{smtputf8}.

Never to the null sender, and never about a notification (a queue entry
with C{bounce} set): those are logged instead.  The notification is
committed to the spool (durable) before the Deferred fires, and then
handed to the delivery manager.
"""

from __future__ import annotations

import email.policy
import io
import re
import textwrap
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.utils import formatdate

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from twisted_mta.spool.entry import QueueEntry, RecipientState

log = Logger()

FAILED, DELAYED = "failed", "delayed"

_REPLY = re.compile(r"\s*([2-5][0-9]{2})(?:[ -]|$)(?:([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$))?")
_EMBEDDED = re.compile(r"(?:^|(?<=[\s:(\[]))([245][0-9]{2})[ -]([245]\.[0-9]{1,3}\.[0-9]{1,3})(?=\s|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_REMOTE = re.compile(r"([^\[\]\s]*)\[([^\]]*)\]")


def parse_reply(reply: str | None) -> tuple[int | None, str | None]:
    """
    The reply code and RFC 3463 enhanced status code at the start of an
    SMTP-style reply line: C{"550 5.1.1 no such user"} gives
    C{(550, "5.1.1")}, C{"451 try later"} C{(451, None)}, anything else
    C{(None, None)}.  An enhanced code whose class is not the reply's is
    ignored.
    """
    m = _REPLY.match(reply or "")
    if m is None:
        return None, None
    code = int(m.group(1))
    if m.group(2) is None or m.group(2) != m.group(1)[0]:
        return code, None
    return code, f"{m.group(2)}.{int(m.group(3))}.{int(m.group(4))}"


def _smtp_part(reply: str) -> str | None:
    """The SMTP reply in C{reply}: all of it, or one quoted inside our own text."""
    if parse_reply(reply)[0] is not None:
        return reply.strip()
    m = _EMBEDDED.search(reply)
    return reply[m.start():].strip() if m else None


def status_code(reply: str | None, action: str) -> str:
    """
    The DSN C{Status} for a recipient: the reply's enhanced code, with the
    class made to agree with the action (5 for failed, 4 for delayed);
    x.4.7 for a message that expired in the queue; else 5.0.0 or 4.0.0.
    """
    cls = "5" if action == FAILED else "4"
    reply = reply or ""
    if reply.startswith("message expired"):
        return f"{cls}.4.7"
    _, enhanced = parse_reply(_smtp_part(reply) or "")
    if enhanced is not None:
        return cls + enhanced[1:]
    return f"{cls}.0.0"


def _clean(text: str, utf8: bool, limit: int = 900) -> str:
    """One line of at most C{limit} bytes, no control characters; ASCII unless C{utf8}."""
    text = _CONTROL.sub(" ", text).strip()
    if not utf8:
        text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _remote_name(remote: str | None) -> str | None:
    """C{mx.example.test} from C{mx.example.test[192.0.2.1]:25}."""
    if not remote:
        return None
    m = _REMOTE.match(remote)
    if m is None:
        return remote
    return m.group(1) or m.group(2)


def _date(when: float) -> str:
    return formatdate(when, localtime=True)


def _address_type(address: str) -> str:
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def build_dsn(entry: QueueEntry, recipients: list[RecipientState], action: str, *,
              hostname: str, queue_id: str, now: float, headers: bytes | None,
              retry_until: float | None = None, delay_warning: float | None = None
              ) -> tuple[bytes, bool]:
    """
    The notification about C{recipients} of C{entry}, as bytes with CRLF
    line ends, and whether it needs SMTPUTF8.  C{action} is L{FAILED} or
    L{DELAYED}; C{headers} the original header block (None: not
    available); C{queue_id} the notification's own queue id.
    """
    addresses = [entry.sender] + [r.address for r in recipients] + [
        r.original for r in recipients if r.original]
    utf8 = not all(a.isascii() for a in addresses) or (
        entry.smtputf8 and headers is not None and not headers.isascii())
    policy = (email.policy.SMTPUTF8 if utf8 else email.policy.SMTP).clone(max_line_length=78)

    msg = EmailMessage(policy=policy)
    msg["Date"] = _date(now)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    msg["Subject"] = ("Undelivered Mail Returned to Sender" if action == FAILED
                      else "Delayed Mail (still being retried)")
    msg["To"] = entry.sender
    msg["Auto-Submitted"] = "auto-replied"
    msg["Message-ID"] = f"<{queue_id}@{hostname}>"

    # 1. For people.
    lines = [f"This is the mail system at host {hostname}.", ""]
    if action == FAILED:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. Its header is attached below.",
        ]
    else:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
        ]
        if delay_warning is not None:
            lines.append(f"Your message could not be delivered for more than "
                         f"{delay_warning / 3600:g} hour(s).")
        else:
            lines.append("Your message could not be delivered yet.")
        if retry_until is not None:
            lines.append(f"It will be retried until it is {(retry_until - entry.arrival) / 86400:g} "
                         f"day(s) old.")
    lines += [
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
        "                   The mail system",
        "",
    ]
    for r in recipients:
        who = f"<{r.address}>"
        if r.original and r.original != r.address:
            who += f" (expanded from <{r.original}>)"
        reply = _clean(r.last_reply or "no reason recorded", True)
        remote = getattr(r, "remote", None)
        if remote and _smtp_part(reply) == reply:
            line = f"{who}: host {_clean(remote, True)} said: {reply}"
        else:
            line = f"{who}: {reply}"
        lines += textwrap.wrap(line, 78, subsequent_indent="    ", break_on_hyphens=False)
        lines.append("")
    text = "\n".join(lines)
    msg.set_content(text, charset="utf-8", cte="7bit" if text.isascii() else "8bit")
    msg["Content-Description"] = "Notification"
    msg.make_mixed()
    msg.replace_header("Content-Type", "multipart/report")
    msg.set_param("report-type", "delivery-status")

    # 2. For programs: fields written as they are (one line each, unfolded).
    fields = [[
        ("Reporting-MTA", f"dns; {hostname}"),
        ("X-Twisted-MTA-Queue-ID", entry.id),
        ("X-Twisted-MTA-Sender", _address_type(entry.sender)),
        ("Arrival-Date", _date(entry.arrival)),
    ]]
    for r in recipients:
        block = [("Final-Recipient", _address_type(r.address))]
        if r.original:
            block.append(("Original-Recipient", _address_type(r.original)))
        block += [("Action", action), ("Status", status_code(r.last_reply, action))]
        remote = _remote_name(getattr(r, "remote", None))
        if remote:
            block.append(("Remote-MTA", f"dns; {_clean(remote, utf8)}"))
        reply = r.last_reply or ""
        smtp = _smtp_part(reply)
        if smtp is not None:
            block.append(("Diagnostic-Code", f"smtp; {_clean(smtp, utf8)}"))
        elif reply:
            block.append(("Diagnostic-Code", f"X-twisted-mta; {_clean(reply, utf8)}"))
        block.append(("Last-Attempt-Date", _date(now)))
        if action == DELAYED and retry_until is not None:
            block.append(("Will-Retry-Until", _date(retry_until)))
        fields.append(block)
    report = "\n".join("".join(f"{name}: {value}\n" for name, value in block) for block in fields)
    msg.attach(_part(report.encode("utf-8"),
                     "message/global-delivery-status" if utf8 else "message/delivery-status",
                     "Delivery report" if action == FAILED else "Delay report", policy))

    # 3. The original header.
    if headers is not None:
        global_headers = utf8 and not headers.isascii()
        msg.attach(_part(headers, "message/global-headers" if global_headers else "text/rfc822-headers",
                         "Undelivered Message Headers" if action == FAILED
                         else "Delayed Message Headers", policy))
    out = io.BytesIO()
    _Generator(out, policy=policy).flatten(msg)
    return out.getvalue(), utf8


def _part(data: bytes, content_type: str, description: str, policy) -> EmailMessage:
    """A MIME part of type C{content_type} whose content is C{data}, bytes as they are."""
    part = EmailMessage(policy=policy)
    part.set_content(data, maintype="text", subtype="plain",
                     cte="7bit" if data.isascii() else "8bit")
    del part["MIME-Version"]
    part.replace_header("Content-Type", content_type)
    part["Content-Description"] = description
    return part


class _Generator(BytesGenerator):
    """
    Writes the report parts made by L{_part} as the text they are: the
    email package would expect parsed blocks for delivery-status and a
    message for global-headers.
    """

    def _handle_message_delivery_status(self, msg):
        if isinstance(msg.get_payload(), str):
            self._handle_text(msg)
        else:
            super()._handle_message_delivery_status(msg)

    _handle_message_global_delivery_status = _handle_message_delivery_status

    def _handle_message_global_headers(self, msg):
        self._handle_text(msg)


def header_block(chunks, limit: int) -> bytes:
    """
    The header block at the start of a message given as C{chunks} of
    bytes (up to and with the CRLF that ends its last field), at most
    C{limit} bytes of it, cut at a line end.  Reads no further than it must.
    """
    buf = b""
    for chunk in chunks:
        buf += chunk
        if buf.startswith(b"\r\n") or buf.startswith(b"\n"):
            return b""
        for sep in (b"\r\n\r\n", b"\n\n"):
            end = buf.find(sep)
            if 0 <= end < limit:
                return buf[:end + len(sep) // 2]
        if len(buf) > limit:
            break
    if len(buf) > limit:
        buf = buf[:limit]
        cut = buf.rfind(b"\n")
        buf = buf[:cut + 1] if cut >= 0 else b""
    return buf


class Bouncer:
    """
    Makes DSNs (see the module docstring).  C{enqueue(entry)} hands a new
    queue entry to the delivery manager; C{config_getter()} gives the
    current L{Config} (its C{hostname} and C{delivery} lifetimes).
    """

    header_limit = 64 * 1024  # bytes of the original header returned

    def __init__(self, spool, enqueue, config_getter, reactor=None, threadpool=None):
        if reactor is None:
            from twisted.internet import reactor
        self.spool = spool
        self.enqueue = enqueue
        self.config = config_getter
        self.reactor = reactor
        if threadpool is None and hasattr(reactor, "getThreadPool"):
            threadpool = reactor.getThreadPool()
        self.threadpool = threadpool  # None: read inline (a test clock)

    def bounce(self, entry: QueueEntry, failed: list[RecipientState]) -> Deferred:
        """One DSN about C{failed}; fires with its L{QueueEntry} (or None if none is sent) once it is durable."""
        return self._maybe(entry, failed, FAILED)

    def delay(self, entry: QueueEntry, deferred: list[RecipientState]) -> Deferred:
        """One delay DSN about C{deferred}; as L{bounce}."""
        return self._maybe(entry, deferred, DELAYED)

    def _maybe(self, entry: QueueEntry, recipients, action: str) -> Deferred:
        what = "non-delivery" if action == FAILED else "delay"
        rcpts = ",".join(f"<{r.address}>" for r in recipients)
        if not recipients:
            return succeed(None)
        if entry.bounce:
            log.warn("{id}: undeliverable notification, not answered: to={rcpts} ({kind})",
                     id=entry.id, rcpts=rcpts, kind=what)
            return succeed(None)
        if not entry.sender:
            log.info("{id}: null sender: no {kind} notification for {rcpts}",
                     id=entry.id, kind=what, rcpts=rcpts)
            return succeed(None)
        return Deferred.fromCoroutine(self._send(entry, list(recipients), action, what))

    def _read_headers(self, entry: QueueEntry) -> bytes | None:
        chunks = self.spool.read_message(entry)
        try:
            return header_block(chunks, self.header_limit)
        except Exception as e:
            log.warn("{id}: cannot read the message's header for a notification: {e}",
                     id=entry.id, e=e)
            return None
        finally:
            chunks.close()

    async def _send(self, entry: QueueEntry, recipients, action: str, what: str):
        if self.threadpool is not None:
            headers = await deferToThreadPool(self.reactor, self.threadpool,
                                              self._read_headers, entry)
        else:
            headers = self._read_headers(entry)
        cfg = self.config()
        lifetime = cfg.delivery.queue_lifetime
        now = self.reactor.seconds()
        incoming = self.spool.new_message()
        try:
            data, utf8 = build_dsn(
                entry, recipients, action, hostname=cfg.hostname, queue_id=incoming.id,
                now=now, headers=headers, retry_until=entry.arrival + lifetime,
                delay_warning=cfg.delivery.delay_warning)
            incoming.write(data)
            dsn = QueueEntry(
                id=incoming.id, sender="", recipients=[RecipientState(entry.sender)],
                arrival=now, size=incoming.size,
                body="7BIT" if data.isascii() else "8BITMIME", smtputf8=utf8,
                client={"ip": None, "helo": None, "tls": None, "user": None,
                        "origin": f"{what} notification for {entry.id}"},
                bounce=True)
        except BaseException:
            incoming.abort()
            raise
        await self.spool.commit(incoming, dsn)
        log.info("{id}: sender {kind} notification: {dsn} to=<{sender}> about {rcpts}",
                 id=entry.id, kind=what, dsn=dsn.id, sender=entry.sender,
                 rcpts=",".join(f"<{r.address}>" for r in recipients))
        self.enqueue(dsn)
        return dsn
