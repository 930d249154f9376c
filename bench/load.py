#!/usr/bin/env python3
"""
SMTP load generator for the benchmark (never part of the test suite).

Opens N concurrent SMTP sessions to HOST:PORT and sends messages of S
bytes over them, each connection reused for many messages:

    [RSET] MAIL FROM  RCPT TO  DATA  -> 354 -> body + "." -> 250

pipelined in one write when the server offers PIPELINING (RFC 2920), one
command at a time otherwise.  Messages have realistic headers (Received,
From, To, Subject, Date, Message-ID, MIME), CRLF line ends and a body
that is dot-stuffed (some body lines start with a dot on purpose).

The sessions are spread over several client processes (asyncio with
plain Protocols in each, no streams), so that the generator is not the
bottleneck; each process reports the CPU time it used during the
measured phase.  All sessions connect and EHLO first; the clock starts at
the first MAIL and stops at the last 250.

Used by bench/run.py, or on its own:

    python bench/load.py --port 2525 --conns 10 --size 2048 --messages 5000
    python bench/load.py --port 2525 --idle 5000      # hold idle sessions
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email.utils
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import time

# --- messages ---------------------------------------------------------------

_WORDS = (
    "the quarterly report shows that our delivery pipeline handled more "
    "messages than expected and the team would like to thank everyone who "
    "helped migrate the old relay please find the figures attached below "
    "and let us know before friday whether the numbers match your records "
    "meeting invoice schedule server maintenance window customer ticket"
).split()


def _body_lines(n_bytes: int) -> bytes:
    """Plain-text body of about C{n_bytes}: lines of words, CRLF, some starting with a dot."""
    out = []
    total = 0
    i = 0
    while total < n_bytes:
        words = []
        length = 0
        j = i
        target = 40 + (i * 37) % 36  # lines of 40..75 characters
        while length < target:
            w = _WORDS[(j * 7 + i) % len(_WORDS)]
            words.append(w)
            length += len(w) + 1
            j += 1
        line = " ".join(words)
        if i % 23 == 5:
            line = "." + line  # a line that must be dot-stuffed
        elif i % 31 == 7:
            line = "..." + line[:20]
        elif i % 17 == 3:
            line = ""  # paragraph break
        line = line.encode("ascii") + b"\r\n"
        out.append(line)
        total += len(line)
        i += 1
    body = b"".join(out)
    return body[: max(n_bytes - 2, 0)].rstrip(b"\r\n") + b"\r\n" if n_bytes > 2 else b"\r\n"


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2: a dot at the start of any line is doubled."""
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


class MessageFactory:
    """
    Builds messages of about C{size} bytes (headers + body, before
    dot-stuffing).  The body is shared; the header block is made per
    message (unique Message-ID and Subject).
    """

    def __init__(self, size: int, sender: str, rcpt_domain: str, worker: int):
        self.size = size
        self.sender = sender
        self.rcpt_domain = rcpt_domain
        self.worker = worker
        self.date = email.utils.formatdate(localtime=True)
        sample = self._head(0, "user0@" + rcpt_domain)
        self.body = dot_stuff(_body_lines(max(size - len(sample), 4)))

    def _head(self, n: int, rcpt: str) -> bytes:
        return (
            "Received: from client.bench.test (client.bench.test [127.0.0.1])\r\n"
            f"\tby submit.bench.test (bench) with ESMTP id B{self.worker:02d}{n:08d}\r\n"
            f"\tfor <{rcpt}>; {self.date}\r\n"
            f"From: Bench Sender <{self.sender}>\r\n"
            f"To: Bench Recipient <{rcpt}>\r\n"
            f"Subject: Quarterly report, message {n} from worker {self.worker}\r\n"
            f"Date: {self.date}\r\n"
            f"Message-ID: <{n}.{self.worker}.{os.getpid()}@client.bench.test>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "Content-Transfer-Encoding: 7bit\r\n"
            "\r\n"
        ).encode("ascii")

    def message(self, n: int, rcpt: str) -> tuple[bytes, bytes]:
        """(header block, dot-stuffed body ending in CRLF)."""
        return self._head(n, rcpt), self.body


# --- one SMTP session -------------------------------------------------------


class SMTPError(Exception):
    def __init__(self, stage: str, code: int, text: bytes):
        super().__init__(f"{stage}: {code} {text[:80]!r}")
        self.stage, self.code = stage, code


