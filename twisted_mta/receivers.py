"""
The main process's side of C{receivers = N}: it starts N receiving
processes (L{twisted_mta.receiver}) on its listening sockets, takes what
they queue into delivery, forwards their log lines, tells them to reload,
restarts one that dies and recovers the messages it was committing.

Why processes: one Python process receives on one core; a mail server's
work per message (SMTP, TLS, filters, the spool) is independent from one
session to the next, so N processes serve sessions and the main process,
which only accepts connections and hands each to the receiver with the
fewest sessions (L{twisted_mta.handoff}), delivers on its own core.
"""

from __future__ import annotations

import collections
import os
import socket
import sys
import time
from pathlib import Path

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger, LogLevel

import twisted_mta
from twisted_mta import config as configmod
from twisted_mta.handoff import ListeningSocketReader, handoff_pair, peer_ip, send_connection
from twisted_mta.smtp.server import ConnectionCounter
from twisted_mta.smtp import tls as tlsmod
from twisted_mta.spool.entry import QueueEntry
from twisted_mta.spool.store import SpoolError

log = Logger()

#: Seconds before restarting a receiver that died: doubling from the first
#: while it keeps dying soon after start, up to the last.
RESTART_DELAYS = (0.5, 1, 2, 4, 8, 16, 30, 60)
#: A receiver that ran this long before dying is restarted at once.
STABLE_AFTER = 60.0
#: Seconds a receiver has to finish after SIGTERM before SIGKILL.
STOP_TIMEOUT = 30.0

#: Seconds after a receiver died before the spool is searched for messages
#: it committed and never reported (see L{ReceiverPool.sweep}); also how
#: old such a file must be.
SWEEP_AFTER = 10.0

#: Seconds between attempts to hand over connections that no receiver could
#: take (their hand-off sockets full); meanwhile nothing is accepted.
HANDOFF_RETRY = 0.005

#: The environment variable carrying a generated certificate to receivers.
GENERATED_TLS = "TWISTED_MTA_GENERATED_TLS"

_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


