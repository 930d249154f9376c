"""
The durable queue.

Layout under the spool folder::

    incoming/<name>    files made ahead of need, and messages being received
    queue/<id>         the message as received, then its envelope (JSON),
                       then a trailer line: the commit record; then, once
                       delivery has changed it, the entry as saved (JSON),
                       each save followed by its own trailer line
    queue/<id>.state   the entry as saved by versions before saves were
                       appended (read, never written now)
    queue/*.tmp        such a state file being written (removed at start-up)
    corrupt/           entries that could not be read, kept for a human

A message is written to a file in C{incoming/} as it arrives.  Those
files are created (and opened) ahead of need by a thread, a few at a
time: creating a file waits for the file system (inode allocation,
the folder's lock), so the reactor only takes one that is ready.
Accepting a message appends the envelope and the trailer (C{TMTA1
<envelope length> <crc32>}), then, in a thread, renames the file to
C{queue/<id>}; one C{fdatasync} of the file and one C{fsync} of
C{queue/} make it durable; only then does the server say 250.
Everything in C{incoming/} was never acknowledged and is removed at
start-up, and so is a file in C{queue/} without a valid commit record.

Durability work runs in threads, never on the reactor thread, and is
grouped: every request that arrives while a batch is syncing joins the
next batch, whose files are synced in parallel and share one folder sync.
A batch that could start also waits, up to L{COMMIT_WAIT} (1 ms), while
other messages are still being received (between DATA and their end), so
that concurrent sessions share it; a lone session never waits.

A save appends the entry's JSON and a trailer (C{TMTA1S <length>
<crc32>}) to the message file: no file is made, renamed or removed, and
the folder is not synced.  The last save whose trailer and checksum are
whole is the entry's state; the commit record is found by walking back
over the saves.  A save that a crash cut short is ignored (the one
before it, or the envelope, counts) and cut off at start-up.

With C{sync = "filesystem"} (L{Spool}'s C{sync}), a batch makes its
writes durable with one C{syncfs(2)} of the spool's file system instead
of a C{fdatasync} per file and a folder C{fsync}: one journal commit
however many messages the batch holds, but it also writes out whatever
else is waiting on that file system (meant for a spool on its own).

What need not be durable is not synced and does not wait in that line:
removing a message (a crash before the unlink reaches the disk brings
it back, and it is delivered again: at-least-once), and a save that only
records a deferral (L{Spool.save} with C{sync=False}: a crash that loses
it makes the next attempt come sooner).  Writes to one entry's file
happen in the order they were asked for.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import threading
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mta.spool.entry import QueueEntry

log = Logger()

T = TypeVar("T")

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
    return _queue_id(int((time.time() if now is None else now) * 1_000_000))


class _Randomness:
    """
    Random numbers below 52**5 from os.urandom, read 64 at a time: one
    system call per message on the reactor thread was measurable (it
    gives up the GIL, and getting it back waits behind the spool threads).
    The ids' randomness must be unpredictable (see L{Spool.load}), so not
    the random module.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            if not self._buffer:
                self._buffer = os.urandom(5 * 64)
            chunk, self._buffer = self._buffer[:5], self._buffer[5:]
        return int.from_bytes(chunk, "big")


_randomness = _Randomness()


def _queue_id(micros: int) -> str:
    base = len(_ALPHABET)
    stamp = []
    while micros:
        micros, digit = divmod(micros, base)
        stamp.append(_ALPHABET[digit])
    stamp.reverse()
    rand = _randomness.next()  # 52**5 < 2**40: five characters from five bytes
    for _ in range(5):
        rand, digit = divmod(rand, base)
        stamp.append(_ALPHABET[digit])
    return "".join(stamp)


def _id_micros(queue_id: str) -> int:
    """The time part of a queue id, in microseconds (0 if it is not an id)."""
    micros = 0
    for c in queue_id[:-5]:
        digit = _ALPHABET.find(c)
        if digit < 0:
            return 0
        micros = micros * len(_ALPHABET) + digit
    return micros


