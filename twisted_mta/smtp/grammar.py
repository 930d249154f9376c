"""
The SMTP grammar, as pure functions: command lines, paths and mailboxes
(RFC 5321 4.1.2, with RFC 6531 UTF-8), and ESMTP parameters.

Nothing here does I/O or keeps state.  Each function takes text and returns
values or raises L{GrammarError}, which carries the reply the server gives.
This module is the only place in the project that parses an address.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from twisted_mta.smtp import replies as _replies
from twisted_mta.smtp.replies import Reply

# RFC 5321 4.5.3.1: size limits.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
# A command line with its CRLF (4.5.3.1.4).  MAIL and RCPT carry ESMTP
# parameters; the extensions that define them raise the limit (RFC 1870
# +26 for SIZE, RFC 4954 +500 for AUTH=), so those two verbs get more room.
MAX_COMMAND_LINE = 512
MAX_MAIL_RCPT_LINE = 512 + 26 + 500
#: RFC 4954 4: an AUTH command with an initial response, and each line of
#: the exchange, may be up to 12288 octets.
MAX_AUTH_LINE = 12288


class GrammarError(ValueError):
    """A command could not be parsed; C{reply} is what the server answers."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Address:
    """
    A mailbox: a local part and a domain.  C{domain} is C{None} only for the
    special C{<Postmaster>} recipient (RFC 5321 4.1.1.3).  C{domain} keeps
    the case it was given; L{Address.key} is the form used for comparison.
    """

    local: str
    domain: str | None

    def __post_init__(self) -> None:
        # Addresses are also made by plugins, and are printed into command
        # lines, logs and the spool: none may carry a byte that can end or
        # split a line there, whatever the text came from.
        if _LINE_BREAKING.search(self.local) or (
                self.domain is not None and _LINE_BREAKING.search(self.domain)):
            raise ValueError(f"control character in address {self.local!r}@{self.domain!r}")

    def __str__(self) -> str:
        """
        The mailbox as RFC 5321 (RFC 6531 for UTF-8) text, with the local
        part quoted only when it is not a dot-string: the least quoting,
        which L{parse_mailbox} reads back to an equal L{Address}.
        """
        local = self.local
        if not _UDOT_STRING.fullmatch(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return local if self.domain is None else f"{local}@{self.domain}"

    @property
    def domain_key(self) -> str:
        """The domain in the form used to compare and route: lower case."""
        return (self.domain or "").lower()

    @property
    def key(self) -> str:
        """
        The address lower-cased, for comparison and lookups.  (RFC 5321 lets
        local parts be case-sensitive; in practice no site relies on it and
        Postfix folds them too.)
        """
        return str(self).lower()

    @property
    def is_utf8(self) -> bool:
        return not (self.local.isascii() and (self.domain or "").isascii())

    @property
    def is_literal(self) -> bool:
        return (self.domain or "").startswith("[")

    @property
    def has_routing(self) -> bool:
        """
        Whether the local part carries sender-specified routing (the
        percent hack, a bang path, or a stray @), which must never be
        honoured for an untrusted client.
        """
        return any(c in self.local for c in "%!@")


# --- tokens -----------------------------------------------------------------
#
# Every pattern is used with fullmatch: "$" would also match before a final
# newline, so "example.com\n" would pass for a domain.  Digits are spelt
# [0-9], since \d also matches other scripts' digits.

# RFC 6531 lets any non-ASCII character into addresses; the C1 controls
# (NEL among them) and the Unicode line and paragraph separators are left
# out, since text tools take them for line breaks.
_UTF8 = r"[^\x00-\x9f\u2028\u2029]"
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LDH = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ULETDIG = rf"(?:[A-Za-z0-9]|{_UTF8})"
_ULABEL = rf"{_ULETDIG}(?:(?:[A-Za-z0-9-]|{_UTF8}){{0,61}}{_ULETDIG})?"
_DOMAIN = re.compile(rf"{_LDH}(?:\.{_LDH})*")
_UDOMAIN = re.compile(rf"{_ULABEL}(?:\.{_ULABEL})*")
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_UATEXT = rf"(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~]|{_UTF8})"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_UDOT_STRING = re.compile(rf"{_UATEXT}+(?:\.{_UATEXT}+)*")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_UVALUE = re.compile(rf"(?:[\x21-\x3c\x3e-\x7e]|{_UTF8})+")
_VERB = re.compile(r"[A-Za-z]{1,10}")
_UTF8_CHAR = re.compile(_UTF8)
_DIGITS = re.compile(r"[0-9]{1,20}")
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+")
_TAG = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]")
_DCONTENT = re.compile(r"[\x21-\x5a\x5e-\x7e]+")


