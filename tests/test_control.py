"""
The control channel (twisted_mta.control): every AMP command against the
real MTAService, in-process, over a real UNIX socket in a temp folder.
The delivery manager is not started, so the queue stays as the test
wrote it.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.protocols import amp
from twisted.trial import unittest

from twisted_mta import config as configmod
from twisted_mta import control
from twisted_mta.service import MTAService
from twisted_mta.spool.entry import DEFERRED, DELIVERED, QueueEntry, RecipientState
from twisted_mta.spool.store import Spool

CONFIG = """\
hostname = "mx.example.test"
plugin_paths = ["plugins"]
{control}
[[listen]]
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
[relay]
local_domains = ["example.test"]
{filters}
"""

TAGGER = '''
from zope.interface import implementer
from twisted_mta.interfaces import IDataFilter, IMailFilter

@implementer(IMailFilter, IDataFilter)
class Tagger:
    def mail(self, session, envelope):
        return None

    def data(self, session, envelope, message):
        return None
'''

MESSAGE = b"Subject: hello\r\nFrom: a@example.test\r\n\r\nbody\r\n"


def short_folder(case: unittest.TestCase) -> Path:
    """
    A temp folder with a short absolute path: a UNIX socket path must fit
    in 108 bytes, which trial's _trial_temp/<test id> paths may not.
    """
    import tempfile
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="mta-ctl-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder


def write_config(folder: Path, control_line: str = "", filters: str = "") -> Path:
    (folder / "plugins").mkdir(exist_ok=True)
    path = folder / "mta.toml"
    path.write_text(CONFIG.format(control=control_line, filters=filters))
    return path


def queue_message(spool_path: Path, sender="sender@example.test",
                  recipients=("user@remote.test",), message=MESSAGE, **fields) -> QueueEntry:
    """Write one committed message into the spool folder, as the server would."""
    spool = Spool(spool_path, reactor, inline=True)
    spool.prepare()
    incoming = spool.new_message()
    incoming.write(message)
    rcpts = [r if isinstance(r, RecipientState) else RecipientState(r) for r in recipients]
    entry = QueueEntry(id=incoming.id, sender=sender, recipients=rcpts,
                       arrival=fields.pop("arrival", time.time()), size=incoming.size, **fields)
    spool.commit(incoming, entry)
    spool.stop()
    return entry


def some_messages(spool_path: Path) -> list[QueueEntry]:
    """Three messages: one fresh, one deferred after an attempt, one on hold."""
    now = time.time()
    a = queue_message(spool_path, arrival=now - 30)
    b = queue_message(spool_path, sender="", arrival=now - 20, recipients=(
        RecipientState("x@remote.test", DEFERRED, 2, now + 600, "451 4.7.1 try later"),
        RecipientState("y@other.test", DELIVERED, 1, 0.0, "250 2.0.0 ok"),
    ))
    c = queue_message(spool_path, arrival=now - 10, held=True,
                      recipients=("z@remote.test", "w@other.test"))
    return [a, b, c]


class Server:
    """The real MTAService (not listening for SMTP, not delivering) with its control channel."""

    def __init__(self, case: unittest.TestCase, config_path: Path):
        self.mta = MTAService(configmod.load(config_path))
        # The service's own control channel once service.py has one; else ours.
        self.control = getattr(self.mta, "control", None) or control.ControlService(self.mta)
        self.control.prepare()
        self.mta.prepare()
        self.control.startService()
        case.addCleanup(self.stop)
        self.address = self.control.address

    @defer.inlineCallbacks
    def stop(self):
        yield self.control.stopService()
        self.mta.spool.stop()

    def call(self, command, **kwargs) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(control.call(reactor, self.address, command, **kwargs))


class CommandTests(unittest.TestCase):
    def setUp(self):
        self.folder = short_folder(self)
        (self.folder / "plugins").mkdir()
        (self.folder / "plugins" / "tagger.py").write_text(TAGGER)
        self.config = write_config(self.folder, filters='[[filter]]\nuse = "tagger:Tagger"')
        self.entries = some_messages(self.folder / "spool")
        self.server = Server(self, self.config)
        self.mta = self.server.mta

    def call(self, command, **kwargs):
        return self.server.call(command, **kwargs)

    @defer.inlineCallbacks
    def assertControlError(self, d, message):
        try:
            yield d
        except control.ControlError as e:
            self.assertEqual(str(e), message)
        else:
            self.fail(f"no ControlError {message!r}")

    # --- QueueList, QueueShow ------------------------------------------------

    @defer.inlineCallbacks
    def test_list(self):
        result = yield self.call(control.QueueList)
        listed = json.loads(result["json"])
        self.assertEqual([e["id"] for e in listed], [e.id for e in self.entries])
        a, b, c = listed
        self.assertEqual(set(a), {"id", "sender", "recipients", "size", "arrival", "attempts",
                                  "next_try", "held", "active", "bounce", "last_reply"})
        self.assertEqual(a["sender"], "sender@example.test")
        self.assertEqual(a["size"], len(MESSAGE))
        self.assertEqual(a["recipients"], [{"address": "user@remote.test", "state": "pending",
                                            "attempts": 0, "next_try": None, "last_reply": None}])
        self.assertEqual((a["held"], a["active"], a["attempts"], a["next_try"]),
                         (False, False, 0, None))
        self.assertEqual(b["sender"], "")
        self.assertEqual(b["attempts"], 2)
        self.assertEqual(b["last_reply"], "451 4.7.1 try later")
        self.assertEqual(b["next_try"], self.entries[1].recipients[0].next_try)
        self.assertEqual([r["state"] for r in b["recipients"]], ["deferred", "delivered"])
        self.assertIsNone(b["recipients"][1]["next_try"])
        self.assertTrue(c["held"])

    @defer.inlineCallbacks
    def test_list_empty(self):
        for e in self.entries:
            yield self.call(control.QueueDelete, id=e.id)
        result = yield self.call(control.QueueList)
        self.assertEqual(json.loads(result["json"]), [])

    @defer.inlineCallbacks
    def test_list_marks_active(self):
        self.mta.delivery.active[self.entries[0].id] = defer.Deferred()
        self.addCleanup(self.mta.delivery.active.clear)
        listed = json.loads((yield self.call(control.QueueList))["json"])
        self.assertEqual([e["active"] for e in listed], [True, False, False])

    @defer.inlineCallbacks
    def test_show(self):
        result = yield self.call(control.QueueShow, id=self.entries[1].id)
        shown = json.loads(result["json"])
        self.assertEqual(shown["id"], self.entries[1].id)
        self.assertEqual(shown["headers"], "Subject: hello\nFrom: a@example.test\n")
        self.assertEqual(shown["recipients"][0]["last_reply"], "451 4.7.1 try later")

    @defer.inlineCallbacks
    def test_show_includes_added_headers(self):
        entry = self.mta.delivery.entries[self.entries[0].id]
        entry.add_headers = [["X-Tag", "yes"]]
        shown = json.loads((yield self.call(control.QueueShow, id=entry.id))["json"])
        self.assertEqual(shown["headers"], "X-Tag: yes\nSubject: hello\nFrom: a@example.test\n")

    @defer.inlineCallbacks
    def test_show_larger_than_an_amp_value(self):
        """Answers beyond AMP's 64 KiB value limit arrive whole."""
        big = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"\xc3\xa9" * 60) for i in range(1200))
        entry = queue_message(self.folder / "spool", message=big + b"\r\nbody\r\n")
        self.mta.delivery.load([self.mta.spool.load(entry.id)])
        shown = json.loads((yield self.call(control.QueueShow, id=entry.id))["json"])
        self.assertGreater(len(shown["headers"].encode()), 2 * amp.MAX_VALUE_LENGTH)
        self.assertEqual(shown["headers"], big.decode().replace("\r\n", "\n"))

    def test_show_unknown(self):
        return self.assertControlError(self.call(control.QueueShow, id="NOSUCH"),
                                       "no such message: NOSUCH")

    def test_show_bad_id(self):
        return self.assertControlError(self.call(control.QueueShow, id="../queue"),
                                       "no such message: ../queue")

    # --- QueueFlush --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_flush_one(self):
        b = self.entries[1]
        result = yield self.call(control.QueueFlush, id=b.id)
        self.assertEqual(result["ids"], [b.id])
        self.assertEqual(self.mta.delivery.entries[b.id].recipients[0].next_try, 0.0)

    @defer.inlineCallbacks
    def test_flush_domain(self):
        result = yield self.call(control.QueueFlush, domain="Remote.TEST")
        # The held message is not made due, though it has such a recipient.
        self.assertEqual(result["ids"], [self.entries[0].id, self.entries[1].id])
        result = yield self.call(control.QueueFlush, domain="other.test")
        self.assertEqual(result["ids"], [])  # y@other.test was delivered; w@ is held

    @defer.inlineCallbacks
    def test_flush_all(self):
        result = yield self.call(control.QueueFlush)
        self.assertEqual(result["ids"], [self.entries[0].id, self.entries[1].id])

    def test_flush_unknown(self):
        return self.assertControlError(self.call(control.QueueFlush, id="NOSUCH"),
                                       "no such message: NOSUCH")

    def test_flush_held(self):
        c = self.entries[2]
        return self.assertControlError(self.call(control.QueueFlush, id=c.id),
                                       f"{c.id} is on hold; release it to deliver it")

    def test_flush_id_and_domain(self):
        return self.assertControlError(
            self.call(control.QueueFlush, id=self.entries[0].id, domain="remote.test"),
            "give a message id or a domain, not both")

    # --- QueueDelete, QueueHold, QueueRelease ---------------------------------------

    @defer.inlineCallbacks
    def test_delete(self):
        a = self.entries[0]
        result = yield self.call(control.QueueDelete, id=a.id)
        self.assertEqual(result, {"later": False})
        self.assertNotIn(a.id, self.mta.delivery.entries)
        self.assertFalse((self.folder / "spool" / "queue" / a.id).exists())
        yield self.assertControlError(self.call(control.QueueDelete, id=a.id),
                                      f"no such message: {a.id}")

    @defer.inlineCallbacks
    def test_delete_while_being_delivered(self):
        a = self.entries[0]
        self.mta.delivery.active[a.id] = defer.Deferred()
        self.addCleanup(self.mta.delivery.active.clear)
        result = yield self.call(control.QueueDelete, id=a.id)
        self.assertEqual(result, {"later": True})
        self.assertIn(a.id, self.mta.delivery._doomed)

    @defer.inlineCallbacks
    def test_hold_and_release(self):
        a = self.entries[0]
        yield self.call(control.QueueHold, id=a.id)
        self.assertTrue(self.mta.delivery.entries[a.id].held)
        self.assertTrue(Spool(self.folder / "spool", inline=True).load(a.id).held)
        yield self.call(control.QueueRelease, id=a.id)
        self.assertFalse(self.mta.delivery.entries[a.id].held)
        self.assertFalse(Spool(self.folder / "spool", inline=True).load(a.id).held)

    @defer.inlineCallbacks
    def test_unknown_ids(self):
        for command in (control.QueueDelete, control.QueueHold, control.QueueRelease):
            yield self.assertControlError(self.call(command, id="NOSUCH"),
                                          "no such message: NOSUCH")

    @defer.inlineCallbacks
    def test_internal_failure_is_one_line(self):
        def broken(queue_id):
            raise OSError(28, "No space left on device")

        self.patch(self.mta.delivery, "hold", broken)
        a = self.entries[0]
        yield self.assertControlError(
            self.call(control.QueueHold, id=a.id),
            f"holding {a.id} failed: [Errno 28] No space left on device")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    # --- Reload, Plugins ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_reload(self):
        result = yield self.call(control.Reload)
        self.assertEqual(result, {"generation": 2, "notes": []})
        self.assertEqual(self.mta.pipeline.generation, 2)

    @defer.inlineCallbacks
    def test_reload_says_what_it_could_not_apply(self):
        """A listener change is reported to the admin who reloaded, not only logged."""
        path = self.folder / "mta.toml"
        path.write_text(path.read_text().replace("interface=127.0.0.1", "interface=127.0.0.2", 1))
        result = yield self.call(control.Reload)
        self.assertEqual(result["generation"], 2)
        self.assertEqual(result["notes"], ["[[listen]] changed; listeners change only on restart"])

    @defer.inlineCallbacks
    def test_reload_refused(self):
        (self.folder / "plugins" / "tagger.py").write_text("def broken(:\n")
        try:
            yield self.call(control.Reload)
        except control.ReloadRefused as e:
            self.assertIn("tagger", str(e))
            self.assertNotIn("\n", str(e))
        else:
            self.fail("reload was not refused")
        self.assertEqual(self.mta.pipeline.generation, 1)

    @defer.inlineCallbacks
    def test_plugins(self):
        result = json.loads((yield self.call(control.Plugins))["json"])
        self.assertEqual(result["generation"], 1)
        self.assertEqual(result["relay"]["name"], "relay")
        self.assertEqual(result["router"]["name"], "routes")
        [f] = result["filters"]
        self.assertEqual(f["name"], "tagger:Tagger")
        self.assertEqual(f["hooks"], ["mail", "data"])
        self.assertEqual(f["origin"], str(self.folder / "plugins" / "tagger.py"))
        self.assertEqual(f["timeout"], 30.0)


