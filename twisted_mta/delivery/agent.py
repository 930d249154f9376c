"""
The seam between the delivery manager and the ways a message leaves:
L{IDeliveryAgent} and the L{Outcome} of one recipient's attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import Interface

DELIVERED, DEFERRED, FAILED = "delivered", "deferred", "failed"


@dataclass(frozen=True)
class Outcome:
    """
    What became of one recipient in one attempt: C{status} is C{delivered},
    C{deferred} (try again later) or C{failed} (for good); C{reply} is the
    next hop's answer (or our own reason) as one line of text, such as
    C{550 5.1.1 <u@example.test>: Recipient address rejected}; C{remote}
    names the host that answered, if any.
    """

    recipient: str
    status: str
    reply: str
    remote: str | None = None


class IDeliveryAgent(Interface):
    """Delivers recipients of a queued message by one kind of route."""

    def deliver(entry, route, recipients):
        """
        Try to deliver C{entry} (a L{QueueEntry}) to C{recipients} (its
        L{RecipientState}s, all with the same next hop) by C{route}.
        Returns a Deferred firing with one L{Outcome} per recipient.  It
        must not fail: a failure to reach the next hop is a C{deferred}
        outcome for each recipient.
        """
