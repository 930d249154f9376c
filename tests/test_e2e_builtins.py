"""
End-to-end tests of the built-in policy plugins greylist, ratelimit,
recipients, headers and size (issue 6): the real service in this process,
configured by a C{mta.toml} the test writes, Python's smtplib (in a
thread) as the client, over loopback.

Time: greylist and ratelimit read the time from the reactor they are
given, so these tests give the service a reactor whose clock stands
still until the test moves it (L{StoppedClock}); everything else (the
sockets, the timers) is the real reactor's.  Relayed mail goes to a
loopback SMTP sink (tests.smtp_sink) through a C{[[route]]} via "smtp".
"""

from __future__ import annotations

import smtplib

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.e2e_support import LOCAL_DOMAIN, RawClient, Site, in_thread, wait_for
from tests.smtp_sink import SinkFactory, listen_sink

SENDER = "alice@client.example.net"
BOB = f"bob@{LOCAL_DOMAIN}"
CAROL = f"carol@{LOCAL_DOMAIN}"
DAVE = f"dave@{LOCAL_DOMAIN}"
REMOTE = "partner@remote.example.org"


class StoppedClock:
    """
    The real reactor, but for C{seconds()}: a time that moves only when
    the test calls L{advance}.  Plugins that take their clock from the
    reactor (greylist, ratelimit) see it; sockets and timers are real.
    """

    def __init__(self, real=reactor):
        self._real = real
        self.now = real.seconds()

    def seconds(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name):
        return getattr(self._real, name)


def start(testcase, site: Site, clock=None):
    """Start an L{MTAService} for C{site} (with C{clock} as its reactor); stopped at the end."""
    from twisted_mta import config as configmod
    from twisted_mta.service import MTAService

    mta = MTAService(configmod.load(site.config_path), reactor=clock or reactor)
    mta.prepare()
    mta.startService()
    testcase.addCleanup(e2e.stop_in_process, mta)
    for name, port in zip(site.ports, mta.ports):
        site.ports[name] = port.getHost().port
    return mta


def sink(testcase) -> tuple[SinkFactory, int]:
    """An SMTP sink on loopback (the smart host); closed at the end of the test."""
    return listen_sink(testcase)


def transaction(site: Site, sender: str, recipients, message: bytes | None = None,
                mail_options=(), source: str | None = None) -> dict:
    """
    One SMTP transaction with smtplib (blocking): EHLO, MAIL, each RCPT,
    and DATA if a recipient was accepted.  Never raises on a refusal:
    returns {"ehlo": features, "mail": (code, text), "rcpt": [(code, text)],
    "data": (code, text) or None}, texts decoded.
    """
    client = smtplib.SMTP(local_hostname="client.example.net", timeout=60,
                          source_address=(source, 0) if source else None)
    out: dict = {"rcpt": [], "data": None}
    try:
        client.connect(site.host, site.port())
        client.ehlo()
        out["ehlo"] = {k.upper(): v for k, v in client.esmtp_features.items()}
        code, text = client.mail(sender, list(mail_options))
        out["mail"] = (code, text.decode())
        if code != 250:
            return out
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            out["rcpt"].append((code, text.decode()))
        if any(code == 250 for code, _ in out["rcpt"]):
            body = message if message is not None else e2e.message("builtins@client.example.net")
            try:
                code, text = client.data(body)
            except smtplib.SMTPDataError as e:
                code, text = e.smtp_code, e.smtp_error
            out["data"] = (code, text.decode())
        return out
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


class E2EMixin:
    def site(self, extra: str = "", **kwargs) -> Site:
        kwargs.setdefault("listeners", {"smtp": "none"})
        return Site(self.mktemp(), fixed_ports=False, extra=extra, **kwargs)

    def attempt(self, site, sender=SENDER, recipients=(BOB,), **kw):
        return in_thread(transaction, site, sender, list(recipients), **kw)

    def assertReply(self, reply, code: int, enhanced: str, *texts: str):
        got_code, text = reply
        self.assertEqual(got_code, code, reply)
        self.assertTrue(text.startswith(enhanced + " "), reply)
        for part in texts:
            self.assertIn(part, text)


# --- greylist ---------------------------------------------------------------