class Session(asyncio.Protocol):
    """A minimal SMTP client session: replies are awaited in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport = None
        self.buf = b""
        self.lines: list[bytes] = []
        self.ready: collections.deque = collections.deque()
        self.waiters: collections.deque = collections.deque()
        self.closed = False
        self.exc: BaseException | None = None
        self.extensions: dict[str, str] = {}
        #: Once set (by a _Driver), replies go to on_reply(code) instead.
        self.on_reply = None
        self.on_lost = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end + 1]
            start = end + 1
            self.lines.append(line)
            if line[3:4] != b"-":
                try:
                    code = int(line[:3])
                except ValueError:
                    code = 0
                if self.on_reply is not None:
                    self.lines = []
                    self.on_reply(code)
                    continue
                reply = (code, self.lines)
                self.lines = []
                if self.waiters:
                    fut = self.waiters.popleft()
                    if not fut.done():
                        fut.set_result(reply)
                else:
                    self.ready.append(reply)
        self.buf = buf[start:]

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.exc = exc or ConnectionError("connection closed by server")
        if self.on_lost is not None:
            self.on_lost(self.exc)
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(self.exc)

    def reply(self):
        """An awaitable for the next reply: (code, lines)."""
        fut = self.loop.create_future()
        if self.ready:
            fut.set_result(self.ready.popleft())
        elif self.closed:
            fut.set_exception(self.exc)
        else:
            self.waiters.append(fut)
        return fut

    def write(self, data: bytes) -> None:
        if self.closed:
            raise self.exc
        self.transport.write(data)


async def open_session(host: str, port: int, ehlo: bool = True, timeout: float = 30.0) -> Session:
    loop = asyncio.get_running_loop()
    _, s = await asyncio.wait_for(
        loop.create_connection(lambda: Session(loop), host, port), timeout)
    code, lines = await asyncio.wait_for(s.reply(), timeout)
    if code != 220:
        s.transport.close()
        raise SMTPError("greeting", code, b"".join(lines))
    if ehlo:
        s.write(b"EHLO client.bench.test\r\n")
        code, lines = await asyncio.wait_for(s.reply(), timeout)
        if code != 250:
            s.transport.close()
            raise SMTPError("EHLO", code, b"".join(lines))
        for line in lines[1:]:
            word = line[4:].strip().decode("ascii", "replace")
            name, _, value = word.partition(" ")
            s.extensions[name.upper()] = value
    return s


# --- a worker process ---------------------------------------------------------


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        except (ValueError, OSError):
            pass


class _Tickets:
    """Messages left to send, shared by all workers."""

    def __init__(self, value):
        self.value = value

    def take(self) -> bool:
        with self.value.get_lock():
            if self.value.value <= 0:
                return False
            self.value.value -= 1
            return True


class _Driver:
    """
    Sends messages over one open session, as a callback state machine
    driven by the session's replies (no task or future per command: the
    generator must cost the server as little CPU as possible).
    """

    def __init__(self, s: Session, opts: dict, factory: MessageFactory, tickets: _Tickets,
                 deadline: float, stats: dict, n0: int, done: asyncio.Future, live: list):
        self.s, self.opts, self.factory, self.tickets = s, opts, factory, tickets
        self.deadline, self.stats, self.n = deadline, stats, n0
        self.done, self.live = done, live
        self.pipelining = "PIPELINING" in s.extensions
        self.use_size = "SIZE" in s.extensions
        self.rset = opts["rset"]
        self.sender = opts["sender"].encode()
        self.first = True
        self.state = "cmds"
        self.expect: collections.deque = collections.deque()
        self.unsent: collections.deque = collections.deque()
        self.failed: str | None = None
        self.t0 = 0.0
        self.body: tuple = ()
        s.on_reply = self.on_reply
        s.on_lost = self.on_lost

    def start(self) -> None:
        self.next_message()

    def next_message(self) -> None:
        if time.monotonic() >= self.deadline or not self.tickets.take():
            self.state = "quit"
            self.s.write(b"QUIT\r\n")
            return
        self.n += 1
        rcpt = f"user{self.n % 100}@{self.opts['rcpt_domain']}"
        head, body = self.factory.message(self.n, rcpt)
        self.body = (head, body, b".\r\n")
        self.size = len(head) + len(body)
        size_param = b" SIZE=%d" % self.size if self.use_size else b""
        steps = []
        if self.rset and not self.first:
            steps.append(("RSET", b"RSET\r\n", 250))
        self.first = False
        steps.append(("MAIL", b"MAIL FROM:<" + self.sender + b">" + size_param + b"\r\n", 250))
        steps.append(("RCPT", b"RCPT TO:<" + rcpt.encode() + b">\r\n", 250))
        steps.append(("DATA", b"DATA\r\n", 354))
        self.failed = None
        self.state = "cmds"
        self.t0 = t0 = time.monotonic()
        if self.stats["first"] is None:
            self.stats["first"] = t0
        self.expect.extend(steps)
        if self.pipelining:
            self.s.write(b"".join(cmd for _, cmd, _ in steps))
        else:
            self.s.write(steps[0][1])
            self.unsent.extend(steps[1:])

    def on_reply(self, code: int) -> None:
        state = self.state
        if state == "body":
            t1 = time.monotonic()
            if code == 250:
                st = self.stats
                st["accepted"] += 1
                st["bytes"] += self.size
                st["latencies"].append(t1 - self.t0)
                st["last"] = t1
            else:
                self.stats["errors"][f"end of DATA {code}"] += 1
            return self.next_message()
        if state == "quit":
            self.s.transport.close()
            return
        if state == "drain":  # the "." sent to end a DATA opened after a failure
            return self.next_message()
        stage, _, want = self.expect.popleft()
        if code != want and self.failed is None:
            self.failed = f"{stage} {code}"
            if not self.pipelining:
                self.expect.clear()
                self.unsent.clear()
        if self.unsent:
            _, cmd, _ = self.unsent.popleft()
            self.s.write(cmd)
            return
        if self.expect:
            return
        if self.failed is not None:
            self.stats["errors"][self.failed] += 1
            if code == 354:  # DATA went through although something before it failed
                self.state = "drain"
                self.s.write(b".\r\n")
                return
            return self.next_message()
        self.state = "body"
        self.s.transport.writelines(self.body)

    def on_lost(self, exc) -> None:
        if self.state != "quit":
            self.stats["errors"][f"connection lost: {type(exc).__name__}"] += 1
        self.live[0] -= 1
        if self.live[0] == 0 and not self.done.done():
            self.done.set_result(None)


async def _worker_main(idx: int, nconns: int, opts: dict, tickets: _Tickets, ready_q, start_evt) -> dict:
    loop = asyncio.get_running_loop()
    factory = MessageFactory(opts["size"], opts["sender"], opts["rcpt_domain"], idx)
    errors: collections.Counter = collections.Counter()
    sem = asyncio.Semaphore(100)

    async def connect():
        async with sem:
            try:
                return await open_session(opts["host"], opts["port"])
            except (OSError, asyncio.TimeoutError, SMTPError) as e:
                errors[f"connect: {e}"[:120]] += 1
                return None

    sessions = [s for s in await asyncio.gather(*(connect() for _ in range(nconns))) if s]
    ext = sessions[0].extensions if sessions else {}
    ready_q.put(("ready", idx, len(sessions), dict(errors), sorted(ext)))
    await loop.run_in_executor(None, start_evt.wait)
    stats = {"accepted": 0, "bytes": 0, "first": None, "last": None,
             "latencies": [], "errors": errors}
    deadline = time.monotonic() + opts["duration"]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    done = loop.create_future()
    live = [len(sessions)]
    drivers = [_Driver(s, opts, factory, tickets, deadline, stats, i * 10_000_000, done, live)
               for i, s in enumerate(sessions)]
    for d in drivers:
        d.start()
    if drivers:
        await done
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    stats["cpu"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    stats["errors"] = dict(errors)
    stats["sessions"] = len(sessions)
    return stats


def _worker(idx, nconns, opts, counter, ready_q, start_evt, result_q) -> None:
    _raise_nofile(nconns + 100)
    try:
        stats = asyncio.run(_worker_main(idx, nconns, opts, _Tickets(counter), ready_q, start_evt))
    except BaseException as e:  # report, never hang the runner
        ready_q.put(("ready", idx, 0, {f"worker crashed: {e!r}": 1}, []))
        stats = {"accepted": 0, "bytes": 0, "first": None, "last": None, "latencies": [],
                 "errors": {f"worker crashed: {e!r}": 1}, "cpu": 0.0, "sessions": 0}
    result_q.put((idx, stats))


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def _get(q, workers, timeout: float):
    """q.get(), but give up if every worker died (instead of hanging)."""
    import queue
    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if all(not w.is_alive() for w in workers):
                try:
                    return q.get(timeout=1.0)
                except queue.Empty:
                    raise RuntimeError("load generator workers died")
            if time.monotonic() > deadline:
                raise RuntimeError("load generator timed out")


def run_load(host: str, port: int, conns: int, size: int, messages: int = 10**9,
             duration: float = 10.0, procs: int | None = None, rset: bool = True,
             sender: str = "sender@client.bench.test", rcpt_domain: str = "remote.bench.invalid",
             on_start=None) -> dict:
    """
    Run one load and return its figures.  Stops after C{messages} accepted
    attempts or C{duration} seconds, whichever comes first.  C{on_start}
    is called (in this process) just before the clock starts.
    """
    if procs is None:
        procs = 1
    procs = max(1, min(procs, conns))
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", messages)
    ready_q, result_q = ctx.Queue(), ctx.Queue()
    start_evt = ctx.Event()
    opts = {"host": host, "port": port, "size": size, "duration": duration, "rset": rset,
            "sender": sender, "rcpt_domain": rcpt_domain}
    shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    workers = [ctx.Process(target=_worker, args=(i, n, opts, counter, ready_q, start_evt, result_q),
                           daemon=True) for i, n in enumerate(shares)]
    for w in workers:
        w.start()
    connected = 0
    connect_errors: collections.Counter = collections.Counter()
    extensions: list = []
    for _ in workers:
        _, idx, n, errs, ext = _get(ready_q, workers, 180)
        connected += n
        connect_errors.update(errs)
        extensions = extensions or ext
    if on_start is not None:
        on_start()
    wall0 = time.monotonic()
    start_evt.set()
    results = [_get(result_q, workers, duration + 600)[1] for _ in workers]
    wall1 = time.monotonic()
    for w in workers:
        w.join(10)
    accepted = sum(r["accepted"] for r in results)
    errors: collections.Counter = collections.Counter()
    for r in results:
        errors.update(r["errors"])
    firsts = [r["first"] for r in results if r["first"] is not None]
    lasts = [r["last"] for r in results if r["last"] is not None]
    elapsed = (max(lasts) - min(firsts)) if firsts and lasts else 0.0
    lat = sorted(x for r in results for x in r["latencies"])
    cpu = sum(r["cpu"] for r in results)
    return {
        "host": host, "port": port, "conns": conns, "connected": connected, "size": size,
        "procs": procs, "extensions": extensions,
        "pipelining": "PIPELINING" in extensions,
        "accepted": accepted, "bytes": sum(r["bytes"] for r in results),
        "errors": dict(errors), "error_count": sum(errors.values()),
        "connect_errors": dict(connect_errors),
        "elapsed": elapsed, "wall": wall1 - wall0,
        "first": min(firsts) if firsts else None, "last": max(lasts) if lasts else None,
        "rate": accepted / elapsed if elapsed > 0 else 0.0,
        "lat_ms": {q: (v * 1000 if v is not None else None)
                   for q, v in (("p50", _percentile(lat, 50)), ("p90", _percentile(lat, 90)),
                                ("p99", _percentile(lat, 99)), ("max", lat[-1] if lat else None))},
        "client_cpu": cpu,
        "client_cpu_pct": 100.0 * cpu / (wall1 - wall0) if wall1 > wall0 else 0.0,
    }


# --- idle sessions ----------------------------------------------------------


def _idle_worker(host, port, n, ehlo, timeout, overall, ready_q, release_evt) -> None:
    _raise_nofile(n + 100)

    def rss_kb() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    async def main():
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(200)
        outcome: collections.Counter = collections.Counter()
        rss0 = rss_kb()
        sessions = []

        async def one():
            async with sem:
                try:
                    _, s = await asyncio.wait_for(
                        loop.create_connection(lambda: Session(loop), host, port), timeout)
                except (OSError, asyncio.TimeoutError) as e:
                    outcome[f"connect failed: {type(e).__name__}"] += 1
                    return
                sessions.append(s)
                outcome["connected"] += 1
            # Waiting for the greeting happens outside the semaphore: a
            # server that serves only so many at once (Postfix's process
            # limit) must not stop us from opening the rest.
            try:
                code, _ = await asyncio.wait_for(s.reply(), timeout)
            except (OSError, asyncio.TimeoutError, ConnectionError):
                return
            if code != 220:
                outcome[f"greeting {code}"] += 1
                return
            outcome["greeted"] += 1
            if ehlo:
                try:
                    s.write(b"EHLO idle.bench.test\r\n")
                    code, _ = await asyncio.wait_for(s.reply(), timeout)
                except (OSError, asyncio.TimeoutError, ConnectionError):
                    return
                if code == 250:
                    outcome["ehlo"] += 1

        tasks = [asyncio.ensure_future(one()) for _ in range(n)]
        # Bounded: a server that serves only so many sessions at once
        # leaves the rest waiting for a greeting, or for the kernel to
        # accept them at all.
        _, pending = await asyncio.wait(tasks, timeout=overall)
        for t in pending:
            t.cancel()
        outcome["unfinished"] = len(pending)
        outcome["open_now"] = sum(1 for s in sessions if not s.closed)
        outcome["client_rss_delta_kb"] = rss_kb() - rss0
        ready_q.put(dict(outcome))
        await loop.run_in_executor(None, release_evt.wait)
        for s in sessions:
            if s.transport is not None:
                s.transport.abort()

    asyncio.run(main())


class IdleClients:
    """Hold C{n} idle sessions (greeted, and EHLO'd if C{ehlo}) in a child process."""

    def __init__(self, host: str, port: int, n: int, ehlo: bool = True, timeout: float = 60.0,
                 overall: float | None = None):
        overall = overall if overall is not None else max(3 * timeout, n / 50.0)
        ctx = mp.get_context("spawn")
        self._ready_q = ctx.Queue()
        self._release = ctx.Event()
        self._proc = ctx.Process(target=_idle_worker,
                                 args=(host, port, n, ehlo, timeout, overall, self._ready_q, self._release),
                                 daemon=True)
        self.overall = overall

    def open(self) -> dict:
        """Open them all; returns counts (connected, greeted, ehlo, unfinished, open_now)."""
        self._proc.start()
        return _get(self._ready_q, [self._proc], self.overall + 120)

    def close(self) -> None:
        self._release.set()
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()


# --- command line -----------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=10, help="concurrent sessions (default 10)")
    p.add_argument("--size", type=int, default=2048, help="message size in bytes (default 2048)")
    p.add_argument("--messages", type=int, default=10**9, help="messages to send (default: until --duration)")
    p.add_argument("--duration", type=float, default=10.0, help="stop sending after this many seconds (default 10)")
    p.add_argument("--procs", type=int, default=1,
                   help="client processes (default 1: one drives >10,000 msg/s into a sink)")
    p.add_argument("--no-rset", action="store_true", help="no RSET between messages")
    p.add_argument("--rcpt-domain", default="remote.bench.invalid")
    p.add_argument("--idle", type=int, default=0, metavar="N",
                   help="instead: open N idle sessions, print counts, hold them until Enter")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    if a.idle:
        idle = IdleClients(a.host, a.port, a.idle)
        print(json.dumps(idle.open()))
        try:
            input("holding; press Enter to close ")
        except EOFError:
            pass
        idle.close()
        return 0
    r = run_load(a.host, a.port, a.conns, a.size, a.messages, a.duration, a.procs,
                 rset=not a.no_rset, rcpt_domain=a.rcpt_domain)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        lat = r["lat_ms"]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"
        print(f"{r['accepted']} accepted in {r['elapsed']:.2f}s = {r['rate']:.0f} msg/s "
              f"({r['conns']} conns, {r['size']} B, pipelining={r['pipelining']}); "
              f"errors={r['error_count']} {r['errors'] or ''}")
        print(f"latency ms p50={fmt(lat['p50'])} p90={fmt(lat['p90'])} p99={fmt(lat['p99'])} "
              f"max={fmt(lat['max'])}; generator CPU {r['client_cpu']:.2f}s "
              f"= {r['client_cpu_pct']:.0f}% of one core over {r['procs']} process(es)")
    return 1 if r["accepted"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
