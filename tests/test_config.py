"""
The configuration file: every error is one line naming the file, the key
and the reason, and stops start-up; the embedded default loads.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from tests import e2e_support as e2e
from twisted_mta import config as configmod

GOOD = """\
hostname = "mx.example.test"
spool = "spool"

[[listen]]
endpoint = "tcp:2525:interface=127.0.0.1"
tls = "starttls"

[relay]
local_domains = ["example.test"]
networks = ["127.0.0.0/8", "::1/128"]
"""


class ErrorTests(unittest.TestCase):
    """Each kind of mistake gives one line: C{FILE: KEY: REASON}."""

    def setUp(self):
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.path = self.folder / "mta.toml"

    def error(self, text: str) -> str:
        """Load C{text} as mta.toml; the ConfigError's line (which must be one)."""
        self.path.write_text(text)
        with self.assertRaises(configmod.ConfigError) as caught:
            configmod.load(self.path)
        line = str(caught.exception)
        self.assertNotIn("\n", line)
        self.assertTrue(line.startswith(f"{self.path}: "), line)
        return line

    def assertError(self, text: str, key: str, *reason: str) -> str:
        line = self.error(text)
        self.assertTrue(line.startswith(f"{self.path}: {key}: "), line)
        for part in reason:
            self.assertIn(part, line)
        return line

    def test_good(self):
        """The baseline the other tests break loads."""
        self.path.write_text(GOOD)
        cfg = configmod.load(self.path)
        self.assertEqual(cfg.hostname, "mx.example.test")

    def test_bad_toml(self):
        line = self.error(GOOD + "\n[limits\nmessage_size = 5\n")
        self.assertIn("not valid TOML", line)
        self.assertIn("line", line)

    def test_missing_file(self):
        missing = self.folder / "nope.toml"
        with self.assertRaises(configmod.ConfigError) as caught:
            configmod.load(missing)
        self.assertEqual(str(caught.exception), f"{missing}: no such file")

    def test_unknown_top_level_key(self):
        self.assertError(GOOD.replace("spool =", 'colour = "blue"\nspool ='),
                         "colour", "unknown key")

    def test_unknown_key_in_tables(self):
        self.assertError(GOOD + "[limits]\nmessage_sise = 5\n", "limits.message_sise", "unknown key")
        self.assertError(GOOD + "[relay2]\n", "relay2", "unknown key")
        self.assertError(GOOD.replace('tls = "starttls"', 'tls = "starttls"\nport = 25'),
                         "listen[1].port", "unknown key")
        self.assertError(GOOD + '[[route]]\ndomains = ["example.test"]\nvia = "maildir"\nhots = "x"\n',
                         "route[1].hots", "unknown key")
        self.assertError(GOOD + "[tls]\ncertfile = \"x\"\n", "tls.certfile", "unknown key")
        self.assertError(GOOD.replace("networks", "network"), "relay.network", "unknown key")

    def test_second_listener_named(self):
        """Errors in the n-th table of an array name it listen[n]."""
        self.assertError(GOOD + '[[listen]]\nendpoint = "tcp:587"\ntls = "required"\n',
                         "listen[2].tls", '"required"')

    def test_wrong_types(self):
        self.assertError(GOOD + '[limits]\nmessage_size = "big"\n', "limits.message_size",
                         'expected a positive integer, got "big"')
        self.assertError(GOOD + "[limits]\nrecipients = -1\n", "limits.recipients",
                         "expected a positive integer, got -1")
        self.assertError(GOOD + "[limits]\nconnections = true\n", "limits.connections",
                         "expected a positive integer, got true")
        self.assertError(GOOD + "[limits]\ncommand_timeout = \"5m\"\n", "limits.command_timeout",
                         "expected a positive number")
        self.assertError(GOOD.replace('hostname = "mx.example.test"', "hostname = 5"),
                         "hostname", "expected a string, got 5")
        self.assertError(GOOD.replace('networks = ["127.0.0.0/8", "::1/128"]',
                                      'networks = "127.0.0.0/8"'),
                         "relay.networks", "expected a list of strings")
        self.assertError(GOOD.replace('local_domains = ["example.test"]', "local_domains = [1]"),
                         "relay.local_domains", "expected a list of strings")
        self.assertError('listen = "tcp:25"\n', "listen", "expected a list of [[listen]] tables")
        self.assertError("tls = 5\n" + GOOD, "tls", "expected a table, got 5")
        self.assertError("limits = []\n" + GOOD, "limits", "expected a table")

    def test_missing_certificate_file(self):
        line = self.assertError(GOOD + '[tls]\ncertificate = "mx.pem"\nkey = "mx.key"\n',
                                "tls.certificate", "no such file")
        self.assertIn(str(self.folder / "mx.pem"), line)
        (self.folder / "mx.pem").write_text("")
        line = self.assertError(GOOD + '[tls]\ncertificate = "mx.pem"\nkey = "mx.key"\n',
                                "tls.key", "no such file")
        self.assertIn(str(self.folder / "mx.key"), line)

    def test_certificate_without_key(self):
        e2e.write_pki(self.folder)
        self.assertError(GOOD + '[tls]\ncertificate = "mx.pem"\n', "tls.key",
                         "certificate and key go together")

    def test_bad_endpoint(self):
        for endpoint in ("tcp:smtp-port", "carrier-pigeon:25", "tcp:25:interfaze=127.0.0.1", ""):
            self.assertError(GOOD.replace("tcp:2525:interface=127.0.0.1", endpoint),
                             "listen[1].endpoint", "endpoint" if endpoint else "")
        line = self.error(GOOD.replace("tcp:2525:interface=127.0.0.1", "tcp:smtp-port"))
        self.assertIn('"tcp:smtp-port"', line)

    def test_listener_without_endpoint(self):
        self.assertError(GOOD.replace('endpoint = "tcp:2525:interface=127.0.0.1"\n', ""),
                         "listen[1].endpoint", "missing")

    def test_bad_cidr(self):
        for bad in ("10.0.0.0/33", "10.0.0.300/8", "::1/129", "localhost", "10.0.0.0/8/8"):
            line = self.assertError(
                GOOD.replace('"::1/128"', f'"{bad}"'), "relay.networks", "not a network (CIDR)")
            self.assertIn(f'"{bad}"', line)

    def test_bad_enums(self):
        """The README's example line, and the other fixed sets of names."""
        line = self.error(GOOD.replace('tls = "starttls"', 'tls = "yes"'))
        self.assertEqual(
            line, f'{self.path}: listen[1].tls: expected one of none, starttls, '
                  f'require-starttls, implicit, got "yes"')
        self.assertError(GOOD.replace('tls = "starttls"', 'tls = "starttls"\nauth = "maybe"'),
                         "listen[1].auth", "expected one of none, offer, require", '"maybe"')
        self.assertError(GOOD + '[limits]\nbare_newline = "fix"\n', "limits.bare_newline",
                         "expected one of reject, normalize", '"fix"')
        self.assertError(GOOD + '[[route]]\ndomains = ["example.test"]\nvia = "pigeon"\n',
                         "route[1].via", "expected one of maildir, lmtp, smtp, mx, discard")
        self.assertError(GOOD + '[[route]]\ndomains = ["*"]\nvia = "smtp"\nhost = "smarthost.test"\n'
                         'tls = "sometimes"\n', "route[1].tls",
                         "expected one of none, opportunistic, require, verify")

    def test_bad_domains(self):
        self.assertError(GOOD.replace('["example.test"]', '["example..test"]'),
                         "relay.local_domains", "not a domain")
        self.assertError(GOOD.replace('hostname = "mx.example.test"', 'hostname = "mx example"'),
                         "hostname", "not a host name")

    def test_auth_needs_users(self):
        self.assertError(GOOD.replace('endpoint = "tcp:2525:interface=127.0.0.1"',
                                      'endpoint = "tcp:2525:interface=127.0.0.1"\nauth = "offer"'),
                         "auth.users", "missing")

    def test_bad_sender_rule(self):
        self.assertError(GOOD + '\n[auth]\nsender_rule = ""\n', "auth.sender_rule",
                         "expected a plugin name")

    def test_bad_nameserver(self):
        self.assertError(GOOD + '\n[delivery]\nnameservers = ["ns.example.test"]\n',
                         "delivery.nameservers", "ns.example.test")

    def test_bad_control_endpoint(self):
        self.assertError('control = "bogus:x"\n' + GOOD, "control", "bad endpoint")