GREYLIST = e2e.toml_table("[[filter]]", {"use": "greylist", "delay": 300, "window": 3600})


class GreylistTests(E2EMixin, unittest.TestCase):
    """
    A first attempt gets 451 4.7.1 at RCPT; a retry after the delay
    passes and is delivered; the state is the spool's, kept across a
    restart and a reload.  Loopback is not in the site's relay networks,
    so it is greylisted.
    """

    @defer.inlineCallbacks
    def test_greylisted_then_passes_and_survives_a_restart(self):
        site = self.site(GREYLIST)
        clock = StoppedClock()
        mta = start(self, site, clock)

        first = yield self.attempt(site)
        self.assertReply(first["rcpt"][0], 451, "4.7.1", f"<{BOB}>",
                         "Greylisted, please try again later")
        self.assertIsNone(first["data"])
        clock.advance(299)
        early = yield self.attempt(site)
        self.assertEqual(early["rcpt"][0][0], 451)
        clock.advance(1)
        retry = yield self.attempt(site)
        self.assertEqual(retry["rcpt"], [(250, "2.1.5 Ok")])
        self.assertEqual(retry["data"][0], 250)
        yield wait_for(lambda: site.delivered(BOB), "delivery to bob")

        # Another sender: a triplet still pending when the server restarts.
        pending = yield self.attempt(site, sender="carl@client.example.net")
        self.assertEqual(pending["rcpt"][0][0], 451)
        self.assertTrue((site.folder / "spool" / "state" / "greylist.log").is_file())

        yield e2e.stop_in_process(mta)
        clock.advance(200)
        start(self, site, clock)  # a new service on the same spool

        known = yield self.attempt(site)
        self.assertEqual(known["rcpt"][0][0], 250)  # passed before: still passes
        self.assertEqual(known["data"][0], 250)
        still = yield self.attempt(site, sender="carl@client.example.net")
        self.assertEqual(still["rcpt"][0][0], 451)  # first seen 200 s ago, not reset
        clock.advance(100)
        now = yield self.attempt(site, sender="carl@client.example.net")
        self.assertEqual(now["rcpt"][0][0], 250)
        self.assertEqual(now["data"][0], 250)

    @defer.inlineCallbacks
    def test_state_kept_across_a_reload(self):
        site = self.site(GREYLIST)
        clock = StoppedClock()
        mta = start(self, site, clock)
        first = yield self.attempt(site, recipients=[BOB, CAROL])
        self.assertEqual([code for code, _ in first["rcpt"]], [451, 451])
        clock.advance(300)
        passed = yield self.attempt(site, recipients=[BOB])
        self.assertEqual(passed["rcpt"][0][0], 250)

        # The reload changes the plugin's table (a longer delay, an allow
        # list); the triplets already known keep their times.
        text = site.config_path.read_text().replace("delay = 300", "delay = 600")
        site.config_path.write_text(text.replace('use = "greylist"',
                                                 'use = "greylist"\nallow = ["198.51.100.0/24"]'))
        generation = yield mta.reload()
        self.assertEqual(generation, 2)
        again = yield self.attempt(site, recipients=[BOB, CAROL])
        # bob's triplet passed; carol's is 300 s old, short of the new 600
        self.assertEqual([code for code, _ in again["rcpt"]], [250, 451])
        clock.advance(300)
        later = yield self.attempt(site, recipients=[CAROL])
        self.assertEqual(later["rcpt"][0][0], 250)

    @defer.inlineCallbacks
    def test_relay_networks_skip_it(self):
        site = self.site(GREYLIST, networks=["127.0.0.0/8"])
        start(self, site, StoppedClock())
        result = yield self.attempt(site)
        self.assertEqual(result["rcpt"][0][0], 250)
        self.assertEqual(result["data"][0], 250)


# --- ratelimit --------------------------------------------------------------


def ratelimit(*rules: dict) -> str:
    text = e2e.toml_table("[[filter]]", {"use": "ratelimit"})
    for rule in rules:
        text += e2e.toml_table("[[filter.rules]]", rule)
    return text


