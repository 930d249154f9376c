#!/usr/bin/env python3
"""
The benchmark runner (run by hand; never part of the test suite).

Starts each server under test on loopback with a temporary folder and
measures, in one run so that results can be given as ratios to Postfix:

  matrix   messages/s accepted (first MAIL to last 250), for each message
           size x concurrency x server, with latency percentiles, server
           CPU, generator CPU, CPU used by other processes, peak RSS
  idle     memory per idle SMTP session: (RSS with N open - RSS with 0) / N
  relay    (issue 3) twisted-mta and Postfix relaying everything to a sink:
           messages/s from the first MAIL until the sink holds all N
  profile  py-spy of twisted-mta under 2 KB x 10 connections: hot spots

Every server is started afresh for each measurement.  Results are
printed as a markdown report and saved to bench/results/<timestamp>.md
(and .json).  See bench/README.md.

    /tmp/venv/bin/python bench/run.py                 # all of it
    /tmp/venv/bin/python bench/run.py --only matrix --servers twisted-mta,postfix
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import load  # noqa: E402
import servers as S  # noqa: E402

ALL_SERVERS = ("twisted-mta", "postfix", "aiosmtpd", "twisted-20")


class Unsupported(Exception):
    """The server under test cannot do what this measurement needs (yet)."""


# --- helpers ----------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_server(name: str, args, **kw) -> S.Server:
    common = {"workdir": args.workdir, "keep": args.keep}
    # twisted-mta-rN: the same with "receivers = N" (N receiving processes);
    # -fs: with spool_sync = "filesystem" (one syncfs per batch)
    m = re.fullmatch(r"(twisted-mta(?:-base)?)(?:-r(\d+))?(-fs)?", name)
    if m:
        base = m.group(1)
        if base == "twisted-mta-base" and getattr(args, "base_path", None) is None:
            raise SystemExit("twisted-mta-base needs --mta-baseline REV")
        path = args.base_path if base == "twisted-mta-base" else args.mta_path
        return S.TwistedMTA(mode=kw.pop("mode", args.mta_mode), twistd=args.twistd,
                            python_path=path, switch_interval=args.mta_switch_interval,
                            receivers=int(m.group(2) or 0), spool_sync="filesystem"
                            if m.group(3) else None, **common, **kw)
    if name == "postfix":
        return S.Postfix(mode=kw.pop("mode", args.postfix_mode), **common, **kw)
    if name == "aiosmtpd":
        return S.Aiosmtpd(python=args.aiosmtpd_python, **common)
    if name == "twisted-20":
        return S.Twisted20(**common)
    raise SystemExit(f"unknown server {name!r}; known: {', '.join(ALL_SERVERS)}")


def snapshot_source(rev: str, workdir: Path | None) -> tuple[Path, str]:
    """
    Export twisted_mta/ and twisted/plugins/ at git revision C{rev} into a
    temp folder (put first on twistd's PYTHONPATH), so that the whole run
    measures one commit even while others edit and commit the working tree.
    """
    import tempfile
    full = subprocess.run(["git", "-C", str(S.REPO), "rev-parse", "--verify", rev + "^{commit}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dest = Path(tempfile.mkdtemp(prefix="bench-src-", dir=str(workdir) if workdir else None))
    archive = subprocess.run(["git", "-C", str(S.REPO), "archive", full, "twisted_mta", "twisted"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, full[:10]


def warm_up(port: int, rcpt_domain: str, n: int = 20) -> None:
    """A few messages over one session, so that lazy imports and caches are done."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("warmup.bench.test")
        for i in range(n):
            c.sendmail("warmup@client.bench.test", [f"warm{i}@{rcpt_domain}"],
                       f"Subject: warm-up {i}\r\n\r\nwarm-up\r\n")


def stored_messages(srv: S.Server) -> int | None:
    """Messages the server holds on disk now (a sanity check of 'accepted')."""
    if srv.tmp is None:
        return None
    roots = {
        "twisted-mta": [srv.tmp / "spool" / "queue"],
        "postfix": [srv.tmp / "queue" / q for q in ("incoming", "active", "deferred", "hold")],
        "aiosmtpd": [srv.tmp / "spool"],
        "twisted-20": [srv.tmp / "spool"],
    }[srv.name]
    n = 0
    for root in roots:
        for _, _, files in os.walk(root):
            n += sum(1 for f in files if "." not in f or srv.name != "twisted-mta")
    return n


def server_log_problems(srv: S.Server) -> int:
    """Tracebacks and errors in the server's log (twisted-mta), warnings/fatals (Postfix)."""
    if srv.tmp is None:
        return 0
    n = 0
    for name in ("twistd.log", "server.log", "maillog"):
        p = srv.tmp / name
        if p.exists():
            with open(p, errors="replace") as f:
                for line in f:
                    if ("Traceback" in line or "Unhandled" in line or " fatal:" in line
                            or " panic:" in line or "[-] error" in line.lower()):
                        n += 1
    return n


def wait_quiet(args) -> float:
    """
    Wait (up to --quiet-wait seconds) until the machine is quiet: less than
    --quiet-threshold % of one core busy over a second, with none of ours
    running.  Other people run tests on this machine.  Returns the last
    reading.
    """
    deadline = time.monotonic() + args.quiet_wait
    said = False
    while True:
        b0 = S.system_busy_seconds()
        time.sleep(1.0)
        busy = 100 * (S.system_busy_seconds() - b0)
        if busy < args.quiet_threshold or time.monotonic() >= deadline:
            if said or busy >= args.quiet_threshold:
                log(f"  machine busy at {busy:.0f}% of a core" if busy >= args.quiet_threshold
                    else f"  quiet now ({busy:.0f}%)")
            return busy
        if not said:
            log(f"  waiting for the machine to be quiet (others use {busy:.0f}% of a core)")
            said = True


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, spec=".0f", none="-"):
    return none if v is None else format(v, spec)


