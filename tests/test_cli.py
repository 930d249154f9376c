"""
C{twisted-mta check-config}: "ok" and status 0, or one line on standard
error naming the file, the key and the reason, and status 1.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from tests import e2e_support as e2e
from twisted_mta import cli

GOOD = """\
hostname = "mx.example.test"
[[listen]]
endpoint = "tcp:2525:interface=127.0.0.1"
tls = "starttls"
[relay]
local_domains = ["example.test"]
"""


def script() -> list[str]:
    """The installed console script next to this Python (else python -m)."""
    path = Path(sys.executable).parent / "twisted-mta"
    if path.exists():
        return [str(path)]
    return [sys.executable, "-m", "twisted_mta.cli"]


class CheckConfigTests(unittest.TestCase):
    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir()

    def write(self, text: str, name: str = "mta.toml") -> Path:
        path = self.folder / name
        path.write_text(text)
        return path

    def main(self, *argv: str, cwd: Path | None = None) -> tuple[int, str, str]:
        """Run cli.main in this process: (status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        here = os.getcwd()
        if cwd is not None:
            os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = cli.main(list(argv))
        finally:
            os.chdir(here)
        return status, out.getvalue(), err.getvalue()

    def run_script(self, *argv: str) -> tuple[int, str, str]:
        result = subprocess.run(script() + list(argv), cwd=self.folder, capture_output=True,
                                stdin=subprocess.DEVNULL, timeout=120,
                                env=e2e.ServerProcess.environment())
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    def assertOneLineError(self, result, *parts: str) -> str:
        status, out, err = result
        self.assertEqual(status, 1, (out, err))
        self.assertEqual(out, "")
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith("twisted-mta: "), lines[0])
        for part in parts:
            self.assertIn(part, lines[0])
        return lines[0]

    # --- the console script ---------------------------------------------------

    def test_script_ok(self):
        path = self.write(GOOD)
        self.assertEqual(self.run_script("check-config", str(path)), (0, "ok\n", ""))

    def test_script_error(self):
        path = self.write(GOOD.replace('tls = "starttls"', 'tls = "yes"'))
        line = self.assertOneLineError(self.run_script("check-config", str(path)))
        self.assertEqual(
            line, f'twisted-mta: {path}: listen[1].tls: expected one of none, starttls, '
                  f'require-starttls, implicit, got "yes"')

    def test_script_default_file(self):
        """Without a file: mta.toml in the working folder."""
        self.write(GOOD)
        self.assertEqual(self.run_script("check-config"), (0, "ok\n", ""))

    def test_script_without_a_command(self):
        """One usage line on standard error and status 2, as argparse programs do."""
        self.assertEqual(self.run_script(), (
            2, "", "usage: twisted-mta [-h] [--config FILE] "
                   "{check-config,reload,plugins,passwd,queue} ...\n"))
        self.assertEqual(self.run_script("queue"), (
            2, "", "usage: twisted-mta queue [-h] [--config FILE] "
                   "{list,show,flush,delete,hold,release} ...\n"))

    def test_script_usage_errors_one_line(self):
        for argv, start in ((["queue", "show"], "twisted-mta queue show: the following "
                             "arguments are required: id; usage: twisted-mta queue show "),
                            (["frob"], "twisted-mta: argument command: invalid choice: 'frob'"),
                            (["check-config", "--config"],
                             "twisted-mta check-config: argument --config: expected one argument")):
            status, out, err = self.run_script(*argv)
            self.assertEqual((status, out, err.count("\n")), (2, "", 1), err)
            self.assertTrue(err.startswith(start), err)

    def test_script_passwd(self):
        """C{passwd NAME --stdin} writes the [auth] users file."""
        path = self.write(GOOD + '[auth]\nusers = "users"\n')
        result = subprocess.run(script() + ["passwd", "alice", "--stdin", "--config", str(path)],
                                cwd=self.folder, capture_output=True, input=b"s3cret\n",
                                timeout=120, env=e2e.ServerProcess.environment())
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertIn(b"added alice in ", result.stdout)
        self.assertTrue((self.folder / "users").read_text().startswith("alice:"))

    # --- cli.main -----------------------------------------------------------------

    def test_ok_with_certificates(self):
        e2e.write_pki(self.folder)
        path = self.write(GOOD + '[tls]\ncertificate = "mx.pem"\nkey = "mx.key"\n')
        self.assertEqual(self.main("check-config", str(path)), (0, "ok\n", ""))

    def test_config_option(self):
        path = self.write(GOOD, "other.toml")
        self.assertEqual(self.main("check-config", "--config", str(path)), (0, "ok\n", ""))
        self.assertEqual(self.main("--config", str(path), "check-config"), (0, "ok\n", ""))

    def test_default_file_missing(self):
        self.assertOneLineError(self.main("check-config", cwd=self.folder),
                                "mta.toml: no such file")

    def test_errors(self):
        cases = [
            ("[limits\n", "not valid TOML"),
            (GOOD + "colour = 1\n", "relay.colour: unknown key"),
            ("colour = 1\n" + GOOD, ": colour: unknown key"),
            (GOOD + '[limits]\nmessage_size = "big"\n',
             'limits.message_size: expected a positive integer, got "big"'),
            (GOOD + '[tls]\ncertificate = "nope.pem"\nkey = "nope.key"\n',
             "tls.certificate: no such file"),
            (GOOD.replace("tcp:2525:interface=127.0.0.1", "tcp:port"), "listen[1].endpoint: bad endpoint"),
            (GOOD + 'networks = ["10.0.0.0/33"]\n', "relay.networks: not a network (CIDR)"),
            (GOOD + '[[route]]\ndomains = ["*"]\nvia = "pigeon"\n', "route[1].via: expected one of"),
        ]
        for text, reason in cases:
            path = self.write(text)
            self.assertOneLineError(self.main("check-config", str(path)), f"{path}", reason)

    def test_certificate_not_pem(self):
        """Files that exist but hold no certificate or key: one line naming the file."""
        (self.folder / "mx.pem").write_text("garbage\n")
        (self.folder / "mx.key").write_text("garbage\n")
        path = self.write(GOOD + '[tls]\ncertificate = "mx.pem"\nkey = "mx.key"\n')
        self.assertOneLineError(self.main("check-config", str(path)), f"{path}: tls: ", "mx.pem")

    def test_key_does_not_match(self):
        e2e.write_pki(self.folder)
        other = self.folder / "other"
        other.mkdir()
        e2e.write_pki(other)
        path = self.write(GOOD + '[tls]\ncertificate = "mx.pem"\nkey = "other/mx.key"\n')
        self.assertOneLineError(self.main("check-config", str(path)), f"{path}: tls: ",
                                "does not match")

    def test_unknown_plugin(self):
        path = self.write(GOOD + '[[filter]]\nuse = "no_such_module:NoSuchFilter"\n')
        self.assertOneLineError(self.main("check-config", str(path)), f"{path}: filter[1]",
                                "no_such_module")
