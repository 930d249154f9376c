"""
The plugin contract.

A plugin is a class that declares, with C{@implementer}, one or more of the
interfaces below, and is constructed from its TOML table (the keys other
than C{use}, as keyword arguments).  A filter declares the hook interfaces
it implements, one per hook, and only those methods are called: a class
that declares L{IRcptFilter} but has no C{rcpt} method is refused at load.

Every hook may return its answer directly, return a Deferred that fires
with it, or be an C{async def}.  The server never waits on a hook with the
reactor blocked, and bounds each call with a timeout (30 s, or the
plugin table's C{timeout}).  A hook that raises or times out answers
"451 4.3.0" for that transaction; the error is logged with the plugin's
name.  The values a hook receives are in L{twisted_mta.values}; the
answer is a L{twisted_mta.values.Verdict} (C{None} means continue).
"""

from __future__ import annotations

from zope.interface import Interface


class IFilter(Interface):
    """
    A filter: something the server asks at one or more stages of an SMTP
    session.  Declare the stage interfaces below, not this one.
    """


class IConnectFilter(IFilter):
    def connect(session):
        """
        A client has connected, before the greeting.  C{session}: a
        L{Session} with the client's address.  Reject: 554 and the
        session refuses everything but QUIT; tempfail or disconnect:
        421 and close.
        """


class IHeloFilter(IFilter):
    def helo(session, hostname):
        """
        The client said HELO or EHLO C{hostname} (a string).  Reject: 550;
        tempfail: 451.  The name is kept either way only if accepted.
        """


class IAuthFilter(IFilter):
    def auth(session, username):
        """
        The client has authenticated as C{username} (the password was
        right).  Reject: 535 5.7.8 and the session stays unauthenticated;
        tempfail: 454 4.7.0.
        """


class IMailFilter(IFilter):
    def mail(session, envelope):
        """
        MAIL FROM: C{envelope.sender} (C{None} for C{<>}) with its
        declared size and body type.  Reject: 550 (sender refused; 553
        when the verdict names 5.7.1, 5.1.7 or 5.1.8: this sender is not
        allowed, as for a login that does not own it); tempfail: 451.
        A L{RewriteSender} change replaces the sender.
        """


class IRcptFilter(IFilter):
    def rcpt(session, envelope, recipient):
        """
        RCPT TO: C{recipient} (an L{Address}), after the relay rules let
        it through.  C{envelope.recipients} holds those accepted so far.
        Reject: 554 with 5.7.1 (the default: a policy refusal), 550 with
        others (5.1.1: no such user; 5.7.23: SPF fail), 552 for 5.2.2 or 5.3.4; tempfail: 451; discard:
        accepted but never delivered.
        A L{RewriteRecipient} replaces it (aliases), a L{SetRoute} routes it.
        """


class IDataFilter(IFilter):
    def data(session, envelope, message):
        """
        The whole message has arrived (C{message}: a L{Message}) and is
        not yet acknowledged.  Reject: 554 5.7.1; tempfail: 451 4.7.1;
        discard: 250 but the message is dropped.  Header changes
        (L{AddHeader}, L{RemoveHeader}) apply to the queued message.
        """


class IRelayPolicy(Interface):
    """
    Decides which recipients a session may send to: the rule that keeps
    the server from being an open relay.  Asked at each RCPT, before the
    filters.
    """

    def check_recipient(session, envelope, recipient):
        """
        May C{session} send to C{recipient}?  Continue or accept: yes.
        Reject (or tempfail): no; with no text given the client sees
        "554 5.7.1 Relay access denied".
        """

    def is_local(domain):
        """Whether mail for C{domain} (lower case) is finally delivered here."""


class IRouter(Interface):
    """Chooses the next hop of each recipient, each time delivery is tried."""

    def route(envelope, recipient):
        """
        The L{Route} for C{recipient} (an L{Address}) of a message with
        C{envelope}; or C{None} when there is none (the recipient is
        deferred, and the log says so).  May return a Deferred.
        """


class IDeliveryObserver(Interface):
    """Told of each delivery outcome; cannot change it.  Errors are logged and ignored."""

    def delivered(queue_id, recipient, route, reply):
        """C{recipient} was handed to C{route}'s next hop, which answered C{reply} (text)."""

    def deferred(queue_id, recipient, route, reply, next_try):
        """Delivery failed for now; it is tried again at C{next_try} (POSIX time)."""

    def bounced(queue_id, recipient, route, reply):
        """Delivery failed for good; a DSN goes to the sender (unless it is C{<>})."""