def machine_info(args) -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"
    rev = run(["git", "-C", str(S.REPO), "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", str(S.REPO), "status", "--porcelain", "--", "twisted_mta", "twisted"])
    try:
        import twisted
        tw = twisted.__version__
    except Exception:
        tw = "?"
    with open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    cpu_model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "cpu_model": cpu_model, "mem_gb": round(int(mem) / 1024 / 1024, 1),
        "python": platform.python_version(), "twisted": tw,
        "postfix": S.postfix_version() if shutil.which("postconf") else "not installed",
        "repo_rev": rev, "repo_dirty": bool(dirty),
        "fs": run(["df", "--output=source,fstype", str(args.workdir or "/tmp")]).splitlines()[-1:],
        "loadavg_start": os.getloadavg(), "nice": os.nice(0),
        "argv": sys.argv,
    }


# --- the matrix ---------------------------------------------------------------


def measure_cell(name: str, size: int, conns: int, args) -> dict:
    quiet = wait_quiet(args)
    srv = make_server(name, args)
    port = srv.start()
    try:
        warm_up(port, srv.rcpt_domain)
        snap = {}

        def on_start():
            snap["procs"] = S.all_process_cpu()
            snap["threads"] = S.thread_cpu(srv.root_pid) if srv.name != "postfix" else {}
            snap["ut"] = S.user_sys(srv.pids(), srv.root_pid)
            snap["cpu"] = srv.cpu()
            snap["sys"] = S.system_busy_seconds()
            snap["t"] = time.monotonic()
            snap["load"] = os.getloadavg()[0]

        r = load.run_load("127.0.0.1", port, conns, size, messages=args.messages,
                          duration=args.duration, procs=args.procs, rset=not args.no_rset,
                          rcpt_domain=srv.rcpt_domain, on_start=on_start)
        cpu1, sys1, t1 = srv.cpu(), S.system_busy_seconds(), time.monotonic()
        procs1 = S.all_process_cpu()
        threads1 = S.thread_cpu(srv.root_pid) if srv.name != "postfix" else {}
        ut1 = S.user_sys(srv.pids(), srv.root_pid)
        wall = t1 - snap["t"]
        server_cpu = cpu1 - snap["cpu"]
        users, kthreads = S.other_cpu(snap["procs"], procs1, {os.getpid(), srv.root_pid})
        total = sys1 - snap["sys"]
        r.update({
            "server": name, "describe": srv.describe(), "quiet_before": quiet,
            "server_user_pct": 100 * (ut1[0] - snap["ut"][0]) / wall,
            "server_sys_pct": 100 * (ut1[1] - snap["ut"][1]) / wall,
            # per thread (twisted-mta: the reactor's MainThread, spool threads)
            "threads": {k: {"user_pct": 100 * (v[0] - snap["threads"].get(k, (0, 0, 0))[0]) / wall,
                            "sys_pct": 100 * (v[1] - snap["threads"].get(k, (0, 0, 0))[1]) / wall,
                            "n": v[2]} for k, v in threads1.items()},
            "server_cpu_pct": 100 * server_cpu / wall,
            # other people's processes: what makes a figure unreliable
            "other_cpu_pct": 100 * users / wall,
            # kernel threads (I/O, journal) and time not attributed to any
            # process alive at the end (interrupts, short-lived processes)
            "kernel_cpu_pct": 100 * kthreads / wall,
            "unattributed_cpu_pct": 100 * max(0.0, total - server_cpu - r["client_cpu"] - users - kthreads) / wall,
            "loadavg": snap["load"],
            "hwm_kb": srv.hwm_kb(), "rss_kb": srv.rss_kb(), "pss_kb": srv.pss_kb(),
            "nprocs": len(srv.pids()),
        })
        time.sleep(0.5)
        r["stored"] = stored_messages(srv)
        r["log_problems"] = server_log_problems(srv)
        return r
    finally:
        srv.stop()
        srv.cleanup()


def _threads_text(threads: dict) -> str:
    return ", ".join(f"{k}×{v['n']} {v['user_pct'] + v['sys_pct']:.0f}%"
                     for k, v in sorted(threads.items(), key=lambda kv: -(kv[1]["user_pct"] + kv[1]["sys_pct"]))
                     if v["user_pct"] + v["sys_pct"] >= 1) or "-"


def run_matrix(args, report: dict) -> None:
    cells = report.setdefault("matrix", [])
    for rep in range(args.repeat):
        for size in args.sizes:
            for conns in args.conns:
                for name in args.servers:
                    log(f"matrix: {name} size={size} conns={conns} (run {rep + 1}/{args.repeat})")
                    try:
                        r = measure_cell(name, size, conns, args)
                    except Exception as e:
                        log(f"  FAILED: {e}")
                        cells.append({"server": name, "size": size, "conns": conns, "rep": rep,
                                      "failed": str(e)[:2000]})
                        continue
                    r["rep"] = rep
                    cells.append(r)
                    log(f"  {r['rate']:.0f} msg/s, errors {r['error_count']}, server CPU "
                        f"{r['server_cpu_pct']:.0f}% (user {r['server_user_pct']:.0f}%, sys "
                        f"{r['server_sys_pct']:.0f}%; threads {_threads_text(r['threads'])}), generator {r['client_cpu_pct']:.0f}%, "
                        f"others {r['other_cpu_pct']:.0f}%, kernel {r['kernel_cpu_pct']:.0f}+"
                        f"{r['unattributed_cpu_pct']:.0f}%, peak RSS {r['hwm_kb'] / 1024:.1f} MiB")


