#!/usr/bin/env python3
"""
CPU per mail transaction in the SMTP client alone (twisted_mta.smtp.client):
L{Session.send} over one reused connection to a scripted server (a
StringTransport fed the replies at once), 2 KB messages, PIPELINING; no
sockets, no spool, no delivery manager.  For changes too small to see in
bench/delivery_cpu.py's noise.

    /tmp/venv/bin/python bench/client_cpu.py [--tree DIR ...] [-n 3000] [--repeat 7]

The timers are the real reactor's (not running: callLater and cancel
only), as the client uses them.  Reported: the median over the repeats
of the reactor thread's CPU per transaction, per tree, the trees
alternating.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MESSAGE = b"Subject: x\r\n\r\n" + b"y" * 2000 + b"\r\n"


def measure(n: int) -> float:
    from twisted.internet import defer, reactor
    from twisted.internet.testing import StringTransport
    from twisted_mta.smtp.client import ChunksSource, ClientProtocol, Session, Timeouts

    proto = ClientProtocol(reactor, 300)
    transport = StringTransport()
    proto.makeConnection(transport)
    session = Session(proto, "sink[127.0.0.1]", "mta.bench.test", Timeouts())
    defer.ensureDeferred(session.open())
    proto.dataReceived(b"220 sink\r\n")
    proto.dataReceived(b"250-sink\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250 8BITMIME\r\n")
    start = time.thread_time()
    for i in range(n):
        d = defer.ensureDeferred(session.send("a@client.test", ["b@remote.test"],
                                              ChunksSource([MESSAGE]), size=len(MESSAGE)))
        if b"RSET" in transport.value():
            proto.dataReceived(b"250 2.0.0 Ok\r\n")
        proto.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data\r\n")
        proto.dataReceived(b"250 2.0.0 Ok: queued\r\n")
        [result] = d.result
        assert result.status == "delivered", result
        transport.clear()
        session.reset()
        if b"RSET" in transport.value():  # sent at once (older trees): answer it now
            transport.clear()
            proto.dataReceived(b"250 2.0.0 Ok\r\n")
    return (time.thread_time() - start) / n * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="SMTP client CPU per transaction")
    p.add_argument("-n", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--tree", action="append", help="source tree(s) to compare (default: this one)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.path.insert(0, args.tree[0])
        print(measure(args.n))
        return 0
    trees = args.tree or [str(REPO)]
    figures: dict[str, list[float]] = {t: [] for t in trees}
    for _ in range(args.repeat):
        for tree in trees:
            out = subprocess.run([sys.executable, __file__, "--child", "-n", str(args.n),
                                  "--tree", tree], capture_output=True, text=True, check=True)
            figures[tree].append(float(out.stdout.split()[-1]))
    for tree, values in figures.items():
        print(f"{tree}: median {statistics.median(values):.1f} us per transaction "
              f"({', '.join(f'{v:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