class ValueTests(unittest.TestCase):
    """What a good file becomes."""

    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir()

    def test_values(self):
        """Paths are relative to the file's folder, whatever the working folder."""
        pki = e2e.write_pki(self.folder)
        path = self.folder / "mta.toml"
        path.write_text(GOOD + '[tls]\ncertificate = "mx.pem"\nkey = "mx.key"\n'
                        '[[listen]]\nendpoint = "tcp:4650"\ntls = "implicit"\n'
                        "[limits]\nmessage_size = 1000\ncommand_timeout = 30\n")
        cwd = os.getcwd()
        os.chdir("/")
        self.addCleanup(os.chdir, cwd)
        cfg = configmod.load(os.path.relpath(path, "/"))
        self.assertEqual(cfg.spool, self.folder / "spool")
        self.assertEqual(cfg.tls.certificate, pki["certificate"])
        self.assertEqual(cfg.tls.key, pki["key"])
        self.assertEqual([(l.endpoint, l.tls) for l in cfg.listen],
                         [("tcp:2525:interface=127.0.0.1", "starttls"), ("tcp:4650", "implicit")])
        self.assertEqual(cfg.limits.message_size, 1000)
        self.assertEqual(cfg.limits.command_timeout, 30.0)
        self.assertEqual(cfg.limits.recipients, 100)
        self.assertEqual(cfg.relay.local_domains, ("example.test",))
        self.assertEqual(cfg.relay.networks, (ipaddress.ip_network("127.0.0.0/8"),
                                              ipaddress.ip_network("::1/128")))
        # Without [[route]]: local domains to Maildirs under mail/, the rest by MX.
        self.assertEqual([(r.domains, r.via) for r in cfg.routes],
                         [(("example.test",), "maildir"), (("*",), "mx")])
        self.assertEqual(cfg.routes[0].path, self.folder / "mail")

    def test_immutable(self):
        path = self.folder / "mta.toml"
        path.write_text(GOOD)
        cfg = configmod.load(path)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            cfg.hostname = "other.test"
        with self.assertRaises(dataclasses.FrozenInstanceError):
            cfg.limits.message_size = 1
        with self.assertRaises(dataclasses.FrozenInstanceError):
            cfg.listen[0].tls = "none"
        self.assertIsInstance(cfg.listen, tuple)
        self.assertIsInstance(cfg.relay.local_domains, tuple)
        with self.assertRaises(TypeError):
            cfg.raw["hostname"] = "x"

    def test_embedded_default(self):
        """The embedded default: loopback port 2525, STARTTLS, localhost, under the folder."""
        cfg = configmod.default(self.folder)
        self.assertEqual(cfg.hostname, "localhost")
        self.assertEqual([(l.endpoint, l.tls) for l in cfg.listen],
                         [("tcp:2525:interface=127.0.0.1", "starttls")])
        self.assertEqual(cfg.spool, self.folder / "spool")
        self.assertEqual(cfg.relay.local_domains, ("localhost",))
        self.assertIsNone(cfg.tls.certificate)
        self.assertEqual(cfg.routes[0].via, "maildir")
        self.assertEqual(cfg.routes[0].path, self.folder / "mail")
        self.assertEqual(set(cfg.relay.networks), {ipaddress.ip_network("127.0.0.0/8"),
                                                   ipaddress.ip_network("::1/128")})

    def test_embedded_default_prepares(self):
        """
        The service prepares on the embedded default (a generated
        certificate, the spool under the folder) without listening.
        """
        from twisted_mta.service import MTAService

        mta = MTAService(configmod.default(self.folder))
        mta.prepare()
        self.assertIsNotNone(mta.tls_options)
        self.assertTrue((self.folder / "spool" / "queue").is_dir())
        self.assertEqual(mta.ports, [])


