"""
Tests for L{twisted_mta.smtp.data}: the DATA terminator and dot-unstuffing,
BDAT chunk counting, and the bare CR / bare LF rules that stop smuggling.
Every reader is fed its input split at every possible place, since TCP
may cut a stream anywhere.
"""

from __future__ import annotations

import itertools
import random

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.smtp.data import (
    ChunkReader,
    DataReader,
    NewlineFilter,
    has_bare_newline,
    normalize_newlines,
)

TERMINATOR = b"\r\n.\r\n"

# The sequences a laxer server might take for the end of DATA.
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\n.\r", b"\r\n.\r"]


def reference(stream: bytes) -> tuple[bytes, bytes] | None:
    """
    What a DATA reader must make of C{stream}, written the slow and obvious
    way, line by line: (body, leftover), or C{None} if C{stream} holds no
    end of data.
    """
    lines = []
    pos = 0
    while True:
        end = stream.find(b"\r\n", pos)
        if end < 0:
            return None
        line = stream[pos:end]
        pos = end + 2
        if line == b".":
            return b"".join(lines), stream[pos:]
        if line.startswith(b"."):
            line = line[1:]
        lines.append(line + b"\r\n")


def splits(data: bytes, pieces: int):
    """Every way to cut C{data} into C{pieces} parts (some may be empty)."""
    for cuts in itertools.combinations_with_replacement(range(len(data) + 1), pieces - 1):
        bounds = (0,) + cuts + (len(data),)
        yield [data[a:b] for a, b in zip(bounds, bounds[1:])]


def read(parts: list[bytes]) -> tuple[bytes, bytes, bool]:
    """Feed C{parts} to a new L{DataReader}: (body, leftover, done)."""
    reader = DataReader()
    out = []
    for i, part in enumerate(parts):
        out.append(reader.feed(part))
        if reader.done:
            # What comes after the terminator is the caller's, not ours.
            return b"".join(out), reader.leftover + b"".join(parts[i + 1:]), True
    return b"".join(out), b"", False


def filtered(parts: list[bytes], normalize: bool = False) -> tuple[bytes, bool]:
    newlines = NewlineFilter(normalize=normalize)
    out = [newlines.feed(part) for part in parts]
    out.append(newlines.close())
    return b"".join(out), newlines.bare


# Representative inputs: dot-stuffing at the start, in the middle, lines
# that are only dots, a terminator-like tail, 8-bit bytes, and leftover.
SAMPLES = [
    b".\r\n",
    b"\r\n.\r\n",
    b"..\r\n.\r\n",
    b"a\r\n.\r\nQUIT\r\n",
    b".x\r\n..\r\n...\r\n.\r\n",
    b"a\r\n..b\r\n\r\n.\r\nMAIL",
    b"\xff\xfe\x00\r\n.\r.\r\n.\r\n\r\n",
    b"x\n.\ny\r.\rz\r\n.\nw\r\n.\r\nRSET\r\n",
]


class ReferenceTests(SynchronousTestCase):
    """The reference itself says what the RFC says."""

    def test_reference(self):
        self.assertEqual(reference(b".\r\n"), (b"", b""))
        self.assertEqual(reference(b"..\r\n.\r\nX"), (b".\r\n", b"X"))
        self.assertIsNone(reference(b"a\n.\n"))


