#!/usr/bin/env python3
"""
The reactor thread's CPU per accepted message, for the receive path.

Runs the real service (L{MTAService}, the bench's queue mode: relay from
127.0.0.0/8 to a non-local domain, a router that routes nothing, so every
message is queued in the spool and deferred without a delivery attempt)
in this process, logging to a file as twistd does, and drives it over
loopback with bench/load.py's generator (10 pipelining sessions, RSET
between messages) in separate processes.  It reports, per accepted
message:

  - reactor: the CPU (user + system) of the reactor thread, from
    C{time.thread_time()} read in that thread when the generator starts
    its clock and when it is done: the figure to cut;
  - process: the CPU of the whole server process (the spool's threads too);

as the median of C{--repeat} runs per size, sizes interleaved.  The machine
is shared and noisy: compare medians of the same invocation, or of runs
made close together.  With C{--profile FILE}, one more run per size under
cProfile (reactor thread only) writes its statistics (pstats) to
C{FILE.<size>} and prints the top functions; with C{--py-spy FILE}, one
more run per size sampled by py-spy (bench/README.md says where to get
it) is summarized by area of the code.

    /tmp/venv/bin/python bench/server_cpu.py                      # 2 KB and 100 KB, 3 repeats
    /tmp/venv/bin/python bench/server_cpu.py --sizes 2048 --messages 5000 --repeat 5
    /tmp/venv/bin/python bench/server_cpu.py --sizes 2048 --profile /tmp/prof
    git archive 1612b83 | tar -x -C /tmp/base && \
        /tmp/venv/bin/python bench/server_cpu.py --source /tmp/base
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# --source DIR: measure the twisted_mta in DIR (e.g. a `git archive` of
# another commit) instead of this checkout's.
if "--source" in sys.argv:
    sys.path.insert(0, sys.argv[sys.argv.index("--source") + 1])
sys.path[:0] = [str(REPO / "bench")]
if "--source" not in sys.argv:
    sys.path.insert(0, str(REPO))

from twisted.internet import defer, reactor, threads  # noqa: E402
from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402
from twisted.python.logfile import LogFile  # noqa: E402

import load  # noqa: E402  (bench/load.py)

CONFIG = """\
hostname = "mta.bench.test"
spool = "spool"
plugin_paths = ["plugins"]
[[listen]]
endpoint = "tcp:0:interface=127.0.0.1:backlog=1024"
tls = "none"
[limits]
connections = 20000
connections_per_client = 20000
[relay]
local_domains = ["bench.test"]
networks = ["127.0.0.0/8"]
[router]
use = "bench_defer:Defer"
"""

# The same router plugin as bench/servers.py's queue mode.
DEFER_PLUGIN = '''\
from zope.interface import implementer
from twisted_mta.interfaces import IRouter


@implementer(IRouter)
class Defer:
    def route(self, envelope, recipient):
        return None
'''


def start_logging(path: Path, kind: str) -> None:
    """
    Log to a file as twistd --logfile does: with Twisted's text observer
    (twistd's own), or with the formatter twisted_mta.logs gives twistd
    since 9e32477 (C{--log mta}; the same lines, cheaper).  Compare two
    trees with the same one.
    """
    log_file = LogFile.fromFullPath(str(path))
    if kind == "mta":
        from twisted.logger import FileLogObserver
        from twisted_mta.logs import format_event
        observer = FileLogObserver(log_file, format_event)
    else:
        observer = textFileLogObserver(log_file)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def start_service(folder: Path):
    """A service on a fresh spool in C{folder}; its port."""
    from twisted_mta import config as configmod
    from twisted_mta.service import MTAService

    folder.mkdir()
    (folder / "plugins").mkdir()
    (folder / "plugins" / "bench_defer.py").write_text(DEFER_PLUGIN)
    (folder / "mta.toml").write_text(CONFIG)
    mta = MTAService(configmod.load(folder / "mta.toml"))
    mta.prepare()
    mta.startService()
    return mta, mta.ports[0].getHost().port


def check_source() -> None:
    import twisted_mta
    print(f"twisted_mta from {Path(twisted_mta.__file__).parent}", flush=True)


@defer.inlineCallbacks
def one_run(folder: Path, size: int, messages: int, conns: int,
            profile: cProfile.Profile | None = None, spy: tuple[str, str] | None = None):
    """
    One measured run on a service of its own (a spool that fills up run
    after run costs more per message), after a warm-up: imports, the
    spool's threads and pools, the first files.
    """
    mta, port = start_service(folder)
    try:
        yield threads.deferToThread(load.run_load, "127.0.0.1", port, conns, size, 300,
                                    duration=3600.0)
        result = yield measure(port, size, messages, conns, profile, spy)
    finally:
        yield mta.stopService()
        shutil.rmtree(folder / "spool", ignore_errors=True)
    return result


@defer.inlineCallbacks
def measure(port: int, size: int, messages: int, conns: int, profile: cProfile.Profile | None,
            spy: tuple[str, str] | None = None):
    marks = {}

    def started():  # in the reactor thread, when the generator's clock starts
        if spy is not None:
            marks["spy"] = subprocess.Popen(
                [spy[0], "record", "--pid", str(os.getpid()), "--format", "raw", "--output", spy[1],
                 "--rate", "1000", "--threads", "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        marks["cpu0"] = time.thread_time()
        marks["proc0"] = time.process_time()
        if profile is not None:
            profile.enable()

    result = yield threads.deferToThread(
        load.run_load, "127.0.0.1", port, conns, size, messages, duration=3600.0,
        on_start=lambda: reactor.callFromThread(started))
    if profile is not None:
        profile.disable()
    cpu = time.thread_time() - marks["cpu0"]
    proc = time.process_time() - marks["proc0"]
    if spy is not None:
        marks["spy"].send_signal(signal.SIGINT)
        yield threads.deferToThread(marks["spy"].wait)
    n = result["accepted"]
    if result["error_count"] or n == 0:
        raise RuntimeError(f"load failed: {result['errors']} {result['connect_errors']}")
    return {"size": size, "accepted": n, "reactor_us": cpu / n * 1e6, "process_us": proc / n * 1e6,
            "rate": result["rate"]}


@defer.inlineCallbacks
def main(a, folder: Path):
    start_logging(folder / "twistd.log", a.log)
    check_source()
    runs_made = iter(range(10**6))
    new_folder = lambda: folder / f"run{next(runs_made)}"
    sizes = [int(s) for s in a.sizes.split(",")]
    runs: dict[int, list] = {s: [] for s in sizes}
    for i in range(a.repeat):
        order = sizes if i % 2 == 0 else sizes[::-1]
        for size in order:
            r = yield one_run(new_folder(), size, a.messages, a.conns)
            runs[size].append(r)
            print(f"  run {i + 1} size {size}: reactor {r['reactor_us']:.0f} µs/msg, "
                  f"process {r['process_us']:.0f} µs/msg, {r['rate']:.0f} msg/s", flush=True)
    if a.repeat:
        print(f"\nmedians over {a.repeat} runs of {a.messages} messages, {a.conns} sessions:")
        for size in sizes:
            rs = runs[size]
            med = lambda k: statistics.median(r[k] for r in rs)
            spread = lambda k: f"{min(r[k] for r in rs):.0f}-{max(r[k] for r in rs):.0f}"
            print(f"  {size:>7} B: reactor {med('reactor_us'):.0f} µs/msg ({spread('reactor_us')}), "
                  f"process {med('process_us'):.0f} µs/msg ({spread('process_us')})")
    py_spy = shutil.which("py-spy") or "/tmp/bench-venv/bin/py-spy"
    for size in sizes if a.py_spy else ():
        raw = f"{a.py_spy}.{size}"
        r = yield one_run(new_folder(), size, a.messages, a.conns, spy=(py_spy, raw))
        print(f"\npy-spy at {size} B ({r['accepted']} messages, {r['reactor_us']:.0f} µs/msg), in {raw}")
        print(summarize_spy(raw), flush=True)
    if a.profile:
        for size in sizes:
            prof = cProfile.Profile()
            r = yield one_run(new_folder(), size, a.messages, a.conns, prof)
            path = f"{a.profile}.{size}"
            prof.dump_stats(path)
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("tottime").print_stats(a.top)
            stats.sort_stats("cumulative").print_stats(a.top)
            print(f"\nprofile at {size} B ({r['accepted']} messages, under cProfile "
                  f"{r['reactor_us']:.0f} µs/msg), saved in {path}")
            print(out.getvalue())


# --- the server alone ---------------------------------------------------------
#
# --alone: the protocol code only (smtp/, pipeline.py, the entry's JSON),
# without sockets, the spool's disk work, delivery or other threads: ten
# ESMTPServer sessions on in-memory transports, fed the generator's
# pipelined commands and its messages in 64 KiB reads (what Twisted's TCP
# transport reads at once), over a spool that keeps nothing.  Much less
# noisy than the full run, for comparing changes to those files.


class _NullIncoming:
    def __init__(self, qid: str):
        self.id = qid
        self.path = Path("/nonexistent") / qid
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def flush(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _NullSpool:
    def __init__(self):
        self.n = 0

    def new_message(self):
        self.n += 1
        return _NullIncoming(f"Q{self.n:09d}")

    def commit(self, incoming, entry):
        entry.to_json()  # as the real spool writes it
        return defer.succeed(None)


def alone(a) -> int:
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted_mta import config as configmod, loader
    from twisted_mta.smtp.server import ESMTPFactory, ServerContext
    import tomllib

    check_source()
    folder = Path(tempfile.mkdtemp(prefix="server-cpu-alone-"))
    (folder / "plugins").mkdir()
    (folder / "plugins" / "bench_defer.py").write_text(DEFER_PLUGIN)
    start_logging(folder / "twistd.log", a.log)

    class Context(ServerContext):
        def __init__(self):
            self.reactor = Clock()
            self.config = configmod.parse(tomllib.loads(CONFIG), "mta.toml", folder)
            self.pipeline = loader.build_pipeline(self.config, 1, reactor=self.reactor)
            self.spool = _NullSpool()
            self.tls_options = None
            self.auth = None

    ctx = Context()
    factory = ESMTPFactory(ctx, ctx.config.listen[0])
    sessions = []
    for i in range(a.conns):
        t = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
                            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + i))
        proto = factory.buildProtocol(t.getPeer())
        proto.makeConnection(t)
        proto.dataReceived(b"EHLO client.bench.test\r\n")
        sessions.append((proto, t))

    def run_size(size: int, messages: int, profile=None) -> float:
        mf = load.MessageFactory(size, "sender@client.bench.test", "remote.bench.invalid", 0)
        rcpt = "user1@remote.bench.invalid"
        head, body = mf.message(1, rcpt)
        commands = (f"RSET\r\nMAIL FROM:<sender@client.bench.test> SIZE={len(head) + len(body)}\r\n"
                    f"RCPT TO:<{rcpt}>\r\nDATA\r\n").encode()
        data = head + body + b".\r\n"
        reads = [data[i:i + 65536] for i in range(0, len(data), 65536)]
        for proto, t in sessions:
            t.clear()
        if profile is not None:
            profile.enable()
        cpu0 = time.thread_time()
        for n in range(messages):
            proto, t = sessions[n % len(sessions)]
            proto.dataReceived(commands)
            for r in reads:
                proto.dataReceived(r)
            if n % len(sessions) == len(sessions) - 1:
                for _, t in sessions:
                    t.clear()
        cpu = time.thread_time() - cpu0
        if profile is not None:
            profile.disable()
        for proto, t in sessions:
            out = t.value()
            if out and not out.endswith(b"queued as Q%09d\r\n" % ctx.spool.n) and b" queued as " not in out:
                raise RuntimeError(f"unexpected replies: {out[-300:]!r}")
        return cpu / messages * 1e6

    sizes = [int(s) for s in a.sizes.split(",")]
    for size in sizes:
        run_size(size, 300)  # warm-up
    runs: dict[int, list] = {s: [] for s in sizes}
    for i in range(a.repeat):
        for size in (sizes if i % 2 == 0 else sizes[::-1]):
            us = run_size(size, a.messages)
            runs[size].append(us)
            print(f"  run {i + 1} size {size}: {us:.1f} µs/msg", flush=True)
    if a.repeat:
        print(f"\nserver alone, medians over {a.repeat} runs of {a.messages} messages:")
        for size in sizes:
            print(f"  {size:>7} B: {statistics.median(runs[size]):.1f} µs/msg "
                  f"({min(runs[size]):.1f}-{max(runs[size]):.1f})")
    if a.profile:
        for size in sizes:
            prof = cProfile.Profile()
            run_size(size, a.messages, prof)
            path = f"{a.profile}.alone.{size}"
            prof.dump_stats(path)
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("tottime").print_stats(a.top)
            print(f"\nprofile of the server alone at {size} B, saved in {path}")
            print(out.getvalue())
    shutil.rmtree(folder, ignore_errors=True)
    return 0



# Where the reactor thread's samples go: (label, pattern matched against
# the stack, root first), inclusive; a sample may count in several.
AREAS = [
    ("SMTP command lines (server._line)", r"_line \(.*smtp/server\.py"),
    ("  parse (grammar)", r"smtp/grammar\.py"),
    ("  relay/filters (pipeline)", r"_line \(.*pipeline\.py"),
    ("  new spool file + Received (_start_body)", r"_start_body \("),
    ("body (server._body, before _end_message)", r"_body \((?!.*_end_message)"),
    ("end of message (_end_message)", r"_end_message \("),
    ("  spool flush/commit (spool/store.py)", r"_end_message \(.*spool/store\.py"),
    ("after the commit (_committed)", r"_committed \("),
    ("  transaction log event", r"_log_transaction \("),
    ("replies to the socket (doWrite)", r"doWrite \("),
    ("reading the socket (doRead, not _dataReceived)", r"doRead \((?!.*_dataReceived)"),
    ("delivery manager (delivery/)", r"delivery/"),
    ("spool callbacks (store._finished)", r"_finished \("),
    ("log events (twisted/logger emit)", r"logger/_logger\.py"),
    ("epoll", r"doPoll \([^;]*$"),
]


def summarize_spy(raw: str) -> str:
    """The reactor thread's samples by area, from py-spy's raw output."""
    areas = [(label, re.compile(rx)) for label, rx in AREAS]
    counts: collections.Counter = collections.Counter()
    selfs: collections.Counter = collections.Counter()
    total = 0
    for line in Path(raw).read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if "MainThread" not in stack.split(";", 1)[0] or not n.isdigit():
            continue
        n = int(n)
        total += n
        for label, rx in areas:
            if rx.search(stack):
                counts[label] += n
        selfs[stack.rsplit(";", 1)[-1]] += n
    out = [f"reactor thread: {total} samples (not idle)"]
    out += [f"  {100 * counts[label] / total:5.1f} %  {label}" for label, _ in areas]
    out.append("  top lines (self):")
    out += [f"  {100 * c / total:5.1f} %  {f}" for f, c in selfs.most_common(25)]
    return "\n".join(out)


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2048,102400", help="message sizes, comma-separated")
    p.add_argument("--messages", type=int, default=3000, help="messages per run (default 3000)")
    p.add_argument("--conns", type=int, default=10, help="sessions (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="runs per size (default 3)")
    p.add_argument("--profile", metavar="FILE", help="also profile one run per size into FILE.<size>")
    p.add_argument("--source", metavar="DIR", help="import twisted_mta from DIR (default: this checkout)")
    p.add_argument("--py-spy", metavar="FILE",
                   help="also sample one run per size with py-spy into FILE.<size> and summarize")
    p.add_argument("--top", type=int, default=40, help="functions to print from a profile")
    p.add_argument("--log", choices=("twisted", "mta"), default="twisted",
                   help="log observer: Twisted's text one (default), or twisted_mta.logs' formatter")
    p.add_argument("--alone", action="store_true",
                   help="the protocol code alone, in memory (see the source), not the service")
    a = p.parse_args(argv)
    if a.alone:
        return alone(a)
    failed = []
    with tempfile.TemporaryDirectory(prefix="server-cpu-") as tmp:
        def done(result):
            if isinstance(result, Exception) or hasattr(result, "getTraceback"):
                failed.append(result)
                print(result.getTraceback() if hasattr(result, "getTraceback") else result)
            reactor.stop()

        reactor.callWhenRunning(lambda: main(a, Path(tmp)).addBoth(done))
        reactor.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run())