def _trailer(envelope: bytes) -> bytes:
    return b"%s%010d %08x\n" % (_TRAILER_MAGIC, len(envelope), zlib.crc32(envelope))


_SAVE_MAGIC = b"\nTMTA1S "
# "\nTMTA1S " + 10 digits + " " + 8 hex digits + "\n"
_SAVE_TRAILER_LEN = len(_SAVE_MAGIC) + 10 + 1 + 8 + 1
# Either trailer, anywhere (compact JSON never holds a raw newline, so
# neither can appear inside an envelope or a save).
_ANY_TRAILER = re.compile(rb"\nTMTA1(S?) ([0-9]{10}) ([0-9a-f]{8})\n")


def _save_record(data: bytes) -> bytes:
    """What a save appends: the entry's JSON and its trailer."""
    return b"%s%s%010d %08x\n" % (data, _SAVE_MAGIC, len(data), zlib.crc32(data))


def _state_json(raw: bytes) -> bytes | None:
    """
    The JSON of an old-style state file (C{queue/<id>.state}); None if it
    is empty or was torn.  Plain JSON, or (briefly written so) a header
    line C{TMTA1S <length> <crc32>} and the JSON.
    """
    magic = _SAVE_MAGIC[1:]
    if not raw.startswith(magic):
        return raw or None
    header, _, data = raw.partition(b"\n")
    try:
        length_text, crc_text = header[len(magic):].split(b" ")
        if int(length_text) != len(data) or int(crc_text, 16) != zlib.crc32(data):
            return None
    except ValueError:
        return None
    return data


def _record_at(f, end: int):
    """
    The record (envelope or save) whose trailer ends at C{end}, if it is
    whole: (is a save, where its JSON starts, the JSON); else None.
    """
    if end < _TRAILER_LEN:
        return None
    low = max(0, end - _SAVE_TRAILER_LEN)
    f.seek(low)
    tail = f.read(end - low)
    m = _ANY_TRAILER.search(tail)
    if m is None or m.end() != len(tail):
        return None
    return _check_record(f, low + m.start(), m)


def _check_record(f, trailer_at: int, m):
    """The record whose trailer C{m} starts at C{trailer_at}, if its checksum holds."""
    save, length, crc = bool(m.group(1)), int(m.group(2)), int(m.group(3), 16)
    start = trailer_at - length
    if start < 0:
        return None
    f.seek(start)
    data = f.read(length)
    if len(data) != length or zlib.crc32(data) != crc:
        return None
    return save, start, data


def _last_record_before(f, end: int):
    """
    The last whole record ending at or before C{end}, found by searching
    (a crash cut a save short): (is a save, JSON start, JSON, its end).
    """
    window = 65536
    while True:
        low = max(0, end - window)
        f.seek(low)
        data = f.read(end - low)
        for m in reversed(list(_ANY_TRAILER.finditer(data))):
            record = _check_record(f, low + m.start(), m)
            if record is not None:
                return record + (low + m.end(),)
        if low == 0:
            return None
        window *= 4


def _read_records(f) -> tuple[int, bytes, bytes | None, int, int]:
    """
    Walk back from the end of an open message file: (the message's size,
    the envelope, the last whole save or None, the end of the last whole
    record, the file's size).  Raises L{SpoolError} without a commit record.
    """
    f.seek(0, os.SEEK_END)
    total = pos = f.tell()
    saved = None
    last_end = None
    while True:
        record = _record_at(f, pos)
        if record is None:
            # Not a whole record: what a crash left of a save (or of a
            # commit, which was then never acknowledged).
            found = _last_record_before(f, pos)
            if found is None:
                raise SpoolError("no commit record")
            record, pos = found[:3], found[3]
        if last_end is None:
            last_end = pos
        save, start, data = record
        if not save:
            return start, data, saved, last_end, total
        if saved is None:
            saved = data
        pos = start


