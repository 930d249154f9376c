"""
C{size}: message size limits per sender domain, recipient domain and
authenticated user, below the global C{[limits] message_size} (which
stays the one advertised in EHLO SIZE).

    [[filter]]
    use = "size"
    senders = { "example.test" = 10485760 }      # sender domain -> bytes
    recipients = { "small.example.test" = 1048576 }
    users = { "scanner" = 26214400 }

The sender's limit is its user's when the client has authenticated as a
listed user, else its envelope sender domain's; each recipient domain's
limit applies on top.  A client that declares a SIZE over the limit is
refused at MAIL (sender or user limit) or at RCPT (that recipient's
domain); one whose message turns out bigger is refused at the end of
DATA, as a whole (the smallest limit of all its recipients).  Each
refusal is C{552 5.3.4 Message size exceeds fixed limit}.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted_mta.interfaces import IDataFilter, IMailFilter, IRcptFilter
from twisted_mta.smtp.grammar import is_domain
from twisted_mta.values import Verdict

TOO_BIG = "Message size exceeds fixed limit"


def _limits(table, name: str, domains: bool) -> dict[str, int]:
    if not isinstance(table, dict):
        raise ValueError(f"{name}: expected a table of name = bytes, got {table!r}")
    out = {}
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}.{key}: expected a positive number of bytes, got {value!r}")
        if domains and not is_domain(key.rstrip("."), utf8=True):
            raise ValueError(f"{name}.{key}: not a domain name")
        out[key.lower().rstrip(".") if domains else key.lower()] = value
    return out


@implementer(IMailFilter, IRcptFilter, IDataFilter)
class SizeLimits:
    def __init__(self, senders=None, recipients=None, users=None):
        self.senders = _limits(senders if senders is not None else {}, "senders", True)
        self.recipients = _limits(recipients if recipients is not None else {}, "recipients", True)
        self.users = _limits(users if users is not None else {}, "users", False)

    def sender_limit(self, session, envelope) -> int | None:
        """
        The limit for what this client sends: its user's if it has
        authenticated and the user is listed (the more specific), else the
        envelope sender's domain's, else none.
        """
        if session.user and session.user.lower() in self.users:
            return self.users[session.user.lower()]
        if envelope.sender is not None:
            return self.senders.get(envelope.sender.domain_key)
        return None

    def mail(self, session, envelope):
        limit = self.sender_limit(session, envelope)
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
        sender = self.sender_limit(session, envelope)
        if sender is not None:
            limits.append(sender)
        if limits and message.size > min(limits):
            return Verdict.reject(TOO_BIG, "5.3.4")
        return None