class ReceiverProcess(protocol.ProcessProtocol):
    """One receiving process, as the main process sees it."""

    def __init__(self, pool: "ReceiverPool", index: int):
        self.pool = pool
        self.index = index
        self.name = f"receiver-{index}"
        self.started = pool.reactor.seconds()
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.generation: int | None = None
        self.committing: set[str] = set()
        self.pid: int | None = None
        self._buffers = {1: b"", 2: b""}
        #: the main process's end of the connection handoff pair
        self.link: socket.socket | None = None
        #: whether connections may be handed to it (it said "ready", and
        #: the pair works)
        self.accepting = False
        #: sessions handed to it and not reported closed
        self.sessions = 0
        #: the same, per client IP
        self.clients: collections.Counter = collections.Counter()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    # --- lines from the receiver ---------------------------------------------

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buf = self._buffers.get(fd, b"") + data
        *lines, self._buffers[fd] = buf.split(b"\n")
        handle = self._record if fd == 1 else self._stderr
        for line in lines:
            handle(line)

    def _record(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        if verb == b"queued":
            try:
                entry = QueueEntry.from_json(rest)
            except (ValueError, KeyError, TypeError) as e:
                log.error("{name}: unreadable queued record: {why}", name=self.name, why=e)
                return
            self.committing.discard(entry.id)
            self.pool.mta.received(entry)
        elif verb == b"committing":
            self.committing.add(rest.decode("ascii", "replace"))
        elif verb == b"closed":
            self.closed(rest.decode("ascii", "replace"))
        elif verb == b"aborted":
            self.committing.discard(rest.decode("ascii", "replace"))
        elif verb == b"log":
            level, _, text = rest.partition(b" ")
            log.emit(_LEVELS.get(level.decode("ascii", "replace"), LogLevel.info), "{text}",
                     text=text.decode("utf-8", "replace"), log_system=self.name)
        elif verb == b"ready":
            self.generation = int(rest) if rest.isdigit() else None
            log.info("{name} (pid {pid}) accepting, generation {gen}", name=self.name,
                     pid=self.pid, gen=self.generation)
            self.accepting = self.link is not None
            self.pool.accepting_changed()
            if not self.ready.called:
                self.ready.callback(self)
        elif verb == b"reloaded":  # the receiver has logged it
            self.generation = int(rest) if rest.isdigit() else None
        elif verb == b"refused":
            log.error("{name}: reload refused, its generation {gen} keeps running: {why}",
                      name=self.name, gen=self.generation, why=rest.decode("utf-8", "replace"))
        else:
            log.warn("{name}: unexpected record {line!r}", name=self.name, line=line[:200])

    def _stderr(self, line: bytes) -> None:
        log.error("{name}: {line}", name=self.name, line=line.decode("utf-8", "replace"),
                  log_system=self.name)

    # --- to the receiver ----------------------------------------------------

    def send(self, line: bytes) -> None:
        if self.transport is not None and self.transport.pid is not None:
            self.transport.writeToChild(0, line + b"\n")

    def stop(self) -> defer.Deferred:
        """SIGTERM, and SIGKILL if it has not ended after L{STOP_TIMEOUT}."""
        if self.ended.called:
            return defer.succeed(None)
        try:
            self.transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            return self.ended
        timer = self.pool.reactor.callLater(STOP_TIMEOUT, self._kill)
        self.ended.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return self.ended

    def _kill(self) -> None:
        log.warn("{name} did not stop within {t} s: killed", name=self.name, t=STOP_TIMEOUT)
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def hand(self, connection: socket.socket, ip: str, listen_index: int, over: int) -> bool:
        """
        Pass C{connection} from C{ip} to this receiver; False if it cannot
        take it now (then it has not: the caller still owns C{connection}).
        """
        try:
            send_connection(self.link, connection, listen_index, over)
        except BlockingIOError:
            return False  # it is not keeping up: another one, this time
        except OSError as e:
            log.error("{name}: cannot hand it connections: {why}", name=self.name, why=e)
            self.close_link()
            return False
        self.sessions += 1
        self.clients[ip] += 1
        self.pool.counter.add(ip)
        return True

    def closed(self, ip: str) -> None:
        """A session it was handed ended."""
        if self.clients[ip] > 0:
            self.clients[ip] -= 1
            self.sessions -= 1
            self.pool.counter.remove(ip)
        if not self.clients[ip]:
            del self.clients[ip]

    def forget_sessions(self) -> None:
        """It ended: so did its sessions."""
        for ip, n in self.clients.items():
            for _ in range(n):
                self.pool.counter.remove(ip)
        self.clients.clear()
        self.sessions = 0

    def close_link(self) -> None:
        self.accepting = False
        if self.link is not None:
            self.link.close()
            self.link = None
        self.pool.accepting_changed()

    def processEnded(self, reason) -> None:
        self.close_link()
        self.forget_sessions()
        for fd, rest in self._buffers.items():
            if rest:
                self.childDataReceived(fd, b"\n")
        self.pool.ended(self, reason)
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"{self.name} ended before it was ready"))
            self.ready.addErrback(lambda f: None)
        self.ended.callback(None)