def is_domain(text: str, utf8: bool = False) -> bool:
    """Whether C{text} is an RFC 5321 Domain (RFC 6531 U-labels if C{utf8})."""
    if not text or len(text.encode("utf-8")) > MAX_DOMAIN:
        return False
    return bool((_UDOMAIN if utf8 else _DOMAIN).fullmatch(text))


def is_address_literal(text: str) -> bool:
    """Whether C{text} is an RFC 5321 address-literal such as C{[192.0.2.1]}."""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        # ipaddress also takes a scope ("fe80::1%eth0", with any text
        # after the %), which RFC 5321 has no room for.
        if not _IPV6.fullmatch(inner[5:]):
            return False
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    if _IPV4.fullmatch(inner):
        try:
            ipaddress.IPv4Address(inner)
        except ValueError:
            return False
        return True
    # General-address-literal: Standardized-tag ":" 1*dcontent
    tag, colon, content = inner.partition(":")
    return bool(colon and _TAG.fullmatch(tag) and _DCONTENT.fullmatch(content))


# --- commands ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """A command line split into its verb (upper case) and argument text."""

    verb: str
    argument: str


def parse_command(line: bytes) -> Command:
    """
    Split one command line (without its line ending) into verb and
    argument.  Raises L{GrammarError} for a NUL byte, for bytes that are
    not UTF-8, and for a line that has no verb.  8-bit text is returned
    as is: whether it is allowed depends on the session (SMTPUTF8), which
    the caller knows.
    """
    if b"\x00" in line:
        raise GrammarError(_replies.NUL_IN_COMMAND)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise GrammarError(_replies.EIGHT_BIT_COMMAND)
    verb, _, argument = text.partition(" ")
    if not _VERB.fullmatch(verb):
        raise GrammarError(_replies.SYNTAX_UNKNOWN)
    return Command(verb.upper(), argument)


def parse_helo(argument: str) -> str:
    """
    The client's name from a HELO/EHLO argument: a domain or an address
    literal (RFC 5321 4.1.1.1).  Postfix, and this parser, accept any single
    token, since many clients send a bare host name or worse; only an empty
    argument, one with spaces or one with control characters is refused.
    """
    # Only spaces are trimmed: strip() would also hide a CR or a tab.
    name = argument.strip(" ")
    if not name or " " in name or not name.isprintable():
        raise GrammarError(Reply(501, "5.5.4", "Syntax: EHLO hostname"))
    return name


# --- paths ------------------------------------------------------------------


def _split_path(text: str) -> tuple[str, str]:
    """
    Split C{<path> params} into the text between the brackets and the
    parameter text, honouring quoted strings (a quoted local part may hold
    a C{>}).
    """
    if not text.startswith("<"):
        raise ValueError("path must be in angle brackets")
    i, n = 1, len(text)
    quoted = False
    while i < n:
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            rest = text[i + 1 :]
            if rest and not rest.startswith(" "):
                raise ValueError("no space after path")
            return text[1:i], rest.strip(" ")
        i += 1
    raise ValueError("no closing bracket")


def _parse_local_part(text: str, utf8: bool) -> str:
    """The local part C{text} means: a dot-string as is, a quoted string unquoted."""
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise ValueError("unterminated quoted string")
        out = []
        body = text[1:-1]
        i = 0
        while i < len(body):
            c = body[i]
            if c == "\\":
                if i + 1 >= len(body):
                    raise ValueError("bad quoted pair")
                nxt = body[i + 1]
                if not (" " <= nxt <= "~"):
                    raise ValueError("bad quoted pair")
                out.append(nxt)
                i += 2
                continue
            if c == '"' or not (" " <= c <= "~" or (utf8 and _UTF8_CHAR.fullmatch(c))):
                raise ValueError("bad character in quoted string")
            out.append(c)
            i += 1
        return "".join(out)
    if not (_UDOT_STRING if utf8 else _DOT_STRING).fullmatch(text):
        raise ValueError("bad local part")
    return text


def _local_part_end(text: str) -> int:
    """
    Where the local part at the start of C{text} ends: after its closing
    quote for a quoted string (which may hold an C{@}), else at the first
    C{@} (a dot-string holds none; a general address literal may).
    """
    if not text.startswith('"'):
        return text.find("@")
    i, n = 1, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i + 1
        else:
            i += 1
    raise ValueError("unterminated quoted string")