class DataReaderTests(SynchronousTestCase):
    def assertReads(self, stream: bytes, body: bytes, leftover: bytes = b"") -> None:
        self.assertEqual(reference(stream), (body, leftover))
        self.assertEqual(read([stream]), (body, leftover, True))
        self.assertEqual(read([bytes([b]) for b in stream]), (body, leftover, True))

    def test_simple(self):
        self.assertReads(b"Subject: x\r\n\r\nhello\r\n.\r\n", b"Subject: x\r\n\r\nhello\r\n")

    def test_empty(self):
        self.assertReads(b".\r\n", b"")
        reader = DataReader()
        self.assertEqual(reader.feed(b".\r\n"), b"")
        self.assertTrue(reader.done)
        self.assertEqual(reader.leftover, b"")

    def test_emptyLine(self):
        self.assertReads(b"\r\n.\r\n", b"\r\n")

    def test_unstuffing(self):
        self.assertReads(b"..x\r\n.\r\n", b".x\r\n")
        self.assertReads(b"a\r\n..x\r\n.\r\n", b"a\r\n.x\r\n")
        self.assertReads(b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n")
        self.assertReads(b"..\r\n.\r\n", b".\r\n")
        self.assertReads(b"...\r\n.\r\n", b"..\r\n")
        self.assertReads(b"..\r\n..\r\n..\r\n.\r\n", b".\r\n.\r\n.\r\n")
        self.assertReads(b".a\r\n.b\r\n.c\r\n.\r\n", b"a\r\nb\r\nc\r\n")

    def test_dotNotAtLineStart(self):
        self.assertReads(b"a.b\r\nc..\r\n.\r\n", b"a.b\r\nc..\r\n")

    def test_leftover(self):
        self.assertReads(b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n")
        self.assertReads(b"a\r\n.\r\n.\r\n", b"a\r\n", b".\r\n")
        self.assertReads(b".\r\n\r\n", b"", b"\r\n")
        self.assertReads(b"a\r\n.\r\n\xff\x00", b"a\r\n", b"\xff\x00")

    def test_leftoverIsNotUnstuffed(self):
        reader = DataReader()
        self.assertEqual(reader.feed(b"a\r\n.\r\n..x\r\n.\r\n"), b"a\r\n")
        self.assertEqual(reader.leftover, b"..x\r\n.\r\n")

    def test_eightBit(self):
        body = bytes(range(256)).replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"
        self.assertReads(body + TERMINATOR[2:], body)
        self.assertReads("Gr\u00fc\u00dfe \u2603\r\n".encode("utf-8") + b".\r\n",
                         "Gr\u00fc\u00dfe \u2603\r\n".encode("utf-8"))

    def test_nul(self):
        self.assertReads(b"\x00\r\n.\x00\r\n.\r\n", b"\x00\r\n\x00\r\n")

    def test_smugglingNeverEnds(self):
        for seq in SMUGGLING:
            stream = b"a" + seq + b"MAIL FROM:<x@y>\r\n"
            for parts in splits(stream, 2):
                body, _, done = read(parts)
                self.assertFalse(done, (seq, parts))
                self.assertIn(b"MAIL FROM", body + b"MAIL FROM")
            # Once the real terminator comes, everything before it is body.
            body, leftover, done = read([stream + TERMINATOR[2:] if stream.endswith(b"\r\n")
                                         else stream + TERMINATOR])
            self.assertTrue(done)
            self.assertEqual(leftover, b"")
            self.assertIn(b"MAIL FROM:<x@y>", body)

    def test_smugglingAtStart(self):
        # The body's start counts as a line start, but only for CRLF rules.
        for seq in (b".\n", b".\r", b".\rQUIT\r\n", b".\nQUIT\r\n"):
            self.assertFalse(read([seq])[2], seq)

    def test_bareCRBeforeTerminator(self):
        # "\r" then "\r\n.\r\n": the CRLF.CRLF is there, so the message ends;
        # the bare CR is body (and the newline filter flags it).
        self.assertReads(b"a\r\r\n.\r\n", b"a\r\r\n")

    def test_everySplit(self):
        for stream in SAMPLES:
            expected = reference(stream)
            self.assertIsNotNone(expected, stream)
            for pieces in (1, 2, 3):
                for parts in splits(stream, pieces):
                    self.assertEqual(read(parts), expected + (True,), parts)

    def test_byteByByte(self):
        for stream in SAMPLES:
            self.assertEqual(read([bytes([b]) for b in stream]), reference(stream) + (True,))

    def test_emptyFeeds(self):
        reader = DataReader()
        out = [reader.feed(b""), reader.feed(b"a"), reader.feed(b""), reader.feed(b"\r\n."),
               reader.feed(b""), reader.feed(b"\r\n")]
        self.assertTrue(reader.done)
        self.assertEqual(b"".join(out), b"a\r\n")

    def test_holdsBackLittle(self):
        # Only what may begin a terminator is held back: after a body whose
        # last line is complete, all but its CRLF is released.
        reader = DataReader()
        self.assertEqual(reader.feed(b"line one\r\nline two\r\n"), b"line one\r\nline two")
        self.assertEqual(reader.feed(b"three"), b"\r\nthree")
        self.assertFalse(reader.done)

    def test_fedAfterDone(self):
        reader = DataReader()
        reader.feed(b".\r\n")
        self.assertRaises(RuntimeError, reader.feed, b"x")

    def test_random(self):
        """
        Random bodies heavy in CR, LF and dots, random leftovers, cut at
        random places: the reader agrees with the line-by-line reference,
        and never holds back more than four bytes of what it could release.
        """
        rng = random.Random(5321)
        alphabet = [b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"a", b"\xff", b"\x00", b" "]
        for _ in range(1500):
            stream = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
            if rng.random() < 0.8:
                stream += TERMINATOR + b"".join(
                    rng.choice(alphabet) for _ in range(rng.randrange(0, 6)))
            expected = reference(stream)
            cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.randrange(0, 6)))
            bounds = [0] + cuts + [len(stream)]
            parts = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
            body, leftover, done = read(parts)
            if expected is None:
                self.assertFalse(done, stream)
                # Unstuff what was fed, as if it all were complete lines.
                whole = (b"\r\n" + stream).replace(b"\r\n.", b"\r\n")[2:]
                self.assertTrue(whole.startswith(body), (stream, parts))
                self.assertLessEqual(len(whole) - len(body), 4, (stream, parts))
            else:
                self.assertEqual((body, leftover, done), expected + (True,), (stream, parts))

    def test_largeBody(self):
        # A realistic body in large reads: same answer as the reference.
        rng = random.Random(3030)
        lines = []
        for _ in range(2000):
            line = bytes(rng.randrange(32, 256) for _ in range(rng.randrange(0, 100)))
            if rng.random() < 0.05:
                line = b"." + line
            lines.append(line + b"\r\n")
        stream = b"".join(lines) + b".\r\nQUIT\r\n"
        expected = reference(stream)
        for size in (1, 7, 4096, 65536, len(stream)):
            parts = [stream[i:i + size] for i in range(0, len(stream), size)]
            self.assertEqual(read(parts), expected + (True,), size)