def greet(site: Site) -> tuple[int, bytes, bool]:
    """Connect; the greeting's code and last line, and whether the server then closed."""
    client = RawClient(site.host, site.port())
    try:
        code, lines = client.reply()
        if code == 220:
            client.send(b"QUIT\r\n")
            client.reply()
            return code, lines[-1], False
        closed = client.file.read() == b""
        return code, lines[-1], closed
    finally:
        client.close()


class RateLimitTests(E2EMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_connection_rate(self):
        """
        Over the connections per minute: 421 as the greeting, and closed.
        (No enhanced code: the client has not said EHLO, RFC 2034.)
        """
        site = self.site(ratelimit({"key": "ip", "count": "connections", "limit": 2}))
        clock = StoppedClock()
        start(self, site, clock)
        for _ in range(2):
            code, _, _ = yield in_thread(greet, site)
            self.assertEqual(code, 220)
        code, line, closed = yield in_thread(greet, site)
        self.assertEqual(code, 421)
        self.assertEqual(line, b"mx.example.test Too many connections from 127.0.0.1, "
                               b"try again later")
        self.assertTrue(closed)
        clock.advance(120)  # two minutes on: the window has slid past them
        code, _, _ = yield in_thread(greet, site)
        self.assertEqual(code, 220)

    @defer.inlineCallbacks
    def test_message_rate_and_reload(self):
        """Over the messages per hour: 451 4.7.1 at MAIL, still after a reload."""
        site = self.site(ratelimit({"key": "ip", "count": "messages", "limit": 2}))
        clock = StoppedClock()
        mta = start(self, site, clock)
        for _ in range(2):
            result = yield self.attempt(site)
            self.assertEqual(result["data"][0], 250)
        over = yield self.attempt(site)
        self.assertReply(over["mail"], 451, "4.7.1",
                         "Rate limit exceeded: too many messages from 127.0.0.1")
        yield mta.reload()
        self.assertEqual(mta.pipeline.generation, 2)
        still = yield self.attempt(site)
        self.assertEqual(still["mail"][0], 451)
        clock.advance(7200)
        later = yield self.attempt(site)
        self.assertEqual(later["mail"][0], 250)
        self.assertEqual(later["data"][0], 250)

    @defer.inlineCallbacks
    def test_recipients_per_domain(self):
        """Over the recipients per hour for a domain: 451 4.7.1 at that RCPT; the rest go."""
        site = self.site(ratelimit({"key": "recipient_domain", "count": "recipients",
                                    "limit": 2}))
        start(self, site, StoppedClock())
        result = yield self.attempt(site, recipients=[BOB, CAROL, DAVE])
        self.assertEqual([code for code, _ in result["rcpt"]], [250, 250, 451])
        self.assertReply(result["rcpt"][2], 451, "4.7.1", f"<{DAVE}>",
                         f"too many recipients to {LOCAL_DOMAIN}")
        self.assertEqual(result["data"][0], 250)
        yield wait_for(lambda: site.delivered(BOB) and site.delivered(CAROL), "deliveries")
        self.assertEqual(site.delivered(DAVE), [])


# --- recipients -------------------------------------------------------------


class RecipientsTests(E2EMixin, unittest.TestCase):
    def recipients_site(self, testcase_sink_port: int) -> Site:
        site = self.site(e2e.toml_table("[[filter]]", {"use": "recipients", "file": "recipients"}),
                         relay_route=("127.0.0.1", testcase_sink_port))
        (site.folder / "recipients").write_text(
            f"# who exists here\n{BOB}\n"
            f"sales@{LOCAL_DOMAIN} -> {BOB}, {REMOTE}\n")
        return site

    @defer.inlineCallbacks
    def test_unknown_user_refused_at_rcpt(self):
        site = self.recipients_site(e2e.free_port())
        start(self, site)
        result = yield self.attempt(site, recipients=[f"nobody@{LOCAL_DOMAIN}", BOB])
        self.assertEqual(result["rcpt"][0], (
            550, f"5.1.1 <nobody@{LOCAL_DOMAIN}>: Recipient address rejected: "
                 "User unknown in local recipient table"))
        self.assertEqual(result["rcpt"][1][0], 250)
        self.assertEqual(result["data"][0], 250)

    @defer.inlineCallbacks
    def test_alias_to_a_local_and_a_remote_address(self):
        """
        sales@ expands at RCPT to bob (local: his Maildir) and a remote
        address, which the router sends by the smart host route.
        """
        smarthost, port = sink(self)
        site = self.recipients_site(port)
        start(self, site)
        msg = e2e.message("alias@client.example.net", to=f"sales@{LOCAL_DOMAIN}")
        result = yield self.attempt(site, recipients=[f"sales@{LOCAL_DOMAIN}"], message=msg)
        self.assertEqual(result["rcpt"], [(250, "2.1.5 Ok")])
        self.assertEqual(result["data"][0], 250)
        [local] = yield wait_for(lambda: site.delivered(BOB), "delivery to bob")
        self.assertTrue(local.read_bytes().endswith(msg))
        yield wait_for(lambda: smarthost.messages, "relay to the smart host")
        [relayed] = smarthost.messages
        self.assertEqual((relayed.sender, relayed.recipients), (SENDER, [REMOTE]))
        self.assertTrue(relayed.data.endswith(msg))
        self.assertEqual(site.delivered(f"sales@{LOCAL_DOMAIN}"), [])

    @defer.inlineCallbacks
    def test_file_read_again_on_reload(self):
        site = self.recipients_site(e2e.free_port())
        mta = start(self, site)
        before = yield self.attempt(site, recipients=[CAROL])
        self.assertEqual(before["rcpt"][0][0], 550)
        with open(site.folder / "recipients", "a") as f:
            f.write(f"{CAROL}\n")
        yield mta.reload()
        after = yield self.attempt(site, recipients=[CAROL])
        self.assertEqual(after["rcpt"][0][0], 250)
        self.assertEqual(after["data"][0], 250)

        # A broken file: the reload is refused and the table in force stays.
        (site.folder / "recipients").write_text(f"{BOB}\nthis is not an address\n")
        from twisted_mta.service import ReloadError
        yield self.assertFailure(mta.reload(), ReloadError)
        kept = yield self.attempt(site, recipients=[CAROL])
        self.assertEqual(kept["rcpt"][0][0], 250)


# --- headers ----------------------------------------------------------------


HEADER_RULES = (
    e2e.toml_table("[[filter]]", {"use": "headers", "networks": ["127.0.0.1/32"]})
    + e2e.toml_table("[[filter.rules]]", {"direction": "outbound", "action": "remove",
                                          "name": "Received"})
    + e2e.toml_table("[[filter.rules]]", {"action": "rewrite", "name": "Subject",
                                          "match": r"^\[INTERNAL\] ", "value": ""})
    + e2e.toml_table("[[filter.rules]]", {"direction": "inbound", "action": "add",
                                          "name": "X-Origin", "value": "internet"})
)

INTERNAL = (b"Received: from laptop.corp.example.test (laptop [10.1.2.3])\r\n"
            b"\tby gw.corp.example.test; Thu, 01 Jan 2026 00:00:00 +0000\r\n"
            b"From: <alice@client.example.net>\r\nTo: <partner@remote.example.org>\r\n"
            b"Subject: [INTERNAL] plans\r\nMessage-ID: <headers@client.example.net>\r\n"
            b"\r\nSecret plans.\r\n")


class HeadersTests(E2EMixin, unittest.TestCase):
    """
    Loopback may relay (the relay networks), and the plugin counts only
    127.0.0.1 as inside: a client from 127.0.0.1 sends outbound mail, one
    from 127.0.0.2 inbound.
    """

    @defer.inlineCallbacks
    def test_outbound_rule_strips_received_from_relayed_mail(self):
        smarthost, port = sink(self)
        site = self.site(HEADER_RULES, networks=["127.0.0.0/8"], relay_route=("127.0.0.1", port))
        start(self, site)
        result = yield self.attempt(site, recipients=[REMOTE], message=INTERNAL)
        self.assertEqual(result["data"][0], 250)
        yield wait_for(lambda: smarthost.messages, "relay to the smart host")
        [relayed] = smarthost.messages
        self.assertNotIn(b"received:", relayed.data.lower())  # the client's and ours
        self.assertNotIn(b"10.1.2.3", relayed.data)
        self.assertNotIn(b"127.0.0.1", relayed.data)
        self.assertIn(b"\r\nSubject: plans\r\n", b"\r\n" + relayed.data)
        self.assertNotIn(b"X-Origin", relayed.data)
        self.assertTrue(relayed.data.endswith(b"\r\n\r\nSecret plans.\r\n"))

        # A client that adds no Received field (a desktop mail program):
        # the one this server adds, naming the client, goes all the same.
        plain = e2e.message("plain@client.example.net", to=REMOTE)
        result = yield self.attempt(site, recipients=[REMOTE], message=plain)
        self.assertEqual(result["data"][0], 250)
        yield wait_for(lambda: len(smarthost.messages) == 2, "relay to the smart host")
        self.assertEqual(smarthost.messages[1].data, plain)

    @defer.inlineCallbacks
    def test_inbound_mail_keeps_its_received_lines(self):
        site = self.site(HEADER_RULES, networks=["127.0.0.0/8"])
        start(self, site)
        result = yield self.attempt(site, recipients=[BOB], message=INTERNAL, source="127.0.0.2")
        self.assertEqual(result["data"][0], 250)
        [stored] = yield wait_for(lambda: site.delivered(BOB), "delivery to bob")
        data = stored.read_bytes()
        self.assertIn(b"X-Origin: internet\r\n", data)
        self.assertIn(b"(unknown [127.0.0.2])", data)  # our own Received
        self.assertIn(b"by gw.corp.example.test", data)  # the client's
        self.assertIn(b"\r\nSubject: plans\r\n", data)  # "any" rules apply both ways


# --- size -------------------------------------------------------------------


SIZE_RULES = (
    e2e.toml_table("[[filter]]", {"use": "size"})
    + "senders = { \"client.example.net\" = 20000 }\n"
    + f"recipients = {{ \"{LOCAL_DOMAIN}\" = 2000 }}\n"
)
BIG = "big.example.test"


class SizeTests(E2EMixin, unittest.TestCase):
    def size_site(self) -> Site:
        return self.site(SIZE_RULES, local_domains=[LOCAL_DOMAIN, BIG],
                         limits={"message_size": 1000000})

    @defer.inlineCallbacks
    def test_declared_size_over_a_sender_domain_limit_refused_at_mail(self):
        site = self.size_site()
        start(self, site)
        result = yield self.attempt(site, recipients=[f"x@{BIG}"], mail_options=["SIZE=30000"])
        self.assertEqual(result["ehlo"]["SIZE"], "1000000")  # the global limit, still
        self.assertEqual(result["mail"], (552, "5.3.4 Message size exceeds fixed limit"))
        other = yield self.attempt(site, sender=f"ann@{BIG}", recipients=[f"x@{BIG}"],
                                   mail_options=["SIZE=30000"],
                                   message=e2e.message("s@big", body=b"x" * 29000 + b"\r\n"))
        self.assertEqual(other["mail"][0], 250)  # no limit for that sender's domain
        self.assertEqual(other["data"][0], 250)

    @defer.inlineCallbacks
    def test_declared_size_over_a_recipient_domain_limit_refused_at_rcpt(self):
        site = self.size_site()
        start(self, site)
        result = yield self.attempt(site, recipients=[BOB, f"x@{BIG}"],
                                    mail_options=["SIZE=5000"],
                                    message=e2e.message("r@client", body=b"x" * 4000 + b"\r\n"))
        self.assertEqual(result["rcpt"][0],
                         (552, f"5.3.4 <{BOB}>: Message size exceeds fixed limit"))
        self.assertEqual(result["rcpt"][1][0], 250)
        self.assertEqual(result["data"][0], 250)

    @defer.inlineCallbacks
    def test_undeclared_size_refused_at_the_end_of_data(self):
        site = self.size_site()
        start(self, site)
        result = yield self.attempt(site, recipients=[BOB],
                                    message=e2e.message("d@client", body=b"x" * 4000 + b"\r\n"))
        self.assertEqual(result["rcpt"][0][0], 250)
        self.assertEqual(result["data"], (552, "5.3.4 Message size exceeds fixed limit"))
        small = yield self.attempt(site, recipients=[BOB])
        self.assertEqual(small["data"][0], 250)
