#!/usr/bin/env python3
"""
CPU spent per message on the delivery side of twisted-mta, in process.

    /tmp/venv/bin/python bench/delivery_cpu.py --mode relay -n 2000 --repeat 3
    /tmp/venv/bin/python bench/delivery_cpu.py --mode defer
    /tmp/venv/bin/python bench/delivery_cpu.py --mode refused --profile 30

An L{MTAService} runs in this process from a generated mta.toml (a
loopback listener nobody uses, a log file written as twistd writes it).
N messages of 2 KB are committed to its spool first (the receive side,
not measured); then they are handed to C{DeliveryManager.enqueue} as the
server hands them after each group commit: C{--burst} at a time, at
C{--rate} messages a second.  The run ends when every message is done
for the mode:

  relay    a [[route]] via="smtp" to bench/sink.py (a subprocess, so its
           CPU is not counted); done when the spool is empty
  defer    the bench's queue mode: a router that routes nothing, so each
           message is attempted, deferred and its state saved (no sync)
  refused  a [[route]] via="smtp" to a loopback port that refuses
           connections: connect, refused, deferred, saved

Reported per message: the reactor (main) thread's CPU (time.thread_time)
and the whole process's (time.process_time: the spool's and the thread
pool's threads too), in microseconds; the median over the repeats.  The
machine is shared and noisy: compare medians of 3+ repeats, before and
after, in the same conditions.

C{--tree DIR} (repeatable) measures another source tree, such as an
export of an older commit (C{git archive REV | tar -x -C DIR}); with
several, the runs alternate between them, so that they share the
machine's drift.  C{--log} chooses the log observer (or none, to see
what logging costs).

C{--profile K} runs one more repeat under cProfile, timed by the reactor
thread's CPU clock, and prints the top K functions (C{--sort}): the
profiler inflates function calls several times over, so use it to see
where, not how much.  C{--child --py-spy PATH} samples one run's
measured part with py-spy instead (wall clock, all threads).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import TwistedMTA, free_port  # noqa: E402

DEFER_PLUGIN = TwistedMTA.DEFER_PLUGIN  # the router of the bench's queue mode


def message(i: int, size: int) -> bytes:
    head = (f"Received: from client.bench.test (localhost [127.0.0.1])\r\n"
            f"\tby mta.bench.test (twisted-mta) with ESMTP id X{i}\r\n"
            f"\tfor <rcpt{i % 10}@remote.bench.invalid>; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            f"From: sender@client.bench.test\r\nTo: rcpt{i % 10}@remote.bench.invalid\r\n"
            f"Subject: bench message {i}\r\nMessage-ID: <{i}@client.bench.test>\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = (line * (size // len(line) + 1))[:max(0, size - len(head) - 2)]
    return head + body + b"\r\n"


def config_text(mode: str, port: int, target: int | None) -> str:
    lines = ['hostname = "mta.bench.test"', 'spool = "spool"']
    if mode == "defer":
        lines.append('plugin_paths = ["plugins"]')
    lines += ["[[listen]]", f'endpoint = "tcp:{port}:interface=127.0.0.1"', 'tls = "none"',
              "[relay]", 'local_domains = ["bench.test"]', 'networks = ["127.0.0.0/8"]']
    if mode == "defer":
        lines += ["[router]", 'use = "bench_defer:Defer"']
    else:
        lines += ["[[route]]", 'domains = ["*"]', 'via = "smtp"', 'host = "127.0.0.1"',
                  f"port = {target}", 'tls = "none"']
    return "\n".join(lines) + "\n"


def wait_port(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def one_run(args, folder: Path, profiler: cProfile.Profile | None = None) -> dict:
    """One measured run in C{folder}; returns the figures."""
    from twisted.internet import defer, reactor, task, threads
    from twisted_mta import config as configmod
    from twisted_mta.service import MTAService
    from twisted_mta.spool.entry import QueueEntry, RecipientState

    sink = refuser = None
    target = None
    if args.mode == "relay":
        target = free_port()
        sink = subprocess.Popen([sys.executable, str(REPO / "bench" / "sink.py"), str(target)],
                                stdout=subprocess.DEVNULL)
        wait_port(target)
    elif args.mode == "refused":
        refuser = socket.socket()
        refuser.bind(("127.0.0.1", 0))  # bound, never listening: connect() is refused
        target = refuser.getsockname()[1]
    if args.mode == "defer":
        (folder / "plugins").mkdir()
        (folder / "plugins" / "bench_defer.py").write_text(DEFER_PLUGIN)
    (folder / "mta.toml").write_text(config_text(args.mode, free_port(), target))

    mta = MTAService(configmod.load(folder / "mta.toml"))
    mta.prepare()
    mta.startService()
    spool, manager = mta.spool, mta.delivery
    result: dict = {}

    @defer.inlineCallbacks
    def run():
        # The receive side, not measured: N committed messages.
        entries = []
        commits = []
        for i in range(args.n):
            incoming = spool.new_message()
            incoming.write(message(i, args.size))
            entry = QueueEntry(
                id=incoming.id, sender="sender@client.bench.test",
                recipients=[RecipientState(address=f"rcpt{i % 10}@remote.bench.invalid")],
                arrival=time.time(), size=incoming.size,
                client={"ip": "127.0.0.1", "helo": "client.bench.test", "tls": None, "user": None})
            entries.append(entry)
            commits.append(spool.commit(incoming, entry))
            if len(commits) >= 200:
                yield defer.gatherResults(commits)
                commits = []
        yield defer.gatherResults(commits)
        yield task.deferLater(reactor, 0.2, lambda: None)

        def finished() -> bool:
            if manager.active or spool._tails:
                return False
            if args.mode == "relay":
                return not manager.entries
            return all(r.attempts for e in entries for r in e.recipients)

        spy = None
        if args.py_spy:
            # Sample the measured part only (not the commits before it).
            spy = subprocess.Popen([args.py_spy, "record", "-r", "400", "--nonblocking", "--threads",
                                    "-f", "raw", "-o", args.py_spy_out, "--pid", str(os.getpid())],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            yield task.deferLater(reactor, 1.0, lambda: None)
        t0, c0, p0 = time.monotonic(), time.thread_time(), time.process_time()
        if profiler is not None:
            profiler.enable()
        interval = args.burst / args.rate
        for k in range(0, args.n, args.burst):
            for entry in entries[k:k + args.burst]:
                manager.enqueue(entry)
            yield task.deferLater(reactor, interval, lambda: None)
        while not finished():
            yield task.deferLater(reactor, 0.005, lambda: None)
        if profiler is not None:
            profiler.disable()
        t1, c1, p1 = time.monotonic(), time.thread_time(), time.process_time()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            yield threads.deferToThread(spy.wait)
        result.update(wall=t1 - t0, reactor_us=(c1 - c0) / args.n * 1e6,
                      process_us=(p1 - p0) / args.n * 1e6,
                      connections=mta.smtp_agent.connections_made)
        if args.mode == "relay":
            left = [n for n in os.listdir(spool.queue)]
            assert not left, f"{len(left)} messages left in the queue"

    def go():
        d = run()
        d.addErrback(lambda f: result.setdefault("error", f))
        d.addBoth(lambda _: mta.stopService())
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    try:
        reactor.run()
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait()
        if refuser is not None:
            refuser.close()
    if "error" in result:
        result["error"].raiseException()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="delivery CPU per message, in process")
    p.add_argument("--mode", choices=("relay", "defer", "refused"), default="relay")
    p.add_argument("-n", type=int, default=2000, help="messages per run")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--rate", type=float, default=400.0, help="messages enqueued per second")
    p.add_argument("--burst", type=int, default=10, help="messages enqueued together")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="one more run under cProfile; print the top K functions")
    p.add_argument("--log", choices=("text", "mta", "none"), default="text",
                   help="text: a log file written by Twisted's text observer (twistd's own); "
                        "mta: by twisted_mta.logs' formatter, as twistd mta does since 9e32477 "
                        "(older trees lack it); none: no observer (what logging costs)")
    p.add_argument("--sort", default="tottime", help="cProfile's order (tottime, cumulative)")
    p.add_argument("--tree", action="append",
                   help="a source tree to measure (default: this one), e.g. an export of "
                        "another commit (git archive REV | tar -x -C DIR); given more than "
                        "once, the runs alternate between the trees")
    p.add_argument("--py-spy", metavar="PATH", help="(with --child) sample the measured part "
                   "with this py-spy into --py-spy-out (raw collapsed stacks, all threads)")
    p.add_argument("--py-spy-out", default="delivery-cpu-spy.txt")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        sys.path.insert(0, args.tree[0])
        # One run per process: a reactor runs once.
        from twisted.logger import globalLogBeginner, textFileLogObserver
        folder = Path(tempfile.mkdtemp(prefix="delivery-cpu-"))
        log_file = open(folder / "twistd.log", "a")
        if args.log == "text":
            observers = [textFileLogObserver(log_file)]
        elif args.log == "mta":
            from twisted.logger import FileLogObserver
            from twisted_mta.logs import format_event
            observers = [FileLogObserver(log_file, format_event)]
        else:
            observers = [lambda event: None]
        globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
        # CPU time of the reactor thread, not wall time (waits for the GIL
        # or for a core on a busy machine are not costs of this code).
        profiler = cProfile.Profile(time.thread_time) if args.profile else None
        try:
            r = one_run(args, folder, profiler)
        finally:
            log_file.close()
            shutil.rmtree(folder, ignore_errors=True)
        print("RESULT", r["reactor_us"], r["process_us"], r["wall"], r["connections"])
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.profile)
            print(out.getvalue())
        return 0

    trees = args.tree or [str(REPO)]
    figures: dict[str, tuple[list, list]] = {t: ([], []) for t in trees}

    def command(tree: str) -> list[str]:
        return [sys.executable, __file__, "--child", "--mode", args.mode, "-n", str(args.n),
                "--size", str(args.size), "--rate", str(args.rate), "--burst", str(args.burst),
                "--log", args.log, "--tree", tree]

    # With several trees, the runs alternate between them (the machine's
    # speed drifts over minutes: compare in the same repeats).
    for i in range(args.repeat):
        for tree in trees:
            out = subprocess.run(command(tree), capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
            if line is None:
                print(out.stdout, out.stderr, file=sys.stderr)
                return 1
            _, r, pr, wall, conns = line.split()
            figures[tree][0].append(float(r))
            figures[tree][1].append(float(pr))
            print(f"run {i + 1} {tree}: reactor {float(r):7.1f} us/msg  process {float(pr):7.1f} "
                  f"us/msg  wall {float(wall):5.2f} s  connections {conns}")
    for tree, (reactor_us, process_us) in figures.items():
        if reactor_us:
            print(f"{args.mode} {tree}: median reactor {statistics.median(reactor_us):.1f} us/msg, "
                  f"process {statistics.median(process_us):.1f} us/msg over {len(reactor_us)} "
                  f"runs of {args.n}")
    if args.profile:
        out = subprocess.run(command(trees[0]) + ["--profile", str(args.profile), "--sort", args.sort],
                             capture_output=True, text=True)
        print(out.stdout[out.stdout.find("\n") + 1:], out.stderr[-3000:], sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