class HasBareNewlineTests(SynchronousTestCase):
    def test_clean(self):
        for chunk in (b"", b"abc", b"a\r\nb\r\n", b"\r\n", b"\r\n\r\n"):
            self.assertFalse(has_bare_newline(chunk), chunk)

    def test_bare(self):
        for chunk in (b"\n", b"\r", b"a\nb", b"a\rb", b"\r\r\n", b"\r\n\n", b"\n\r",
                      b"a\r\n\r", *SMUGGLING):
            self.assertTrue(has_bare_newline(chunk), chunk)

    @staticmethod
    def counted(chunk: bytes) -> bool:
        """The obvious definition: every CR and every LF is part of a CRLF."""
        crlf = chunk.count(b"\r\n")
        return chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf

    def test_everyShortChunk(self):
        # NUL, and the bytes either side of CR and LF, next to CR and LF.
        alphabet = [b"\r", b"\n", b"a", b"\x00", b"\x09", b"\x0b", b"\x0c", b"\x0e", b"\xff"]
        for n in range(6):
            for letters in itertools.product(alphabet, repeat=n):
                chunk = b"".join(letters)
                self.assertEqual(has_bare_newline(chunk), self.counted(chunk), chunk)

    def test_random(self):
        rng = random.Random(5322)
        for _ in range(3000):
            chunk = bytes(rng.choice(b"\r\n\x00\xff.a") for _ in range(rng.randrange(0, 300)))
            self.assertEqual(has_bare_newline(chunk), self.counted(chunk), chunk)
        body = b"line of text\r\n" * 5000
        self.assertFalse(has_bare_newline(body))
        for i in (0, 7, 35000, len(body) - 1):
            for bare in (b"\r", b"\n"):
                chunk = body[:i] + bare + body[i:]
                self.assertEqual(has_bare_newline(chunk), self.counted(chunk), (i, bare))


