"""
The example plugins in plugins/, tested as a plugin author would, through
twisted_mta.testing.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from twisted_mta import testing
from twisted_mta.loader import PluginError
from twisted_mta.values import Action, AddHeader, Route

PLUGINS = str(Path(__file__).resolve().parent.parent / "plugins")

PLAIN = b"From: a@example.test\r\nSubject: hello\r\n\r\nJust text.\r\n"
WITH_EXE = (
    b"From: a@example.test\r\nSubject: tool\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
    b'--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="Setup.EXE"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b--\r\n"
)


class AddHeaderTests(unittest.SynchronousTestCase):
    def test_adds_configured_header(self):
        plugin = testing.load("add_header:AddHeader", [PLUGINS], name="X-Checked", value="yes")
        verdict = testing.run(plugin, "data", testing.session(), testing.envelope(),
                              testing.message(PLAIN))
        self.assertEqual(verdict.action, Action.CONTINUE)
        self.assertEqual(verdict.changes, (AddHeader("X-Checked", "yes"),))

    def test_bad_name_refused_at_load(self):
        with self.assertRaises(PluginError) as e:
            testing.load("add_header:AddHeader", [PLUGINS], name="Bad: name")
        self.assertIn("add_header:AddHeader", str(e.exception))


class NoExeTests(unittest.TestCase):
    def setUp(self):
        self.plugin = testing.load("no_exe:NoExe", [PLUGINS])

    @defer.inlineCallbacks
    def test_rejects_exe_attachment(self):
        verdict = yield testing.run(self.plugin, "data", testing.session(), testing.envelope(),
                                    testing.message(WITH_EXE, self.mktemp_dir()))
        self.assertEqual(verdict.action, Action.REJECT)
        self.assertEqual(verdict.enhanced, "5.7.1")
        self.assertIn("Setup.EXE", verdict.text)

    @defer.inlineCallbacks
    def test_passes_plain_text(self):
        verdict = yield testing.run(self.plugin, "data", testing.session(), testing.envelope(),
                                    testing.message(PLAIN, self.mktemp_dir()))
        self.assertEqual(verdict.action, Action.CONTINUE)

    def test_bad_option_refused(self):
        with self.assertRaises(PluginError):
            testing.load("no_exe:NoExe", [PLUGINS], extensions=".exe")

    def mktemp_dir(self):
        path = Path(self.mktemp())
        path.mkdir()
        return path


class _Policy(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.queries = []

    def render_POST(self, request):
        query = json.loads(request.content.read())
        self.queries.append(query)
        request.setHeader(b"content-type", b"application/json")
        if query["recipient"].startswith("blocked@"):
            return json.dumps({"action": "reject", "text": "Blocked by policy"}).encode()
        if query["recipient"].startswith("weird@"):
            return json.dumps({"action": "explode"}).encode()
        return json.dumps({"action": "continue"}).encode()


class HTTPCheckTests(unittest.TestCase):
    def setUp(self):
        self.policy = _Policy()
        self.port = reactor.listenTCP(0, server.Site(self.policy), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        url = f"http://127.0.0.1:{self.port.getHost().port}/check"
        self.plugin = testing.load("http_check:HTTPCheck", [PLUGINS], timeout=5, url=url)

    @defer.inlineCallbacks
    def ask(self, rcpt):
        env = testing.envelope()
        result = yield testing.run(self.plugin, "rcpt", testing.session(), env, testing.address(rcpt))
        return result

    @defer.inlineCallbacks
    def test_continue(self):
        verdict = yield self.ask("ok@example.test")
        self.assertEqual(verdict.action, Action.CONTINUE)
        self.assertEqual(self.policy.queries[0]["recipient"], "ok@example.test")
        self.assertEqual(self.policy.queries[0]["client_ip"], "192.0.2.1")

    @defer.inlineCallbacks
    def test_reject(self):
        verdict = yield self.ask("blocked@example.test")
        self.assertEqual((verdict.action, verdict.text), (Action.REJECT, "Blocked by policy"))

    @defer.inlineCallbacks
    def test_nonsense_answer_is_tempfail(self):
        verdict = yield self.ask("weird@example.test")
        self.assertEqual((verdict.action, verdict.enhanced), (Action.TEMPFAIL, "4.3.0"))
        self.flushLoggedErrors(ValueError)

    @defer.inlineCallbacks
    def test_service_down_is_tempfail(self):
        yield self.port.stopListening()
        verdict = yield self.ask("ok@example.test")
        self.assertEqual((verdict.action, verdict.enhanced), (Action.TEMPFAIL, "4.3.0"))
        self.flushLoggedErrors()


class SenderRouterTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.router = testing.load(
            "sender_router:SenderRouter", [PLUGINS],
            senders={"marketing.example.test": {"via": "smtp", "host": "bulk.provider.test", "port": 587}},
        ).plugin

    def test_sender_domain_routed_to_its_smart_host(self):
        route = self.router.route(testing.envelope("news@Marketing.example.test"),
                                  testing.address("x@other.test"))
        self.assertEqual(route, Route(via="smtp", host="bulk.provider.test", port=587))

    def test_others_by_mx(self):
        route = self.router.route(testing.envelope("me@example.test"), testing.address("x@other.test"))
        self.assertEqual(route, Route(via="mx"))

    def test_null_sender_by_default_route(self):
        route = self.router.route(testing.envelope(None), testing.address("x@other.test"))
        self.assertEqual(route.via, "mx")

    def test_bad_route_refused_at_load(self):
        with self.assertRaises(PluginError):
            testing.load("sender_router:SenderRouter", [PLUGINS], default={"via": "carrier-pigeon"})