class FakeMTA:
    """Just what the control channel uses of an MTAService."""

    def __init__(self, config, reload_result=None):
        self.config = config
        self.pipeline = None
        self.reload_result = reload_result

    def reload(self):
        return self.reload_result


class ReloadAgainstFakeTests(unittest.TestCase):
    def setUp(self):
        self.folder = short_folder(self)
        self.cfg = configmod.load(write_config(self.folder))
        (self.folder / "spool").mkdir()

    def serve(self, mta):
        svc = control.ControlService(mta, reactor)
        svc.startService()
        self.addCleanup(svc.stopService)
        return lambda command, **kw: defer.Deferred.fromCoroutine(
            control.call(reactor, svc.address, command, **kw))

    @defer.inlineCallbacks
    def test_reload_failure_reason(self):
        call = self.serve(FakeMTA(self.cfg, defer.fail(ValueError("mta.toml: relay: bad\nthing"))))
        try:
            yield call(control.Reload)
        except control.ReloadRefused as e:
            self.assertEqual(str(e), "mta.toml: relay: bad thing")
        else:
            self.fail("no error")

    @defer.inlineCallbacks
    def test_reload_deferred_generation(self):
        d = defer.Deferred()
        call = self.serve(FakeMTA(self.cfg, d))
        answer = call(control.Reload)
        reactor.callLater(0.01, d.callback, 7)
        self.assertEqual((yield answer), {"generation": 7, "notes": []})

    def test_plugins_before_any(self):
        call = self.serve(FakeMTA(self.cfg))
        d = call(control.Plugins)
        return self.assertFailure(d, control.ControlError)


