"""
End to end: plugins swapped while the server runs (issue 4).  The real
service runs in-process on a loopback port; smtplib talks to it from a
thread.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from twisted_mta import config as configmod
from twisted_mta.service import MTAService, ReloadError

TOML = """
hostname = "mx.example.test"
plugin_paths = ["plugins"]
[[listen]]
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
[relay]
local_domains = ["example.test"]
{filters}
"""

TAGGER = '''
from zope.interface import implementer
from twisted_mta.interfaces import IDataFilter
from twisted_mta.values import AddHeader, Verdict

@implementer(IDataFilter)
class Tagger:
    def __init__(self, label="x"):
        self.label = label

    def data(self, session, envelope, message):
        return Verdict.continue_(AddHeader("X-Tagger", "{version} " + self.label))
'''


class ReloadTests(unittest.TestCase):
    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        (self.folder / "plugins").mkdir(parents=True)
        self.sent_ids: list[str] = []
        self.write_plugin(version="v1")
        self.write_config('[[filter]]\nuse = "tagger:Tagger"\nlabel = "one"')
        self.mta = MTAService(configmod.load(self.folder / "mta.toml"))
        self.mta.prepare()
        self.mta.startService()
        self.addCleanup(self.mta.stopService)
        return self.wait_listening()

    @defer.inlineCallbacks
    def wait_listening(self):
        while not self.mta.ports:
            yield deferLater(0.01)
        self.port = self.mta.ports[0].getHost().port

    def write_plugin(self, version=None, source=None):
        (self.folder / "plugins" / "tagger.py").write_text(
            source if source is not None else TAGGER.replace("{version}", version))

    def write_config(self, filters: str):
        (self.folder / "mta.toml").write_text(TOML.format(filters=filters))

    def send(self, n=1):
        """Send n messages in one session from a thread; fires with the queue ids."""
        def run():
            ids = []
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as s:
                s.ehlo()
                for i in range(n):
                    s.mail("sender@example.test")
                    s.rcpt("user@example.test")
                    code, text = s.data(b"Subject: t\r\n\r\nbody\r\n")
                    assert code == 250, (code, text)
                    ids.append(text.decode().rsplit(" ", 1)[1])
            self.sent_ids.extend(ids)
            return ids
        return deferToThread(run)

    @defer.inlineCallbacks
    def delivered_tags(self, count):
        """The X-Tagger values of the first `count` messages in the Maildir."""
        new = self.folder / "mail" / "user@example.test" / "new"
        for _ in range(500):
            files = sorted(new.glob("*")) if new.exists() else []
            if len(files) >= count:
                break
            yield deferLater(0.01)
        tags = []
        # In the order the messages were sent (their queue ids, in our
        # Received line): deliveries may finish out of order.
        sent = self.sent_ids

        def order(path):
            data = path.read_bytes()
            found = [i for i, qid in enumerate(sent) if f" id {qid}".encode() in data]
            return (found[0] if found else len(sent), path.stat().st_mtime_ns)

        for f in sorted(files, key=order):
            for line in f.read_bytes().split(b"\r\n"):
                if line.startswith(b"X-Tagger: "):
                    tags.append(line[10:].decode())
        return tags

    @defer.inlineCallbacks
    def test_edit_and_reload_runs_new_code(self):
        yield self.send()
        self.write_plugin(version="v2")
        generation = yield self.mta.reload()
        self.assertEqual(generation, 2)
        yield self.send()
        tags = yield self.delivered_tags(2)
        self.assertEqual(tags, ["v1 one", "v2 one"])

    @defer.inlineCallbacks
    def test_config_change_reloads_options(self):
        self.write_config('[[filter]]\nuse = "tagger:Tagger"\nlabel = "two"')
        yield self.mta.reload()
        yield self.send()
        self.assertEqual((yield self.delivered_tags(1)), ["v1 two"])

    @defer.inlineCallbacks
    def test_transaction_in_progress_finishes_on_old_code(self):
        client = smtplib.SMTP()

        def begin():
            client.connect("127.0.0.1", self.port)
            client.ehlo()
            client.mail("sender@example.test")

        def finish():
            client.rcpt("user@example.test")
            code, text = client.data(b"Subject: t\r\n\r\nbody\r\n")
            self.sent_ids.append(text.decode().rsplit(" ", 1)[1])
            client.quit()
            return code

        yield deferToThread(begin)
        self.write_plugin(version="v2")
        yield self.mta.reload()
        code = yield deferToThread(finish)
        self.assertEqual(code, 250)
        yield self.send()  # a new session: the new generation
        self.assertEqual((yield self.delivered_tags(2)), ["v1 one", "v2 one"])

    @defer.inlineCallbacks
    def assert_refused(self, *fragments):
        with self.assertRaises(ReloadError) as e:
            yield self.mta.reload()
        for fragment in fragments:
            self.assertIn(fragment, str(e.exception))
        self.assertEqual(self.mta.pipeline.generation, 1)
        yield self.send()  # the old generation keeps working
        self.assertEqual((yield self.delivered_tags(1)), ["v1 one"])

    def test_syntax_error_refused_with_file_and_line(self):
        self.write_plugin(source=TAGGER.replace("{version}", "v2") + "\ndef broken(:\n")
        path = str(self.folder / "plugins" / "tagger.py")
        line = len((TAGGER + "\n").splitlines()) + 1
        return self.assert_refused(f"{path}:{line}", "SyntaxError", "filter[1]")

    def test_missing_method_refused(self):
        self.write_plugin(source=TAGGER.replace("{version}", "v2").replace("def data(", "def dta("))
        return self.assert_refused("tagger:Tagger", "data")

    def test_bad_option_refused(self):
        self.write_config('[[filter]]\nuse = "tagger:Tagger"\ncolour = "red"')
        return self.assert_refused("filter[1]", "bad options", "colour")

    def test_exception_at_import_refused(self):
        self.write_plugin(source="raise RuntimeError('no database')\n" + TAGGER.replace("{version}", "v2"))
        return self.assert_refused("tagger.py:1", "RuntimeError", "no database")

    def test_bad_config_refused(self):
        self.write_config('[[filter]]\nuse = "tagger:Tagger"\n[limits]\nrecipients = "many"')
        return self.assert_refused("mta.toml", "limits.recipients")

    @defer.inlineCallbacks
    def test_old_generation_modules_forgotten(self):
        import gc
        import sys
        self.write_plugin(version="v2")
        yield self.mta.reload()
        self.write_plugin(version="v3")
        yield self.mta.reload()
        gc.collect()
        names = [n for n in sys.modules if n.startswith("twisted_mta_plugin_g") and n.endswith("_tagger")]
        self.assertEqual(names, ["twisted_mta_plugin_g3_tagger"])


def deferLater(seconds):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


class CertificateReloadTests(unittest.TestCase):
    """[tls] files are re-read by a reload; new STARTTLS sessions get the new certificate."""

    def setUp(self):
        from twisted_mta.smtp import tls
        self.tls = tls
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir(parents=True)
        self.write_cert("first.example.test")
        (self.folder / "mta.toml").write_text(
            'hostname = "mx.example.test"\n[tls]\ncertificate = "mx.pem"\nkey = "mx.key"\n'
            '[[listen]]\nendpoint = "tcp:0:interface=127.0.0.1"\n[relay]\nlocal_domains = ["example.test"]\n')
        self.mta = MTAService(configmod.load(self.folder / "mta.toml"))
        self.mta.prepare()
        self.mta.startService()
        self.addCleanup(self.mta.stopService)

    def write_cert(self, name):
        key, chain = self.tls.self_signed(name)
        key_pem, chain_pem = self.tls.pem(key, chain)
        (self.folder / "mx.key").write_bytes(key_pem)
        (self.folder / "mx.pem").write_bytes(chain_pem)

    def peer_name(self):
        import ssl

        from cryptography import x509
        port = self.mta.ports[0].getHost().port

        def run():
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.starttls(context=context)
                der = s.sock.getpeercert(binary_form=True)
            cert = x509.load_der_x509_certificate(der)
            return cert.subject.rfc4514_string()
        return deferToThread(run)

    @defer.inlineCallbacks
    def test_new_certificate_after_reload(self):
        while not self.mta.ports:
            yield deferLater(0.01)
        self.assertEqual((yield self.peer_name()), "CN=first.example.test")
        self.write_cert("second.example.test")
        yield self.mta.reload()
        self.assertEqual((yield self.peer_name()), "CN=second.example.test")

    @defer.inlineCallbacks
    def test_bad_certificate_refuses_reload(self):
        while not self.mta.ports:
            yield deferLater(0.01)
        (self.folder / "mx.pem").write_bytes(b"not a certificate")
        with self.assertRaises(ReloadError) as e:
            yield self.mta.reload()
        self.assertIn("mx.pem", str(e.exception))
        self.assertEqual((yield self.peer_name()), "CN=first.example.test")


STAMP = '''
from zope.interface import implementer
from twisted_mta.interfaces import IDataFilter, IMailFilter
from twisted_mta.smtp.grammar import Address
from twisted_mta.values import AddHeader, RewriteSender, Verdict

GENERATION = {generation}

@implementer(IMailFilter, IDataFilter)
class Stamp:
    def mail(self, session, envelope):
        # The sender carries the generation that judged MAIL...
        sender = envelope.sender
        return Verdict.continue_(RewriteSender(Address(f"g{{GENERATION}}-{{sender.local}}", sender.domain)))

    def data(self, session, envelope, message):
        # ...and the header the one that judged DATA: they must agree.
        return Verdict.continue_(AddHeader("X-Stamp", f"g{{GENERATION}}"))
'''


class ReloadUnderLoadTests(unittest.TestCase):
    """Mail keeps flowing, judged coherently, while the plugins are swapped."""

    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        (self.folder / "plugins").mkdir(parents=True)
        self.write_stamp(1)
        (self.folder / "mta.toml").write_text(TOML.format(filters='[[filter]]\nuse = "stamp:Stamp"'))
        self.mta = MTAService(configmod.load(self.folder / "mta.toml"))
        self.mta.prepare()
        self.mta.startService()
        self.addCleanup(self.mta.stopService)
        self.port = self.mta.ports[0].getHost().port

    def write_stamp(self, generation: int) -> None:
        (self.folder / "plugins" / "stamp.py").write_text(STAMP.format(generation=generation))

    def send(self, sender: str, n: int):
        def run():
            ids = []
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
                for i in range(n):
                    code, text = s.sendmail(f"{sender}@example.test", ["user@example.test"],
                                            f"Subject: {sender} {i}\r\n\r\nbody\r\n".encode()) or (250, b"")
                    ids.append(i)
            return ids
        return deferToThread(run)

    @defer.inlineCallbacks
    def test_200_messages_through_20_reloads(self):
        """
        Four clients send 50 messages each while the plugin file is
        rewritten and reloaded 20 times: every message is accepted and
        delivered once, and the generation that judged its MAIL also
        judged its DATA.
        """
        senders = [self.send(f"c{k}", 50) for k in range(4)]
        generations = []
        for generation in range(2, 22):
            self.write_stamp(generation)
            generations.append((yield self.mta.reload()))
            yield deferLater(0.02)
        results = yield defer.gatherResults(senders, consumeErrors=True)
        self.assertEqual([len(r) for r in results], [50] * 4)
        self.assertEqual(generations, list(range(2, 22)))

        new = self.folder / "mail" / "user@example.test" / "new"
        for _ in range(1000):
            files = list(new.glob("*")) if new.exists() else []
            if len(files) >= 200:
                break
            yield deferLater(0.01)
        self.assertEqual(len(files), 200)
        seen, used = set(), set()
        for f in files:
            data = f.read_bytes()
            head = data.split(b"\r\n\r\n", 1)[0].decode()
            fields = dict(line.split(": ", 1) for line in head.split("\r\n") if ": " in line)
            mail_gen = fields["Return-Path"].strip("<>").split("-", 1)[0]
            self.assertEqual(fields["X-Stamp"], mail_gen, head)
            seen.add(fields["Subject"])
            used.add(mail_gen)
        self.assertEqual(len(seen), 200)  # each message once
        # The load really spanned reloads (not all judged by one generation).
        self.assertGreater(len(used), 1, used)
