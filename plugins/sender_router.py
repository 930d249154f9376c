"""
Example router: send mail from some sender domains through their own
smart host, everything else by the recipient domain's MX (or a default
route you give).

    [router]
    use = "sender_router:SenderRouter"
    default = { via = "mx" }
    [router.senders."marketing.example.test"]
    via = "smtp"
    host = "bulk.provider.test"
    port = 587
    tls = "verify"

A router replaces the [[route]] tables; it is asked for every recipient at
every delivery attempt, so a reload re-routes mail already queued.
"""

from zope.interface import implementer

from twisted_mta.interfaces import IRouter
from twisted_mta.values import Route

_KEYS = {"via", "host", "port", "tls", "path", "endpoint", "username", "password_file"}


def _route(table: dict, where: str) -> Route:
    unknown = set(table) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    if table.get("via") not in ("mx", "smtp", "lmtp", "maildir", "discard"):
        raise ValueError(f"{where}: via must be mx, smtp, lmtp, maildir or discard")
    return Route(**table)


@implementer(IRouter)
class SenderRouter:
    def __init__(self, senders: dict | None = None, default: dict | None = None):
        self.senders = {d.lower(): _route(t, f"senders.{d}") for d, t in (senders or {}).items()}
        self.default = _route(default or {"via": "mx"}, "default")

    def route(self, envelope, recipient):
        sender = envelope.sender
        if sender is not None and sender.domain_key in self.senders:
            return self.senders[sender.domain_key]
        return self.default
