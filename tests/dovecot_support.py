"""
A private Dovecot for the LMTP interoperation tests: Debian's Dovecot 2.3
(dovecot-core and dovecot-lmtpd) started in the foreground
(C{dovecot -F -c <folder>/dovecot.conf}) with its own configuration,
base_dir, state_dir, log and mail in a temporary folder, speaking only
LMTP on 127.0.0.1:<a free port>, never touching the system's Dovecot
(whose base_dir is /run/dovecot).

    dc = Dovecot(users=("carol", "dave"))
    dc.started(testcase)             # blocking; stopped and removed at cleanup
    dc.delivered("carol")            # files in carol@dovecot.test's Maildir new/

What the instance does:

  - C{protocols = lmtp}, C{ssl = no}; the LMTP service's only TCP
    listener is C{127.0.0.1:port} (its UNIX socket, and every other
    socket, lives in the private base_dir).
  - The userdb is a passwd-file listing C{users} (looked up by the local
    part: C{username_format=%n}), every one with the uid and gid of
    C{nobody}, its home C{mail/<user>} and its mail in
    C{maildir:~/Maildir}.  Anyone else is refused per recipient by
    Dovecot itself at RCPT (C{550 5.1.1 <address> User doesn't exist:
    ...}).
  - Logs (info and errors) go to C{dovecot.log} in the folder.

Dovecot's master must start as root (it drops to C{nobody} for the mail
store, and refuses uid 0 for mail access); it also needs the package's
C{dovecot} and C{dovenull} users.  L{require} turns a machine that cannot
do this into a skip, except under C{TWISTED_MTA_CI=1} (set by
C{.ci/run}), where it is a failure.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.e2e_support import free_port
from tests.processes import LocalPeer, alive, descendants, installed, require_peer, tool

DOMAIN = "dovecot.test"
HOSTNAME = "dovecot.test"
START_DEADLINE = 30.0
STOP_DEADLINE = 15.0


def problem() -> str | None:
    """Why a private Dovecot cannot be run here, or None."""
    for name in ("dovecot", "doveadm"):
        if not installed(name):
            return (f"{name} is not installed (apt-get install dovecot-core dovecot-lmtpd; "
                    ".ci/run does)")
    if not Path("/usr/lib/dovecot/lmtp").exists():
        return "Dovecot's LMTP server is not installed (apt-get install dovecot-lmtpd; .ci/run does)"
    if os.geteuid() != 0:
        return "Dovecot's master must start as root, and these tests do not run as root"
    for user in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"there is no {user!r} user (the Debian package makes it)"
    return None


def require(testcase) -> None:
    """Skip C{testcase} if Dovecot cannot run here (fail under CI)."""
    require_peer(testcase, problem(), "Dovecot")


CONF = """\
# A private Dovecot for twisted-mta's tests (tests/dovecot_support.py).
instance_name = {instance}
base_dir = {folder}/run
state_dir = {folder}/state
log_path = {folder}/dovecot.log
info_log_path = {folder}/dovecot.log
debug_log_path = {folder}/dovecot.log
hostname = {hostname}
postmaster_address = postmaster@{domain}
protocols = lmtp
listen = 127.0.0.1
ssl = no
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:~/Maildir
auth_mechanisms = plain
lmtp_proxy = no

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {folder}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {folder}/users
}}

service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


class Dovecot(LocalPeer):
    """A private Dovecot speaking LMTP; see the module docstring."""

    def __init__(self, users=("carol",)):
        self.users = list(users)
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.proc: subprocess.Popen | None = None
        # A short path outside the checkout (UNIX sockets live in base_dir),
        # which the mail user (nobody) can get through.
        self.folder = Path(tempfile.mkdtemp(prefix="mta-dc-"))
        os.chmod(self.folder, 0o755)
        self.conf = self.folder / "dovecot.conf"
        self.mail = self.folder / "mail"
        self.logfile = self.folder / "dovecot.log"
        self.outfile = self.folder / "dovecot.out"   # its stdout and stderr
        nobody = pwd.getpwnam("nobody")
        self.mail_uid, self.mail_gid = nobody.pw_uid, nobody.pw_gid
        self.mail.mkdir()
        os.chown(self.mail, self.mail_uid, self.mail_gid)
        self._write_config()

    @property
    def endpoint(self) -> str:
        """A Twisted client endpoint string for its LMTP listener."""
        return f"tcp:host={self.host}:port={self.port}"

    def _write_config(self) -> None:
        self.conf.write_text(CONF.format(
            instance=self.folder.name, folder=self.folder, hostname=HOSTNAME, domain=DOMAIN,
            port=self.port))
        # name:password:uid:gid:gecos:home:shell (the password is unused).
        (self.folder / "users").write_text("".join(
            f"{user}:{{PLAIN}}unused:{self.mail_uid}:{self.mail_gid}::{self.mail / user}::\n"
            for user in self.users))

    # --- running it ----------------------------------------------------------

    def start(self) -> "Dovecot":
        """Start it and wait until its LMTP listener greets (blocking)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.outfile, "ab") as out:
            self.proc = subprocess.Popen(
                [tool("dovecot"), "-F", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=5) as s:
                    s.settimeout(5)
                    if s.makefile("rb").readline().startswith(b"220 "):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self._stop()
                raise RuntimeError(f"dovecot did not greet on {self.port}\n--- dovecot.out:\n{out}\n"
                                   + self.log_tail())
            time.sleep(0.05)

    def _stop(self) -> str:
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        children = descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                pass
        for pid in [proc.pid] + children:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait()
        return self.outfile.read_text(errors="replace") if self.outfile.exists() else ""

    def stop(self) -> None:
        """Stop it (SIGTERM to its master) and wait for its processes to end."""
        self._stop()

    # --- looking at it -------------------------------------------------------

    def maildir(self, user: str) -> Path:
        return self.mail / user / "Maildir"

    def delivered(self, user: str) -> list[Path]:
        """The files in C{user}@dovecot.test's Maildir new/, by name."""
        new = self.maildir(user) / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def log_tail(self, n: int = 30) -> str:
        return "--- dovecot.log:\n" + "\n".join(self.log().splitlines()[-n:])