def parse_mailbox(text: str, utf8: bool = False) -> Address:
    """
    Parse an RFC 5321 Mailbox (C{local@domain}, without brackets).  With
    C{utf8}, RFC 6531 UTF-8 local parts and U-label domains are allowed.
    Raises L{ValueError} with the reason when C{text} is not a mailbox.
    """
    at = _local_part_end(text)
    if at <= 0 or text[at : at + 1] != "@":
        raise ValueError("no domain")
    local_text, domain = text[:at], text[at + 1 :]
    # RFC 5321 4.5.3.1.1 limits the Local-part as sent, quotes included.
    if len(local_text.encode("utf-8")) > MAX_LOCAL_PART:
        raise ValueError("local part too long")
    local = _parse_local_part(local_text, utf8)
    if not (is_domain(domain, utf8) or is_address_literal(domain)):
        raise ValueError("bad domain")
    return Address(local, domain)


def _strip_source_route(text: str, utf8: bool = False) -> str:
    """
    Drop an RFC 5321 A-d-l source route (C{@a,@b:user@c}); the RFC says to
    accept and ignore it, and ignoring it is what keeps it from opening a
    relay.
    """
    if not text.startswith("@"):
        return text
    route, colon, mailbox = text.partition(":")
    if not colon:
        raise ValueError("bad source route")
    for hop in route.split(","):
        if not (hop.startswith("@") and (is_domain(hop[1:], utf8) or is_address_literal(hop[1:]))):
            raise ValueError("bad source route")
    return mailbox


def parse_path(text: str, utf8: bool = False, null_ok: bool = False,
               postmaster_ok: bool = False) -> Address | None:
    """
    Parse the inside of a path's angle brackets.  Returns C{None} for the
    null path (only where C{null_ok}); C{Address(Postmaster, None)} for a
    bare C{Postmaster} (only where C{postmaster_ok}).  A source route is
    dropped.
    """
    # RFC 5321 4.5.3.1.3: 256 octets "including the punctuation", that is
    # the angle brackets too.
    if len(text.encode("utf-8")) + 2 > MAX_PATH:
        raise ValueError("path too long")
    if text == "":
        if null_ok:
            return None
        raise ValueError("null path")
    if postmaster_ok and text.lower() == "postmaster":
        return Address(text, None)
    return parse_mailbox(_strip_source_route(text, utf8), utf8)


def parse_params(text: str, utf8: bool = False) -> dict[str, str | None]:
    """
    Parse ESMTP parameters (C{KEY=value KEY ...}) into a dict with upper-case
    keys.  A repeated keyword or a malformed one raises L{ValueError}.
    """
    params: dict[str, str | None] = {}
    # Parameters are separated by SP (RFC 5321 4.1.2); str.split() would
    # also split at tabs and Unicode spaces.
    for word in text.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key):
            raise ValueError(f"bad parameter {word!r}")
        if eq and not (_UVALUE if utf8 else _VALUE).fullmatch(value):
            raise ValueError(f"bad parameter value {word!r}")
        key = key.upper()
        if key in params:
            raise ValueError(f"duplicate parameter {key}")
        params[key] = value if eq else None
    return params


@dataclass(frozen=True, slots=True)
class MailCommand:
    sender: Address | None
    size: int | None
    body: str  # "7BIT" or "8BITMIME"
    smtputf8: bool
    auth: str | None
    params: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class RcptCommand:
    recipient: Address
    params: dict[str, str | None]


def _upper_ascii(text: str) -> str:
    """
    C{text} upper-cased when it is ASCII, else as it is: str.upper maps
    some non-ASCII letters to ASCII ones (dotless i to I, long s to S), so
    "8B\\u0131TMIME" must not pass for 8BITMIME.
    """
    return text.upper() if text.isascii() else text


def _split_prefix(argument: str, prefix: str, usage: Reply) -> str:
    if _upper_ascii(argument[: len(prefix)]) != prefix:
        raise GrammarError(usage)
    # Postfix (strict_rfc821_envelopes=no) takes a space after the colon;
    # so many clients send one that refusing it helps nobody.
    return argument[len(prefix) :].lstrip(" ")


# The arguments nearly every client sends: an ASCII dot-string mailbox and,
# for MAIL, at most SIZE.  parse_mail and parse_rcpt read these with one
# match instead of the full grammar, giving exactly what the full grammar
# gives (the same token patterns; the length limits checked below);
# anything else, including every error, goes through the full grammar.
_SIMPLE_MAIL = re.compile(
    rf"FROM:<({_DOT_STRING.pattern})@({_DOMAIN.pattern})>(?: SIZE=([0-9]{{1,20}}))?")
_SIMPLE_RCPT = re.compile(rf"TO:<({_DOT_STRING.pattern})@({_DOMAIN.pattern})>")


def _simple_mailbox(local: str, domain: str) -> Address | None:
    """The Address of a simple path's parts, or None if over a length limit."""
    # RFC 5321 4.5.3.1: the path counts its brackets; ASCII, so len = octets.
    if len(local) > MAX_LOCAL_PART or len(local) + len(domain) + 3 > MAX_PATH:
        return None
    return Address(local, domain)


