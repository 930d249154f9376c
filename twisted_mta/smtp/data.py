"""
Reading a message body off the wire, sans-IO: the DATA terminator and
dot-unstuffing (RFC 5321 4.5.2), BDAT chunk counting (RFC 3030), and the
line-ending rules that stop SMTP smuggling.

The readers take bytes as they arrive and hand back body bytes and, once
the body is complete, whatever followed it.  They work on whole chunks
with C{bytes.find}, C{bytes.split} and the stdlib's newline decoder (all
in C), never line by line: the body is the hot path.

Line endings.  DATA ends only at C{<CRLF>.<CRLF>}; a bare LF or a bare CR
never ends a line for this reader, so C{<LF>.<LF>}, C{<LF>.<CRLF>},
C{<CR>.<CR>} and C{<CRLF>.<LF>} are message content and can never end the
message early or smuggle a second one.  Because a body holding a bare LF
or bare CR could still smuggle through a laxer server further on, the
reader notes it: the server then either rejects the message (the default,
like Postfix's C{smtpd_forbid_bare_newline = reject}) or, with
C{bare_newline = "normalize"}, rewrites every bare CR and bare LF to CRLF
so that what is relayed is unambiguous.
"""

from __future__ import annotations

import re
from io import IncrementalNewlineDecoder

_TERMINATOR = b"\r\n.\r\n"
_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")


def has_bare_newline(chunk: bytes) -> bool:
    """Whether C{chunk} holds a CR not followed by LF or an LF not preceded by CR."""
    # The stdlib's universal-newlines decoder notes which kinds of line
    # ending it has seen, in one pass in C; three bytes.count passes (CRLF,
    # CR, LF: the obvious way, which the tests keep as the reference) were
    # the largest cost of a large body.  latin-1 maps each byte to one
    # character, so every CR and LF is seen as it is on the wire; final=True
    # makes a CR at the end bare, as it is within this chunk.
    seen = IncrementalNewlineDecoder(None, translate=False)
    seen.decode(chunk.decode("latin-1"), final=True)
    return seen.newlines not in (None, "\r\n")


def normalize_newlines(chunk: bytes) -> bytes:
    """Rewrite every bare CR and bare LF in C{chunk} to CRLF."""
    return _ANY_NEWLINE.sub(b"\r\n", chunk)


class NewlineFilter:
    """
    Watches a body, fed in pieces of any size, for a bare CR or a bare LF
    (L{bare}), and with C{normalize} rewrites each to CRLF.  A CRLF split
    between two pieces is not bare: a piece's final CR is held back until
    the next piece (or L{close}) shows what follows it.
    """

    def __init__(self, normalize: bool = False) -> None:
        self.normalize = normalize
        self.bare = False
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of C{chunk} to store now."""
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if (self.normalize or not self.bare) and has_bare_newline(chunk):
            self.bare = True
            if self.normalize:
                chunk = normalize_newlines(chunk)
        return chunk

    def close(self) -> bytes:
        """End of the body: the bytes still held back."""
        if not self._held_cr:
            return b""
        self._held_cr = False
        self.bare = True
        return b"\r\n" if self.normalize else b"\r"


class DataReader:
    """
    Reads a DATA body.  L{feed} returns the body bytes it can release now
    (dot-unstuffed), and sets L{done} and L{leftover} once it has seen the
    terminator.  At most four bytes are held back between calls, in case
    they begin a terminator or a dot-stuffed line.
    """

    def __init__(self) -> None:
        # The body starts at the start of a line: a virtual CRLF in front
        # lets one search find a terminator or a stuffed dot on line one.
        self._held = b"\r\n"
        self._skip = 2
        self.done = False
        self.leftover = b""

    def feed(self, data: bytes) -> bytes:
        if self.done:
            raise RuntimeError("DataReader fed after the terminator")
        buf = self._held + data if self._held else data
        # A terminator and a stuffed dot both begin with CRLF-dot, and most
        # bodies hold neither: one scan for it settles both for them.
        dot = buf.find(b"\r\n.")
        end = buf.find(_TERMINATOR, dot) if dot >= 0 else -1
        if end >= 0:
            # Keep the CRLF that ends the last line of the body.
            release, self._held = buf[: end + 2], b""
            self.leftover = buf[end + 5 :]
            self.done = True
        else:
            # Hold back from the first CR in the last four bytes: the
            # longest prefix of a terminator that can end a buffer.  No
            # CRLF-dot (a stuffed dot) can straddle this cut, since its
            # only CR would be the one it starts at.
            cut = buf.find(b"\r", max(len(buf) - 4, 0))
            if cut < 0:
                cut = len(buf)
            release, self._held = buf[:cut], buf[cut:]
        if 0 <= dot <= len(release) - 3:
            # RFC 5321 4.5.2: a leading dot on any line is removed.  (The
            # same as release.replace(b"\r\n.", b"\r\n"), which searches the
            # buffer twice, to count and to copy: this takes half the time
            # on a body with a stuffed dot every few lines and no more with
            # one; up to twice as long only when nearly every line is
            # stuffed and under about 30 bytes; linear in any case.)
            release = b"\r\n".join(release.split(b"\r\n."))
        if self._skip:
            skip = min(self._skip, len(release))
            release = release[skip:]
            self._skip -= skip
        return release


class ChunkReader:
    """
    Reads one BDAT chunk of a declared size.  L{feed} returns the chunk
    bytes in what it is given; L{done} and L{leftover} as for L{DataReader}.
    BDAT bytes are never unstuffed or searched for a terminator.
    """

    def __init__(self, size: int) -> None:
        self._remaining = size
        self.done = size == 0
        self.leftover = b""

    def feed(self, data: bytes) -> bytes:
        if self.done:
            raise RuntimeError("ChunkReader fed after the chunk")
        take = data[: self._remaining]
        self._remaining -= len(take)
        if self._remaining == 0:
            self.done = True
            self.leftover = data[len(take) :]
        return take
