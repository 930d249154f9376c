"""
End to end, the admin paths of issues 3 and 4 as a sysadmin meets them:
C{twistd -n mta --config FILE} runs as a real subprocess, and the
C{twisted-mta} command runs as a subprocess against it.

 - SIGHUP: a drop-in filter is activated, changed and broken by editing
   files and sending C{kill -HUP}; the outcome is read in twistd's log.
 - C{twisted-mta reload} and C{twisted-mta plugins}.
 - C{twisted-mta queue ...} on mail deferred by a route to a closed port,
   live and then read-only on the spool folder after the server stopped.

Every wait polls the log (or the command) until what it waits for shows,
with a generous deadline; nothing asserts how long anything takes.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from email import policy
from email.message import EmailMessage
from pathlib import Path

from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.test_cli import script

REPO_PLUGINS = e2e.REPO / "plugins"
SENDER = "alice@client.example.net"
BOB = "bob@example.test"
NO_EXE_TEXT = "Executable attachments are not accepted"
NEW_TEXT = "No programs by mail, please"
FILTER_NO_EXE = '\n[[filter]]\nuse = "no_exe:NoExe"\n'
FILTER_ADD_HEADER = '\n[[filter]]\nuse = "add_header:AddHeader"\nvalue = "admin-test"\n'


def site_folder(case: unittest.TestCase) -> Path:
    """
    A site folder with a short path: the control socket (spool/control.sock)
    must fit in a UNIX socket address, which trial's temp paths may not.
    """
    folder = Path(tempfile.mkdtemp(prefix="mta-adm-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder


def exe_message(n: int) -> bytes:
    m = EmailMessage()
    m["From"] = SENDER
    m["To"] = BOB
    m["Subject"] = f"the installer, take {n}"
    m["Message-ID"] = f"<exe{n}@client.example.net>"
    m.set_content("See the attachment.\n")
    m.add_attachment(b"MZ\x90\x00\x03\x00", maintype="application", subtype="octet-stream",
                     filename="setup.exe")
    return m.as_bytes(policy=policy.SMTP)


class LogWatcher:
    """Reads twistd.log from where it last stopped, waiting for a line to show."""

    def __init__(self, server: e2e.ServerProcess):
        self.server = server
        self.path = server.site.log_path
        self.offset = 0

    def skip(self) -> None:
        """Look only at what is logged from now on."""
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def wait(self, pattern: str, what: str | None = None) -> str:
        """The first new complete line matching the regular expression C{pattern}."""
        regex = re.compile(pattern)

        def find():
            if not self.server.running:
                raise AssertionError(f"twistd exited while waiting for {what or pattern}:\n"
                                     + self.server.output())
            if not self.path.exists():
                return None
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # complete lines only
            pos = 0
            for line in data[:end].split(b"\n"):
                pos += len(line) + 1
                text = line.decode("utf-8", "replace")
                if regex.search(text):
                    self.offset += pos
                    return text
            return None

        try:
            return e2e.wait_for_blocking(find, what or pattern)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.server.output()}")


class AdminMixin:
    def start(self, **site_options) -> None:
        self.folder = site_folder(self)
        (self.folder / "plugins").mkdir()
        self.site = e2e.Site(self.folder, {"smtp": "none"}, tls=False, **site_options)
        # plugin_paths is a top-level key: it goes before the first table.
        self.base = 'plugin_paths = ["plugins"]\n' + self.site.config_path.read_text()
        self.site.config_path.write_text(self.base)
        self.server = e2e.start_process(self, self.site, wait=False)
        self.log = LogWatcher(self.server)
        # The control channel listens last, after the SIGHUP handler is in place.
        self.log.wait(r"control: listening on", "the control channel")
        self.server.wait_listening()

    def configure(self, extra: str = "") -> None:
        self.site.config_path.write_text(self.base + extra)

    def cli(self, *args: str, config: bool = True) -> tuple[int, str, str]:
        """Run C{twisted-mta ARGS --config FILE}: (exit status, stdout, stderr)."""
        argv = script() + list(args)
        if config:
            argv += ["--config", str(self.site.config_path)]
        result = subprocess.run(argv, cwd=self.folder, capture_output=True,
                                stdin=subprocess.DEVNULL, timeout=120,
                                env=e2e.ServerProcess.environment())
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    def ok(self, *args: str) -> str:
        """Run the command, which must succeed quietly; its standard output."""
        code, out, err = self.cli(*args)
        self.assertEqual((code, err), (0, ""), f"twisted-mta {' '.join(args)}:\n{out}{err}")
        return out

    def send(self, message: bytes, recipient: str = BOB) -> tuple[int, str]:
        code, text = e2e.send(self.site.host, self.site.port(), SENDER, [recipient], message)
        return code, text.decode()


class ReloadTests(AdminMixin, unittest.TestCase):
    """Issue 4: a drop-in filter activated, changed and broken while twistd runs."""

    def setUp(self):
        self.start()
        self.plugin = self.folder / "plugins" / "no_exe.py"
        self.plugin.write_text((REPO_PLUGINS / "no_exe.py").read_text())
        (self.folder / "plugins" / "add_header.py").write_text(
            (REPO_PLUGINS / "add_header.py").read_text())

    def hup(self) -> None:
        self.log.skip()
        self.server.proc.send_signal(signal.SIGHUP)

    def break_plugin(self) -> int:
        """Append a syntax error to the plugin; the line number Python will name."""
        source = self.plugin.read_text()
        self.plugin.write_text(source + "\ndef broken(:\n")
        return len(source.splitlines()) + 2

    def test_sighup(self):
        code, text = self.send(exe_message(1))
        self.assertEqual(code, 250, text)

        # Activate the filter: the next transaction is refused by it.
        self.configure(FILTER_NO_EXE)
        self.hup()
        line = self.log.wait(r"reloaded: generation 2\b", "the first reload")
        self.assertIn("no_exe:NoExe", line)
        code, text = self.send(exe_message(2))
        self.assertEqual((code, text), (554, f"5.7.1 {NO_EXE_TEXT} (setup.exe)"))
        code, text = self.send(e2e.message("plain@client.example.net"))
        self.assertEqual(code, 250, text)

        # Edit the code: the new text shows.
        self.plugin.write_text(self.plugin.read_text().replace(NO_EXE_TEXT, NEW_TEXT))
        self.hup()
        self.log.wait(r"reloaded: generation 3\b", "the second reload")
        code, text = self.send(exe_message(3))
        self.assertEqual((code, text), (554, f"5.7.1 {NEW_TEXT} (setup.exe)"))

        # Break the file: refused with the file and the line; generation 3 runs on.
        line_number = self.break_plugin()
        self.hup()
        line = self.log.wait(r"reload refused", "the refusal")
        self.assertIn("generation 3 keeps running", line)
        self.assertIn(f"{self.plugin}:{line_number}", line)
        self.assertIn("SyntaxError", line)
        self.assertIn("filter[1]", line)
        code, text = self.send(exe_message(4))
        self.assertEqual((code, text), (554, f"5.7.1 {NEW_TEXT} (setup.exe)"))
        self.assertTrue(self.server.running)
        self.assertEqual(self.server.stop(), 0)

    def test_reload_command_and_plugins(self):
        out = self.ok("plugins")
        self.assertEqual(out.splitlines()[0], "generation 1")
        self.assertIn("filters: none\n", out)

        self.configure(FILTER_NO_EXE + FILTER_ADD_HEADER)
        self.assertEqual(self.ok("reload"), "reloaded: generation 2\n")
        out = self.ok("plugins")
        lines = out.splitlines()
        self.assertEqual(lines[0], "generation 2")
        self.assertEqual(lines[1], f"relay:   relay  ({e2e.REPO / 'twisted_mta/builtins/relay.py'})")
        self.assertEqual(lines[2],
                         f"router:  routes  ({e2e.REPO / 'twisted_mta/builtins/routes.py'})")
        self.assertEqual(lines[3:], [
            "filters, in order:",
            "  1. no_exe:NoExe  hooks: data  timeout: 30 s",
            f"     from {self.plugin}",
            "  2. add_header:AddHeader  hooks: data  timeout: 30 s",
            f"     from {self.folder / 'plugins' / 'add_header.py'}",
        ])
        listed = json.loads(self.ok("plugins", "--json"))
        self.assertEqual([(f["name"], f["origin"]) for f in listed["filters"]],
                         [("no_exe:NoExe", str(self.plugin)),
                          ("add_header:AddHeader", str(self.folder / "plugins" / "add_header.py"))])
        code, text = self.send(exe_message(1))
        self.assertEqual(code, 554, text)

        # A broken plugin: one line naming the file and the line, status 1.
        line_number = self.break_plugin()
        code, out, err = self.cli("reload")
        self.assertEqual((code, out), (1, ""), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("twisted-mta: reload refused: "), err)
        self.assertIn(f"{self.plugin}:{line_number}", err)
        self.assertIn("SyntaxError", err)
        self.log.wait(r"reload refused, generation 2 keeps running", "the refusal in the log")
        self.assertEqual(self.ok("plugins").splitlines()[0], "generation 2")
        code, text = self.send(exe_message(2))
        self.assertEqual(code, 554, text)

        # Mended: the next reload takes the next number.
        self.plugin.write_text((REPO_PLUGINS / "no_exe.py").read_text())
        self.assertEqual(self.ok("reload"), "reloaded: generation 3\n")
        self.assertEqual(self.server.stop(), 0)


ENTRY_KEYS = {"id", "sender", "recipients", "size", "arrival", "attempts", "next_try",
              "last_reply", "held", "active", "bounce"}
RECIPIENT_KEYS = {"address", "state", "attempts", "next_try", "last_reply"}


class QueueTests(AdminMixin, unittest.TestCase):
    """Issue 3: the queue commands against twistd, then on its spool after it stopped."""

    def setUp(self):
        self.closed = e2e.free_port()
        self.start(networks=["127.0.0.0/8"], relay_route=("127.0.0.1", self.closed),
                   delivery={"min_backoff": 3600, "max_backoff": 7200})
        self.refused = f"connect to 127.0.0.1[127.0.0.1]:{self.closed}: Connection refused"

    def queue(self) -> dict[str, dict]:
        listed = json.loads(self.ok("queue", "list", "--json"))
        return {e["id"]: e for e in listed}

    def wait_attempt(self, queue_id: str, n: int) -> None:
        """Wait for the log line of attempt C{n} on C{queue_id}."""
        self.log.wait(rf"{queue_id}: to=<[^>]*> status=deferred attempts={n}\b",
                      f"attempt {n} of {queue_id}")

    def test_queue_commands(self):
        recipients = ["ann@one.test", "ben@two.test", "cat@one.test"]
        ids = []
        for n, rcpt in enumerate(recipients):
            code, text = self.send(e2e.message(f"q{n}@client.example.net", to=rcpt), rcpt)
            self.assertEqual(code, 250, text)
            ids.append(e2e.queue_id(text.encode()))
        for queue_id in ids:
            self.wait_attempt(queue_id, 1)
        a, b, c = ids

        # queue list: postqueue -p's layout.
        out = self.ok("queue", "list")
        self.assertTrue(out.startswith("-Queue ID-"), out)
        self.assertTrue(out.endswith(" Kbytes in 3 Requests.\n"), out)
        for queue_id, rcpt in zip(ids, recipients):
            self.assertRegex(out, rf"\n{queue_id} +\d+ .* {re.escape(SENDER)}\n +"
                                  rf"{re.escape(rcpt)}  \[deferred, 1 attempt, next try ")
        self.assertIn(f"(451 4.4.1 {self.refused})", out)

        # queue list --json: one object per message with every field the issue names.
        before = time.time()
        queue = self.queue()
        self.assertEqual(list(queue), ids)
        for queue_id, rcpt in zip(ids, recipients):
            e = queue[queue_id]
            self.assertEqual(set(e), ENTRY_KEYS)
            self.assertEqual((e["id"], e["sender"], e["attempts"], e["held"]),
                             (queue_id, SENDER, 1, False))
            self.assertGreater(e["size"], 0)
            self.assertLessEqual(e["arrival"], before)
            self.assertGreater(e["next_try"], before + 1800)  # min_backoff is an hour
            self.assertEqual(e["last_reply"], f"451 4.4.1 {self.refused}")
            [r] = e["recipients"]
            self.assertEqual(set(r), RECIPIENT_KEYS)
            self.assertEqual((r["address"], r["state"], r["attempts"], r["last_reply"]),
                             (rcpt, "deferred", 1, f"451 4.4.1 {self.refused}"))
            self.assertEqual(r["next_try"], e["next_try"])

        # queue show: the state and the header block.
        out = self.ok("queue", "show", a)
        self.assertIn(f"id:         {a}\nstatus:     queued\nsender:     {SENDER}\n", out)
        self.assertIn("attempts:   1\n", out)
        self.assertIn("  ann@one.test  [deferred, 1 attempt, next try ", out)
        self.assertIn("Message-ID: <q0@client.example.net>\n", out)
        self.assertIn(f"by {e2e.HOSTNAME} (twisted-mta) with ESMTP id {a}", out)
        shown = json.loads(self.ok("queue", "show", "--json", a))
        self.assertEqual(set(shown), ENTRY_KEYS | {"headers"})

        # hold: a held message is not tried by a flush, and cannot be flushed by id.
        self.assertEqual(self.ok("queue", "hold", a), f"held: {a}\n")
        self.assertTrue(self.queue()[a]["held"])
        self.assertIn(f"{a}!", self.ok("queue", "list"))
        self.assertEqual(self.cli("queue", "flush", a),
                         (1, "", f"twisted-mta: {a} is on hold; release it to deliver it\n"))
        self.log.skip()
        self.assertEqual(self.ok("queue", "flush"), f"flushed: {b}\nflushed: {c}\n")
        self.wait_attempt(b, 2)
        self.wait_attempt(c, 2)
        queue = self.queue()
        self.assertEqual([queue[i]["attempts"] for i in ids], [1, 2, 2])

        # release: no longer held (tried at its next time).
        self.assertEqual(self.ok("queue", "release", a), f"released: {a}\n")
        self.assertFalse(self.queue()[a]["held"])

        # flush ID: one new attempt on that message.
        self.log.skip()
        attempts = self.queue()[b]["attempts"]
        self.assertEqual(self.ok("queue", "flush", b), f"flushed: {b}\n")
        self.wait_attempt(b, attempts + 1)
        self.assertEqual(self.queue()[b]["attempts"], attempts + 1)

        # flush --domain: the messages with recipients there.
        queue = self.queue()
        self.log.skip()
        self.assertEqual(self.ok("queue", "flush", "--domain", "one.test"),
                         f"flushed: {a}\nflushed: {c}\n")
        self.wait_attempt(a, queue[a]["attempts"] + 1)
        self.wait_attempt(c, queue[c]["attempts"] + 1)
        after = self.queue()
        self.assertEqual([after[i]["attempts"] for i in (a, c)],
                         [queue[a]["attempts"] + 1, queue[c]["attempts"] + 1])

        # delete: gone from the queue and from the spool folder.
        self.assertIn(c, self.site.queued_ids())
        self.assertEqual(self.ok("queue", "delete", c), f"deleted: {c}\n")
        self.assertNotIn(c, self.site.queued_ids())
        self.assertEqual(list(self.queue()), [a, b])
        self.assertEqual(self.cli("queue", "delete", c),
                         (1, "", f"twisted-mta: no such message: {c}\n"))
        live = self.queue()

        # Each change is logged with its id; asking is not logged at all.
        log = self.site.log_path.read_text()
        for line in (f"{a}: held by the administrator", f"{a}: released by the administrator",
                     f"{c}: deleted by the administrator", "control: flush all: 2 messages",
                     f"control: flush {b}: 1 message due now", "control: flush domain one.test: 2 "):
            self.assertIn(line, log)
        self.assertNotIn("ControlProtocol", log)

        # The server stops: list and show read the spool folder, changes are refused.
        self.assertEqual(self.server.stop(), 0)
        socket_path = self.folder / "spool" / "control.sock"
        self.assertFalse(socket_path.exists())
        not_running = f"the server is not running (control socket {socket_path}: no such socket)"
        note = (f"twisted-mta: {not_running}; read the spool folder {self.folder / 'spool'} "
                f"instead (read-only)\n")

        code, out, err = self.cli("queue", "list", "--json")
        self.assertEqual((code, err), (0, note))
        offline = {e["id"]: e for e in json.loads(out)}
        for e in offline.values():
            self.assertEqual(set(e), ENTRY_KEYS)
        for queue_id in (a, b):
            self.assertEqual({**offline[queue_id], "active": False},
                             {**live[queue_id], "active": False})
        code, out, err = self.cli("queue", "list")
        self.assertEqual((code, err), (0, note))
        self.assertIn(f"\n{b} ", out)
        self.assertTrue(out.endswith(" Kbytes in 2 Requests.\n"), out)
        code, out, err = self.cli("queue", "show", a)
        self.assertEqual((code, err), (0, note))
        self.assertIn(f"id:         {a}\n", out)
        self.assertIn("Message-ID: <q0@client.example.net>\n", out)

        for args in (("queue", "flush"), ("queue", "flush", a), ("queue", "flush", "--domain",
                     "one.test"), ("queue", "delete", a), ("queue", "hold", a),
                     ("queue", "release", a), ("reload",), ("plugins",)):
            self.assertEqual(self.cli(*args), (1, "", f"twisted-mta: {not_running}\n"), args)
        self.assertEqual(self.site.queued_ids(), {a, b})
        code, out, err = self.cli("queue", "list", "--json")
        self.assertEqual({e["id"]: e["held"] for e in json.loads(out)}, {a: False, b: False})
