"""
What the spool keeps about a queued message: L{QueueEntry}, with one
L{RecipientState} per recipient, and their JSON form.

An entry is mutable: the delivery manager updates recipient states and
asks the spool to save it.  Addresses are kept as text (as the grammar
prints them) and parsed back with the grammar.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from twisted_mta.smtp.grammar import Address, parse_mailbox

PENDING, DELIVERED, DEFERRED, FAILED = "pending", "delivered", "deferred", "failed"
FINAL = (DELIVERED, FAILED)


@dataclass
class RecipientState:
    """
    One recipient's delivery state.  C{state} is one of C{pending} (not yet
    tried), C{deferred} (tried, to be tried again at C{next_try}),
    C{delivered} or C{failed}.  C{last_reply} is the last answer from the
    next hop (or our own reason), as text.  C{remote} names the host that gave C{last_reply}.  C{route} is a route chosen by a
    filter (a L{Route} as a dict), which then overrides the router.
    """

    address: str
    state: str = PENDING
    attempts: int = 0
    next_try: float = 0.0
    last_reply: str | None = None
    route: dict | None = None
    original: str | None = None
    remote: str | None = None

    @property
    def mailbox(self) -> Address:
        return parse_address(self.address)

    @property
    def final(self) -> bool:
        return self.state in FINAL


@dataclass
class QueueEntry:
    """
    A queued message's envelope and state.  C{sender} is C{""} for the null
    sender.  C{size} is the size of the message file's message part.
    C{add_headers} ([name, value] pairs) are prepended, and header fields
    matching C{remove_headers} ([name, regex or None] pairs) dropped,
    whenever the message is read for delivery.
    """

    id: str
    sender: str
    recipients: list[RecipientState]
    arrival: float
    size: int = 0
    body: str = "7BIT"
    smtputf8: bool = False
    client: dict[str, Any] = field(default_factory=dict)
    add_headers: list[list[str]] = field(default_factory=list)
    remove_headers: list[list] = field(default_factory=list)
    held: bool = False
    delay_warned: bool = False
    bounce: bool = False  # this message is itself a DSN: never bounce it

    @property
    def sender_address(self) -> Address | None:
        return parse_address(self.sender) if self.sender else None

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)

    @property
    def attempts(self) -> int:
        return max((r.attempts for r in self.recipients), default=0)

    @property
    def next_try(self) -> float:
        waiting = [r.next_try for r in self.recipients if not r.final]
        return min(waiting) if waiting else 0.0

    def to_json(self) -> bytes:
        # The dict is written out by hand: dataclasses.asdict deep-copies
        # every field and was the larger part of the cost.  The fields and
        # their order are those of the dataclasses (a test checks).
        return _encode({
            "id": self.id, "sender": self.sender,
            "recipients": [
                {"address": r.address, "state": r.state, "attempts": r.attempts,
                 "next_try": r.next_try, "last_reply": r.last_reply, "route": r.route,
                 "original": r.original, "remote": r.remote}
                for r in self.recipients],
            "arrival": self.arrival, "size": self.size, "body": self.body,
            "smtputf8": self.smtputf8, "client": self.client,
            "add_headers": self.add_headers, "remove_headers": self.remove_headers,
            "held": self.held, "delay_warned": self.delay_warned, "bounce": self.bounce,
        }).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> "QueueEntry":
        raw = json.loads(data)
        raw["recipients"] = [RecipientState(**r) for r in raw["recipients"]]
        return cls(**raw)


# One encoder for all: json.dumps with options makes a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> Address:
    """
    Parse an address the spool stored (as L{Address.__str__} printed it).
    Remembered: a delivery attempt asks for the same few addresses several
    times (the envelope for the router, each recipient's domain), which
    was a measurable share of its CPU; an L{Address} is immutable, so one
    may be shared.
    """
    return parse_mailbox(text, utf8=True)
