#!/usr/bin/env python3
"""
What the plugin pipeline costs (issue 4, "Speed"); run by hand, never
part of the test suite.

  throughput  twistd -n mta (bench/servers.py TwistedMTA, queue mode) with
              0, 5 and 10 cheap filters, the same load each time (2 KB
              messages over 10 sessions for --duration seconds, through
              bench/load.run_load), interleaved for --repeat R, the order
              rotated each repeat (a run is affected by the one before
              it), so that the machine's noise falls on all alike.
              Reports msg/s (median per variant, and the ratio to 0
              filters) and the server's CPU per message.  The variant
              "0-again" (no filters either) is an A/A check of the noise.
  hooks       in this process: each chain's pipeline asked at every stage
              as the server asks it; CPU per message, and each filter alone.
  reload      in this process: an MTAService (twisted_mta.service) with
              10 plugins from 10 files in a plugins folder (every reload
              executes them afresh), service.reload() --reloads times;
              median and p95 per reload, and loader.build_pipeline alone.

The filters are chosen to be cheap and to run a hook at every stage a
message passes (see CHAINS); the report lists each one with the stages
it hooks, read from the pipeline the server builds, and checks that the
data-stage changes of every filter are on the queued messages.

    /tmp/venv/bin/python bench/pipeline.py --repeat 6 --variants 0,5,10,0-again
    /tmp/venv/bin/python bench/pipeline.py --only reload --reloads 50

The report is printed and written to bench/results/pipeline-<stamp>.md
(and .json); see bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import load  # noqa: E402
import run as R  # noqa: E402  (warm_up, wait_quiet, snapshot_source, stored_messages, ...)
import servers as S  # noqa: E402

SENDER_DOMAIN = "client.bench.test"  # load.run_load's default sender
RCPT_DOMAIN = S.TwistedMTA.rcpt_domain  # remote.bench.invalid in queue mode
BIG = 10 ** 9  # rate limits nobody reaches
MIB50 = 50 * 1024 * 1024

# --- the filter chains ------------------------------------------------------------
#
# Each filter is (use, options, why).  Options are TOML values written out by
# toml_value(); "{plugins}" in a string is replaced by the plugins folder.

FIVE = [
    ("ratelimit", {"rules": [
        {"key": "ip", "count": "connections", "limit": BIG},
        {"key": "ip", "count": "messages", "limit": BIG},
        {"key": "recipient_domain", "count": "recipients", "limit": BIG}]},
     "per-IP connections and messages, per-domain recipients; limits never reached"),
    ("size", {"senders": {SENDER_DOMAIN: MIB50}, "recipients": {RCPT_DOMAIN: MIB50}},
     "limits for the bench's sender and recipient domains (both looked up and compared)"),
    ("recipients", {"domains": [RCPT_DOMAIN], "addresses": [f"*@{RCPT_DOMAIN}"]},
     "the recipient domain checked, with a catch-all"),
    ("headers", {"rules": [{"action": "add", "name": "X-Bench-Headers", "value": "added"}]},
     "one add rule"),
    ("add_header:AddHeader", {"name": "X-Bench-Plugin", "value": "added"},
     "plugins/add_header.py"),
]

TEN = FIVE + [
    ("no_exe:NoExe", {}, "plugins/no_exe.py: MIME parse of the whole message in a thread"),
    ("add_header:AddHeader", {"name": "X-Bench-Plugin-2", "value": "added"},
     "plugins/add_header.py again"),
    ("headers", {"rules": [{"action": "rewrite", "name": "Subject", "match": "^Quarterly report",
                            "value": "Report"}]},
     "a rewrite rule that matches every message (reads the stored header)"),
    ("ratelimit", {"rules": [
        {"key": "sender", "count": "messages", "limit": BIG},
        {"key": "sender", "count": "recipients", "limit": BIG}]},
     "per-sender messages and recipients"),
    ("recipients", {"domains": [RCPT_DOMAIN], "file": "{plugins}/recipients"},
     "a recipients file (catch-all and a few addresses)"),
]

#: Names for each filter of TEN on its own (a diagnostic: --variants 0,size,...).
SINGLES = ["ratelimit", "size", "recipients", "headers-add", "add_header", "no_exe",
           "add_header-2", "headers-rewrite", "ratelimit-sender", "recipients-file"]

#: The variants: "0", "5", "10" filters, and each filter alone.
#: "0-again": no filters either, an A/A check of the order's own effect.
CHAINS = {"0": [], "5": FIVE, "10": TEN, "0-again": [],
          **{name: [f] for name, f in zip(SINGLES, TEN)}}


def expected_headers(chain) -> set[str]:
    """The header fields a chain adds to every queued message (checked after each run)."""
    out = set()
    for use, options, _ in chain:
        if use.startswith("add_header"):
            out.add(options["name"])
        for rule in options.get("rules", ()) if use == "headers" else ():
            out.add(rule["name"])
    return out

RECIPIENTS_FILE = f"postmaster@{RCPT_DOMAIN}\nabuse@{RCPT_DOMAIN}\n*@{RCPT_DOMAIN}\n"

#: The reload bench: 10 [[filter]] tables, each from its own file (copies
#: of the example plugins), so every reload executes 10 files.
RELOAD_FILES = [
    ("add_header", "AddHeader", {"name": "X-Reload-{i}"}),
    ("no_exe", "NoExe", {}),
    ("http_check", "HTTPCheck", {"url": "http://127.0.0.1:9/check"}),
]


def toml_value(v, plugins: Path) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v.replace("{plugins}", str(plugins)))  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x, plugins) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x, plugins)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def filters_toml(chain, plugins: Path) -> str:
    out = []
    for use, options, _ in chain:
        out += ["", "[[filter]]", f"use = {json.dumps(use)}"]
        for key, value in options.items():
            if key == "rules":  # arrays of tables, as the docs write them
                continue
            out.append(f"{key} = {toml_value(value, plugins)}")
        for rule in options.get("rules", ()):
            out.append("[[filter.rules]]")
            out += [f"{k} = {toml_value(x, plugins)}" for k, x in rule.items()]
    return "\n".join(out) + "\n"


def export_plugins(source: str, dest: Path) -> Path:
    """The example plugins/ of git revision C{source} (or the working tree) in C{dest}/plugins."""
    out = dest / "plugins"
    if source == "worktree":
        shutil.copytree(S.REPO / "plugins", out, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(S.REPO), "archive", source, "plugins"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (out / "recipients").write_text(RECIPIENTS_FILE)
    return out


class FilteredMTA(S.TwistedMTA):
    """TwistedMTA (queue mode) with C{plugin_paths} and a chain of [[filter]] tables."""

    def __init__(self, variant: str, plugins: Path, **kw):
        super().__init__(mode="queue", **kw)
        self.variant = variant
        self.plugins = plugins
        self.name = "twisted-mta"  # R.stored_messages knows its spool by this name

    def describe(self) -> str:
        return f"twisted-mta (queue, filters: {self.variant})"

    def config_text(self) -> str:
        # Top-level keys go before the first table.
        return (f"plugin_paths = [{json.dumps(str(self.plugins))}]\n" + super().config_text()
                + filters_toml(CHAINS[self.variant], self.plugins))


# --- throughput ------------------------------------------------------------------


def queued_headers(srv: S.Server, limit: int = 50) -> tuple[int, set[str] | None]:
    """(state files read, the header names every one of them adds), from the spool."""
    queue = srv.tmp / "spool" / "queue"
    common = None
    n = 0
    for p in sorted(queue.glob("*.state")):
        if n >= limit:
            break
        try:  # a header line (TMTA1S <length> <crc32>), then the entry's JSON
            entry = json.loads(p.read_bytes().split(b"\n", 1)[1])
        except (OSError, ValueError, IndexError):
            continue
        if entry.get("sender", "").startswith("warmup@"):
            continue  # R.warm_up's messages: another Subject
        names = {name for name, _ in entry.get("add_headers", [])}
        common = names if common is None else common & names
        n += 1
    return n, common


def measure(variant: str, rep: int, args) -> dict:
    quiet = R.wait_quiet(args)
    srv = FilteredMTA(variant, args.plugins, twistd=args.twistd, python_path=args.mta_path,
                      workdir=args.workdir, keep=args.keep)
    port = srv.start()
    try:
        R.warm_up(port, srv.rcpt_domain)
        snap = {}

        def on_start():
            snap["procs"] = S.all_process_cpu()
            snap["threads"] = S.thread_cpu(srv.root_pid)
            snap["cpu"] = srv.cpu()
            snap["sys"] = S.system_busy_seconds()
            snap["t"] = time.monotonic()
            snap["load"] = os.getloadavg()[0]

        r = load.run_load("127.0.0.1", port, args.conns, args.size, duration=args.duration,
                          rcpt_domain=srv.rcpt_domain, on_start=on_start)
        cpu1, sys1, t1 = srv.cpu(), S.system_busy_seconds(), time.monotonic()
        procs1, threads1 = S.all_process_cpu(), S.thread_cpu(srv.root_pid)
        wall = t1 - snap["t"]
        server_cpu = cpu1 - snap["cpu"]
        main0 = snap["threads"].get("main", (0, 0, 0))
        main_cpu = sum(threads1.get("main", (0, 0, 0))[:2]) - sum(main0[:2])
        users, kthreads = S.other_cpu(snap["procs"], procs1, {os.getpid(), srv.root_pid})
        total = sys1 - snap["sys"]
        accepted = max(1, r["accepted"])
        r.update({
            "filters": variant, "rep": rep, "quiet_before": quiet, "loadavg": snap["load"],
            "server_cpu_pct": 100 * server_cpu / wall,
            "main_cpu_pct": 100 * main_cpu / wall,
            # CPU per message: far less disturbed by other people's load than msg/s
            "cpu_us_per_msg": 1e6 * server_cpu / accepted,
            "main_us_per_msg": 1e6 * main_cpu / accepted,
            "other_cpu_pct": 100 * users / wall,
            "unattributed_cpu_pct": 100 * max(0.0, total - server_cpu - r["client_cpu"] - users
                                              - kthreads) / wall,
        })
        time.sleep(0.5)
        r["stored"] = R.stored_messages(srv)
        r["log_problems"] = R.server_log_problems(srv)
        r["checked_entries"], headers = queued_headers(srv)
        r["added_headers"] = sorted(headers or ())
        missing = expected_headers(CHAINS[variant]) - (headers or set())
        r["missing_headers"] = sorted(missing) if r["checked_entries"] else ["<no entries>"]
        if r["log_problems"]:
            R.log(f"  {r['log_problems']} problem line(s) in the server's log:\n{srv.log_tail()}")
        return r
    finally:
        srv.stop()
        srv.cleanup()
        # Removing thousands of spool files leaves the journal work for later: flush it
        # now, or it lands on the next run (which then depends on what ran before it).
        os.sync()


def noisy(r: dict) -> bool:
    return r["other_cpu_pct"] + r["unattributed_cpu_pct"] >= R.NOISY


def chain_pipeline(n: int, folder: Path, args):
    """The L{Pipeline} the server builds for the C{n}-filter chain (config and spool in C{folder})."""
    from twisted_mta import config as configmod, loader
    srv = FilteredMTA(n, args.plugins, twistd=args.twistd)
    srv.port = 0
    (folder / "mta.toml").write_text(srv.config_text())
    srv.stop()  # only closes the refused port's socket
    return loader.build_pipeline(configmod.load(folder / "mta.toml"), 1)


def chain_stages(args) -> dict[int, list[tuple[str, list[str]]]]:
    """For each chain: (use, the stages it hooks)."""
    out = {}
    for n in args.variants:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            out[n] = [(f.name, f.hooks()) for f in chain_pipeline(n, Path(tmp), args).filters]
    return out


def run_throughput(args, report: dict) -> None:
    report["chains"] = {n: [[use, stages] for use, stages in chain]
                        for n, chain in chain_stages(args).items()}
    runs = report["throughput"] = []
    for rep in range(args.repeat):
        k = rep % len(args.variants) if args.order == "rotate" else 0
        for n in args.variants[k:] + args.variants[:k]:
            R.log(f"repeat {rep + 1}/{args.repeat}: {n} filters")
            r = measure(n, rep, args)
            runs.append(r)
            R.log(f"  {r['rate']:.0f} msg/s, server {r['server_cpu_pct']:.0f}% "
                  f"({r['cpu_us_per_msg']:.0f} µs/msg, reactor {r['main_us_per_msg']:.0f} µs/msg), "
                  f"errors {r['error_count']}, others {r['other_cpu_pct']:.0f}%, "
                  f"load {r['loadavg']:.1f}, headers added {r['added_headers']}")
            with open(args.out.with_suffix(".json"), "w") as f:  # partial results survive a crash
                json.dump(report, f, indent=1, default=str)


def throughput_table(report: dict, args) -> str:
    """
    Medians per variant over the runs that were not noisy (as bench/run.py: others'
    processes plus unattributed CPU under R.NOISY % of a core), all runs if fewer than
    two were quiet; the ranges cover every run.  Per-repeat ratios pair a run with the
    0-filter run of the same repeat, both quiet.
    """
    runs = report["throughput"]
    med = statistics.median

    def clean(g):
        quiet = [r for r in g if not noisy(r)]
        return quiet if len(quiet) >= 2 else g

    zero = [r for r in runs if r["filters"] == "0"]
    base = {r["rep"]: r for r in zero if not noisy(r)}
    lines = ["| filters | msg/s median (range) | × 0 filters: ratio of medians | × 0 filters: "
             "per repeat, median (range) | server CPU µs/msg | of which reactor thread | "
             "× 0 filters (CPU/msg) | p50 / p99 ms | errors | noisy runs (left out) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rate0 = med([r["rate"] for r in clean(zero)]) if zero else None
    cpu0 = med([r["cpu_us_per_msg"] for r in clean(zero)]) if zero else None
    summary = {}
    for n in args.variants:
        g = [r for r in runs if r["filters"] == n]
        if not g:
            continue
        rates = [r["rate"] for r in g]
        q = clean(g)
        rate = med([r["rate"] for r in q])
        paired = [r["rate"] / base[r["rep"]]["rate"] for r in g
                  if r["rep"] in base and base[r["rep"]]["rate"] and not noisy(r)]
        cpu = med([r["cpu_us_per_msg"] for r in q])
        main = med([r["main_us_per_msg"] for r in q])
        summary[n] = {"rate": rate, "ratio": rate / rate0 if rate0 else None,
                      "paired": med(paired) if paired else None, "paired_all": paired,
                      "cpu_us": cpu, "cpu_ratio": cpu / cpu0 if cpu0 else None}
        rng = lambda xs, f: f" ({min(xs):{f}}–{max(xs):{f}})" if len(xs) > 1 else ""
        lines.append(
            f"| {n} | {rate:.0f}{rng(rates, '.0f')} | "
            f"{R.fmt(summary[n]['ratio'], '.2f')} | "
            f"{R.fmt(summary[n]['paired'], '.2f')}{rng(paired, '.2f') if paired else ''} | "
            f"{cpu:.0f} | {main:.0f} | {R.fmt(summary[n]['cpu_ratio'], '.2f')} | "
            f"{med([r['lat_ms']['p50'] or 0 for r in q]):.1f} / "
            f"{med([r['lat_ms']['p99'] or 0 for r in q]):.1f} | "
            f"{sum(r['error_count'] for r in g)} | {sum(1 for r in g if noisy(r))} of {len(g)} "
            f"({len(g) - len(q)}) |")
    report["throughput_summary"] = summary
    out = ["\n".join(lines), ""]
    five = summary.get("5")
    if five and five["ratio"] is not None:
        cost = 100 * (1 - five["ratio"])
        verdict = "met" if cost < 10 else "not met"
        paired = five["paired_all"]
        out.append(f"**Target (5 cheap filters cost under 10 % of throughput): {verdict}**: "
                   f"{five['ratio']:.2f}× the 0-filter rate by the medians (a cost of {cost:.1f} %)"
                   + (f", {five['paired']:.2f}× by the median of per-repeat ratios "
                      f"({min(paired):.2f}–{max(paired):.2f})" if paired else "")
                   + (f"; server CPU per message {100 * (five['cpu_ratio'] - 1):+.1f} %"
                      if five["cpu_ratio"] is not None else "")
                   + ".  Run-to-run spread on this shared machine is as wide as the target; the "
                   "hooks' own CPU (below) is the firmer figure.")
        out.append("")
    checks = []
    for r in runs:
        if r["missing_headers"] or r["log_problems"] or r["error_count"]:
            checks.append(f"- repeat {r['rep'] + 1}, {r['filters']} filters: missing changes "
                          f"{r['missing_headers']}, log problems {r['log_problems']}, "
                          f"errors {r['errors']}")
    if checks:
        out += ["Problems:", ""] + checks + [""]
    else:
        out += ["Every run: 0 errors, no tracebacks in the server's log, and the changes of every "
                "data-stage filter (added headers, the Subject rewrite) on each of the first 50 "
                "queued messages checked.", ""]
    stored = [(r["stored"], r["accepted"]) for r in runs]
    if all(s is not None and s == a + 20 for s, a in stored):
        out += ["Messages in the spool afterwards equalled accepted + 20 warm-up in every run.", ""]
    else:
        out += [f"Spool check (stored, accepted): {stored} (stored should be accepted + 20)", ""]
    out += [f"A run is noisy when other processes plus CPU time not attributed to any process "
            f"reach {R.NOISY:.0f} % of a core during it; medians leave noisy runs out (when at "
            f"least two runs of the variant were quiet), ranges include them.", ""]
    return "\n".join(out)


def chains_text(report: dict) -> str:
    out = []
    for n, chain in CHAINS.items():
        if n not in report.get("chains", {}) or not chain or n in SINGLES:
            continue
        stages = report["chains"][n]
        out += [f"**{n} filters**, in order:", "",
                "| # | use | hooks | what |", "|---:|---|---|---|"]
        for i, ((use, _, why), (_, hooks)) in enumerate(zip(chain, stages), 1):
            out.append(f"| {i} | `{use}` | {', '.join(hooks)} | {why} |")
        out.append("")
    return "\n".join(out)


# --- reload ----------------------------------------------------------------------


def reload_site(folder: Path, plugins_src: Path, kind: str) -> Path:
    """A config folder for the reload bench: C{kind} is "files10", "chain10" or "none"."""
    folder.mkdir(parents=True)
    plugins = folder / "plugins"
    plugins.mkdir()
    (plugins / "recipients").write_text(RECIPIENTS_FILE)
    text = ['hostname = "mta.bench.test"', 'spool = "spool"', f'control = "unix:{folder}/c.sock"',
            'plugin_paths = ["plugins"]', "[[listen]]", 'endpoint = "tcp:0:interface=127.0.0.1"',
            'tls = "none"', "[relay]", 'local_domains = ["bench.test"]',
            'networks = ["127.0.0.0/8"]', ""]
    if kind == "files10":
        for i in range(1, 11):
            module, cls, options = RELOAD_FILES[(i - 1) % len(RELOAD_FILES)]
            name = f"p{i:02d}_{module}"
            shutil.copy(plugins_src / f"{module}.py", plugins / f"{name}.py")
            text += ["[[filter]]", f'use = "{name}:{cls}"']
            text += [f"{k} = {json.dumps(v.format(i=i))}" for k, v in options.items()]
    elif kind == "chain10":
        for f in plugins_src.glob("*.py"):
            shutil.copy(f, plugins / f.name)
        text.append(filters_toml(TEN, plugins))
    (folder / "mta.toml").write_text("\n".join(text) + "\n")
    return folder / "mta.toml"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def run_reload(args, report: dict) -> None:
    from twisted_mta import config as configmod, loader
    from twisted_mta.service import MTAService
    out = report["reload"] = {}
    base = Path(tempfile.mkdtemp(prefix="bench-reload-", dir=args.workdir))
    bytecode = sys.dont_write_bytecode
    try:
        for kind in ("none", "files10", "files10-pyc", "chain10"):
            R.log(f"reload: {kind}")
            # Without a bytecode cache every reload compiles each plugin file (a plugins
            # folder the server cannot write to, or PYTHONDONTWRITEBYTECODE); with one,
            # the first load writes __pycache__ and later ones read it.
            sys.dont_write_bytecode = kind != "files10-pyc"
            path = reload_site(base / kind, args.plugins, kind.removesuffix("-pyc"))
            service = MTAService(configmod.load(path))
            service.prepare()  # first pipeline, TLS options (a self-signed certificate, kept)
            nfilters = len(service.pipeline.filters)
            for _ in range(3):  # warm: imports of what the plugins import
                service.reload()
            times = []
            for _ in range(args.reloads):
                t0 = time.perf_counter()
                d = service.reload()
                times.append(time.perf_counter() - t0)
                failure = []
                d.addErrback(failure.append)
                if failure:
                    raise SystemExit(f"reload failed: {failure[0].getErrorMessage()}")
            build = []
            for i in range(args.reloads):
                config = configmod.load(path)
                t0 = time.perf_counter()
                loader.build_pipeline(config, 10_000 + i, reactor=service.reactor,
                                      shared=service.shared)
                build.append(time.perf_counter() - t0)
            parse = []
            for _ in range(args.reloads):
                t0 = time.perf_counter()
                configmod.load(path)
                parse.append(time.perf_counter() - t0)
            del config
            gc.collect()
            out[kind] = {
                "filters": nfilters, "generation": service.pipeline.generation,
                # only the current generation's should be left: old ones are forgotten
                "plugin_modules": sum(1 for m in sys.modules if m.startswith("twisted_mta_plugin_g")),
                "reload_ms": [1000 * t for t in times], "build_ms": [1000 * t for t in build],
                "config_ms": [1000 * t for t in parse],
            }
            R.log(f"  reload median {1000 * statistics.median(times):.2f} ms, "
                  f"build_pipeline {1000 * statistics.median(build):.2f} ms")
            # Collected now, before the next service: its plugin modules have the same
            # names (same generation numbers) and its finalizers would drop the next one's.
            del service
            gc.collect()
    finally:
        sys.dont_write_bytecode = bytecode
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


RELOAD_KINDS = {
    "none": "no filters (relay rules and router only)",
    "files10": "**10 filters from 10 plugin files** (copies of add_header.py, no_exe.py, "
               "http_check.py; each file executed afresh per reload), no bytecode cache",
    "files10-pyc": "the same, with `__pycache__` written by the first load and read after",
    "chain10": "the 10-filter chain of the throughput bench (2 plugin files, 8 built-ins)",
}


def reload_table(report: dict, args) -> str:
    lines = ["| configuration | filters | reload() median ms | p95 ms | "
             "build_pipeline median ms | p95 ms | config load median ms | plugin modules left |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, r in report["reload"].items():
        lines.append(
            f"| {RELOAD_KINDS[kind]} | {r['filters']} | {statistics.median(r['reload_ms']):.2f} | "
            f"{percentile(r['reload_ms'], 95):.2f} | {statistics.median(r['build_ms']):.2f} | "
            f"{percentile(r['build_ms'], 95):.2f} | {statistics.median(r['config_ms']):.2f} | "
            f"{r['plugin_modules']} |")
    return "\n".join(lines) + (
        f"\n\n{args.reloads} reloads each, in this process, after 3 unmeasured; the reactor "
        "not running (reload() is synchronous: it reads the config, builds the pipeline "
        "and swaps it in).  `build_pipeline` is the same minus reading the config file "
        "and the TLS and auth steps.  Plugin modules left: modules of plugin files in "
        "`sys.modules` after all the reloads and builds and a garbage collection (only the "
        "current generation's should be).\n")


# --- the hooks alone -------------------------------------------------------------


def run_hooks(args, report: dict) -> None:
    """
    In this process, with the reactor running: each chain's pipeline asked
    at every stage (connect, mail, rcpt, data) for --hook-messages messages,
    as the server asks it, with a 2 KB message in a file; chains
    interleaved --repeat times.  Wall and CPU (all threads: no_exe parses
    in one) per message.  What the server adds (SMTP, spool, delivery) is
    not here, so the figure is the chain's own cost, little disturbed by
    other people's load.
    """
    from twisted.internet import defer, reactor
    from twisted_mta.pipeline import Pipeline
    from twisted_mta.smtp.grammar import parse_mailbox
    from twisted_mta.values import Action, Envelope, Message, Session, parse_headers

    tmp = Path(tempfile.mkdtemp(prefix="bench-hooks-", dir=args.workdir))
    out = report["hooks"] = {"messages": args.hook_messages, "runs": [], "single": []}
    try:
        pipelines = {}
        for n in args.variants:
            (tmp / str(n)).mkdir()
            pipelines[n] = chain_pipeline(n, tmp / str(n), args)
        rcpt = parse_mailbox(f"user1@{RCPT_DOMAIN}")
        sender = parse_mailbox(f"sender@{SENDER_DOMAIN}")
        head, body = load.MessageFactory(args.size, str(sender), RCPT_DOMAIN, 0).message(1, str(rcpt))
        received = (b"Received: from client.bench.test (localhost [127.0.0.1])\r\n"
                    b"\tby mta.bench.test with ESMTP id ABCDE; Sun, 29 Nov 2026 09:00:00 +0000\r\n")
        path = tmp / "message"
        path.write_bytes(received + head + body)
        message = Message(size=len(head) + len(body), headers=parse_headers(head), path=str(path))

        @defer.inlineCallbacks
        def one_chain(pipeline, count: int):
            for i in range(count):
                session = Session(f"S{i}", "127.0.0.1", 40000, "127.0.0.1", 25, "tcp:25",
                                  "client.bench.test", True)
                envelope = Envelope(sender, (), message.size)
                verdicts = [(yield pipeline.ask("connect", session)),
                            (yield pipeline.ask("mail", session, envelope)),
                            (yield pipeline.ask("rcpt", session, envelope, rcpt)),
                            (yield pipeline.ask("data", session, envelope.evolve(recipients=(rcpt,)),
                                                message))]
                for v in verdicts:
                    if v.action is not Action.CONTINUE:
                        raise RuntimeError(f"a filter said {v}")

        @defer.inlineCallbacks
        def go():
            for n in args.variants:  # warm-up: imports, the thread pool
                yield one_chain(pipelines[n], 50)
            for rep in range(args.repeat):
                for n in args.variants:
                    t0, c0 = time.perf_counter(), time.process_time()
                    yield one_chain(pipelines[n], args.hook_messages)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    out["runs"].append({"filters": n, "rep": rep,
                                        "wall_us": 1e6 * wall / args.hook_messages,
                                        "cpu_us": 1e6 * cpu / args.hook_messages})
                    R.log(f"hooks: repeat {rep + 1}, {n} filters: "
                          f"{1e6 * wall / args.hook_messages:.0f} µs wall, "
                          f"{1e6 * cpu / args.hook_messages:.0f} µs CPU per message")
            # Each filter of the longest chain on its own, beside an empty pipeline.
            longest = pipelines[max(args.variants, key=lambda v: len(CHAINS[v]))]
            empty = Pipeline(0, longest.relay, longest.router, ())
            singles = [("(none)", empty)] + [
                (f"{i}. {f.name}", Pipeline(0, longest.relay, longest.router, (f,)))
                for i, f in enumerate(longest.filters, 1)]
            count = max(1, args.hook_messages // 2)
            for label, pipeline in singles:
                yield one_chain(pipeline, 20)
                c0 = time.process_time()
                yield one_chain(pipeline, count)
                out["single"].append([label, 1e6 * (time.process_time() - c0) / count])

        failure = []

        def start():
            d = go()
            d.addErrback(failure.append)
            d.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(start)
        reactor.run(installSignalHandlers=False)
        if failure:
            failure[0].raiseException()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def hooks_table(report: dict, args) -> str:
    runs = report["hooks"]["runs"]
    med = statistics.median
    base = med([r["cpu_us"] for r in runs if r["filters"] == "0"]) if any(
        r["filters"] == "0" for r in runs) else None
    summary = report.get("throughput_summary", {})
    rate0 = summary.get("0", {}).get("rate")
    lines = ["| filters | wall µs/msg | CPU µs/msg (all threads) | CPU over 0 filters µs/msg |"
             + (" that, as a share of a message's time at the 0-filter rate |" if rate0 else ""),
             "|---:|---:|---:|---:|" + ("---:|" if rate0 else "")]
    for n in args.variants:
        g = [r for r in runs if r["filters"] == n]
        if not g:
            continue
        cpu, wall = med([r["cpu_us"] for r in g]), med([r["wall_us"] for r in g])
        extra = cpu - base if base is not None else None
        share = f" {100 * extra * rate0 / 1e6:.1f} % |" if rate0 and extra is not None else (
            " |" if rate0 else "")
        lines.append(f"| {n} | {wall:.0f} | {cpu:.0f} | {R.fmt(extra, '.0f')} |" + share)
    return "\n".join(lines) + (
        f"\n\n{report['hooks']['messages']} messages per chain and repeat, {args.repeat} repeats "
        "interleaved, medians; each message asked at connect, mail, rcpt and data (connect once "
        "per message: the load reuses its sessions, so this counts it more often than the "
        "server sees it).  The 0-filter row is the cost of asking an empty pipeline "
        "(Deferreds, inlineCallbacks).  The share column is the extra CPU times the 0-filter "
        "throughput: what the chain would cost if the server were CPU-bound on one core.\n"
        + single_table(report))


def single_table(report: dict) -> str:
    single = report["hooks"].get("single")
    if not single:
        return ""
    base = single[0][1]
    lines = ["", "Each filter of the longest chain alone (one pass, "
             f"{max(1, report['hooks']['messages'] // 2)} messages):", "",
             "| filter | CPU µs/msg | over an empty pipeline |", "|---|---:|---:|"]
    lines += [f"| {label} | {cpu:.0f} | {cpu - base:.0f} |" for label, cpu in single]
    return "\n".join(lines) + "\n"



# --- report ---------------------------------------------------------------------


def render(report: dict, args) -> str:
    m = report["machine"]
    out = [f"# twisted-mta: the cost of the filter pipeline ({m['date']})", "",
           f"Code: `{args.mta_rev}` (`--mta-source {args.mta_source}`).  Machine: {m['cpus']} CPUs "
           f"({m['cpu_model']}), Python {m['python']}, Twisted {m['twisted']}, load average at "
           f"start {', '.join(f'{x:.1f}' for x in m['loadavg_start'])}.", "",
           f"Command: `{' '.join([sys.executable] + sys.argv)}`", ""]
    if report.get("throughput"):
        runs = report["throughput"]
        loads = [r["loadavg"] for r in runs]
        out += ["## Throughput", "",
                f"twistd -n mta in queue mode (a route to a refused loopback port: one delivery "
                f"attempt per message, deferred, stays queued), {args.size} B messages over "
                f"{args.conns} sessions for {args.duration:.0f} s after 20 warm-up messages, a "
                f"fresh server per run, variants interleaved "
                f"({','.join(args.variants)} × {args.repeat} repeats, order {args.order}).  Load average "
                f"during the runs {min(loads):.1f}–{max(loads):.1f}: the machine is shared, so "
                f"absolute msg/s drift between runs; the ratios within a repeat and the CPU per "
                f"message are the figures to read.", "",
                throughput_table(report, args), chains_text(report)]
    if report.get("hooks"):
        out += ["## The hooks alone (in process)", "", hooks_table(report, args)]
    if report.get("reload"):
        out += ["## Reload", "", reload_table(report, args)]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("throughput", "hooks", "reload"), help="one part only")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--variants", default="0,5,10",
                   help="chains to run: 0, 5, 10 filters, or one filter alone: " + ", ".join(SINGLES))
    p.add_argument("--order", choices=("fixed", "rotate"), default="rotate",
                   help="rotate (default): each repeat starts one variant later, so each takes "
                        "every place in turn (a run is affected by the one before it); fixed: "
                        "the order given, every repeat")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per run (default 10)")
    p.add_argument("--conns", type=int, default=10)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--reloads", type=int, default=50, help="measured reloads (default 50)")
    p.add_argument("--hook-messages", type=int, default=2000,
                   help="messages per chain and repeat in the hooks part (default 2000)")
    p.add_argument("--mta-source", default="HEAD",
                   help="a git revision, exported once (default HEAD), or 'worktree'")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="before each run, wait up to this long for the machine to be quiet")
    p.add_argument("--quiet-threshold", type=float, default=10.0,
                   help="'quiet': others use less than this %% of one core")
    p.add_argument("--workdir", type=Path, default=None, help="where temp folders go")
    p.add_argument("--keep", action="store_true", help="keep the servers' temp folders")
    p.add_argument("--twistd", default=None)
    args = p.parse_args(argv)
    args.variants = args.variants.split(",")
    if any(n not in CHAINS for n in args.variants):
        p.error(f"--variants: each one of {', '.join(CHAINS)}")
    args.twistd = args.twistd or S.find_twistd()

    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir=args.workdir))
    try:
        if args.mta_source == "worktree":
            args.mta_path, args.mta_rev = S.REPO, "worktree"
        else:
            args.mta_path, args.mta_rev = R.snapshot_source(args.mta_source, scratch)
        args.plugins = export_plugins(args.mta_rev if args.mta_source != "worktree" else "worktree",
                                      scratch)
        sys.path.insert(0, str(args.mta_path))  # the in-process parts use the same code
        results = BENCH / "results"
        results.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = results / f"pipeline-{stamp}.md"
        report = {"machine": R.machine_info(args), "args": {k: str(v) for k, v in vars(args).items()}}
        if args.only in (None, "reload"):
            run_reload(args, report)
        if args.only in (None, "throughput"):
            run_throughput(args, report)
        if args.only in (None, "hooks"):  # last: it runs (and stops) the reactor
            run_hooks(args, report)
        text = render(report, args)
        args.out.write_text(text)
        with open(args.out.with_suffix(".json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(text)
        R.log(f"written to {args.out}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
