"""
The servers under test, each started on a loopback port with its own
temporary folder, and the /proc readings the runner takes of them.

    TwistedMTA   twistd -n mta --config <tmp>/mta.toml
    Postfix      a private instance: postfix -c <tmp>/etc start
    Aiosmtpd     bench/aiosmtpd_server.py (fsync per message)
    Twisted20    bench/twisted_fsync_server.py (fsync per message)

Every server is started afresh for each measurement, so peak RSS
(VmHWM) belongs to that measurement alone.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- /proc ------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """C{root} and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is None:
            continue
        children.setdefault(int(st[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat(pid) is None:
            continue
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def thread_cpu(pid: int) -> dict[str, tuple[float, float, int]]:
    """{"main" | "other": (user s, system s, threads)} of one process's threads."""
    out: dict[str, list] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        # Python does not name OS threads: tell the main thread (the
        # reactor, the event loop) from the others by its id.
        name = "main" if int(tid) == pid else "other"
        acc = out.setdefault(name, [0.0, 0.0, 0])
        acc[0] += int(fields[11]) / CLK_TCK
        acc[1] += int(fields[12]) / CLK_TCK
        acc[2] += 1
    return {k: tuple(v) for k, v in out.items()}


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def cpu_seconds(pids: list[int], include_reaped_of: int | None = None) -> float:
    """utime+stime of C{pids}, plus reaped children's time of one of them."""
    total = 0
    for pid in pids:
        st = _stat(pid)
        if st is None:
            continue
        total += int(st[11]) + int(st[12])
        if pid == include_reaped_of:
            total += int(st[13]) + int(st[14])
    return total / CLK_TCK


def all_process_cpu() -> dict[int, tuple[float, int]]:
    """{pid: (utime+stime seconds, ppid)} of every process now."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is not None:
            out[int(name)] = ((int(st[11]) + int(st[12])) / CLK_TCK, int(st[1]))
    return out


def other_cpu(before: dict, after: dict, exclude: set[int]) -> tuple[float, float]:
    """
    CPU seconds used between two L{all_process_cpu} snapshots by (other
    user-space processes, kernel threads), leaving out C{exclude} and the
    descendants of C{exclude} (as they were in either snapshot).
    """
    parents = {pid: pp for snap in (before, after) for pid, (_, pp) in snap.items()}

    def excluded(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid in exclude:
                return True
            pid = parents.get(pid, 0)
            seen += 1
        return False

    user = kernel = 0.0
    for pid, (cpu, pp) in after.items():
        if excluded(pid):
            continue
        delta = cpu - before[pid][0] if pid in before else cpu
        if pid == 2 or pp == 2:
            kernel += delta
        else:
            user += delta
    return user, kernel


def user_sys(pids: list[int], include_reaped_of: int | None = None) -> tuple[float, float]:
    """(user s, system s) of C{pids} (and one's reaped children)."""
    u = t = 0
    for pid in pids:
        st = _stat(pid)
        if st is None:
            continue
        u += int(st[11])
        t += int(st[12])
        if pid == include_reaped_of:
            u += int(st[13])
            t += int(st[14])
    return u / CLK_TCK, t / CLK_TCK


def system_busy_seconds() -> float:
    """CPU time spent not idle, all CPUs, since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def mem_available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_greeting(port: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("server exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = data
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"no 220 greeting on port {port} within {timeout}s ({last!r})")


def _nofile(n: int):
    def preexec():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(soft, min(n, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        os.setsid()
    return preexec


# --- servers ------------------------------------------------------------------


#: Folders of finished cells, removed by L{remove_discarded} at the end of
#: the run.  Removing a spool of thousands of files between cells made the
#: next server slow to create files: on ext4 without a journal (this VM's
#: root), the inode allocator skips every inode freed in the last 60-360 s,
#: one buffer-cache lookup each (`recently_deleted` in perf), so each new
#: file cost up to ~1 ms of kernel CPU and the cell after a cleanup (another
#: server's) paid for it.
_DISCARDED: list[Path] = []
#: below this much free space, remove at once rather than keep until the end
_KEEP_FREE_BYTES = 8 << 30


def discard(folder: Path) -> None:
    """Remove C{folder} at the end of the run (at once if the disk is filling up)."""
    _DISCARDED.append(folder)
    if shutil.disk_usage(folder).free < _KEEP_FREE_BYTES:
        remove_discarded()


def remove_discarded() -> int:
    """Remove the folders L{discard} kept; returns how many."""
    n = len(_DISCARDED)
    while _DISCARDED:
        shutil.rmtree(_DISCARDED.pop(), ignore_errors=True)
    return n


class Server:
    """One server under test.  L{start} returns the port."""

    name = "?"
    #: recipients go to this domain (the server must accept them)
    rcpt_domain = "remote.bench.invalid"
    #: the process whose VmHWM et al. are summed with its descendants
    root_pid: int | None = None

    def __init__(self, workdir: Path | None = None, keep: bool = False):
        self.keep = keep
        self.workdir = workdir
        self.tmp: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    def _mktemp(self) -> Path:
        base = str(self.workdir) if self.workdir else None
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-", dir=base))
        os.chmod(self.tmp, 0o755)  # Postfix's unprivileged daemons must get in
        return self.tmp

    def pids(self) -> list[int]:
        return process_tree(self.root_pid) if self.root_pid else []

    def rss_kb(self) -> int:
        return sum(status_kb(p, "VmRSS") for p in self.pids())

    def hwm_kb(self) -> int:
        return sum(status_kb(p, "VmHWM") for p in self.pids())

    def pss_kb(self) -> int:
        return sum(pss_kb(p) for p in self.pids())

    def cpu(self) -> float:
        return cpu_seconds(self.pids(), include_reaped_of=self.root_pid)

    def log_tail(self, n: int = 20) -> str:
        return ""

    def describe(self) -> str:
        return self.name

    def _popen(self, argv, env=None, nofile=20000, logname="server.log") -> None:
        log = open(self.tmp / logname, "ab")
        self.proc = subprocess.Popen(argv, cwd=self.tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_nofile(nofile))
        self.root_pid = self.proc.pid

    def _wait_ready(self, timeout: float = 60.0) -> None:
        try:
            wait_for_greeting(self.port, timeout, alive=lambda: self.proc.poll() is None)
        except RuntimeError as e:
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"{self.name}: {e}\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self.root_pid = None
        refuser = getattr(self, "_refuser", None)
        if refuser is not None:
            refuser.close()
            self._refuser = None

    def cleanup(self) -> None:
        if self.tmp is not None and not self.keep:
            discard(self.tmp)
        self.tmp = None


class TwistedMTA(Server):
    """
    twistd -n mta.  Modes (where accepted mail goes):
      queue   recipients in a non-local domain, and a router plugin (written
              to the temp folder, bench_defer:Defer) that routes nothing: at
              its first attempt each recipient is deferred ("451 4.3.5 no
              route for this domain"; its state saved) and the message
              stays queued.  This is Postfix's defer_transports: the queue
              manager defers without trying the transport.
      refused the same, but through a real attempt: a [[route]] via "smtp" to
              a loopback port that refuses connections (a bound socket that
              never listens, held by the runner): "451 4.4.1 ... Connection
              refused".  (Without any route, the MX agent would get NXDOMAIN
              for remote.bench.invalid and bounce every message.)
      discard a [[route]] with via = "discard": delivered at once, removed
      maildir recipients in a local domain, delivered into Maildirs
      relay   a [[route]] via = "smtp" to a sink (the relay benchmark)
    """

    name = "twisted-mta"

    def __init__(self, mode: str = "queue", twistd: str | None = None, python_path: Path = REPO,
                 relay_port: int | None = None, switch_interval: float | None = None,
                 receivers: int = 0, spool_sync: str | None = None, **kw):
        super().__init__(**kw)
        self.mode = mode
        self.receivers = receivers  # "receivers = N" in its config
        self.spool_sync = spool_sync  # "spool_sync = ..." in its config (None: the default)
        #: a diagnostic: sys.setswitchinterval() in the server (via a
        #: sitecustomize in the temp folder; the project is not touched)
        self.switch_interval = switch_interval
        self.twistd = twistd or find_twistd()
        self.python_path = python_path
        self.relay_port = relay_port
        self._refuser: socket.socket | None = None
        if mode == "maildir":
            self.rcpt_domain = "bench.test"

    def describe(self) -> str:
        extra = f", switch interval {self.switch_interval}" if self.switch_interval else ""
        if self.receivers:
            extra += f", receivers = {self.receivers}"
        if self.spool_sync:
            extra += f", spool_sync = {self.spool_sync}"
        return f"twisted-mta ({self.mode}{extra})"

    def config_text(self) -> str:
        lines = [
            'hostname = "mta.bench.test"',
            'spool = "spool"',
        ]
        if self.receivers:  # (older revisions, the baseline, do not know the key)
            lines.append(f"receivers = {self.receivers}")
        if self.spool_sync:
            lines.append(f'spool_sync = "{self.spool_sync}"')
        if self.mode == "queue":
            lines.append('plugin_paths = ["plugins"]')
        lines += [
            "[[listen]]",
            # backlog: 5,000 idle sessions are opened in bursts
            f'endpoint = "tcp:{self.port}:interface=127.0.0.1:backlog=1024"',
            'tls = "none"',
            "[limits]",
            "connections = 20000",
            "connections_per_client = 20000",
            "[relay]",
            'local_domains = ["bench.test"]',
            'networks = ["127.0.0.0/8"]',
        ]
        if self.mode == "discard":
            lines += ["[[route]]", 'domains = ["*"]', 'via = "discard"']
        elif self.mode == "maildir":
            lines += ["[[route]]", 'domains = ["bench.test"]', 'via = "maildir"', 'path = "mail"',
                      "[[route]]", 'domains = ["*"]', 'via = "mx"']
        elif self.mode == "relay":
            lines += ["[[route]]", 'domains = ["*"]', 'via = "smtp"', 'host = "127.0.0.1"',
                      f"port = {self.relay_port}", 'tls = "none"']
        elif self.mode == "refused":  # one attempt, refused, deferred, stays queued
            lines += ["[[route]]", 'domains = ["*"]', 'via = "smtp"', 'host = "127.0.0.1"',
                      f"port = {self._refused_port()}", 'tls = "none"']
        elif self.mode == "queue":  # deferred at the first attempt without trying
            lines += ["[router]", 'use = "bench_defer:Defer"']
        else:
            raise ValueError(f"twisted-mta: unknown mode {self.mode}")
        return "\n".join(lines) + "\n"

    DEFER_PLUGIN = (
        '"""The bench\'s router for queue mode: no route, so each recipient is deferred."""\n'
        "from zope.interface import implementer\n"
        "from twisted_mta.interfaces import IRouter\n\n\n"
        "@implementer(IRouter)\n"
        "class Defer:\n"
        "    def route(self, envelope, recipient):\n"
        "        return None\n")

    def _refused_port(self) -> int:
        """A loopback port bound (so nobody else takes it) but never listening: connect() is refused."""
        if self._refuser is None:
            self._refuser = socket.socket()
            self._refuser.bind(("127.0.0.1", 0))
        return self._refuser.getsockname()[1]

    def start(self) -> int:
        self._mktemp()
        self.port = free_port()
        (self.tmp / "mta.toml").write_text(self.config_text())
        if self.mode == "queue":
            (self.tmp / "plugins").mkdir()
            (self.tmp / "plugins" / "bench_defer.py").write_text(self.DEFER_PLUGIN)
        path = str(self.python_path)
        if self.switch_interval:
            site = self.tmp / "site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(
                f"import sys\nsys.setswitchinterval({self.switch_interval!r})\n")
            path = f"{site}{os.pathsep}{path}"
        env = dict(os.environ, PYTHONPATH=path)
        self._popen([self.twistd, "-n", "--pidfile", str(self.tmp / "twistd.pid"),
                     "--logfile", str(self.tmp / "twistd.log"),
                     "mta", "--config", str(self.tmp / "mta.toml")], env=env)
        self._wait_ready()
        return self.port

    def log_tail(self, n: int = 20) -> str:
        out = []
        for name in ("server.log", "twistd.log"):
            p = (self.tmp or Path("/nonexistent")) / name
            if p.exists():
                out += p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(out)


class Postfix(Server):
    """
    A private Postfix instance (postfix -c <tmp>/etc start), loopback only,
    mynetworks = 127.0.0.0/8, Debian's defaults otherwise (including the
    fsync of every queue file before 250).  Modes:
      queue   default_transport = smtp with defer_transports = smtp: the
              queue manager takes each message, defers it (defer log) and
              it stays in the deferred queue
      discard default_transport = discard: delivered at once, removed
      relay   relayhost = [127.0.0.1]:<sink port>
    Logs go to a file through postlogd (maillog_file).
    """

    name = "postfix"

    def __init__(self, mode: str = "queue", smtpd_limit: int | None = None,
                 relay_port: int | None = None, **kw):
        super().__init__(**kw)
        self.mode = mode
        self.smtpd_limit = smtpd_limit
        self.relay_port = relay_port

    def describe(self) -> str:
        return f"postfix {postfix_version()} ({self.mode})"

    def start(self) -> int:
        if not shutil.which("postfix"):
            raise RuntimeError("postfix is not installed: apt-get install -y postfix")
        self._mktemp()
        self.port = free_port()
        etc, queue, data = self.tmp / "etc", self.tmp / "queue", self.tmp / "data"
        for d in (etc, queue, data):
            d.mkdir()
        shutil.chown(data, "postfix")
        main = [
            "compatibility_level = 3.6",
            f"queue_directory = {queue}",
            f"data_directory = {data}",
            f"maillog_file = {self.tmp}/maillog",
            f"maillog_file_prefixes = {self.tmp}",
            "myhostname = postfix.bench.test",
            "mydestination =",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            "message_size_limit = 52428800",
            "biff = no",
            "smtp_tls_security_level = none",
            "smtpd_tls_security_level = none",
        ]
        if self.mode == "queue":
            main += ["default_transport = smtp", "defer_transports = smtp", "relayhost ="]
        elif self.mode == "discard":
            main += ["default_transport = discard", "relayhost ="]
        elif self.mode == "relay":
            main += ["default_transport = smtp", f"relayhost = [127.0.0.1]:{self.relay_port}"]
        else:
            raise ValueError(f"postfix: unknown mode {self.mode}")
        (etc / "main.cf").write_text("\n".join(main) + "\n")
        smtpd_max = str(self.smtpd_limit) if self.smtpd_limit else "-"
        master = f"""\
127.0.0.1:{self.port} inet n - n - {smtpd_max} smtpd
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
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
        if self.smtpd_limit and self.smtpd_limit > 100:
            # master.cf's process limit alone is not enough: the default
            # limit caps the other services, and master needs descriptors.
            (etc / "main.cf").open("a").write(f"default_process_limit = {self.smtpd_limit}\n")
        (etc / "master.cf").write_text(master)
        self.etc = etc
        r = subprocess.run(["postfix", "-c", str(etc), "start"], capture_output=True, text=True,
                           preexec_fn=_nofile(4 * (self.smtpd_limit or 100) + 1000))
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}\n{self.log_tail()}")
        pidfile = queue / "pid" / "master.pid"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.root_pid = int(pidfile.read_text().split()[0])
                break
            except (FileNotFoundError, ValueError, IndexError):
                time.sleep(0.1)
        if not self.root_pid:
            raise RuntimeError(f"postfix: no master.pid\n{self.log_tail()}")
        try:
            wait_for_greeting(self.port, 60, alive=lambda: _stat(self.root_pid) is not None)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"postfix: {e}\n{self.log_tail()}")
        return self.port

    def log_tail(self, n: int = 20) -> str:
        p = (self.tmp or Path("/nonexistent")) / "maillog"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def stop(self) -> None:
        if self.root_pid is None:
            return
        master = self.root_pid
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _stat(master) is not None:
            time.sleep(0.1)
        if _stat(master) is not None:
            subprocess.run(["postfix", "-c", str(self.etc), "abort"], capture_output=True)
            time.sleep(1)
        # Children of this instance only (never by name: others may run Postfix).
        for pid in process_tree(master):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.root_pid = None


class Aiosmtpd(Server):
    name = "aiosmtpd"

    def __init__(self, python: str | None = None, **kw):
        super().__init__(**kw)
        self.python = python or find_python_with("aiosmtpd")

    def describe(self) -> str:
        return "aiosmtpd (fsync per message)"

    def start(self) -> int:
        if self.python is None:
            raise RuntimeError("no Python with aiosmtpd found: pip install aiosmtpd, or --aiosmtpd-python")
        self._mktemp()
        self.port = free_port()
        (self.tmp / "spool").mkdir()
        self._popen([self.python, str(BENCH / "aiosmtpd_server.py"), str(self.port), str(self.tmp / "spool")])
        self._wait_ready()
        return self.port

    def log_tail(self, n: int = 20) -> str:
        p = (self.tmp or Path("/nonexistent")) / "server.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""


class Twisted20(Server):
    name = "twisted-20"

    def __init__(self, python: str | None = None, **kw):
        super().__init__(**kw)
        self.python = python or sys.executable

    def describe(self) -> str:
        return "20-line Twisted (twisted.mail.smtp, fsync per message)"

    def start(self) -> int:
        self._mktemp()
        self.port = free_port()
        (self.tmp / "spool").mkdir()
        self._popen([self.python, str(BENCH / "twisted_fsync_server.py"), str(self.port), str(self.tmp / "spool")])
        self._wait_ready()
        return self.port

    def log_tail(self, n: int = 20) -> str:
        p = (self.tmp or Path("/nonexistent")) / "server.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""


# --- finding things ---------------------------------------------------------


def find_twistd() -> str:
    cand = Path(sys.executable).parent / "twistd"
    if cand.exists():
        return str(cand)
    found = shutil.which("twistd")
    if found:
        return found
    raise RuntimeError("twistd not found: run the bench with the virtualenv's python")


def find_python_with(module: str) -> str | None:
    cands = [sys.executable, "/tmp/bench-venv/bin/python"]
    for py in cands:
        if py and Path(py).exists():
            r = subprocess.run([py, "-c", f"import {module}"], capture_output=True)
            if r.returncode == 0:
                return py
    return None


_pf_version = None


def postfix_version() -> str:
    global _pf_version
    if _pf_version is None:
        try:
            # postconf -d reads no main.cf (the system may have none).
            r = subprocess.run(["postconf", "-d", "mail_version"], capture_output=True, text=True)
            _pf_version = r.stdout.split("=")[-1].strip() or "?"
        except OSError:
            _pf_version = "?"
    return _pf_version
