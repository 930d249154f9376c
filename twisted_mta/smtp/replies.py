"""
SMTP replies: one value type and the one place where replies become bytes.

Every reply the server sends is a L{Reply}.  Reply texts may come from
plugins, so L{Reply.format} is where they are made safe to put on the wire:
no CR or LF can break out of a reply line, non-ASCII is replaced, the
enhanced status code is checked, and each line is bounded.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
MAX_REPLY_LINE = 512
# The room for text on a line with the usual prefix; a longer enhanced
# code (RFC 3463 allows three digits in each part) leaves less.
MAX_REPLY_TEXT = MAX_REPLY_LINE - len("250-5.7.1 \r\n")

_UNSAFE = re.compile(r"[^\x20-\x7e]")
_LINE_BREAK = re.compile(r"\r?\n")


@dataclass(frozen=True, slots=True)
class Reply:
    """
    An SMTP reply: a three-digit code, an RFC 3463 enhanced status code
    (or C{None} where none applies, as in the greeting) and one or more
    lines of text.
    """

    code: int
    enhanced: str | None
    text: str | tuple[str, ...]

    @property
    def lines(self) -> tuple[str, ...]:
        """
        The lines of text: a tuple's items, or a string split at each LF
        (or CRLF).  Each may still hold characters L{format} replaces.
        """
        if isinstance(self.text, tuple):
            return self.text or ("",)
        return tuple(_LINE_BREAK.split(self.text))

    @property
    def positive(self) -> bool:
        return self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def format(self, enhanced: bool = True) -> bytes:
        """
        The reply as bytes for the wire, one CRLF-terminated line per line
        of text, with the enhanced code on every line when C{enhanced} is
        true (RFC 2034: after EHLO).  Whatever the text and the enhanced
        code hold, the result is exactly one reply: printable ASCII lines
        of at most 512 octets, each starting with the code.
        """
        text = self.text
        wanted = self.enhanced if enhanced else None
        if (type(text) is str and text.isascii() and text.isprintable()
                and (wanted is None or type(wanted) is str)):
            # The common case, and every reply the server makes itself: one
            # line of printable ASCII, with nothing to split or replace.
            start = _line_start(self.code, wanted)
            return f"{start}{text[:MAX_REPLY_LINE - 2 - len(start)]}\r\n".encode("ascii")
        return self._format_lines(enhanced)

    def _format_lines(self, enhanced: bool) -> bytes:
        """L{format} for any text: one or more lines, anything replaced."""
        lines = self.lines
        last = len(lines) - 1
        prefix = str(self.code)
        code = _wire_enhanced(self.code, self.enhanced) if enhanced else None
        code = f"{code} " if code else ""
        room = MAX_REPLY_LINE - len(prefix) - 1 - len(code) - 2
        out = []
        for i, line in enumerate(lines):
            line = _UNSAFE.sub("?", line)[:room]
            sep = " " if i == last else "-"
            out.append(f"{prefix}{sep}{code}{line}\r\n")
        return "".join(out).encode("ascii")

    def __str__(self) -> str:
        return self.format().decode("ascii").rstrip("\r\n").replace("\r\n", " / ")

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.enhanced, text)


def class_digit_matches(code: int, enhanced: str | None) -> bool:
    """
    Whether an enhanced status code's class agrees with the reply code
    (RFC 3463: 2.x.x with 2yz, 4.x.x with 4yz, 5.x.x with 5yz).
    """
    return enhanced is None or enhanced[0] == str(code)[0]


# fullmatch, and [0-9]: "$" matches before a final newline, \d other
# scripts' digits.
_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def valid_enhanced(enhanced: str) -> bool:
    """Whether C{enhanced} is an RFC 3463 status code such as C{5.7.1}."""
    return bool(_ENHANCED.fullmatch(enhanced))


def _wire_enhanced(code: int, enhanced: str | None) -> str | None:
    """
    The enhanced code to send with C{code}: C{None} where there is none or
    the reply class has none (RFC 3463 has only 2, 4 and 5); the class
    digit set to the reply's, as Postfix does, since a plugin may give
    5.7.1 for what the server answers with 451; and X.0.0 in place of
    anything that is not an enhanced code, which could otherwise put any
    text, a CRLF included, on the wire.
    """
    if not enhanced:
        return None
    klass = str(code)[:1]
    if klass not in ("2", "4", "5"):
        return None
    if not (isinstance(enhanced, str) and valid_enhanced(enhanced)):
        return f"{klass}.0.0"
    return klass + enhanced[1:]


@functools.lru_cache(maxsize=256)
def _line_start(code: int, enhanced: str | None) -> str:
    """The start of a last (or only) reply line: C{"250 2.1.0 "}, C{"354 "}."""
    wire = _wire_enhanced(code, enhanced)
    return f"{code} {wire} " if wire else f"{code} "


# The replies the server gives in more than one place.  Texts follow what
# Postfix answers in the same case, so log parsers keep working.
OK = Reply(250, "2.0.0", "Ok")
SYNTAX_UNKNOWN = Reply(500, "5.5.1", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")
BARE_NEWLINE = Reply(500, "5.5.2", "Error: bare <LF> received")
NUL_IN_COMMAND = Reply(500, "5.5.2", "Error: NUL character in command")
EIGHT_BIT_COMMAND = Reply(500, "5.5.2", "Error: 8-bit character in command")
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
TOO_MANY_RCPT = Reply(452, "4.5.3", "Error: too many recipients")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Error: message file too big")
NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
PLUGIN_FAILED = Reply(451, "4.3.0", "Error: queue file write error")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing")
VRFY = Reply(252, "2.0.0", "Send some mail, I'll try my best")
SYNC_ERROR = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")


#: Enhanced codes at MAIL that say the sender address itself is not allowed
#: (RFC 5321's 553 "mailbox name not allowed"), as Postfix answers a
#: sender login mismatch or a malformed sender.
_SENDER_NOT_ALLOWED = ("5.7.1", "5.1.7", "5.1.8")


def refusal_reply(verdict, stage: str) -> Reply:
    """
    The reply to a refusing L{Verdict} (reject or tempfail) at C{stage}
    (C{helo}, C{mail}, C{rcpt} or C{data}): the server owns the codes, a
    plugin gives the text and, if it likes, the enhanced code.

      - tempfail: 451 (with 4.7.1 unless the plugin says otherwise);
      - reject: 552 for a size limit (5.3.4) or a full mailbox (5.2.2);
        at MAIL, 553 when the plugin names 5.7.1, 5.1.7 or 5.1.8 (this
        sender is not allowed); at DATA, and at RCPT with 5.7.1 (a policy
        refusal of the client), 554; otherwise (5.1.1 unknown user, 5.7.23
        SPF fail...) 550; with 5.7.1 when the plugin names no enhanced code.
    """
    from twisted_mta.values import Action  # here: values -> grammar -> replies

    if verdict.action is Action.TEMPFAIL:
        return Reply(451, verdict.enhanced or "4.7.1", verdict.text or "Try again later")
    enhanced = verdict.enhanced or "5.7.1"
    if enhanced in ("5.3.4", "5.2.2"):
        code = 552
    elif stage == "mail" and verdict.enhanced in _SENDER_NOT_ALLOWED:
        code = 553
    elif stage == "data" or (stage == "rcpt" and enhanced == "5.7.1"):
        # At RCPT, 5.7.1 is a policy refusal of the client, not of the
        # mailbox: 554 as Postfix answers for relay denied, RBLs and access
        # maps.  SPF's 5.7.23 stays 550, as RFC 7208 8.4 asks.
        code = 554
    else:
        code = 550
    return Reply(code, enhanced, verdict.text or "Rejected")