#: Seconds work nobody waits on (deferral saves, unlinks) may wait for the
#: spool's I/O thread, to go with other jobs: each hand-off wakes the
#: thread and then the reactor, ~50 us of CPU on the development VM (22%
#: of the main process's Python time in a receiving benchmark).
LAZY_IO_DELAY = 0.02


class SpoolError(Exception):
    pass


# Message bytes are kept in memory (the pieces as they came, not copied)
# until this much has come, then written with one writev: a write gives up
# the GIL, and getting it back on the reactor thread can wait behind the
# spool threads.
_WRITE_AHEAD = 1 << 20
_MAX_PIECES = 512  # under IOV_MAX


def _write_all(fd: int, pieces: list) -> None:
    """Write C{pieces} (a list, consumed) to C{fd} in as few system calls as the kernel allows."""
    while pieces:
        written = os.writev(fd, pieces)
        done = 0
        while done < len(pieces) and written >= len(pieces[done]):
            written -= len(pieces[done])
            done += 1
        del pieces[:done]
        if written:
            pieces[0] = pieces[0][written:]


class Incoming:
    """
    A message being received into the spool.  L{write} appends message
    bytes (held in memory up to C{_WRITE_AHEAD}, then to the page cache:
    it does not wait for the disk); L{flush} makes all of them readable by
    path.  Hand it to L{Spool.commit} to make it durable, or L{abort} it.
    C{path} is where the file is now: in C{incoming/} until it is committed.
    """

    def __init__(self, spool: "Spool", queue_id: str, path: Path, fd: int | None):
        self.spool = spool
        self.id = queue_id
        self.path = path
        self.size = 0
        self._fd = fd
        self._pieces: list[bytes] = []
        self._held = 0
        self._aborted = False
        self._open = True  # not yet handed to commit, nor aborted

    def write(self, data: bytes) -> None:
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer
        self._pieces.append(data)
        self._held += len(data)
        self.size += len(data)
        if self._held >= _WRITE_AHEAD or len(self._pieces) >= _MAX_PIECES:
            self.flush()

    def flush(self) -> None:
        """Hand what was written so far to the OS, so it can be read back by path."""
        if self._pieces:
            _write_all(self._fd, self._pieces)
            self._held = 0

    def _take(self) -> list[bytes]:
        """The pieces not written yet; the caller writes them (in a thread)."""
        pieces, self._pieces, self._held = self._pieces, [], 0
        return pieces

    def abort(self) -> None:
        """Drop the message: nothing of it stays in the spool."""
        if self._aborted:
            return
        self._aborted = True
        self.spool._closed(self)
        self._pieces = []
        fd, path = self._fd, self.path
        self._fd = None

        def job() -> None:
            if fd is not None:  # else a failed commit closed it
                os.close(fd)
            try:
                path.unlink()
            except FileNotFoundError:
                pass

        # Closing and unlinking wait for the journal too: not on the reactor.
        self.spool.run_io(job).addErrback(
            lambda failure: log.failure("spool: could not remove {path}", failure, path=str(path)))


