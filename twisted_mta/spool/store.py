"""
The durable queue.

Layout under the spool folder::

    queue/<id>         the message as received, then its envelope (JSON),
                       then a trailer line: the commit record
    queue/<id>.state   the entry as last saved, once delivery has changed it
    queue/*.tmp        a state file being written
    corrupt/           entries that could not be read, kept for a human

A message is written to C{queue/<id>} as it arrives.  Accepting it appends
the envelope and the trailer (C{TMTA1 <envelope length> <crc32>}), then
one C{fdatasync} of the file and one C{fsync} of the folder make it
durable; only then does the server say 250.  A file without a valid
trailer was never acknowledged and is removed at start-up.

Durability work runs in threads, never on the reactor thread, and is
grouped: every request that arrives while a batch is syncing joins the
next batch, whose files are synced in parallel and share one folder sync.
"""

from __future__ import annotations

import os
import re
import secrets
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mta.spool.entry import QueueEntry

log = Logger()

_TRAILER_MAGIC = b"\nTMTA1 "
# "\nTMTA1 " + 10 digits + " " + 8 hex digits + "\n"
_TRAILER_LEN = len(_TRAILER_MAGIC) + 10 + 1 + 8 + 1
_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"


def new_queue_id(now: float | None = None) -> str:
    """
    A new queue id: the arrival time in microseconds (so ids sort by
    arrival) and random characters, from an alphabet without vowels, as
    Postfix's long ids are.
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    out = []
    while micros:
        micros, digit = divmod(micros, len(_ALPHABET))
        out.append(_ALPHABET[digit])
    return "".join(reversed(out)) + "".join(secrets.choice(_ALPHABET) for _ in range(5))


def _trailer(envelope: bytes) -> bytes:
    return b"%s%010d %08x\n" % (_TRAILER_MAGIC, len(envelope), zlib.crc32(envelope))


class SpoolError(Exception):
    pass


class Incoming:
    """
    A message being received into the spool.  L{write} appends message
    bytes (to the page cache: it does not wait for the disk).  Hand it to
    L{Spool.commit} to make it durable, or L{abort} it.
    """

    def __init__(self, spool: "Spool", queue_id: str, path: Path):
        self.spool = spool
        self.id = queue_id
        self.path = path
        self.size = 0
        self._file = open(path, "xb")

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def flush(self) -> None:
        """Hand what was written so far to the OS, so it can be read back by path."""
        self._file.flush()

    def abort(self) -> None:
        """Drop the message: nothing of it stays in the spool."""
        if not self._file.closed:
            self._file.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class _GroupSync:
    """
    Runs durability jobs in threads, in batches.  A job is a function run
    in a worker thread; after every job of a batch has run, the folders
    the batch touched are fsync'ed once each; then each job's Deferred
    fires (with the job's exception, if it raised).  One batch runs at a
    time; what is submitted meanwhile waits for the next.
    """

    def __init__(self, reactor, threads: int = 8, inline: bool = False):
        self._reactor = reactor
        self._inline = inline
        self._batches = ThreadPoolExecutor(1, thread_name_prefix="spool-batch")
        # Concurrent fsyncs let the file system merge them into fewer
        # journal commits: on the development VM, 8 threads took a third
        # of the time per file that one did.
        self._workers = ThreadPoolExecutor(threads, thread_name_prefix="spool-sync")
        self._pending: list[tuple[Callable[[], None], Path, Deferred]] = []
        self._running = False

    def submit(self, job: Callable[[], None], folder: Path) -> Deferred:
        d: Deferred = Deferred()
        self._pending.append((job, folder, d))
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        self._running = True
        if self._inline:
            future: Future = Future()
            try:
                future.set_result(self._run(batch))
            except BaseException as e:
                future.set_exception(e)
            return self._finished(batch, future)
        future = self._batches.submit(self._run, batch)
        future.add_done_callback(
            lambda f: self._reactor.callFromThread(self._finished, batch, f)
        )

    @staticmethod
    def _one(job: Callable[[], None]) -> BaseException | None:
        try:
            job()
        except BaseException as e:
            return e
        return None

    def _run(self, batch) -> list[BaseException | None]:
        if len(batch) == 1:
            errors = [self._one(batch[0][0])]
        else:
            errors = list(self._workers.map(self._one, [job for job, _, _ in batch]))
        for folder in {folder for _, folder, _ in batch}:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return errors

    def _finished(self, batch, future) -> None:
        self._running = False
        try:
            errors = future.result()
        except BaseException as e:  # the folder sync itself failed
            errors = [e] * len(batch)
        for (_, _, d), error in zip(batch, errors):
            if error is None:
                d.callback(None)
            else:
                d.errback(Failure(error))
        if self._pending:
            self._start()

    def stop(self) -> None:
        self._batches.shutdown(wait=True)
        self._workers.shutdown(wait=True)


class Spool:
    """
    The queue folder.  Methods that make something durable return a
    Deferred that fires once it is on disk; the others are quick local
    file operations.
    """

    def __init__(self, path: str | os.PathLike, reactor=None, inline: bool = False):
        """
        @param inline: do the durability work on the calling thread, at
            once (for deterministic unit tests; never in the server).
        """
        if reactor is None:
            from twisted.internet import reactor
        self.path = Path(path)
        self.queue = self.path / "queue"
        self.corrupt = self.path / "corrupt"
        self._reactor = reactor
        self._sync = _GroupSync(reactor, inline=inline)

    # --- start-up -----------------------------------------------------------

    def prepare(self) -> list[QueueEntry]:
        """
        Create the folders if need be, remove what was never committed, and
        return every committed entry.  Blocking: called once at start-up,
        before the server listens.
        """
        for folder in (self.path, self.queue, self.corrupt):
            folder.mkdir(parents=True, exist_ok=True)
        entries = []
        names = set(os.listdir(self.queue))
        for name in sorted(names):
            path = self.queue / name
            if name.endswith(".tmp"):
                path.unlink()
                log.info("spool: removed unfinished state file {name}", name=name)
            elif name.endswith(".state"):
                if name[: -len(".state")] not in names:
                    path.unlink()
            else:
                try:
                    entry = self.load(name)
                except SpoolError as e:
                    if "no commit record" in str(e):
                        path.unlink()
                        log.info("spool: removed {id}, which was never acknowledged", id=name)
                    else:
                        self._quarantine(name, str(e))
                    continue
                entries.append(entry)
        return entries

    def _quarantine(self, name: str, why: str) -> None:
        log.error("spool: {id} cannot be read ({why}); moved to {folder}",
                  id=name, why=why, folder=str(self.corrupt))
        for suffix in ("", ".state"):
            src = self.queue / (name + suffix)
            if src.exists():
                os.replace(src, self.corrupt / (name + suffix))

    # --- receiving ----------------------------------------------------------

    def new_message(self) -> Incoming:
        """Start a new message file; its id is L{Incoming.id}."""
        while True:
            queue_id = new_queue_id()
            try:
                return Incoming(self, queue_id, self.queue / queue_id)
            except FileExistsError:
                continue

    def commit(self, incoming: Incoming, entry: QueueEntry) -> Deferred:
        """
        Append C{entry} and the commit record to the message file and make
        both durable.  The Deferred fires once they are on disk; if it
        fails, the message was not accepted and its file is removed.
        """
        envelope = entry.to_json()
        f = incoming._file
        f.write(envelope)
        f.write(_trailer(envelope))
        f.flush()
        fd = f.fileno()

        def job() -> None:
            try:
                os.fdatasync(fd)
            finally:
                f.close()

        d = self._sync.submit(job, self.queue)

        def failed(failure):
            log.failure("spool: could not commit {id}", failure, id=incoming.id)
            incoming.abort()
            return failure

        return d.addErrback(failed)

    # --- reading ------------------------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        return self.queue / queue_id

    def load(self, queue_id: str) -> QueueEntry:
        """
        Read an entry: its state file if it has one, else the envelope in
        its message file.  Raises L{SpoolError} if it cannot be read.
        Blocking (a small read).
        """
        state = self.queue / (queue_id + ".state")
        try:
            with open(self.queue / queue_id, "rb") as f:
                size, envelope = self._read_commit(f)
            if state.exists():
                envelope = state.read_bytes()
            entry = QueueEntry.from_json(envelope)
        except FileNotFoundError:
            raise SpoolError(f"{queue_id}: no such queue entry")
        except (ValueError, KeyError, TypeError) as e:
            raise SpoolError(f"{queue_id}: unreadable envelope: {e}")
        if entry.id != queue_id:
            # The envelope names its own file.  A message body that ends in
            # a forged envelope and commit record (a crash before our own
            # was written) cannot know the random id, so it is not a commit.
            raise SpoolError("no commit record")
        entry.size = size
        return entry

    @staticmethod
    def _read_commit(f) -> tuple[int, bytes]:
        """The message size and envelope of an open message file."""
        f.seek(0, os.SEEK_END)
        total = f.tell()
        if total < _TRAILER_LEN:
            raise SpoolError("no commit record")
        f.seek(total - _TRAILER_LEN)
        trailer = f.read(_TRAILER_LEN)
        try:
            if not trailer.startswith(_TRAILER_MAGIC) or not trailer.endswith(b"\n"):
                raise ValueError
            length_text, crc_text = trailer[len(_TRAILER_MAGIC):-1].split(b" ")
            length, crc = int(length_text), int(crc_text, 16)
        except ValueError:
            raise SpoolError("no commit record")
        size = total - _TRAILER_LEN - length
        if size < 0:
            raise SpoolError("no commit record")
        f.seek(size)
        envelope = f.read(length)
        if zlib.crc32(envelope) != crc:
            raise SpoolError("no commit record")
        return size, envelope

    def entries(self) -> Iterator[QueueEntry]:
        """Every committed entry, read from disk (for tools; blocking)."""
        try:
            names = sorted(os.listdir(self.queue))
        except FileNotFoundError:
            return
        for name in names:
            if "." in name:
                continue
            try:
                yield self.load(name)
            except SpoolError:
                continue

    def read_message(self, entry: QueueEntry, chunk_size: int = 65536) -> Iterator[bytes]:
        """
        The message as it is to be delivered: C{entry}'s added header fields,
        then the message as received without the fields it removes.
        Blocking reads: call from a thread, or for small messages.
        """
        if entry.add_headers:
            yield b"".join(
                f"{name}: {value}\r\n".encode("utf-8") for name, value in entry.add_headers
            )
        remaining = entry.size
        with open(self.queue / entry.id, "rb") as f:
            if entry.remove_headers:
                head, remaining = _read_head(f, remaining)
                yield _drop_fields(head, entry.remove_headers)
            while remaining > 0:
                chunk = f.read(min(chunk_size, remaining))
                if not chunk:
                    raise SpoolError(f"{entry.id}: message file is short")
                remaining -= len(chunk)
                yield chunk

    # --- changing -----------------------------------------------------------

    def save(self, entry: QueueEntry) -> Deferred:
        """Make C{entry}'s current state durable (replacing the last one)."""
        final = self.queue / (entry.id + ".state")
        tmp = self.queue / (entry.id + ".state.tmp")
        data = entry.to_json()

        def job() -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fdatasync(f.fileno())
            os.replace(tmp, final)

        return self._sync.submit(job, self.queue)

    def remove(self, queue_id: str) -> Deferred:
        """
        Remove an entry for good.  The message file goes first: a state
        file left alone by a crash is cleaned up at start-up, whereas the
        other order could bring a delivered message back.
        """
        def job() -> None:
            for suffix in ("", ".state"):
                try:
                    os.unlink(self.queue / (queue_id + suffix))
                except FileNotFoundError:
                    pass

        return self._sync.submit(job, self.queue)

    def stop(self) -> None:
        self._sync.stop()


def _read_head(f, limit: int) -> tuple[bytes, int]:
    """Read up to and with the empty line ending the header block."""
    head = b""
    while len(head) < limit:
        chunk = f.read(min(65536, limit - len(head)))
        if not chunk:
            break
        head += chunk
        end = head.find(b"\r\n\r\n")
        if end >= 0 or head.startswith(b"\r\n"):
            break
    end = head.find(b"\r\n\r\n")
    cut = 2 if head.startswith(b"\r\n") else (end + 4 if end >= 0 else len(head))
    f.seek(cut - len(head), os.SEEK_CUR)
    return head[:cut], limit - cut


def _drop_fields(head: bytes, rules: list) -> bytes:
    """
    C{head} without the header fields (with their folded lines) that match
    a rule: C{[name, regex or None]} (a bare name string is C{[name, None]}).
    """
    compiled: dict[str, list] = {}
    for rule in rules:
        name, pattern = (rule, None) if isinstance(rule, str) else (rule[0], rule[1])
        compiled.setdefault(name.lower(), []).append(re.compile(pattern) if pattern else None)
    out: list[bytes] = []
    field: list[bytes] = []

    def flush() -> None:
        if not field:
            return
        first = field[0]
        name = first.split(b":", 1)[0].decode("utf-8", "replace").strip().lower()
        patterns = compiled.get(name) if b":" in first else None
        if patterns:
            value = b"".join(field).split(b":", 1)[1].decode("utf-8", "replace").strip()
            if any(p is None or p.search(value) for p in patterns):
                field.clear()
                return
        out.extend(field)
        field.clear()

    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and field:
            field.append(line)
            continue
        flush()
        field.append(line)
    flush()
    return b"\r\n".join(out)
