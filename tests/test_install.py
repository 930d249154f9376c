"""
The package installs with a plain, non-editable C{pip install} into a
fresh virtualenv, after which C{twistd} finds the C{mta} plugin, the
C{twisted-mta} script works, the installed service runs, and none of
Twisted's own files was replaced (issue 2, part 1: never ship
C{twisted/__init__.py} or C{twisted/plugins/__init__.py}).

Installing takes a while (pip fetches Twisted, cryptography...), so it
happens once per test process and the tests share the virtualenv.  Set
C{TWISTED_MTA_SKIP_INSTALL_TEST=1} to skip them when no package index is
reachable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from tests import e2e_support as e2e

_IGNORED = shutil.ignore_patterns(
    ".git", "_trial_temp*", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
    ".venv", "dropin.cache", "spool", "mail", "results")


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 900)
    result = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, **kwargs)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited with {result.returncode}:\n"
            + result.stdout.decode(errors="replace")[-4000:]
            + result.stderr.decode(errors="replace")[-4000:])
    return result


def _clean_env() -> dict:
    """The environment for the installed tools: nothing of the source tree."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONWARNINGS"):
        env.pop(name, None)
    return env


def copy_source(target: Path) -> Path:
    """
    A copy of the working tree (tracked and untracked files, not ignored
    ones), so that pip builds in a folder of its own and never writes
    build/ or *.egg-info into the tree other tests run from.
    """
    listed = None
    if (e2e.REPO / ".git").exists() and shutil.which("git"):
        result = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=e2e.REPO, capture_output=True)
        if result.returncode == 0:
            listed = [n for n in result.stdout.decode().split("\0") if n]
    if listed is None:
        shutil.copytree(e2e.REPO, target, ignore=_IGNORED)
        return target
    for name in listed:
        source = e2e.REPO / name
        if not source.is_file() or name.startswith("_trial_temp"):
            continue
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
    return target


class Installation:
    """A fresh virtualenv with the package installed from a copy of the tree."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.source = folder / "src"
        self.venv = folder / "venv"
        self.bin = self.venv / "bin"
        self.python = self.bin / "python"

    def install(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        copy_source(self.source)
        _run([sys.executable, "-m", "venv", str(self.venv)], env=_clean_env())
        self.pip("install", str(self.source))

    def pip(self, *args: str) -> subprocess.CompletedProcess:
        return _run([str(self.python), "-m", "pip", "--disable-pip-version-check", "-q", *args],
                    env=_clean_env(), cwd=self.folder)

    def run(self, *argv, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """A tool of the venv, from an empty folder, without the source tree."""
        empty = self.folder / "empty"
        empty.mkdir(exist_ok=True)
        return _run([str(a) for a in argv], env=_clean_env(), cwd=cwd or empty, timeout=300)


_installation: Installation | None = None
_failure: BaseException | None = None


def installation() -> Installation:
    """The shared installation, made on first use (once per test process)."""
    global _installation, _failure
    if os.environ.get("TWISTED_MTA_SKIP_INSTALL_TEST"):
        raise unittest.SkipTest("TWISTED_MTA_SKIP_INSTALL_TEST is set")
    if _failure is not None:
        raise AssertionError(f"the installation failed earlier: {_failure}")
    if _installation is None:
        inst = Installation(Path("test_install").resolve())
        try:
            inst.install()
        except BaseException as e:
            _failure = e
            raise
        _installation = inst
    return _installation


_CHECK_FILES = r"""
import base64, hashlib, json, sys
import importlib.metadata as md

ours = [str(f) for f in md.files("twisted-mta")]
twisted = md.distribution("twisted")
intact = {}
for name in ("twisted/__init__.py", "twisted/plugins/__init__.py"):
    entry = [f for f in twisted.files if str(f) == name][0]
    data = entry.locate().read_bytes()
    digest = hashlib.new(entry.hash.mode, data).digest()
    intact[name] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == entry.hash.value
import twisted_mta, twisted.plugins
print(json.dumps({"ours": ours, "intact": intact, "module": twisted_mta.__file__,
                  "plugins": list(twisted.plugins.__path__)}))