NOISY = 20.0  # % of a core used by others (processes + unattributed) that makes a run noisy


def noisy(c: dict) -> bool:
    return c["other_cpu_pct"] + c.get("unattributed_cpu_pct", 0.0) >= NOISY


def matrix_table(report: dict, args) -> str:
    cells = [c for c in report.get("matrix", []) if "failed" not in c]
    failed = [c for c in report.get("matrix", []) if "failed" in c]
    groups: dict = collections.defaultdict(list)
    for c in cells:
        groups[(c["size"], c["conns"], c["server"])].append(c)
    out = ["| size | conns | server | msgs/s | × Postfix | p50 ms | p99 ms | errors | server CPU | generator CPU | others' CPU | kernel CPU | peak RSS MiB | PSS MiB |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size in args.sizes:
        for conns in args.conns:
            def clean(g):
                return [c for c in g if not noisy(c)] or g

            pf = groups.get((size, conns, "postfix"))
            pf_rate = median([c["rate"] for c in clean(pf)]) if pf else None
            for name in args.servers:
                g = groups.get((size, conns, name))
                if not g:
                    continue
                rates = [c["rate"] for c in g]
                quiet = clean(g)
                rate = median([c["rate"] for c in quiet])
                spread = f" ({min(rates):.0f}–{max(rates):.0f})" if len(rates) > 1 else ""
                if len(quiet) < len(g):
                    spread += f" [{len(g) - len(quiet)} noisy run(s) left out]"
                g = quiet
                # × Postfix: the median of per-run ratios (each run of a server
                # against Postfix's run of the same repeat, a few seconds
                # apart), since the machine's speed drifts over minutes
                ratios = []
                for c in quiet:
                    p_same = [x for x in (pf or []) if x.get("rep") == c.get("rep") and not noisy(x)]
                    if p_same and p_same[0]["rate"]:
                        ratios.append(c["rate"] / p_same[0]["rate"])
                if ratios:
                    ratio = f"{median(ratios):.2f}"
                    if len(ratios) > 1 and name != "postfix":
                        ratio += f" ({min(ratios):.2f}–{max(ratios):.2f})"
                else:
                    ratio = f"{rate / pf_rate:.2f}" if pf_rate else "-"
                pipelining = "" if g[0]["pipelining"] else " ¹"
                out.append(
                    f"| {size // 1024} KB | {conns} | {name}{pipelining} | {rate:.0f}{spread} | {ratio} | "
                    f"{fmt(median([c['lat_ms']['p50'] for c in g]), '.1f')} | "
                    f"{fmt(median([c['lat_ms']['p99'] for c in g]), '.1f')} | "
                    f"{sum(c['error_count'] for c in g)} | "
                    f"{median([c['server_cpu_pct'] for c in g]):.0f}% | "
                    f"{median([c['client_cpu_pct'] for c in g]):.0f}% | "
                    f"{median([c['other_cpu_pct'] for c in g]):.0f}% | "
                    f"{median([c['kernel_cpu_pct'] + c['unattributed_cpu_pct'] for c in g]):.0f}% | "
                    f"{max(c['hwm_kb'] for c in g) / 1024:.1f} | "
                    f"{fmt(median([c.get('pss_kb') for c in g]) and median([c.get('pss_kb') for c in g]) / 1024, '.1f')} |")
    notes = ["", "¹ the server does not offer PIPELINING: one command at a time.",
             "× Postfix: median (and range) of the ratios of each run to Postfix's run in the same "
             "repeat, a few seconds apart.  "
             f"msgs/s: median of the runs that were not noisy (others' processes and unattributed CPU "
             f"under {NOISY:.0f}% of a core), range of all runs in brackets; the other columns are "
             "medians of the same runs.  Peak RSS: VmHWM summed over the server's processes (for "
             "Postfix this counts shared pages once per process); PSS: at the end of the run, shared "
             "pages split between processes.",
             "CPU columns: % of one core over the measured phase (100% = one core; the machine has "
             f"{os.cpu_count()}).  Server CPU: the server's processes (and threads).  Generator CPU: "
             "the load generator (user + system time, incl. the kernel's TCP work it pays for).  "
             "Others' CPU: every other user-space process (other people's tests; the runner is "
             "negligible): above ~10% the figure is unreliable.  Kernel CPU: kernel threads (block "
             "I/O, ext4 journal) plus time no live process accounts for (interrupts, processes that "
             "came and went)."]
    for c in failed:
        notes.append(f"FAILED: {c['server']} {c['size']} B × {c['conns']}: {(c['failed'].splitlines() or ['?'])[0]}")
    errs = [c for c in cells if c["error_count"]]
    for c in errs:
        notes.append(f"errors: {c['server']} {c['size']} B × {c['conns']}: {c['errors']}")
    probs = [c for c in cells if c.get("log_problems")]
    for c in probs:
        notes.append(f"server log: {c['server']} {c['size']} B × {c['conns']}: {c['log_problems']} error line(s)")
    return "\n".join(out + notes)


# --- idle sessions ------------------------------------------------------------


def measure_idle(name: str, n: int, args) -> dict:
    wait_quiet(args)
    kw = {}
    if name == "postfix":
        kw["smtpd_limit"] = args.postfix_idle_limit
    srv = make_server(name, args, **kw)
    port = srv.start()
    try:
        warm_up(port, srv.rcpt_domain, n=3)
        # open and close a few sessions, so that what every session needs
        # once (code paths, caches) is in RSS before the baseline
        pre = load.IdleClients("127.0.0.1", port, 10, ehlo=True, timeout=10)
        pre.open()
        pre.close()
        time.sleep(2)
        rss0, pss0, np0, avail0 = srv.rss_kb(), srv.pss_kb(), len(srv.pids()), S.mem_available_kb()
        timeout = 20.0 if name == "postfix" and (args.postfix_idle_limit or 100) < n else 120.0
        idle = load.IdleClients("127.0.0.1", port, n, ehlo=True, timeout=timeout)
        t0 = time.monotonic()
        counts = idle.open()
        opened_in = time.monotonic() - t0
        time.sleep(3)
        rss1, pss1, np1, avail1 = srv.rss_kb(), srv.pss_kb(), len(srv.pids()), S.mem_available_kb()
        hwm = srv.hwm_kb()
        idle.close()
        held = counts.get("ehlo", 0)
        client_kb = counts.get("client_rss_delta_kb", 0)
        return {
            # all the memory the machine lost, less the generator's part:
            # includes kernel memory (both ends' sockets; Postfix's page
            # tables and kernel stacks), and whatever others did meanwhile
            "bytes_per_conn_system": (avail0 - avail1 - client_kb) * 1024 / held if held else None,
            "server": name, "describe": srv.describe(), "requested": n, "counts": counts,
            "held": held, "opened_in": opened_in,
            "rss0_kb": rss0, "rss1_kb": rss1, "pss0_kb": pss0, "pss1_kb": pss1,
            "procs0": np0, "procs1": np1, "hwm_kb": hwm,
            "bytes_per_conn_rss": (rss1 - rss0) * 1024 / held if held else None,
            "bytes_per_conn_pss": (pss1 - pss0) * 1024 / held if held else None,
            "smtpd_limit": kw.get("smtpd_limit"),
        }
    finally:
        srv.stop()
        srv.cleanup()


def run_idle(args, report: dict) -> None:
    rows = report.setdefault("idle", [])
    for name in args.idle_servers:
        log(f"idle: {name}, {args.idle} sessions")
        try:
            r = measure_idle(name, args.idle, args)
        except Exception as e:
            log(f"  FAILED: {e}")
            rows.append({"server": name, "failed": str(e)[:2000]})
            continue
        rows.append(r)
        log(f"  held {r['held']}: {fmt(r['bytes_per_conn_rss'])} B/session (RSS), "
            f"{fmt(r['bytes_per_conn_pss'])} B/session (PSS)")


def idle_table(report: dict) -> str:
    out = ["| server | sessions held (EHLO done) | processes 0 → N | RSS 0 → N MiB | bytes/session (RSS) | bytes/session (PSS) | bytes/session (system) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for r in report.get("idle", []):
        if "failed" in r:
            notes.append(f"FAILED: {r['server']}: {(r['failed'].splitlines() or ['?'])[0]}")
            continue
        extra = ""
        if r["server"] == "postfix":
            extra = f" (smtpd process limit {r['smtpd_limit'] or 100})"
        out.append(f"| {r['server']}{extra} | {r['held']} of {r['requested']} | {r['procs0']} → {r['procs1']} | "
                   f"{r['rss0_kb'] / 1024:.1f} → {r['rss1_kb'] / 1024:.1f} | {fmt(r['bytes_per_conn_rss'])} | "
                   f"{fmt(r['bytes_per_conn_pss'])} | {fmt(r.get('bytes_per_conn_system'))} |")
        if r["held"] < r["requested"]:
            notes.append(f"{r['server']}: only {r['held']} of {r['requested']} sessions got a greeting and "
                         f"EHLO reply ({r['counts']}); the figure is per session held.")
    notes.append("RSS of Postfix is summed over all its processes (shared pages counted in each); "
                 "PSS splits shared pages between the processes that share them.  'system' is the drop "
                 "in MemAvailable less the generator's own RSS growth, per session: it adds kernel "
                 "memory (the socket structures of both ends, about the same for every server; "
                 "Postfix's page tables and kernel stacks) and is disturbed by other people's "
                 "processes.")
    return "\n".join(out + [""] + notes)


# --- relay (issue 3) ----------------------------------------------------------


class SinkProcess:
    def __init__(self, python: str):
        self.port = S.free_port()
        self.proc = subprocess.Popen([python, str(BENCH / "sink.py"), str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     preexec_fn=S._nofile(20000))
        self.timeline: list[tuple[int, float]] = []
        self.count = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        S.wait_for_greeting(self.port, 10)

    def _read(self) -> None:
        for line in self.proc.stdout:
            n, t = line.split()
            with self._cond:
                self.count = int(n)
                self.timeline.append((int(n), float(t)))
                self._cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def time_of(self, n: int) -> float | None:
        for count, t in self.timeline:
            if count >= n:
                return t
        return None

    def count_at(self, t: float) -> int:
        c = 0
        for count, tt in self.timeline:
            if tt <= t:
                c = count
        return c

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def measure_relay(name: str, args) -> dict:
    wait_quiet(args)
    sink = SinkProcess(sys.executable)
    srv = make_server(name, args, mode="relay", relay_port=sink.port)
    try:
        port = srv.start()
        # Probe: one message must reach the sink before the measurement.
        warm_up(port, srv.rcpt_domain, n=1)
        if not sink.wait_for(1, args.relay_probe_timeout):
            hint = ""
            tail = srv.log_tail(200)
            m = re.findall(r"status=deferred.*", tail) or re.findall(r".*(?:not available|deferred).*", tail)
            if m:
                hint = f" Server says: {m[-1].strip()[:300]}"
            raise Unsupported(f"{name} did not relay a probe message to the sink within "
                              f"{args.relay_probe_timeout:.0f}s (is SMTP delivery implemented?).{hint}")
        base = sink.count
        n = args.relay_messages
        r = load.run_load("127.0.0.1", port, args.relay_conns, args.relay_size, messages=n,
                          duration=3600, procs=args.procs, rset=not args.no_rset,
                          rcpt_domain=srv.rcpt_domain)
        ok = sink.wait_for(base + r["accepted"], args.relay_timeout)
        t_done = sink.time_of(base + r["accepted"])
        first, last_accept = r["first"], r["last"]
        res = {
            "server": name, "describe": srv.describe(), "messages": n, "accepted": r["accepted"],
            "errors": r["errors"], "accept_rate": r["rate"], "sink_count": sink.count - base,
            "complete": ok,
            "relay_elapsed": (t_done - first) if (ok and t_done and first) else None,
            "delivered_while_accepting": (sink.count_at(last_accept) - base) if last_accept else None,
            "hwm_kb": srv.hwm_kb(), "client_cpu_pct": r["client_cpu_pct"],
        }
        res["relay_rate"] = r["accepted"] / res["relay_elapsed"] if res["relay_elapsed"] else None
        return res
    finally:
        srv.stop()
        srv.cleanup()
        sink.stop()


def run_relay(args, report: dict) -> None:
    rows = report.setdefault("relay", [])
    for name in args.relay_servers:
        log(f"relay: {name}, {args.relay_messages} x {args.relay_size} B over {args.relay_conns} sessions")
        try:
            r = measure_relay(name, args)
        except Unsupported as e:
            log(f"  UNSUPPORTED: {e}")
            rows.append({"server": name, "unsupported": str(e)})
            continue
        except Exception as e:
            log(f"  FAILED: {e}")
            rows.append({"server": name, "failed": str(e)[:2000]})
            continue
        rows.append(r)
        log(f"  relayed at {fmt(r['relay_rate'])} msg/s (accepted at {r['accept_rate']:.0f} msg/s; "
            f"{fmt(r['delivered_while_accepting'])} delivered while accepting)")


def relay_table(report: dict, args) -> str:
    out = [f"{args.relay_messages} messages of {args.relay_size} B over {args.relay_conns} sessions, "
           "relayed to the bench's sink (bench/sink.py).", "",
           "| server | relayed msgs/s (first MAIL → sink holds all) | × Postfix | accepted msgs/s | delivered while accepting | peak RSS MiB |",
           "|---|---:|---:|---:|---:|---:|"]
    rows = report.get("relay", [])
    pf = [r for r in rows if r.get("server") == "postfix" and r.get("relay_rate")]
    pf_rate = pf[0]["relay_rate"] if pf else None
    notes = []
    for r in rows:
        if "unsupported" in r or "failed" in r:
            notes.append(f"{r['server']}: {r.get('unsupported') or r.get('failed')}")
            continue
        ratio = f"{r['relay_rate'] / pf_rate:.2f}" if pf_rate and r["relay_rate"] else "-"
        out.append(f"| {r['server']} | {fmt(r['relay_rate'])} | {ratio} | {r['accept_rate']:.0f} | "
                   f"{fmt(r['delivered_while_accepting'])} of {r['accepted']} | {r['hwm_kb'] / 1024:.1f} |")
        if not r["complete"]:
            notes.append(f"{r['server']}: the sink got only {r['sink_count']} of {r['accepted']} "
                         f"within {args.relay_timeout:.0f}s")
    return "\n".join(out + [""] + notes)


# --- profile ------------------------------------------------------------------


def find_py_spy(args) -> str | None:
    for cand in (args.py_spy, str(Path(sys.executable).parent / "py-spy"), "/tmp/bench-venv/bin/py-spy",
                 shutil.which("py-spy")):
        if cand and Path(cand).exists():
            return cand
    return None


# Where the reactor thread's time goes, by what the stack passes through
# (inclusive; a sample counts for every category its stack matches).
PROFILE_CATEGORIES = [
    ("SMTP command lines (ESMTPServer._line)", r"ESMTPServer\._line "),
    ("message body (ESMTPServer._body)", r"ESMTPServer\._body "),
    ("end of message: checks, envelope, commit (_end_message)", r"ESMTPServer\._end_message "),
    ("after the fsync: callbacks, 250, enqueue (_GroupSync._finished)", r"_GroupSync\._finished "),
    ("delivery attempt (DeliveryManager._run/_attempt/_record)", r"DeliveryManager\._(?:run|attempt|record) "),
    ("logging (twisted.logger Logger.emit → file)", r"Logger\.emit "),
    ("envelope/state JSON (QueueEntry.to_json)", r"QueueEntry\.to_json "),
    ("state file save (Spool.save, reactor side)", r"Spool\.save "),
    ("new spool file (Spool.new_message: id, open)", r"Spool\.new_message "),
    ("Received header (_received_header)", r"_received_header "),
    ("thread hand-off (executor submit, callFromThread)", r"ThreadPoolExecutor\.submit |callFromThread "),
    ("pipeline/plugins (Pipeline.ask, check_relay)", r"twisted_mta/pipeline\.py"),
    ("TCP writes (doWrite)", r"doWrite "),
    ("waiting in epoll (leaf)", r"doPoll \([^;]*$"),
]


def summarize_raw(raw: Path, top: int = 25) -> dict:
    """
    Sample counts from py-spy's raw (collapsed) output, recorded with
    --threads: per thread group (the reactor's MainThread, the rest), self
    time by function and by line, and inclusive time of twisted_mta
    functions.
    """
    frame_re = re.compile(r"^(?P<func>.*) \((?P<file>.*?):(?P<line>\d+)\)$")
    category_res = [(name, re.compile(rx)) for name, rx in PROFILE_CATEGORIES]
    groups: dict = {}
    by_thread = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = "?"
        if frames and frames[0].startswith("thread "):
            thread = frames.pop(0)
        if frames and frames[0].startswith("process "):
            frames.pop(0)
        name = thread.split(": ", 1)[-1]
        name = re.sub(r"_\d+$", "", name)  # spool-sync_3 -> spool-sync
        group = "MainThread" if name == "MainThread" else "other threads"
        total += n
        by_thread[name] += n
        g = groups.setdefault(group, {"total": 0, "self_fn": collections.Counter(),
                                      "self_line": collections.Counter(), "incl_fn": collections.Counter(),
                                      "categories": collections.Counter()})
        g["total"] += n
        for cname, rx in category_res:
            if rx.search(stack):
                g["categories"][cname] += n
        parsed = []
        for f in frames:
            m = frame_re.match(f)
            if m:
                path = short_path(m["file"])
                parsed.append((f"{m['func']} ({path})", f"{path}:{m['line']} {m['func']}"))
        seen = set()
        for fn, _ in parsed:
            if fn not in seen:
                g["incl_fn"][fn] += n
                seen.add(fn)
        if parsed:
            g["self_fn"][parsed[-1][0]] += n
            g["self_line"][parsed[-1][1]] += n
    out = {"total": total, "threads": by_thread.most_common(), "groups": {}}
    for name, g in groups.items():
        out["groups"][name] = {
            "total": g["total"],
            "self_fn": g["self_fn"].most_common(top),
            "self_line": g["self_line"].most_common(top),
            "incl_fn": [x for x in g["incl_fn"].most_common(400) if "twisted_mta" in x[0]][:top],
            "categories": [(name, g["categories"][name]) for name, _ in PROFILE_CATEGORIES],
        }
    return out


def short_path(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1] if marker == "/site-packages/" else "stdlib/" + path.split(marker, 1)[1].split("/", 1)[-1]
    if str(S.REPO) in path:
        return os.path.relpath(path, S.REPO)
    return path


def run_profile(args, report: dict, outdir: Path, stamp: str) -> None:
    py_spy = find_py_spy(args)
    profiles = report.setdefault("profile", [])
    if py_spy is None:
        profiles.append({"failed": "py-spy not found (pip install py-spy, or --py-spy PATH)"})
        return
    for mode in args.profile_modes:
        wait_quiet(args)
        srv = make_server("twisted-mta", args)
        port = srv.start()
        raw = outdir / f"{stamp}-profile-{mode}.txt"
        try:
            warm_up(port, srv.rcpt_domain)
            log(f"profile ({mode}): py-spy on twisted-mta (pid {srv.root_pid}), "
                f"{args.profile_size} B x {args.profile_conns} conns")
            cmd = [py_spy, "record", "--pid", str(srv.root_pid), "--format", "raw", "--output", str(raw),
                   "--rate", str(args.profile_rate), "--threads", "--nonblocking"]
            if mode == "gil":
                cmd.append("--gil")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
            r = load.run_load("127.0.0.1", port, args.profile_conns, args.profile_size,
                              duration=args.profile_duration, procs=args.procs, rset=not args.no_rset,
                              rcpt_domain=srv.rcpt_domain)
            spy.send_signal(signal.SIGINT)
            try:
                _, err = spy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            if not raw.exists():
                profiles.append({"mode": mode, "failed": f"py-spy wrote nothing: {err[-500:]}"})
                continue
            summary = summarize_raw(raw)
            summary.update({"mode": mode, "rate": r["rate"], "raw": str(raw.relative_to(BENCH)),
                            "size": args.profile_size, "conns": args.profile_conns,
                            "duration": args.profile_duration, "sampling_rate": args.profile_rate,
                            "mta_mode": srv.mode})
            profiles.append(summary)
            log(f"  {r['rate']:.0f} msg/s under py-spy; {summary['total']} samples -> {raw}")
        finally:
            srv.stop()
            srv.cleanup()


def profile_section(report: dict) -> str:
    out = []
    for p in report.get("profile", []):
        if "failed" in p:
            out += [f"profile {p.get('mode', '')} failed: {p['failed']}", ""]
            continue
        total = p["total"] or 1
        what = ("--gil: only the thread holding the GIL is sampled, so this is where Python spends "
                "CPU (one core at most)" if p["mode"] == "gil" else
                "all threads that are not idle are sampled, including those blocked in fsync: "
                "where each thread spends its time")
        out += [f"### py-spy {p['mode']}", "",
                f"py-spy record --threads --nonblocking{' --gil' if p['mode'] == 'gil' else ''} at "
                f"{p['sampling_rate']} Hz while twisted-mta ({p['mta_mode']} mode) took {p['size']} B "
                f"messages over {p['conns']} sessions for {p['duration']:.0f} s ({p['rate']:.0f} msg/s "
                f"under the profiler); {p['total']} samples; {what}.  Raw stacks: bench/{p['raw']} "
                "(git-ignored).", "",
                "Samples per thread: " + ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in p["threads"][:8]),
                ""]
        for gname, g in sorted(p["groups"].items(), key=lambda kv: kv[0] != "MainThread"):
            gt = g["total"] or 1
            if gname == "MainThread":
                out += [f"**MainThread** (the reactor; {100 * g['total'] / total:.0f}% of samples): where "
                        "its time goes, by what the stack passes through (inclusive, categories overlap; "
                        "% of this thread's samples)", "", "| % | category |", "|---:|---|"]
                out += [f"| {100 * n / gt:.1f} | {name} |" for name, n in g["categories"]]
                out.append("")
            out += [f"**{gname}** ({100 * g['total'] / total:.0f}% of samples): self time by line "
                    f"(% of this group's samples)", "", "| % | file:line function |", "|---:|---|"]
            out += [f"| {100 * n / gt:.1f} | `{fn}` |" for fn, n in g["self_line"][:15]]
            out += ["", f"**{gname}**: self time by function", "", "| % | function (file) |", "|---:|---|"]
            out += [f"| {100 * n / gt:.1f} | `{fn}` |" for fn, n in g["self_fn"][:15]]
            if gname == "MainThread":
                out += ["", f"**{gname}**: inclusive time of twisted_mta functions", "",
                        "| % | function (file) |", "|---:|---|"]
                out += [f"| {100 * n / gt:.1f} | `{fn}` |" for fn, n in g["incl_fn"][:25]]
            out.append("")
    return "\n".join(out)


# --- report -------------------------------------------------------------------


def render(report: dict, args) -> str:
    m = report["machine"]
    nice_text = f"; servers and generator ran at nice {m['nice']}" if m.get("nice") else ""
    if args.mta_rev == "worktree":
        mta_text = (f"the working tree at {m['repo_rev']}"
                    f"{' with uncommitted changes' if m['repo_dirty'] else ''}")
    else:
        mta_text = f"commit {args.mta_rev} (exported for the run)"
    if getattr(args, "base_rev", None):
        mta_text += f"; twisted-mta-base: commit {args.base_rev} (exported for the run)"
    parts = [f"# twisted-mta benchmark, {m['date']}", "",
             f"Machine: {m['cpus']} × {m['cpu_model']}, {m['mem_gb']} GB, Linux {m['kernel']}, "
             f"file system {' '.join(m['fs'])}; Python {m['python']}, Twisted {m['twisted']}, "
             f"Postfix {m['postfix']}; twisted-mta: {mta_text}.  "
             f"Load average at start: {' '.join(f'{x:.2f}' for x in m['loadavg_start'])}"
             f"{nice_text}.", "",
             f"Command: `{' '.join(m['argv'])}`", ""]
    if report.get("matrix"):
        parts += ["## Messages accepted per second", "",
                  f"Each cell: a fresh server, 20 warm-up messages, then {args.duration:.0f} s "
                  f"(or {args.messages} messages) of load; msgs/s from the first MAIL to the last 250; "
                  f"{'RSET between messages; ' if not args.no_rset else ''}{args.repeat} run(s) per cell "
                  "(median, range in brackets).  "
                  f"twisted-mta mode: {args.mta_mode}; Postfix mode: {args.postfix_mode} "
                  "(see bench/README.md).", "",
                  matrix_table(report, args), ""]
    if report.get("idle"):
        parts += ["## Memory per idle session", "",
                  "(RSS with N sessions open after EHLO − RSS before) / N, on a fresh server after a "
                  "warm-up.", "", idle_table(report), ""]
    if report.get("relay"):
        parts += ["## Relay (issue 3)", "", relay_table(report, args), ""]
    if report.get("profile"):
        parts += ["## Profile of twisted-mta", "", profile_section(report), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="twisted-mta benchmark runner (see bench/README.md)")
    p.add_argument("--only", default="matrix,idle,relay,profile",
                   help="what to run: matrix,idle,relay,profile (default: all)")
    p.add_argument("--servers", default=",".join(ALL_SERVERS), help="for the matrix (default: all four)")
    p.add_argument("--sizes", default="2048,102400", help="message sizes in bytes (default 2048,102400)")
    p.add_argument("--conns", default="1,10,50", help="concurrent sessions (default 1,10,50)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per cell (default 10)")
    p.add_argument("--messages", type=int, default=10**9, help="cap on messages per cell (default: none)")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell; the table shows the median")
    p.add_argument("--procs", type=int, default=1,
                   help="load generator processes (default 1: one process drives >10,000 msg/s into a sink)")
    p.add_argument("--no-rset", action="store_true", help="no RSET between messages")
    p.add_argument("--mta-mode", default="queue", choices=("queue", "refused", "discard", "maildir"),
                   help="where twisted-mta puts accepted mail (default queue: non-local, stays queued)")
    p.add_argument("--postfix-mode", default="queue", choices=("queue", "discard"),
                   help="where Postfix puts accepted mail (default queue: defer_transports, stays queued)")
    p.add_argument("--idle", type=int, default=5000, help="idle sessions to open (default 5000)")
    p.add_argument("--idle-servers", default="twisted-mta,postfix,aiosmtpd,twisted-20")
    p.add_argument("--postfix-idle-limit", type=int, default=5000,
                   help="smtpd process limit for the idle test (default 5000, i.e. one smtpd per "
                        "session; Postfix's default is 100)")
    p.add_argument("--relay-servers", default="twisted-mta,postfix")
    p.add_argument("--relay-messages", type=int, default=5000)
    p.add_argument("--relay-size", type=int, default=2048)
    p.add_argument("--relay-conns", type=int, default=10)
    p.add_argument("--relay-timeout", type=float, default=300.0)
    p.add_argument("--relay-probe-timeout", type=float, default=15.0)
    p.add_argument("--profile-size", type=int, default=2048)
    p.add_argument("--profile-conns", type=int, default=10)
    p.add_argument("--profile-duration", type=float, default=20.0)
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--profile-modes", default="gil,threads",
                   help="gil (Python CPU: the GIL holder), threads (all busy threads); default both")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="before each measurement, wait up to this long for other processes to calm down")
    p.add_argument("--quiet-threshold", type=float, default=10.0,
                   help="'quiet' means others use less than this %% of one core (default 10)")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness increment for the runner and all it starts (e.g. -10, as root, so that "
                        "other people's processes disturb the figures less)")
    p.add_argument("--mta-baseline", default=None, metavar="REV",
                   help="also measure the twisted-mta of git revision REV, as server "
                        "'twisted-mta-base' (add it to --servers), interleaved with the others: "
                        "a before/after comparison within the same repeats")
    p.add_argument("--mta-source", default="HEAD",
                   help="the twisted-mta code to run: a git revision, exported once for the whole run "
                        "(default HEAD), or 'worktree' for /work/main as it is (others' uncommitted edits "
                        "included, and changing under the run)")
    p.add_argument("--mta-switch-interval", type=float, default=None, metavar="SECONDS",
                   help="diagnostic: sys.setswitchinterval() in twisted-mta (Python's default 0.005)")
    p.add_argument("--twistd", default=None, help="twistd to run (default: beside this python)")
    p.add_argument("--aiosmtpd-python", default=None, help="a python with aiosmtpd (default: search)")
    p.add_argument("--py-spy", default=None)
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only print the report of a run saved earlier (bench/results/<stamp>.json)")
    p.add_argument("--summarize", type=Path, default=None, metavar="RAW",
                   help="only print the summary of a py-spy raw file recorded earlier")
    p.add_argument("--workdir", type=Path, default=None, help="where the temp folders go (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the servers' temp folders")
    p.add_argument("--out", type=Path, default=BENCH / "results")
    args = p.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.conns = [int(x) for x in args.conns.split(",")]
    args.idle_servers = [s for s in args.idle_servers.split(",") if s]
    args.relay_servers = [s for s in args.relay_servers.split(",") if s]
    args.profile_modes = [s for s in args.profile_modes.split(",") if s]
    only = set(args.only.split(","))
    if args.render:
        saved = json.loads(args.render.read_text())
        print(render(saved, argparse.Namespace(**saved["args"])))
        return 0
    if args.summarize:
        summary = summarize_raw(args.summarize)
        summary.update({"mode": "gil" if "gil" in args.summarize.name else "threads", "rate": 0.0,
                        "raw": str(args.summarize), "size": 0, "conns": 0, "duration": 0,
                        "sampling_rate": args.profile_rate, "mta_mode": "?"})
        print(profile_section({"profile": [summary]}))
        return 0

    if args.nice:
        # Inherited by every server, the generator and Postfix's master
        # (started by the postfix command run from here).
        os.nice(args.nice)
    args.out.mkdir(parents=True, exist_ok=True)
    snapshot = None
    if args.mta_source == "worktree":
        args.mta_path, args.mta_rev = S.REPO, "worktree"
    else:
        snapshot, rev = snapshot_source(args.mta_source, args.workdir)
        args.mta_path, args.mta_rev = snapshot, rev
    base_snapshot = None
    args.base_path = args.base_rev = None
    if args.mta_baseline:
        base_snapshot, args.base_rev = snapshot_source(args.mta_baseline, args.workdir)
        args.base_path = base_snapshot
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"machine": machine_info(args), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in vars(args).items()}}
    log(f"machine: {report['machine']['cpus']} CPUs, load {report['machine']['loadavg_start']}")
    try:
        if "matrix" in only:
            run_matrix(args, report)
        if "idle" in only:
            run_idle(args, report)
        if "relay" in only:
            run_relay(args, report)
        if "profile" in only:
            run_profile(args, report, args.out, stamp)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    finally:
        if S.remove_discarded():
            log("removed the cells' folders: on ext4 without a journal, files created in the "
                "next ~6 minutes cost more (bench/README.md); wait before another run, or use --keep")
        for folder in (snapshot, base_snapshot):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    text = render(report, args)
    (args.out / f"{stamp}.md").write_text(text + "\n")
    (args.out / f"{stamp}.json").write_text(json.dumps(report, indent=1, default=str))
    print(text)
    log(f"saved {args.out / (stamp + '.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
