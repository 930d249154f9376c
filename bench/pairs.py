#!/usr/bin/env python3
"""
Two revisions of twisted-mta, A and B, in alternating pairs of short runs.

The development VM's speed drifts by 10-20 % over minutes (other guests
on the host), more than most single changes are worth, so a change is
judged by pairs of runs made one right after the other, in alternating
order (A then B, B then A, ...), and by the median of the pairs' ratios
B/A: messages per second, and the server's CPU (all its processes) per
message.  Even so, one pair of the same code gave 1.25 and the next 0.94:
take six pairs or more, and confirm a kept change with bench/run.py.  Each run is a fresh server in queue mode (as bench/run.py's),
20 warm-up messages, then --duration seconds of load.

    # the working tree against the last commit, receivers = 2, six pairs
    /tmp/venv/bin/python bench/pairs.py --a HEAD --b . --receivers 2 --pairs 6
    # two commits, spool_sync = "filesystem", 100 KB
    /tmp/venv/bin/python bench/pairs.py --a 62c532a --b a8217e4 --receivers 2 \\
        --spool-sync filesystem --size 102400

A revision is "." (this checkout as it is) or anything git rev-parse takes
(exported into a temp folder, as bench/run.py's --mta-baseline).  Spool
folders are kept until the end, then removed (see bench/README.md on why
removing them between runs would be unfair to the next one).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load  # noqa: E402
import servers as S  # noqa: E402
from run import snapshot_source, warm_up  # noqa: E402


def one_run(source: Path, args) -> tuple[float, float]:
    """(msgs/s, server CPU µs per message) of one fresh server from C{source}."""
    srv = S.TwistedMTA(mode="queue", python_path=source, receivers=args.receivers,
                       spool_sync=args.spool_sync, keep=False)
    port = srv.start()
    try:
        warm_up(port, srv.rcpt_domain)
        start = {}
        result = load.run_load("127.0.0.1", port, args.conns, args.size,
                               duration=args.duration, rcpt_domain=srv.rcpt_domain,
                               on_start=lambda: start.update(cpu=srv.cpu()))
        cpu = srv.cpu() - start["cpu"]
    finally:
        srv.stop()
        srv.cleanup()
    accepted = result["accepted"]
    return result["rate"], 1e6 * cpu / max(1, accepted)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="HEAD", help="revision A (default HEAD)")
    p.add_argument("--b", default=".", help='revision B (default ".": this checkout)')
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--receivers", type=int, default=0)
    p.add_argument("--spool-sync", choices=("file", "filesystem"), default=None)
    p.add_argument("--conns", type=int, default=10)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--duration", type=float, default=6.0)
    args = p.parse_args(argv)
    sources = {}
    for side, rev in (("A", args.a), ("B", args.b)):
        if rev == ".":
            sources[side], label = S.REPO, "this checkout"
        else:
            sources[side], label = snapshot_source(rev, None)
        print(f"{side}: {rev} ({label})", flush=True)
    rates, cpus = [], []
    try:
        for i in range(args.pairs):
            order = ("A", "B") if i % 2 == 0 else ("B", "A")
            got = {side: one_run(sources[side], args) for side in order}
            (ra, ca), (rb, cb) = got["A"], got["B"]
            rates.append(rb / ra)
            cpus.append(cb / ca)
            print(f"pair {i + 1}: A {ra:.0f} msg/s {ca:.0f} µs/msg | B {rb:.0f} msg/s {cb:.0f} µs/msg"
                  f" | B/A rate {rates[-1]:.3f} cpu {cpus[-1]:.3f}", flush=True)
            time.sleep(1)
    finally:
        S.remove_discarded()
        for source in sources.values():
            if source != S.REPO:
                shutil.rmtree(source, ignore_errors=True)
    print(f"median B/A over {len(rates)} pairs: msgs/s {statistics.median(rates):.3f}, "
          f"CPU per message {statistics.median(cpus):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