class ServiceTests(unittest.TestCase):
    """Where the channel listens, with what mode, and what it does with a socket already there."""

    def setUp(self):
        self.folder = short_folder(self)

    def cfg(self, line=""):
        return configmod.load(write_config(self.folder, line))

    def test_default_address(self):
        address = control.control_address(self.cfg())
        self.assertEqual((address.kind, address.path, address.mode),
                         ("unix", self.folder / "spool" / "control.sock", 0o600))
        self.assertEqual(str(address), f"control socket {self.folder / 'spool' / 'control.sock'}")

    def test_relative_unix_path(self):
        address = control.control_address(self.cfg('control = "unix:run/ctl.sock:mode=660"'))
        self.assertEqual((address.path, address.mode), (self.folder / "run" / "ctl.sock", 0o660))

    def test_absolute_unix_path_with_escapes(self):
        address = control.control_address(self.cfg(r'control = "unix:address=/tmp/a\\:b.sock"'))
        self.assertEqual(address.path, Path("/tmp/a:b.sock"))

    def test_tcp_address(self):
        address = control.control_address(self.cfg('control = "tcp:7025:interface=127.0.0.1"'))
        self.assertEqual((address.kind, address.host, address.port), ("tcp", "127.0.0.1", 7025))
        address = control.control_address(self.cfg('control = "tcp:port=7026"'))
        self.assertEqual((address.host, address.port), ("127.0.0.1", 7026))

    def start(self, cfg):
        svc = control.ControlService(FakeMTA(cfg), reactor)
        svc.prepare()
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    def test_socket_mode_0600(self):
        (self.folder / "spool").mkdir()
        svc = self.start(self.cfg())
        st = os.stat(svc.address.path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)

    @defer.inlineCallbacks
    def test_stop_removes_socket(self):
        (self.folder / "spool").mkdir()
        svc = control.ControlService(FakeMTA(self.cfg()), reactor)
        svc.startService()
        self.assertTrue(svc.address.path.exists())
        yield svc.stopService()
        self.assertFalse(svc.address.path.exists())

    def test_refuses_beside_a_live_server(self):
        (self.folder / "spool").mkdir()
        self.start(self.cfg())
        second = control.ControlService(FakeMTA(self.cfg()), reactor)
        e = self.assertRaises(control.ControlStartupError, second.prepare)
        self.assertEqual(str(e), f"control socket {self.folder / 'spool' / 'control.sock'}: "
                                 "another server is running and answers on it")

    def test_removes_stale_socket(self):
        path = self.folder / "spool" / "control.sock"
        path.parent.mkdir()
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()  # the file stays; nobody listens
        svc = self.start(self.cfg())
        self.assertEqual(svc.port.getHost().name, str(path).encode())

    def test_path_too_long_is_logged_not_fatal(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        long_path = self.folder / ("d" * 120) / "control.sock"
        svc = self.start(self.cfg(f'control = "unix:{long_path}"'))
        self.assertIsNone(svc.port)
        [event] = [e for e in events if e.get("log_namespace") == "twisted_mta.control"]
        self.assertIn("longer than a UNIX socket allows", event["log_format"])

    def test_listen_failure_is_logged_not_fatal(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        svc = self.start(self.cfg('control = "unix:no/such/folder/control.sock"'))
        self.assertIsNone(svc.port)
        [event] = [e for e in events if e.get("log_namespace") == "twisted_mta.control"]
        self.assertIn("No such file or directory", event["why"])

    def test_refuses_a_file_that_is_not_a_socket(self):
        path = self.folder / "spool" / "control.sock"
        path.parent.mkdir()
        path.write_text("precious")
        svc = control.ControlService(FakeMTA(self.cfg()), reactor)
        e = self.assertRaises(control.ControlStartupError, svc.prepare)
        self.assertIn("is not a socket", str(e))
        self.assertEqual(path.read_text(), "precious")

    @defer.inlineCallbacks
    def test_tcp_control(self):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        cfg = self.cfg(f'control = "tcp:{port}:interface=127.0.0.1"')
        mta = FakeMTA(cfg, defer.succeed(3))
        svc = control.ControlService(mta, reactor)
        svc.prepare()
        svc.startService()
        self.addCleanup(svc.stopService)
        result = yield defer.Deferred.fromCoroutine(
            control.call(reactor, svc.address, control.Reload))
        self.assertEqual(result, {"generation": 3, "notes": []})


class ClientTests(unittest.TestCase):
    def setUp(self):
        self.folder = short_folder(self)
        self.cfg = configmod.load(write_config(self.folder))

    def call(self):
        return defer.Deferred.fromCoroutine(
            control.call(reactor, control.control_address(self.cfg), control.QueueList))

    @defer.inlineCallbacks
    def test_no_socket(self):
        try:
            yield self.call()
        except control.NotRunning as e:
            self.assertEqual(str(e), f"control socket {self.folder}/spool/control.sock: "
                                     "no such socket")
        else:
            self.fail("no NotRunning")

    @defer.inlineCallbacks
    def test_stale_socket(self):
        path = self.folder / "spool" / "control.sock"
        path.parent.mkdir()
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
        try:
            yield self.call()
        except control.NotRunning as e:
            self.assertTrue(str(e).endswith("connection refused"), str(e))
        else:
            self.fail("no NotRunning")

    @defer.inlineCallbacks
    def test_path_too_long(self):
        long_path = self.folder / ("d" * 120) / "control.sock"
        self.cfg = configmod.load(write_config(self.folder, f'control = "unix:{long_path}"'))
        try:
            yield self.call()
        except control.NotRunning as e:
            self.assertEqual(str(e), f"control socket {long_path}: "
                                     "the path is too long for a UNIX socket")
        else:
            self.fail("no NotRunning")