class NormalizeNewlinesTests(SynchronousTestCase):
    def test_normalize(self):
        cases = {
            b"": b"",
            b"a\r\nb": b"a\r\nb",
            b"a\nb": b"a\r\nb",
            b"a\rb": b"a\r\nb",
            b"\r\r\n": b"\r\n\r\n",
            b"\n\r": b"\r\n\r\n",
            b"\r\n\n": b"\r\n\r\n",
            b"\n.\n": b"\r\n.\r\n",
            b"\r.\r": b"\r\n.\r\n",
            b"\r\n.\n": b"\r\n.\r\n",
            b"\r.\r\n": b"\r\n.\r\n",
        }
        for chunk, normal in cases.items():
            self.assertEqual(normalize_newlines(chunk), normal, chunk)
            self.assertFalse(has_bare_newline(normal))


class NewlineFilterTests(SynchronousTestCase):
    def test_clean(self):
        for parts in splits(b"a\r\nb\r\n\r\n", 3):
            self.assertEqual(filtered(parts), (b"a\r\nb\r\n\r\n", False), parts)
            self.assertEqual(filtered(parts, normalize=True), (b"a\r\nb\r\n\r\n", False), parts)

    def test_splitCRLFNotBare(self):
        newlines = NewlineFilter()
        self.assertEqual(newlines.feed(b"a\r"), b"a")
        self.assertEqual(newlines.feed(b"\nb\r"), b"\r\nb")
        self.assertEqual(newlines.feed(b"\n"), b"\r\n")
        self.assertEqual(newlines.close(), b"")
        self.assertFalse(newlines.bare)

    def test_splitCRLFNormalize(self):
        newlines = NewlineFilter(normalize=True)
        out = newlines.feed(b"a\r") + newlines.feed(b"\n") + newlines.close()
        self.assertEqual(out, b"a\r\n")
        self.assertFalse(newlines.bare)

    def test_heldCROverEmptyFeeds(self):
        newlines = NewlineFilter()
        out = newlines.feed(b"a\r") + newlines.feed(b"") + newlines.feed(b"\n") + newlines.close()
        self.assertEqual(out, b"a\r\n")
        self.assertFalse(newlines.bare)

    def test_crThenOther(self):
        newlines = NewlineFilter()
        out = newlines.feed(b"a\r") + newlines.feed(b"b") + newlines.close()
        self.assertEqual(out, b"a\rb")
        self.assertTrue(newlines.bare)

    def test_crAtClose(self):
        newlines = NewlineFilter()
        self.assertEqual(newlines.feed(b"a\r"), b"a")
        self.assertEqual(newlines.close(), b"\r")
        self.assertTrue(newlines.bare)
        newlines = NewlineFilter(normalize=True)
        self.assertEqual(newlines.feed(b"a\r") + newlines.close(), b"a\r\n")
        self.assertTrue(newlines.bare)

    def test_smugglingFlagged(self):
        for seq in SMUGGLING:
            body = b"Subject: x\r\n\r\nhi" + seq + b"MAIL FROM:<evil@x>\r\n"
            for parts in splits(body, 2):
                self.assertEqual(filtered(parts), (body, True), (seq, parts))
                self.assertEqual(filtered(parts, normalize=True),
                                 (normalize_newlines(body), True), (seq, parts))

    def test_smugglingThroughDataReader(self):
        # The whole path a body takes: wire -> DataReader -> NewlineFilter.
        for seq in SMUGGLING:
            stream = b"hi" + seq + b"MAIL FROM:<evil@x>\r\n.\r\n"
            for parts in splits(stream, 2):
                reader = DataReader()
                newlines = NewlineFilter(normalize=True)
                out = b""
                for part in parts:
                    if not reader.done:
                        out += newlines.feed(reader.feed(part))
                out += newlines.close()
                self.assertTrue(reader.done)
                self.assertEqual(reader.leftover, b"")
                self.assertTrue(newlines.bare, (seq, parts))
                self.assertFalse(has_bare_newline(out))
                self.assertTrue(out.endswith(b"MAIL FROM:<evil@x>\r\n"))

    def test_normalizeEverySplit(self):
        for body in (b"a\rb\nc\r\nd\r", b"\r\r\n\n\r", b"\n", b"\r", b"x\r\n\r"):
            for parts in splits(body, 3):
                self.assertEqual(filtered(parts, normalize=True),
                                 (normalize_newlines(body), True), parts)
                self.assertEqual(filtered(parts), (body, True), parts)

    def test_staysBare(self):
        newlines = NewlineFilter()
        newlines.feed(b"a\nb")
        self.assertEqual(newlines.feed(b"c\r\n"), b"c\r\n")
        self.assertTrue(newlines.bare)

    def test_random(self):
        rng = random.Random(6531)
        alphabet = [b"\r", b"\n", b"\r\n", b"a", b".", b"\xff"]
        for _ in range(2000):
            body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
            cuts = sorted(rng.randrange(len(body) + 1) for _ in range(rng.randrange(0, 5)))
            bounds = [0] + cuts + [len(body)]
            parts = [body[a:b] for a, b in zip(bounds, bounds[1:])]
            bare = has_bare_newline(body)
            self.assertEqual(filtered(parts), (body, bare), parts)
            self.assertEqual(filtered(parts, normalize=True),
                             (normalize_newlines(body), bare), parts)