class ReceiverPool(service.Service):
    """
    Runs C{count} receiving processes for C{mta} (an L{MTAService}), on
    its listening ports (C{mta.ports}, in C{[[listen]]} order).
    """

    def __init__(self, mta, count: int, reactor):
        self.mta = mta
        self.count = count
        self.reactor = reactor
        self.processes: dict[int, ReceiverProcess] = {}
        self.readers: list[ListeningSocketReader] = []
        self._next = 0  # round robin among the least loaded
        #: the sessions open in all receivers, for [limits]
        self.counter = ConnectionCounter()
        self._failures: dict[int, int] = {}
        self._timers: dict[int, object] = {}
        self._stopping = False
        self._sweep = None
        #: accepted connections no receiver could take yet, in order
        self._waiting: collections.deque = collections.deque()
        self._retry = None

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.readers = [ListeningSocketReader(self.reactor, port.socket, n, self.dispatch)
                        for n, port in enumerate(self.mta.ports)]
        for index in range(1, self.count + 1):
            self.spawn(index)

    def accepting_changed(self) -> None:
        """
        Accept while at least one receiver can take connections and none
        is waiting for one (L{_waiting}).
        """
        start = (not self._stopping and not self._waiting
                 and any(p.accepting for p in self.processes.values()))
        for reader in self.readers:
            reader.start() if start else reader.stop()
        if self._waiting and self._retry is None and not self._stopping:
            self._retry = self.reactor.callLater(HANDOFF_RETRY, self._hand_waiting)

    def stop_accepting(self) -> None:
        """Stop accepting for good (before the listening sockets close)."""
        for reader in self.readers:
            reader.stop()
        self.readers = []
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        while self._waiting:
            connection, _ = self._waiting.popleft()
            connection.close()

    def dispatch(self, connection: socket.socket, listen_index: int) -> None:
        """
        Hand a new connection to the receiver with the fewest sessions,
        saying whether it is over a connection limit (counted here, over
        all receivers: the receiver answers 421).  If none can take it now
        (their hand-off sockets are full: a burst of connections faster
        than they adopt them), it waits here, and this process stops
        accepting until it has been handed: the rest wait in the kernel's
        listen queue, as they would for a busy single process.
        """
        if self._waiting or not self._hand(connection, listen_index):
            self._waiting.append((connection, listen_index))
            self.accepting_changed()

    def _hand(self, connection: socket.socket, listen_index: int) -> bool:
        ip = peer_ip(connection)
        over = ConnectionCounter.over(self.mta.config.limits, self.counter.total + 1,
                                      self.counter.per_ip.get(ip, 0) + 1)
        ready = [p for p in self.processes.values() if p.accepting]
        if ready:
            self._next = (self._next + 1) % len(ready)
            ready = ready[self._next:] + ready[:self._next]  # ties: in turn
            ready.sort(key=lambda p: p.sessions)
        for proc in ready:
            if proc.hand(connection, ip, listen_index, over):
                connection.close()  # the receiver has its own copy
                return True
        return False

    def _hand_waiting(self) -> None:
        self._retry = None
        while self._waiting:
            connection, listen_index = self._waiting[0]
            if not self._hand(connection, listen_index):
                break
            self._waiting.popleft()
        self.accepting_changed()

    def whenReady(self) -> defer.Deferred:
        """Fires once every receiver now running has said it is ready."""
        return defer.gatherResults([p.ready for p in self.processes.values()])

    def spawn(self, index: int) -> ReceiverProcess | None:
        """Start receiver C{index} on the listening sockets (not while stopping)."""
        self._timers.pop(index, None)
        mta = self.mta
        if self._stopping or not mta.ports:
            return None
        link, their_end = handoff_pair()
        child_fds = {0: "w", 1: "r", 2: "r", 3: their_end.fileno()}
        args = [sys.executable, "-m", "twisted_mta.receiver", "--index", str(index),
                "--handoff", "3"]
        if mta.pipeline is not None:
            args += ["--generation", str(mta.pipeline.generation)]
        if mta.config.file == configmod.DEFAULT_FILE:
            args += ["--default-folder", str(mta.config.folder)]
        else:
            args += ["--config", str(Path(mta.config.file).resolve())]
        env = dict(os.environ)
        if mta.generated is not None:
            # The development default's generated certificate, so that all
            # processes present the same one.  Only the server's own user
            # (and root) can read a process's environment.
            host, key, chain = mta.generated
            key_pem, chain_pem = tlsmod.pem(key, chain)
            env[GENERATED_TLS] = host + "\n" + (key_pem + chain_pem).decode("ascii")
        # The receiver imports this very package, wherever it came from.
        top = str(Path(twisted_mta.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            [top] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        proc = ReceiverProcess(self, index)
        proc.link = link
        self.processes[index] = proc
        try:
            self.reactor.spawnProcess(proc, sys.executable, args, env=env, childFDs=child_fds)
        finally:
            their_end.close()  # the receiver has it now
        return proc

    def reload(self, generation: int) -> int:
        """Tell every receiver to reload to C{generation}; returns it."""
        for proc in self.processes.values():
            proc.send(b"reload %d" % generation)
        return generation

    def ended(self, proc: ReceiverProcess, reason) -> None:
        """A receiver ended: recover what it was committing; restart it unless stopping."""
        if self.processes.get(proc.index) is proc:
            del self.processes[proc.index]
        self._recover(proc)
        if self._stopping:
            log.info("{name} stopped", name=proc.name)
            return
        if self._sweep is None:
            self._sweep = self.reactor.callLater(SWEEP_AFTER, self.sweep)
        log.error("{name} (pid {pid}) ended: {why}", name=proc.name, pid=proc.pid,
                  why=reason.value)
        ran = self.reactor.seconds() - proc.started
        failures = 0 if ran >= STABLE_AFTER else self._failures.get(proc.index, 0) + 1
        self._failures[proc.index] = failures
        delay = 0 if failures == 0 else RESTART_DELAYS[min(failures, len(RESTART_DELAYS)) - 1]
        log.info("{name}: restarting in {delay} s", name=proc.name, delay=delay)
        self._timers[proc.index] = self.reactor.callLater(delay, self.spawn, proc.index)

    def _recover(self, proc: ReceiverProcess) -> defer.Deferred:
        """
        Messages whose commit the dead receiver had begun and not reported:
        those that made it into the spool are delivered (the client may
        not have had its 250, so it may send again: at least once).  Reads
        in the spool's I/O thread.
        """
        ids, proc.committing = sorted(proc.committing), set()
        if not ids:
            return defer.succeed(None)
        spool = self.mta.spool

        def find() -> list:
            found = []
            for queue_id in ids:
                try:
                    found.append(spool.load(queue_id))
                except SpoolError:
                    continue  # never committed: the client had no 250
            return found

        return self._deliver_found(find, "{name}: recovered {id}, committed as it ended",
                                   name=proc.name)

    def _deliver_found(self, find, message: str, **fields) -> defer.Deferred:
        """
        Run C{find} in the spool's I/O thread and deliver the entries it
        returns, logging C{message} (with C{id} and C{fields}) for each.
        """
        def deliver(entries: list) -> None:
            for entry in entries:
                log.info(message, id=entry.id, **fields)
                self.mta.received(entry)  # (which ignores one it knows by now)

        return self.mta.spool.run_io(find).addCallback(deliver).addErrback(
            lambda failure: log.failure("could not search the spool", failure))

    def sweep(self) -> defer.Deferred:
        """
        Deliver what is in the spool, committed, older than L{SWEEP_AFTER}
        and known to nobody: a receiver killed right after a commit, before
        its C{committing} line left it, had said nothing of it (the next
        start-up would find it; this finds it now).  Reads in the spool's
        I/O thread.
        """
        self._sweep = None
        spool = self.mta.spool
        known = set(self.mta.delivery.entries)
        for proc in self.processes.values():
            known |= proc.committing
        before = time.time() - SWEEP_AFTER

        def find() -> list:
            found = []
            for name in sorted(os.listdir(spool.queue)):
                if "." in name or name in known:
                    continue
                try:
                    if os.stat(spool.queue / name).st_mtime > before:
                        continue  # being committed or just queued: told soon
                    found.append(spool.load(name))
                except (OSError, SpoolError):
                    continue  # gone, or never committed
            return found

        return self._deliver_found(
            find, "{id}: found in the spool after a receiver ended; delivering")

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self._stopping = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        self.stop_accepting()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        return defer.DeferredList([p.stop() for p in list(self.processes.values())])