class _FilePool:
    """
    Files in C{incoming/}, created and opened by a thread ahead of need.
    L{take} is called on the reactor thread and never touches the disk
    unless the pool ran dry (then it creates one file itself, as a last
    resort, and counts it in C{misses}).
    """

    def __init__(self, folder: Path, executor: ThreadPoolExecutor | None, size: int = 32):
        self.folder = folder
        self.size = size
        self._executor = executor  # None: create on demand (inline spools)
        self._ready: deque = deque()  # appended by the thread, taken by the reactor
        self._refill: Future | None = None
        self._closed = False
        self.misses = 0

    def _create(self) -> tuple[Path, int]:
        while True:
            path = self.folder / secrets.token_hex(8)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                continue
            return path, fd

    def _fill(self, n: int) -> None:
        for _ in range(n):
            if self._closed:
                return
            self._ready.append(self._create())

    def take(self) -> tuple[Path, int]:
        try:
            item = self._ready.popleft()
        except IndexError:
            item = None
        if self._executor is not None and not self._closed and (
                self._refill is None or self._refill.done()):
            want = self.size - len(self._ready)
            if want > self.size // 4:
                self._refill = self._executor.submit(self._fill, want)
        if item is None:
            if self._executor is not None:
                self.misses += 1
            item = self._create()
        return item

    def close(self) -> None:
        """Close and remove the files not taken (after the thread stopped)."""
        self._closed = True
        while self._ready:
            path, fd = self._ready.popleft()
            os.close(fd)
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def _load_syncfs():
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
    return function


_syncfs = _load_syncfs()

#: How the spool makes a batch durable: "file" (fdatasync each file, fsync
#: the folder) or "filesystem" (one syncfs of the spool's file system).
SYNC_MODES = ("file", "filesystem")


def syncfs_available() -> bool:
    """Whether this system has C{syncfs(2)} (Linux)."""
    return _syncfs is not None


