"""
C{size}: message size limits per sender domain, recipient domain and
authenticated user, below the global C{[limits] message_size} (which
stays the one advertised in EHLO SIZE).

    [[filter]]
    use = "size"
    senders = { "example.test" = 10485760 }      # sender domain -> bytes
    recipients = { "small.example.test" = 1048576 }
    users = { "scanner" = 26214400 }

A client that declares a SIZE over the limit is refused at MAIL (sender
or user limit) or at RCPT (that recipient's domain); one whose message
turns out bigger is refused at the end of DATA.  Each refusal is
C{552 5.3.4 Message size exceeds fixed limit}.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted_mta.interfaces import IDataFilter, IMailFilter, IRcptFilter
from twisted_mta.values import Verdict

TOO_BIG = "Message size exceeds fixed limit"


def _limits(table, name: str) -> dict[str, int]:
    if not isinstance(table, dict):
        raise ValueError(f"{name}: expected a table of name = bytes")
    out = {}
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}.{key}: expected a positive number of bytes, got {value!r}")
        out[key.lower()] = value
    return out


@implementer(IMailFilter, IRcptFilter, IDataFilter)
class SizeLimits:
    def __init__(self, senders=None, recipients=None, users=None):
        self.senders = _limits(senders or {}, "senders")
        self.recipients = _limits(recipients or {}, "recipients")
        self.users = _limits(users or {}, "users")

    def _sender_limit(self, session, envelope) -> int | None:
        limits = []
        if envelope.sender is not None and envelope.sender.domain_key in self.senders:
            limits.append(self.senders[envelope.sender.domain_key])
        if session.user and session.user.lower() in self.users:
            limits.append(self.users[session.user.lower()])
        return min(limits) if limits else None

    def mail(self, session, envelope):
        limit = self._sender_limit(session, envelope)
        if limit is not None and envelope.size is not None and envelope.size > limit:
            return Verdict.reject(TOO_BIG, "5.3.4")
        return None

    def rcpt(self, session, envelope, recipient):
        limit = self.recipients.get(recipient.domain_key)
        if limit is not None and envelope.size is not None and envelope.size > limit:
            return Verdict.reject(TOO_BIG, "5.3.4")
        return None

    def data(self, session, envelope, message):
        limits = [self.recipients[r.domain_key] for r in envelope.recipients
                  if r.domain_key in self.recipients]
        sender = self._sender_limit(session, envelope)
        if sender is not None:
            limits.append(sender)
        if limits and message.size > min(limits):
            return Verdict.reject(TOO_BIG, "5.3.4")
        return None
