"""
A private Postfix instance for the interoperation tests: Debian's Postfix
run as a second instance (C{postfix -c <folder>/etc start}) with its own
config, queue and data folders in a temporary folder, listening only on
127.0.0.1:<a free port>, never touching the system's Postfix.

    pf = Postfix(relay_port=site.port(), relay_ca=site.ca)
    pf.start()                       # blocking; the test's cleanup stops it
    pf.delivered("carol")            # files in its Maildir for carol@postfix.test

What the instance does:

  - C{postfix.test} (L{DOMAIN}) is a virtual mailbox domain: the users in
    C{mailboxes} get a Maildir under C{vmail/postfix.test/<user>/}
    (C{virtual_mailbox_maps} is a C{texthash:} table, so no postmap); any
    other user there is refused at RCPT with Postfix's own
    C{550 5.1.1 ... User unknown in virtual mailbox table}.
  - C{recipient_access}: C{{address: "450 4.2.0 text"}} refuses those
    recipients at RCPT with that reply (C{check_recipient_access}).
  - Everything else goes to C{relayhost = [127.0.0.1]:relay_port} (when
    given), over STARTTLS at level C{secure}: the certificate must chain
    to C{relay_ca} and name C{relay_match} (C{smtp_tls_policy_maps}).
  - Its own server certificate (L{tests.e2e_support.write_pki}, for
    C{postfix.test}, localhost, 127.0.0.1 and ::1; L{ca} is its CA)
    makes STARTTLS available on its listener, with the TLS details in the
    Received header.
  - C{sasl_users}: C{{name: password}} enables AUTH (PLAIN, LOGIN, after
    STARTTLS only) through Cyrus SASL with a private sasldb (needs
    C{saslpasswd2}, Debian's sasl2-bin, and libsasl2-modules).
  - Clients in 127.0.0.0/8 may relay.  Logs go to C{maillog} in the
    folder (postlogd).

Postfix's master must start as root (C{mail_owner} is the C{postfix}
user of the Debian package).  L{require} turns a machine that cannot do
this into a skip, except under C{TWISTED_MTA_CI=1} (set by C{.ci/run}),
where it is a failure.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.e2e_support import free_port, write_pki
from tests.processes import LocalPeer, alive, descendants, installed, require_peer, tool

DOMAIN = "postfix.test"
HOSTNAME = "postfix.test"
START_DEADLINE = 60.0


def problem() -> str | None:
    """Why a private Postfix cannot be run here, or None."""
    for name in ("postfix", "postconf", "postqueue"):
        if not installed(name):
            return f"{name} is not installed (apt-get install postfix; .ci/run does)"
    if os.geteuid() != 0:
        return "Postfix's master must start as root, and these tests do not run as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no 'postfix' user (the Debian package makes it)"
    return None


def require(testcase, sasl: bool = False) -> None:
    """Skip C{testcase} if Postfix (and with C{sasl}, saslpasswd2) cannot run here (fail under CI)."""
    why = problem()
    if why is None and sasl and not installed("saslpasswd2"):
        why = "saslpasswd2 is not installed (apt-get install sasl2-bin; .ci/run does)"
    require_peer(testcase, why, "Postfix")


QUEUE_FOLDERS = ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
                 "private", "maildrop", "public", "pid", "saved", "trace")

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix(LocalPeer):
    """A private Postfix instance; see the module docstring."""

    def __init__(self, *, mailboxes=("carol",), relay_port: int | None = None,
                 relay_ca: Path | None = None, relay_match: str = "mx.example.test",
                 recipient_access: dict | None = None, sasl_users: dict | None = None,
                 extra: dict | None = None):
        self.mailboxes = list(mailboxes)
        self.relay_port = relay_port
        self.relay_ca = relay_ca
        self.relay_match = relay_match
        self.recipient_access = dict(recipient_access or {})
        self.sasl_users = dict(sasl_users or {})
        self.extra = dict(extra or {})
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.master_pid: int | None = None
        # A short path outside the checkout: every Postfix daemon (as the
        # postfix user) must be able to get in.
        self.folder = Path(tempfile.mkdtemp(prefix="mta-pf-"))
        os.chmod(self.folder, 0o755)
        self.etc = self.folder / "etc"
        self.queue = self.folder / "queue"
        self.data = self.folder / "data"
        self.vmail = self.folder / "vmail"
        self.maillog = self.folder / "maillog"
        for d in (self.etc, self.queue, self.data, self.vmail):
            d.mkdir()
        self.pki = write_pki(self.etc, HOSTNAME)
        nobody = pwd.getpwnam("nobody")
        self.vmail_uid, self.vmail_gid = nobody.pw_uid, nobody.pw_gid

    @property
    def ca(self) -> Path:
        """Its server certificate's CA (for a client that verifies it)."""
        return self.pki["ca"]

    # --- configuration -------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        etc = self.etc
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.folder),
            "myhostname": HOSTNAME,
            "mydomain": DOMAIN,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_banner": "$myhostname ESMTP Postfix",
            "smtpd_relay_restrictions":
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_recipient_restrictions": f"check_recipient_access texthash:{etc}/recipient_access",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtputf8_enable": "yes",
            "message_size_limit": "52428800",
            "virtual_mailbox_limit": "0",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": str(self.vmail),
            "virtual_mailbox_maps": f"texthash:{etc}/vmailbox",
            "virtual_uid_maps": f"static:{self.vmail_uid}",
            "virtual_gid_maps": f"static:{self.vmail_gid}",
            "virtual_minimum_uid": "100",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(self.pki["certificate"]),
            "smtpd_tls_key_file": str(self.pki["key"]),
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_loglevel": "1",
            "smtp_tls_loglevel": "1",
            "smtp_tls_security_level": "may",
            # Retry deferred mail soon (the tests flush it anyway).
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "10s",
            "queue_run_delay": "5s",
        }
        if self.relay_port is not None:
            cf["default_transport"] = "smtp"
            cf["relayhost"] = f"[127.0.0.1]:{self.relay_port}"
            if self.relay_ca is not None:
                cf["smtp_tls_CAfile"] = str(self.relay_ca)
                cf["smtp_tls_policy_maps"] = f"texthash:{etc}/tls_policy"
        else:
            cf["default_transport"] = "error:no relay host in this test"
            cf["relayhost"] = ""
        if self.sasl_users:
            cf.update({
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "cyrus",
                "smtpd_sasl_path": "smtpd",
                "cyrus_sasl_config_path": f"{etc}/sasl",
                "smtpd_sasl_security_options": "noanonymous",
                "smtpd_tls_auth_only": "yes",
                "smtpd_sasl_local_domain": DOMAIN,
            })
        cf.update(self.extra)
        return cf

    def _write_config(self) -> None:
        etc = self.etc
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main_cf().items()))
        (etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (etc / "vmailbox").write_text("".join(
            f"{user}@{DOMAIN} {DOMAIN}/{user}/\n" for user in self.mailboxes))
        (etc / "recipient_access").write_text("".join(
            f"{address} {action}\n" for address, action in self.recipient_access.items()))
        if self.relay_port is not None and self.relay_ca is not None:
            (etc / "tls_policy").write_text(
                f"[127.0.0.1]:{self.relay_port} secure match={self.relay_match}\n")
        if self.sasl_users:
            self._write_sasl()
        # Postfix waits (about 2 s) for a configuration or table file that
        # changed within the last seconds to settle: these are final.
        past = time.time() - 60
        for path in etc.rglob("*"):
            os.utime(path, (past, past))
        os.chown(self.data, pwd.getpwnam("postfix").pw_uid, -1)
        os.chmod(self.data, 0o700)
        os.chown(self.vmail, self.vmail_uid, self.vmail_gid)
        self._make_queue()

    def _make_queue(self) -> None:
        """
        The queue's folders as Postfix's postfix-files lists them, and the
        C{quick-start} flag that makes C{postfix start} skip its integrity
        check: that check (C{postfix set-permissions}) also walks the
        system's Postfix files and takes seconds.
        """
        try:
            postdrop = grp.getgrnam("postdrop").gr_gid
        except KeyError:
            return  # let postfix start's own check make them
        owner = pwd.getpwnam("postfix").pw_uid
        for name in QUEUE_FOLDERS:
            path = self.queue / name
            path.mkdir(exist_ok=True)
            group = postdrop if name in ("maildrop", "public") else -1
            os.chown(path, 0 if name == "pid" else owner, group)
            os.chmod(path, {"maildrop": 0o730, "public": 0o710, "pid": 0o755}.get(name, 0o700))
        (self.queue / "quick-start").touch()

    def _write_sasl(self) -> None:
        # Debian's Postfix reads <config_directory>/sasl/smtpd.conf; the
        # database stays outside the config folder (postfix check wants
        # everything there owned by root).
        conf = self.etc / "sasl"
        conf.mkdir(exist_ok=True)
        (self.folder / "sasldb").mkdir(exist_ok=True)
        db = self.folder / "sasldb" / "sasldb2"
        (conf / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
            f"sasldb_path: {db}\n")
        for user, password in self.sasl_users.items():
            r = subprocess.run([tool("saslpasswd2"), "-f", str(db), "-p", "-c", "-u", DOMAIN, user],
                               input=password.encode() + b"\n", capture_output=True)
            if r.returncode != 0:
                raise RuntimeError(f"saslpasswd2 failed: {r.stdout!r} {r.stderr!r}")
        postfix = pwd.getpwnam("postfix")
        os.chown(db, postfix.pw_uid, postfix.pw_gid)
        os.chmod(db, 0o600)

    # --- start and stop ------------------------------------------------------

    def start(self) -> "Postfix":
        """Configure and start the instance; wait for its greeting (blocking)."""
        self._write_config()
        r = subprocess.run([tool("postfix"), "-c", str(self.etc), "start"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                               + self.log_tail())
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + START_DEADLINE
        while self.master_pid is None:
            try:
                self.master_pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                if time.monotonic() > deadline:
                    raise RuntimeError("postfix: no master.pid\n" + self.log_tail())
                time.sleep(0.05)
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=10) as s:
                    if s.makefile("rb").readline().startswith(b"220 "):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline or not alive(self.master_pid):
                self.stop()
                raise RuntimeError(f"postfix did not greet on {self.port}\n" + self.log_tail())
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the instance (and only it) and wait for its processes to end."""
        master, self.master_pid = self.master_pid, None
        if master is None:
            return
        children = descendants(master)
        subprocess.run([tool("postfix"), "-c", str(self.etc), "stop"], capture_output=True)
        deadline = time.monotonic() + 20
        while alive(master) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in [master] + children + descendants(master):
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # --- looking at it -------------------------------------------------------

    def maildir(self, user: str) -> Path:
        return self.vmail / DOMAIN / user

    def delivered(self, user: str) -> list[Path]:
        """The files in C{user}@postfix.test's Maildir new/, by name."""
        new = self.maildir(user) / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def log_tail(self, n: int = 30) -> str:
        return "--- postfix maillog:\n" + "\n".join(self.log().splitlines()[-n:])

    def queue_list(self) -> list[dict]:
        """C{postqueue -j}: one dict per message in its queues."""
        r = subprocess.run([tool("postqueue"), "-c", str(self.etc), "-j"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"postqueue -j failed: {r.stdout}{r.stderr}")
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        """C{postqueue -f}: try the deferred mail now."""
        subprocess.run([tool("postqueue"), "-c", str(self.etc), "-f"], capture_output=True)