def syncfs(fd: int) -> None:
    """C{syncfs(2)}: write out the whole file system holding C{fd}, and wait."""
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available on this system")
    if _syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _sync_folder(folder: Path, sync: Callable[[int], None]) -> None:
    """C{sync} (fsync, syncfs) on an fd of C{folder}."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sync(fd)
    finally:
        os.close(fd)


#: How many of a batch's jobs one thread runs, one after the other.  With
#: one each, every job cost a thread wake-up (~50 us of CPU on the
#: development VM); with all in one thread, the syncs would not overlap,
#: which halved the files synced per second on a journalled ext4.  Two:
#: on ext4 with and without a journal, 85-110% of the files per second of
#: one each, for 15-30% less CPU per file (10-file batches).
JOBS_PER_THREAD = 2


#: How long a batch may wait for messages still being received before it
#: starts (seconds).  A batch is a thread wake-up, a folder sync and the
#: file system's work for a sync: shared by more messages, less CPU each.
#: It waits only while some message is between DATA and its end, and
#: starts as soon as none is; a lone session never waits.
COMMIT_WAIT = 0.001


class _GroupSync:
    """
    Runs durability jobs in threads, in batches.  A job is a function run
    in a worker thread; after every job of a batch has run, the folders
    the batch touched are fsync'ed once each; then each job's Deferred
    fires (with the job's exception, if it raised).  One batch runs at a
    time; what is submitted meanwhile waits for the next.  A batch waits
    up to L{COMMIT_WAIT} for the jobs that C{expected} says are coming.
    """

    def __init__(self, reactor, threads: int = 8, inline: bool = False,
                 whole_fs: Path | None = None, expected: Callable[[], int] = lambda: 0):
        """
        @param whole_fs: a folder: end each batch with one C{syncfs} of its
            file system instead of the folders' fsyncs (the jobs then need
            not sync their files).
        @param expected: how many jobs are on their way (messages being
            received), for the next batch to wait for.
        """
        self._reactor = reactor
        self._inline = inline
        self._whole_fs = whole_fs
        self._expected = expected
        self._wait = None  # the DelayedCall of a batch waiting for more
        self._batches = ThreadPoolExecutor(1, thread_name_prefix="spool-batch")
        # Concurrent fsyncs let the file system merge them into fewer
        # journal commits: on the development VM, 8 threads took a third
        # of the time per file that one did.
        self._workers = ThreadPoolExecutor(threads, thread_name_prefix="spool-sync")
        self._pending: list[tuple[Callable[[], None], Path | None, Deferred]] = []
        self._running = False

    def submit(self, job: Callable[[], None], folder: Path | None) -> Deferred:
        """Run C{job} in the next batch; then fsync C{folder} (None: no folder to sync)."""
        d: Deferred = Deferred()
        self._pending.append((job, folder, d))
        self.poke()
        return d

    def poke(self) -> None:
        """Start the next batch if it should start now: nothing runs, and nothing more is coming."""
        if self._running or not self._pending:
            return
        if self._inline or not self._expected():
            if self._wait is not None:
                self._wait.cancel()
                self._wait = None
            self._start()
        elif self._wait is None:
            self._wait = self._reactor.callLater(COMMIT_WAIT, self._waited)

    def _waited(self) -> None:
        self._wait = None
        if not self._running and self._pending:
            self._start()

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

    def _run(self, batch) -> list[BaseException | None]:
        jobs = [job for job, _, _ in batch]
        # Jobs run JOBS_PER_THREAD to a thread, this one taking the first
        # share: the syncs still overlap, with fewer thread wake-ups.  With
        # one syncfs for the batch, a job has no sync to overlap: all here.
        share = len(jobs) if self._whole_fs is not None else JOBS_PER_THREAD
        streams = [jobs[i:i + share] for i in range(0, len(jobs), share)]
        others = [self._workers.submit(_call_each, share) for share in streams[1:]]
        results = _call_each(streams[0])
        for future in others:
            results += future.result()
        if self._whole_fs is not None:
            _sync_folder(self._whole_fs, syncfs)
        else:
            for folder in {folder for _, folder, _ in batch if folder is not None}:
                _sync_folder(folder, os.fsync)
        return [None if ok else value for ok, value in results]

    def _finished(self, batch, future) -> None:
        try:
            errors = future.result()
        except BaseException as e:  # the folder sync itself failed
            errors = [e] * len(batch)
        # Still "running" while the callbacks run: what they submit (the
        # next message of each session) joins one next batch.  Marking the
        # batch finished first let the first callback start a batch of its
        # own, and the rest queue behind it: batches of one, one journal
        # commit per message.
        for (_, _, d), error in zip(batch, errors):
            if error is None:
                d.callback(None)
            else:
                d.errback(Failure(error))
        self._running = False
        if self._pending:
            self._start()

    def stop(self) -> None:
        if self._wait is not None:  # what waited for more goes now
            self._wait.cancel()
            self._wait = None
            if not self._running and self._pending:
                self._start()
        self._batches.shutdown(wait=True)
        self._workers.shutdown(wait=True)


def _call_each(jobs: list[Callable[[], T]]) -> list[tuple[bool, object]]:
    return [_call(job) for job in jobs]


def _fdatasync(fd: int) -> None:
    os.fdatasync(fd)


def _no_sync(fd: int) -> None:
    """A file's sync, when the batch's syncfs covers it."""


class Spool:
    """
    The queue folder.  Methods that make something durable return a
    Deferred that fires once it is on disk; the others are quick local
    file operations.
    """

    def __init__(self, path: str | os.PathLike, reactor=None, inline: bool = False,
                 pool_size: int = 32, sync: str = "file"):
        """
        @param inline: do the disk work on the calling thread, at once (for
            deterministic unit tests and tools; never in the server).
        @param pool_size: how many files to keep created in C{incoming/}
            ahead of need.
        @param sync: one of L{SYNC_MODES} (see the module docstring).
        """
        if sync not in SYNC_MODES:
            raise ValueError(f"sync: expected one of {', '.join(SYNC_MODES)}, got {sync!r}")
        if reactor is None:
            from twisted.internet import reactor
        self.path = Path(path)
        self.queue = self.path / "queue"
        self._queue_path = str(self.queue)
        self.incoming = self.path / "incoming"
        self.corrupt = self.path / "corrupt"
        self._reactor = reactor
        self._inline = inline
        whole_fs = self.path if sync == "filesystem" else None
        #: messages being received (L{new_message}, not yet committed or aborted)
        self._receiving = 0
        self._sync = _GroupSync(reactor, inline=inline, whole_fs=whole_fs,
                                expected=lambda: self._receiving)
        # With a syncfs per batch, the files need no sync of their own.
        self._sync_file = _fdatasync if whole_fs is None else _no_sync
        # Disk work that is not waited on for durability: file creation
        # ahead of need, unlinks, deferral saves.
        self._io_threads = None if inline else ThreadPoolExecutor(
            2, thread_name_prefix="spool-io")
        self._pool = _FilePool(self.incoming, self._io_threads, pool_size)
        self._tails: dict[str, deque[tuple[Callable[[], Deferred], Deferred]]] = {}
        self._io_pending: list[tuple[Callable[[], None], Deferred]] = []
        self._io_call = None  # the DelayedCall of _io_send
        self._io_lazy = False  # it was set for LAZY_IO_DELAY, not the next turn
        self._last_micros = 0
        self._id_lock = threading.Lock()

    # --- start-up -----------------------------------------------------------

    def prepare(self) -> list[QueueEntry]:
        """
        Create the folders if need be, remove what was never committed, and
        return every committed entry.  Blocking: called once at start-up,
        before the server listens.
        """
        for folder in (self.path, self.queue, self.incoming, self.corrupt):
            folder.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(self.incoming):
            # Files made ahead of need, or messages whose commit never
            # finished: none of them was acknowledged.
            (self.incoming / name).unlink()
        entries = []
        names = set(os.listdir(self.queue))
        for name in sorted(names):
            path = self.queue / name
            if name.endswith(".tmp"):
                path.unlink()
                log.info("spool: removed unfinished state file {name}", name=name)
            elif name.endswith(".state"):  # from older versions
                if name[: -len(".state")] not in names:
                    path.unlink()
                elif path.exists() and _state_json(path.read_bytes()) is None:
                    # Torn (load() ignored it).  exists(): quarantine may
                    # have moved it.
                    path.unlink()
                    log.info("spool: removed torn state file {name}", name=name)
            else:
                try:
                    entry, torn = self._load(name)
                    if torn is not None:
                        # A save a crash cut short: cut it off, so that
                        # the file ends with a whole record again.
                        os.truncate(path, torn)
                        log.info("spool: {id}: cut off a save left unfinished", id=name)
                except SpoolError as e:
                    if "no commit record" in str(e):
                        path.unlink()
                        log.info("spool: removed {id}, which was never acknowledged", id=name)
                    else:
                        self._quarantine(name, str(e))
                    continue
                entries.append(entry)
        # New ids sort after (and so never equal) those of a previous run,
        # even if the clock went back.
        self._last_micros = max([self._last_micros] + [_id_micros(e.id) for e in entries])
        return entries

    def _quarantine(self, name: str, why: str) -> None:
        log.error("spool: {id} cannot be read ({why}); moved to {folder}",
                  id=name, why=why, folder=str(self.corrupt))
        for suffix in ("", ".state"):
            src = self.queue / (name + suffix)
            if src.exists():
                os.replace(src, self.corrupt / (name + suffix))

    # --- receiving ----------------------------------------------------------

    def new_id(self) -> str:
        """
        A queue id no other message of this spool has: ids from one
        process have strictly increasing times, and start after the
        newest one found by L{prepare}.
        """
        with self._id_lock:
            micros = max(int(time.time() * 1_000_000), self._last_micros + 1)
            self._last_micros = micros
        return _queue_id(micros)

    def new_message(self) -> Incoming:
        """Start a new message file; its id is L{Incoming.id}."""
        path, fd = self._pool.take()
        self._receiving += 1
        return Incoming(self, self.new_id(), path, fd)

    def _forget(self, incoming: Incoming) -> None:
        if incoming._open:
            incoming._open = False
            self._receiving -= 1

    def _closed(self, incoming: Incoming) -> None:
        """C{incoming} was aborted: a batch need not wait for it."""
        self._forget(incoming)
        self._sync.poke()

    def commit(self, incoming: Incoming, entry: QueueEntry,
               envelope: bytes | None = None) -> Deferred:
        """
        Append C{entry} and the commit record to the message file and make
        both durable.  The Deferred fires once they are on disk; if it
        fails, the message was not accepted and its file is removed.
        C{envelope}: C{entry.to_json()}, if the caller has it already.
        """
        if envelope is None:
            envelope = entry.to_json()
        self._forget(incoming)  # (not _closed: this job is to join the batch it would start)
        pieces = incoming._take()
        pieces += (envelope, _trailer(envelope))
        fd = incoming._fd
        final = self.queue / incoming.id

        def job() -> None:
            try:
                try:
                    _write_all(fd, pieces)
                    # Into queue/ before the sync, so that the sync commits
                    # the rename too (and the folder's fsync has little
                    # left to do): one journal commit, not two.  A crash
                    # before the sync leaves a file whose trailer is not
                    # on disk, which prepare() removes, as for any message
                    # cut short.  The id is this spool's alone (see
                    # new_id): nothing is replaced.
                    os.rename(incoming.path, final)
                    incoming.path = final
                    self._sync_file(fd)
                finally:
                    os.close(fd)
                    incoming._fd = None
            except BaseException:
                try:
                    incoming.path.unlink()
                except OSError:
                    pass
                raise

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
        Read an entry: its last save, else (from older versions) its state
        file, else the envelope in its message file.  Raises L{SpoolError}
        if it cannot be read.  Blocking (small reads).
        """
        entry, _ = self._load(queue_id)
        return entry

    def _load(self, queue_id: str) -> tuple[QueueEntry, int | None]:
        """L{load}, and where a torn save begins (None if there is none)."""
        try:
            with open(self.queue / queue_id, "rb") as f:
                size, envelope, saved, end, total = _read_records(f)
            if not envelope.startswith(b'{"id":"%s"' % queue_id.encode("utf-8", "replace")):
                # The envelope names its own file.  A message body that
                # ends in a forged envelope and commit record (a crash
                # before our own was written) cannot know the random id,
                # so it is not a commit.
                raise SpoolError("no commit record")
            if saved is None:
                try:
                    saved = _state_json((self.queue / (queue_id + ".state")).read_bytes())
                except FileNotFoundError:
                    pass
            entry = QueueEntry.from_json(envelope if saved is None else saved)
        except FileNotFoundError:
            raise SpoolError(f"{queue_id}: no such queue entry")
        except (ValueError, KeyError, TypeError) as e:
            raise SpoolError(f"{queue_id}: unreadable envelope: {e}")
        if entry.id != queue_id:
            raise SpoolError(f"{queue_id}: unreadable envelope: it names {entry.id}")
        entry.size = size
        return entry, (end if end < total else None)

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

    def save(self, entry: QueueEntry, sync: bool = True) -> Deferred:
        """
        Save C{entry}'s current state: append it to its message file (see
        the module docstring).  With C{sync}, the Deferred fires once it is
        durable (an C{fdatasync} of the file, in a batch, and no folder
        sync: nothing was named).  Without, once it is written, not
        synced: for a state whose loss in a crash costs nothing but an
        earlier retry (see L{DeliveryManager._must_sync}); a crash then
        leaves the last save before it, or none.
        """
        path = os.path.join(self._queue_path, entry.id)  # a str: a Path costs more to make
        record = _save_record(entry.to_json())

        def job() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                _write_all(fd, [record])
                if sync:
                    self._sync_file(fd)
            finally:
                os.close(fd)

        if sync:
            return self._in_order(entry.id, lambda: self._sync.submit(job, None))
        return self._in_order(entry.id, lambda: self.run_io(job, soon=False))

    def remove(self, queue_id: str) -> Deferred:
        """
        Remove an entry for good: its message file, then any state file of
        an older version (a state file left alone by a crash is cleaned up
        at start-up, whereas the other order could bring a delivered
        message back).  Not synced: the Deferred fires once the files are
        unlinked.
        """
        def job() -> None:
            for suffix in ("", ".state"):
                try:
                    os.unlink(self.queue / (queue_id + suffix))
                except FileNotFoundError:
                    pass

        return self._in_order(queue_id, lambda: self.run_io(job, soon=False))

    def run_io(self, job: Callable[[], T], soon: bool = True) -> Deferred:
        """
        Run C{job} (blocking disk work that need not be synced: the spool's
        unlinks and unsynced saves, reading a queued message) in the
        spool's I/O thread; the Deferred fires with what it returns.  The
        jobs asked for in one turn of the reactor go to the thread
        together, and come back together: a thread hand-off each was
        measurable (two context switches and a wake-up of the reactor).
        Without C{soon}, the job may wait up to L{LAZY_IO_DELAY} to go
        with others (for work nobody waits on: deferral saves, unlinks).
        """
        if self._io_threads is None:
            try:
                return succeed(job())
            except BaseException:
                return fail()
        d: Deferred = Deferred()
        self._io_pending.append((job, d))
        call = self._io_call
        if call is None:
            self._io_call = self._reactor.callLater(0 if soon else LAZY_IO_DELAY, self._io_send)
        elif soon and self._io_lazy:
            call.reset(0)
        self._io_lazy = not soon and (call is None or self._io_lazy)
        return d

    def _io_send(self) -> None:
        self._io_call = None
        self._io_lazy = False
        group, self._io_pending = self._io_pending, []
        if not group:
            return

        def run() -> list[tuple[bool, object]]:
            return [_call(job) for job, _ in group]

        try:
            future = self._io_threads.submit(run)
        except RuntimeError:  # stopped: shutting down, blocking is fine now
            future = Future()
            future.set_result(run())
            return self._io_done(group, future)
        future.add_done_callback(lambda f: self._reactor.callFromThread(self._io_done, group, f))

    @staticmethod
    def _io_done(group, future: Future) -> None:
        for (_, d), (ok, value) in zip(group, future.result()):
            if ok:
                d.callback(value)
            else:
                d.errback(Failure(value))

    def _in_order(self, queue_id: str, start: Callable[[], Deferred]) -> Deferred:
        """
        Call C{start} (which begins a write to C{queue_id}'s files) once the
        writes asked for before it have finished, so they land in order.
        The writes waiting their turn are kept per entry in C{_tails}; an
        entry with none under way has no key there.
        """
        waiting = self._tails.get(queue_id)
        if waiting is not None:
            d: Deferred = Deferred()
            waiting.append((start, d))
            return d
        self._tails[queue_id] = deque()
        return self._write_in_order(queue_id, start)

    def _write_in_order(self, queue_id: str, start: Callable[[], Deferred]) -> Deferred:
        return start().addBoth(self._written, queue_id)

    def _written(self, outcome, queue_id: str):
        """A write to C{queue_id} has finished: start the next one waiting, if any."""
        waiting = self._tails[queue_id]
        if waiting:
            start, d = waiting.popleft()
            self._write_in_order(queue_id, start).chainDeferred(d)
        else:
            del self._tails[queue_id]
        return outcome

    def stop(self) -> None:
        self._sync.stop()
        if self._io_call is not None and self._io_call.active():
            self._io_call.cancel()
        self._io_call = None
        if self._io_threads is not None:
            self._pool._closed = True
            self._io_threads.shutdown(wait=True)
            self._io_send()  # what was asked for in this last turn: now, here
        self._pool.close()


def _call(job: Callable[[], T]) -> tuple[bool, object]:
    """(True, what C{job} returned) or (False, the exception it raised)."""
    try:
        return True, job()
    except BaseException as e:
        return False, e


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