class ChunkReaderTests(SynchronousTestCase):
    def test_exact(self):
        reader = ChunkReader(5)
        self.assertFalse(reader.done)
        self.assertEqual(reader.feed(b"hello"), b"hello")
        self.assertTrue(reader.done)
        self.assertEqual(reader.leftover, b"")

    def test_zero(self):
        reader = ChunkReader(0)
        self.assertTrue(reader.done)
        self.assertEqual(reader.leftover, b"")
        self.assertRaises(RuntimeError, reader.feed, b"x")

    def test_leftover(self):
        reader = ChunkReader(3)
        self.assertEqual(reader.feed(b"abcBDAT 0 LAST\r\n"), b"abc")
        self.assertTrue(reader.done)
        self.assertEqual(reader.leftover, b"BDAT 0 LAST\r\n")

    def test_noUnstuffingNoTerminator(self):
        data = b"..\r\n.\r\n\n.\n\r\x00\xff"
        reader = ChunkReader(len(data))
        self.assertEqual(reader.feed(data + b"Q"), data)
        self.assertEqual(reader.leftover, b"Q")

    def test_everySplit(self):
        stream = b"ab\r\n.\r\ncdQUIT\r\n"
        for size in (0, 1, 5, 10, len(stream)):
            for parts in splits(stream, 3):
                reader = ChunkReader(size)
                out = []
                rest = b""
                for i, part in enumerate(parts):
                    if reader.done:
                        rest = reader.leftover + b"".join(parts[i:])
                        break
                    out.append(reader.feed(part))
                else:
                    if reader.done:
                        rest = reader.leftover
                self.assertTrue(reader.done)
                self.assertEqual(b"".join(out), stream[:size], (size, parts))
                self.assertEqual(rest, stream[size:], (size, parts))

    def test_notDoneUntilCounted(self):
        reader = ChunkReader(4)
        self.assertEqual(reader.feed(b"ab"), b"ab")
        self.assertEqual(reader.feed(b""), b"")
        self.assertFalse(reader.done)
        self.assertEqual(reader.feed(b"cd"), b"cd")
        self.assertTrue(reader.done)
        self.assertRaises(RuntimeError, reader.feed, b"")