class TwistdTests(unittest.TestCase):
    """C{twistd -n mta --config BAD} does not start, and says why in one line."""

    def run_twistd(self, folder: Path, *args: str, timeout: float = 120):
        site_pid = folder / "twistd.pid"
        log = folder / "twistd.log"
        result = subprocess.run(
            [sys.executable, "-c", e2e._TWISTD, "-n", f"--pidfile={site_pid}",
             f"--logfile={log}", "mta", *args],
            cwd=folder, env=e2e.ServerProcess.environment(), capture_output=True,
            stdin=subprocess.DEVNULL, timeout=timeout)
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    def assertRefused(self, folder: Path, config: Path, expected: str):
        code, out, err = self.run_twistd(folder, "--config", str(config))
        self.assertNotEqual(code, 0)
        lines = (out + err).splitlines()
        self.assertEqual(lines, [f"twisted-mta: {expected}"])
        # It never started: no log, no spool.
        self.assertFalse((folder / "twistd.log").exists())
        self.assertFalse((folder / "spool").exists())

    def test_bad_config(self):
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        bad = folder / "bad.toml"
        bad.write_text(GOOD + '[limits]\nmessage_size = "big"\n')
        self.assertRefused(folder, bad,
                           f'{bad}: limits.message_size: expected a positive integer, got "big"')

    def test_bad_toml(self):
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        bad = folder / "bad.toml"
        bad.write_text("hostname = \n")
        code, out, err = self.run_twistd(folder, "--config", str(bad))
        self.assertNotEqual(code, 0)
        lines = (out + err).splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(f"twisted-mta: {bad}: not valid TOML"), lines)

    def test_certificate_not_pem(self):
        """A certificate file that exists but is no certificate: one line too."""
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        (folder / "mx.pem").write_text("not a certificate\n")
        (folder / "mx.key").write_text("not a key\n")
        bad = folder / "mta.toml"
        bad.write_text(GOOD + '[tls]\ncertificate = "mx.pem"\nkey = "mx.key"\n')
        code, out, err = self.run_twistd(folder, "--config", str(bad))
        self.assertNotEqual(code, 0)
        lines = (out + err).splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(f"twisted-mta: {bad}: tls: "), lines)
        self.assertIn("mx.pem", lines[0])
        self.assertFalse((folder / "twistd.log").exists())

    def test_port_in_use(self):
        """
        A listener that cannot listen (its port is taken) stops start-up:
        twistd exits non-zero, naming the endpoint, instead of running
        without it.
        """
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        config = folder / "mta.toml"
        config.write_text(GOOD.replace("tcp:2525:interface=127.0.0.1", endpoint))
        try:
            code, out, err = self.run_twistd(folder, "--config", str(config), timeout=60)
        except subprocess.TimeoutExpired:
            self.fail("twistd kept running without its listener")
        self.assertNotEqual(code, 0)
        log = folder / "twistd.log"
        said = out + err + (log.read_text() if log.exists() else "")
        self.assertIn(f"listen[1].endpoint: cannot listen on {endpoint}", said)

    def test_missing_config(self):
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        self.assertRefused(folder, folder / "none.toml", f"{folder / 'none.toml'}: no such file")