"""


class InstallTests(unittest.TestCase):
    timeout = 900  # the first test pays for the installation

    def setUp(self):
        self.inst = installation()

    def test_twistd_lists_mta(self):
        """`twistd --help` of the venv lists the mta plugin (no PYTHONPATH, not editable)."""
        out = self.inst.run(self.inst.bin / "twistd", "--help").stdout.decode()
        self.assertRegex(out, r"(?m)^\s+mta\s+A mail transfer agent")

    def test_check_config(self):
        """The twisted-mta console script works."""
        config = self.inst.folder / "check.toml"
        config.write_text('hostname = "mx.example.test"\n[relay]\nlocal_domains = ["example.test"]\n')
        result = self.inst.run(self.inst.bin / "twisted-mta", "check-config", config)
        self.assertEqual(result.stdout, b"ok\n")
        bad = self.inst.folder / "bad.toml"
        bad.write_text("colour = 1\n")
        failed = subprocess.run([str(self.inst.bin / "twisted-mta"), "check-config", str(bad)],
                                capture_output=True, env=_clean_env(), timeout=300)
        self.assertEqual(failed.returncode, 1)
        self.assertEqual(failed.stderr.decode(), f"twisted-mta: {bad}: colour: unknown key\n")

    def test_files(self):
        """
        What is installed is a real copy (not a link to the tree), and it
        holds no twisted/__init__.py or twisted/plugins/__init__.py:
        Twisted's own are still in place, unchanged.
        """
        info = json.loads(self.inst.run(self.inst.python, "-c", _CHECK_FILES).stdout)
        site = Path(info["module"]).parent.parent
        self.assertTrue(Path(info["module"]).is_relative_to(self.inst.venv), info["module"])
        self.assertIn("twisted/plugins/mta.py", info["ours"])
        self.assertNotIn("twisted/__init__.py", info["ours"])
        self.assertNotIn("twisted/plugins/__init__.py", info["ours"])
        self.assertEqual([f for f in info["ours"] if f.startswith("twisted/")
                          and f.endswith("__init__.py")], [])
        self.assertEqual(info["intact"], {"twisted/__init__.py": True,
                                          "twisted/plugins/__init__.py": True})
        # Twisted's own twisted.plugins package, in the venv (its __path__
        # then lists every other twisted/plugins folder on sys.path).
        self.assertEqual(info["plugins"][0], str(site / "twisted" / "plugins"))
        self.assertTrue((site / "twisted" / "plugins" / "mta.py").is_file())

    def test_runs_installed(self):
        """`twistd -n mta` from the venv receives a message over STARTTLS."""
        site = e2e.Site(self.mktemp(), {"smtp": "starttls"})
        server = e2e.ServerProcess(site, python=str(self.inst.python), source_tree=False)
        self.addCleanup(server.cleanup)
        server.start()
        code, text = e2e.send(site.host, site.port(), "alice@client.example.net",
                              ["bob@example.test"], e2e.message("installed@client.example.net"),
                              starttls=site.client_context())
        self.assertEqual(code, 250)
        e2e.queue_id(text)
        e2e.wait_for_blocking(lambda: site.delivered("bob@example.test"), "delivery")
        self.assertEqual(server.stop(), 0)
        self.assertIn(str(self.inst.venv), site.log_path.read_text())

    def test_uninstall_keeps_twisted(self):
        """
        `pip uninstall twisted-mta` removes the plugin and nothing of
        Twisted's: twistd still runs and lists its own plugins.
        (The package is installed again afterwards.)
        """
        self.inst.pip("uninstall", "-y", "twisted-mta")
        try:
            out = self.inst.run(self.inst.bin / "twistd", "--help").stdout.decode()
            self.assertNotRegex(out, r"(?m)^\s+mta\s")
            self.assertRegex(out, r"(?m)^\s+web\s")
            self.inst.run(self.inst.python, "-c",
                          "import twisted.plugins, twisted.web, twisted.scripts.twistd")
        finally:
            self.inst.pip("install", "--no-deps", str(self.inst.source))
        out = self.inst.run(self.inst.bin / "twistd", "--help").stdout.decode()
        self.assertRegex(out, r"(?m)^\s+mta\s")