MAIL_USAGE = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_USAGE = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")


def parse_mail(argument: str, *, max_size: int, extra_params: frozenset[str] = frozenset()) -> MailCommand:
    """
    Parse a MAIL command's argument (C{FROM:<path> params}).  Honours SIZE,
    BODY and SMTPUTF8 (and the names in C{extra_params}, such as AUTH,
    whose values are returned in C{params} for the caller); anything else is
    555 5.5.4.  A declared SIZE over C{max_size} is 552 5.3.4.
    """
    simple = _SIMPLE_MAIL.fullmatch(argument)
    if simple is not None:
        local, domain, size_text = simple.groups()
        sender = _simple_mailbox(local, domain)
        size = None if size_text is None else int(size_text)
        if sender is not None and (size is None or size <= max_size):
            params = {} if size_text is None else {"SIZE": size_text}
            return MailCommand(sender, size, "7BIT", False, None, params)
    rest = _split_prefix(argument, "FROM:", MAIL_USAGE)
    try:
        inner, param_text = _split_path(rest)
    except ValueError:
        raise GrammarError(BAD_SENDER)
    try:
        params = parse_params(param_text, utf8=True)
    except ValueError as e:
        raise GrammarError(Reply(501, "5.5.4", f"Bad parameter syntax: {e}"))
    smtputf8 = "SMTPUTF8" in params
    if smtputf8 and params["SMTPUTF8"] is not None:
        raise GrammarError(Reply(501, "5.5.4", "Bad SMTPUTF8 parameter syntax"))
    if not smtputf8 and not (inner + param_text).isascii():
        raise GrammarError(NEED_SMTPUTF8)
    try:
        sender = parse_path(inner, utf8=smtputf8, null_ok=True)
    except ValueError:
        raise GrammarError(BAD_SENDER)
    size = None
    if "SIZE" in params:
        value = params["SIZE"]
        if value is None or not _DIGITS.fullmatch(value):
            raise GrammarError(Reply(501, "5.5.4", "Bad message size syntax"))
        size = int(value)
        if size > max_size:
            raise GrammarError(Reply(552, "5.3.4", "Message size exceeds fixed limit"))
    body = "7BIT"
    if "BODY" in params:
        value = _upper_ascii(params["BODY"] or "")
        if value not in ("7BIT", "8BITMIME"):
            raise GrammarError(Reply(501, "5.5.4", "Unsupported BODY parameter"))
        body = value
    known = {"SIZE", "BODY", "SMTPUTF8"} | extra_params
    for key in params:
        if key not in known:
            raise GrammarError(Reply(555, "5.5.4", f"Unsupported option: {key}"))
    return MailCommand(sender, size, body, smtputf8, params.get("AUTH"), params)


def parse_rcpt(argument: str, *, smtputf8: bool) -> RcptCommand:
    """
    Parse a RCPT command's argument (C{TO:<path> params}).  No RCPT
    parameter is supported (DSN is not offered), so any is 555 5.5.4.
    """
    simple = _SIMPLE_RCPT.fullmatch(argument)
    if simple is not None:
        recipient = _simple_mailbox(*simple.groups())
        if recipient is not None:
            return RcptCommand(recipient, {})
    rest = _split_prefix(argument, "TO:", RCPT_USAGE)
    try:
        inner, param_text = _split_path(rest)
    except ValueError:
        raise GrammarError(BAD_RECIPIENT)
    if not smtputf8 and not (inner + param_text).isascii():
        raise GrammarError(NEED_SMTPUTF8)
    try:
        recipient = parse_path(inner, utf8=smtputf8, postmaster_ok=True)
    except ValueError:
        raise GrammarError(BAD_RECIPIENT)
    try:
        params = parse_params(param_text, utf8=smtputf8)
    except ValueError as e:
        raise GrammarError(Reply(501, "5.5.4", f"Bad parameter syntax: {e}"))
    for key in params:
        raise GrammarError(Reply(555, "5.5.4", f"Unsupported option: {key}"))
    assert recipient is not None
    return RcptCommand(recipient, params)


def parse_bdat(argument: str) -> tuple[int, bool]:
    """Parse C{BDAT size [LAST]} (RFC 3030) into (size, last)."""
    words = [w for w in argument.split(" ") if w]
    if not words or len(words) > 2 or not _DIGITS.fullmatch(words[0]):
        raise GrammarError(Reply(501, "5.5.4", "Syntax: BDAT count [LAST]"))
    if len(words) == 2 and _upper_ascii(words[1]) != "LAST":
        raise GrammarError(Reply(501, "5.5.4", "Syntax: BDAT count [LAST]"))
    return int(words[0]), len(words) == 2

