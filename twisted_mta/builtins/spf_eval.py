"""
SPF evaluation (RFC 7208), without I/O.

L{Check} holds one question -- may the client at C{ip}, which said HELO
C{helo}, send mail from C{sender}? -- and L{Check.evaluate} is a
generator that answers it.  It does no DNS itself: it yields what it needs
to know and is sent the answers:

  - it yields a L{Query} (a name and a type: C{TXT}, C{A}, C{AAAA},
    C{MX}, C{PTR}) and is sent an L{Answer};
  - or it yields a tuple of L{Query}s (the address lookups of an C{mx}
    or C{ptr} mechanism, which may run at once) and is sent a tuple of
    L{Answer}s, in the same order.

When it stops, its value (C{StopIteration.value}) is a L{Result}.  The
driver that asks twisted.names is C{twisted_mta.builtins.spf.evaluate};
L{run} drives it with a plain function, for tests and tools.  An answer
carries the records of the asked type only (the driver follows CNAMEs).

What it implements, by section of RFC 7208:

  - 2.4, 4.3: the identity: MAIL FROM, or C{postmaster@<helo>} for the
    null sender; a missing local part is C{postmaster}; a malformed
    domain (an empty or too long label, a single label, an address
    literal) gives C{none}.
  - 4.4, 4.5: the TXT records (never type SPF, 99) whose strings, joined,
    begin with C{v=spf1} (any case) and a space or nothing; none gives
    C{none}, more than one C{permerror}; NXDOMAIN C{none}; a DNS error
    (SERVFAIL, REFUSED, timeout) C{temperror}.
  - 4.6: the record is parsed whole before it is evaluated, so a syntax
    error anywhere (non-ASCII, an unknown mechanism, a bad CIDR length,
    a bad domain-spec or macro, C{redirect}/C{exp} twice) is
    C{permerror}.  Unknown modifiers are ignored (their macro-strings are
    still checked).
  - 4.6.4: at most 10 terms that cause DNS lookups (C{include}, C{a},
    C{mx}, C{ptr}, C{exists}, C{redirect}), counted as they are evaluated
    across includes and redirects; at most 2 void lookups (NXDOMAIN or no
    records) by mechanisms; an C{mx} with more than 10 MX records is
    C{permerror}; C{ptr} and C{%{p}} look at the first 10 PTR names only.
  - 5: C{all}, C{include} (pass matches; fail, softfail, neutral do not;
    temperror and permerror propagate; none is permerror), C{a} and
    C{mx} with dual CIDR lengths, C{ptr} (validated names), C{ip4},
    C{ip6}, C{exists} (an A lookup, whatever the client's family).  An
    IPv4-mapped IPv6 client is an IPv4 client.
  - 6: C{redirect} (when nothing matched; its C{none} is C{permerror})
    and C{exp} (a C{fail} by a mechanism of the record that has it: one
    TXT record, ASCII, macro-expanded with C{c}, C{r}, C{t} allowed; any
    trouble with it leaves the explanation to the caller's default).
  - 7: macros C{s l o d i p v h} (and C{c r t} in explanations), the
    digit and C{r} transformers, delimiters, URL-escaping of upper-case
    letters, C{%%}, C{%_}, C{%-}; an expanded name longer than 253
    characters loses labels on its left.  A name that cannot be asked
    (an empty label, a label over 63 characters, not ASCII) is not asked:
    it is taken as not existing.

Nothing is cached: within one evaluation, each lookup is asked when needed.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Callable, Generator
from urllib.parse import quote

__all__ = [
    "PASS", "FAIL", "SOFTFAIL", "NEUTRAL", "NONE", "TEMPERROR", "PERMERROR", "RESULTS",
    "Query", "Answer", "Result", "Check", "run", "parse_record", "PermError",
]

PASS, FAIL, SOFTFAIL, NEUTRAL = "pass", "fail", "softfail", "neutral"
NONE, TEMPERROR, PERMERROR = "none", "temperror", "permerror"
RESULTS = (PASS, FAIL, SOFTFAIL, NEUTRAL, NONE, TEMPERROR, PERMERROR)
QUALIFIERS = {"+": PASS, "-": FAIL, "~": SOFTFAIL, "?": NEUTRAL}

MAX_LOOKUPS = 10  # terms causing DNS lookups (4.6.4)
MAX_VOID = 2      # void lookups (4.6.4)
MAX_MX = 10       # MX records of one mx mechanism
MAX_PTR = 10      # PTR names looked at by ptr and %{p}
MAX_NAME = 253


# --- the questions and answers ----------------------------------------------


@dataclass(frozen=True)
class Query:
    """A DNS question: C{name} (no final dot) and C{type} (TXT, A, AAAA, MX, PTR)."""

    name: str
    type: str


@dataclass(frozen=True)
class Answer:
    """
    A DNS answer.  C{records}: for TXT, each record's strings joined
    (bytes); for A and AAAA, address text; for MX, C{(preference,
    exchange)}; for PTR, names.  C{nxdomain}: the name does not exist.
    C{error}: the lookup failed (SERVFAIL, REFUSED, a timeout): what
    happened, as text.
    """

    records: tuple = ()
    nxdomain: bool = False
    error: str | None = None

    @property
    def void(self) -> bool:
        return self.error is None and not self.records


@dataclass(frozen=True)
class Result:
    """
    The outcome of a check.

    @ivar result: one of L{RESULTS}.
    @ivar identity: C{mailfrom}, or C{helo} (the null sender).
    @ivar sender: the <sender> checked (C{postmaster@...} when it had no
        local part, or for the HELO identity).
    @ivar domain: the identity's domain.
    @ivar ip: the client's address, as text (an IPv4-mapped one as IPv4).
    @ivar helo: the HELO name.
    @ivar mechanism: the term that decided (C{-all}, C{ip4:192.0.2.0/24},
        C{default} when none matched), or C{""}.
    @ivar explanation: for C{fail}: the domain's explanation (its C{exp=}),
        or C{None} (then the receiver's own applies).
    @ivar problem: for the errors: what went wrong.
    """

    result: str
    identity: str
    sender: str
    domain: str
    ip: str
    helo: str
    mechanism: str = ""
    explanation: str | None = None
    problem: str = ""
    lookups: int = 0
    voids: int = 0


class SPFError(Exception):
    result = PERMERROR


class PermError(SPFError):
    """A permanent error: the record (or one it leads to) is broken."""

    result = PERMERROR


class TempError(SPFError):
    """A DNS failure: try again later."""

    result = TEMPERROR


@dataclass(frozen=True)
class _Outcome:
    result: str
    mechanism: str = ""
    explanation: str | None = None


# --- names --------------------------------------------------------------------


def queryable(name: str) -> bool:
    """Whether C{name} (no final dot) can be asked: ASCII, labels of 1 to 63, 253 in all."""
    if not name or len(name) > MAX_NAME or not name.isascii():
        return False
    return all(0 < len(label) <= 63 for label in name.split("."))


def _domain_ok(domain: str) -> bool:
    """4.3: a domain check_host can start from: queryable, more than one label, no literal."""
    return queryable(domain) and "." in domain and not domain.startswith("[")


def _target(name: str) -> str:
    """An expanded name as asked: no final dot, left labels dropped past 253 characters (7.3)."""
    if name.endswith("."):
        name = name[:-1]
    while len(name) > MAX_NAME and "." in name:
        name = name.split(".", 1)[1]
    return name


# --- macro-strings (7.1) ------------------------------------------------------

DOMAIN_LETTERS = frozenset("slodiphv")
EXPLAIN_LETTERS = DOMAIN_LETTERS | frozenset("crt")
_MACRO = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([.+,/_=-]*)\}")
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9]")
_ESCAPES = {"%": "%", "_": " ", "-": "%20"}


@dataclass(frozen=True)
class Macro:
    letter: str        # lower case
    upper: bool        # URL-escape the value
    digits: int        # right-hand parts to keep; 0: all
    reverse: bool
    delimiters: str    # "" means "."


# A parsed macro-string: ("lit", text) | ("esc", text) | ("macro", Macro).
Tokens = tuple


def parse_macro_string(text: str, letters=DOMAIN_LETTERS, spaces: bool = False) -> Tokens:
    """
    The tokens of a macro-string (or, with C{spaces}, an explain-string).
    Raises L{PermError} for a character outside VCHAR (and SP), a C{%}
    not starting a macro, or a macro letter not in C{letters}.
    """
    tokens: list = []
    literal: list[str] = []
    i, n = 0, len(text)

    def flush():
        if literal:
            tokens.append(("lit", "".join(literal)))
            literal.clear()

    while i < n:
        c = text[i]
        if c == "%":
            nxt = text[i + 1:i + 2]
            if nxt in _ESCAPES:
                flush()
                tokens.append(("esc", _ESCAPES[nxt]))
                i += 2
                continue
            m = _MACRO.match(text, i)
            if m is None:
                raise PermError(f"bad macro at {text[i:i + 12]!r}")
            letter, digits, reverse, delimiters = m.groups()
            if letter.lower() not in letters:
                raise PermError(f"macro letter {letter!r} not allowed here")
            if digits and int(digits) == 0:
                raise PermError(f"macro {m.group(0)!r}: zero parts")
            flush()
            tokens.append(("macro", Macro(letter.lower(), letter.isupper(),
                                          int(digits) if digits else 0, bool(reverse),
                                          delimiters)))
            i = m.end()
            continue
        if not ("\x21" <= c <= "\x7e" or (spaces and c == " ")):
            raise PermError(f"character {c!r} not allowed")
        literal.append(c)
        i += 1
    flush()
    return tuple(tokens)


def parse_domain_spec(text: str) -> Tokens:
    """A domain-spec: a macro-string ending in a macro or in C{.toplabel} (and a dot)."""
    if not text:
        raise PermError("empty domain-spec")
    tokens = parse_macro_string(text)
    kind, value = tokens[-1]
    if kind == "lit":
        end = value[:-1] if value.endswith(".") else value
        if "." not in end or not _TOPLABEL.fullmatch(end.rsplit(".", 1)[1]):
            raise PermError(f"bad domain-spec {text!r}")
    return tokens


# --- records (4.5, 4.6) -------------------------------------------------------

_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)", re.S)
_MECHANISM = re.compile(r"([A-Za-z][A-Za-z0-9]*)(.*)", re.S)
_CIDR = re.compile(r"(.*?)(?:/([0-9]+))?(?://([0-9]+))?", re.S)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4 = re.compile(rf"{_QNUM}\.{_QNUM}\.{_QNUM}\.{_QNUM}")


@dataclass(frozen=True)
class Directive:
    qualifier: str      # + - ~ ?
    name: str           # all include a mx ptr ip4 ip6 exists
    text: str           # as written, for Received-SPF's mechanism=
    spec: Tokens = ()   # domain-spec, if any
    network: object = None  # ip4/ip6
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class Record:
    directives: tuple
    redirect: Tokens | None = None
    exp: Tokens | None = None


def is_spf(text: str) -> bool:
    """Whether a TXT record's text is SPF: C{v=spf1} (any case), then a space or nothing."""
    return text[:6].lower() == "v=spf1" and text[6:7] in ("", " ")


def _cidr(text: str | None, top: int, default: int) -> int:
    if text is None:
        return default
    if (len(text) > 1 and text[0] == "0") or int(text) > top:
        raise PermError(f"bad CIDR length /{text}")
    return int(text)


def _directive(term: str) -> Directive:
    qualifier = "+"
    body = term
    if body[:1] in QUALIFIERS:
        qualifier, body = body[0], body[1:]
    m = _MECHANISM.fullmatch(body)
    if m is None:
        raise PermError(f"unknown mechanism {term!r}")
    name, tail = m.group(1).lower(), m.group(2)
    if name == "all":
        if tail:
            raise PermError(f"bad mechanism {term!r}")
        return Directive(qualifier, name, term)
    if name in ("include", "exists"):
        if not tail.startswith(":"):
            raise PermError(f"{name} needs a domain: {term!r}")
        return Directive(qualifier, name, term, parse_domain_spec(tail[1:]))
    if name == "ptr":
        if tail and not tail.startswith(":"):
            raise PermError(f"bad mechanism {term!r}")
        spec = parse_domain_spec(tail[1:]) if tail else ()
        return Directive(qualifier, name, term, spec)
    if name in ("a", "mx"):
        if tail and tail[0] not in ":/":
            raise PermError(f"bad mechanism {term!r}")
        m = _CIDR.fullmatch(tail)
        domain, c4, c6 = m.groups()
        if tail.startswith("/") and domain:
            raise PermError(f"bad CIDR length in {term!r}")
        spec = parse_domain_spec(domain[1:]) if domain else ()
        return Directive(qualifier, name, term, spec, None, _cidr(c4, 32, 32), _cidr(c6, 128, 128))
    if name in ("ip4", "ip6"):
        if not tail.startswith(":"):
            raise PermError(f"{name} needs an address: {term!r}")
        address, slash, length = tail[1:].partition("/")
        if slash and not (length.isascii() and length.isdigit()):
            raise PermError(f"bad CIDR length in {term!r}")
        if name == "ip4":
            if not _IP4.fullmatch(address):
                raise PermError(f"bad IPv4 address in {term!r}")
            bits = _cidr(length if slash else None, 32, 32)
        else:
            try:
                if "%" in address:  # no zone index
                    raise ValueError(address)
                ipaddress.IPv6Address(address)
            except ValueError:
                raise PermError(f"bad IPv6 address in {term!r}")
            bits = _cidr(length if slash else None, 128, 128)
        network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
        return Directive(qualifier, name, term, (), network)
    raise PermError(f"unknown mechanism {term!r}")


def parse_record(text: str) -> Record:
    """Parse an SPF record (its whole text, C{v=spf1 ...}); L{PermError} if it is not valid."""
    if not text.isascii():
        raise PermError("record is not ASCII")
    if not is_spf(text):
        raise PermError("not an SPF record")
    directives, redirect, exp = [], None, None
    for term in text[6:].split(" "):
        if not term:
            continue
        m = _MODIFIER.fullmatch(term)
        if m is None:
            directives.append(_directive(term))
            continue
        name, value = m.group(1).lower(), m.group(2)
        if name == "redirect":
            if redirect is not None:
                raise PermError("redirect= twice")
            redirect = parse_domain_spec(value)
        elif name == "exp":
            if exp is not None:
                raise PermError("exp= twice")
            exp = parse_domain_spec(value)
        else:
            parse_macro_string(value, EXPLAIN_LETTERS)  # unknown: checked, then ignored
    return Record(tuple(directives), redirect, exp)


# --- the check ----------------------------------------------------------------


def _client(ip: str):
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _reverse(address) -> str:
    """The PTR owner of an address."""
    return address.reverse_pointer


def _dotted(address) -> str:
    """%{i}: dotted IPv4, or IPv6 as dot-separated nibbles (RFC 7208 7.3)."""
    if address.version == 4:
        return str(address)
    return ".".join(address.exploded.replace(":", "").upper())


class Check:
    """
    One SPF check: may C{ip} send mail from C{sender} (C{""} for the null
    sender: then C{postmaster@<helo>} is checked, the HELO identity)?

    @param receiver: this host's name, for the C{%{r}} macro.
    @param now: the time, for C{%{t}} (default: now).
    """

    def __init__(self, ip: str, sender: str, helo: str, receiver: str = "unknown",
                 now: float | None = None):
        self.address = _client(ip)
        self.ip = str(self.address)
        self.helo = helo or ""
        self.identity = "mailfrom" if sender else "helo"
        if not sender:
            sender = f"postmaster@{self.helo}"
        local, _, domain = sender.rpartition("@")
        self.local = local or "postmaster"
        self.domain = domain.rstrip(".") if domain else ""
        self.sender = f"{self.local}@{self.domain}"
        self.receiver = receiver
        self.now = time.time() if now is None else now
        self.lookups = 0
        self.voids = 0

    # --- the result ----------------------------------------------------------

    def result(self, result: str, mechanism: str = "", explanation: str | None = None,
               problem: str = "") -> Result:
        return Result(result, self.identity, self.sender, self.domain, self.ip, self.helo,
                      mechanism, explanation, problem, self.lookups, self.voids)

    def evaluate(self) -> Generator:
        """The check, as a generator (see the module docstring); returns a L{Result}."""
        try:
            outcome = yield from self.check_host(self.domain, explain=True)
        except SPFError as e:
            return self.result(e.result, problem=str(e))
        return self.result(outcome.result, outcome.mechanism, outcome.explanation)

    # --- DNS -----------------------------------------------------------------

    def lookup(self, name: str, rtype: str) -> Generator:
        if not queryable(name):
            return Answer(nxdomain=True)
        return (yield Query(name, rtype))

    def lookup_all(self, names, rtype: str) -> Generator:
        """Look C{names} up at once; an Answer each, in order."""
        asked = [n for n in names if queryable(n)]
        answers = iter((yield tuple(Query(n, rtype) for n in asked)) if asked else ())
        return [next(answers) if queryable(n) else Answer(nxdomain=True) for n in names]

    def count_lookup(self, term: str) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise PermError(f"more than {MAX_LOOKUPS} DNS lookups (at {term})")

    def void(self, term: str) -> None:
        self.voids += 1
        if self.voids > MAX_VOID:
            raise PermError(f"more than {MAX_VOID} void DNS lookups (at {term})")

    def address_type(self) -> str:
        return "A" if self.address.version == 4 else "AAAA"

    # --- check_host (4) ------------------------------------------------------

    def check_host(self, domain: str, explain: bool) -> Generator:
        """The result for C{domain}: an L{_Outcome}; errors are raised."""
        if not _domain_ok(domain):
            return _Outcome(NONE)
        answer = yield from self.lookup(domain, "TXT")
        if answer.error:
            raise TempError(f"DNS error looking up {domain} TXT: {answer.error}")
        texts = [data.decode("latin-1") for data in answer.records]
        records = [t for t in texts if is_spf(t)]
        if not records:
            return _Outcome(NONE)
        if len(records) > 1:
            raise PermError(f"{domain} has {len(records)} SPF records")
        record = parse_record(records[0])
        for directive in record.directives:
            matched = yield from self.matches(directive, domain)
            if matched:
                result = QUALIFIERS[directive.qualifier]
                explanation = None
                if result == FAIL and explain and record.exp is not None:
                    explanation = yield from self.explain(record.exp, domain)
                return _Outcome(result, directive.text, explanation)
        if record.redirect is not None:
            self.count_lookup("redirect")
            target = _target((yield from self.expand(record.redirect, domain)))
            outcome = yield from self.check_host(target, explain)
            if outcome.result == NONE:
                raise PermError(f"redirect={target}: no SPF record")
            return outcome
        return _Outcome(NEUTRAL, "default")

    # --- mechanisms (5) ------------------------------------------------------

    def target(self, directive: Directive, domain: str) -> Generator:
        if not directive.spec:
            return domain
        return _target((yield from self.expand(directive.spec, domain)))

    def in_network(self, addresses, directive: Directive) -> bool:
        bits = directive.cidr4 if self.address.version == 4 else directive.cidr6
        for text in addresses:
            try:
                network = ipaddress.ip_network(f"{text}/{bits}", strict=False)
            except ValueError:
                continue
            if self.address in network:
                return True
        return False

    def matches(self, d: Directive, domain: str) -> Generator:
        name = d.name
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            return d.network.version == self.address.version and self.address in d.network
        self.count_lookup(d.text)
        target = yield from self.target(d, domain)
        if name == "include":
            outcome = yield from self.check_host(target, explain=False)
            if outcome.result == NONE:
                raise PermError(f"include:{target}: no SPF record")
            return outcome.result == PASS
        if name == "a":
            answer = yield from self.lookup(target, self.address_type())
            if answer.error:
                raise TempError(f"DNS error looking up {target} {self.address_type()}: "
                                f"{answer.error}")
            if answer.void:
                self.void(d.text)
            return self.in_network(answer.records, d)
        if name == "mx":
            answer = yield from self.lookup(target, "MX")
            if answer.error:
                raise TempError(f"DNS error looking up {target} MX: {answer.error}")
            if answer.void:
                self.void(d.text)
                return False
            if len(answer.records) > MAX_MX:
                raise PermError(f"{target} has more than {MAX_MX} MX records")
            hosts = [x.rstrip(".") for _, x in answer.records if x.rstrip(".")]
            answers = yield from self.lookup_all(hosts, self.address_type())
            for host, a in zip(hosts, answers):
                if a.error:
                    raise TempError(f"DNS error looking up {host} {self.address_type()}: "
                                    f"{a.error}")
            return any(self.in_network(a.records, d) for a in answers)
        if name == "ptr":
            answer = yield from self.lookup(_reverse(self.address), "PTR")
            if answer.error:
                return False  # 5.5: a DNS error on the PTR lookup is no match
            if answer.void:
                self.void(d.text)
                return False
            target = target.lower()
            names = [n.rstrip(".") for n in answer.records[:MAX_PTR]]
            names = [n for n in names
                     if n.lower() == target or n.lower().endswith("." + target)]
            return bool((yield from self.validated(names)))
        if name == "exists":
            answer = yield from self.lookup(target, "A")
            if answer.error:
                raise TempError(f"DNS error looking up {target} A: {answer.error}")
            if answer.void:
                self.void(d.text)
            return bool(answer.records)
        raise PermError(f"unknown mechanism {d.text!r}")  # parse_record lets none through

    def validated(self, names) -> Generator:
        """Those of C{names} that have the client's address (5.5); errors skip a name."""
        answers = yield from self.lookup_all(names, self.address_type())
        out = []
        for name, answer in zip(names, answers):
            for text in answer.records:
                try:
                    if _client(text) == self.address:
                        out.append(name)
                        break
                except ValueError:
                    continue
        return out

    def validated_name(self, domain: str) -> Generator:
        """%{p}: a validated name of the client, best related to C{domain}; or C{unknown}."""
        answer = yield from self.lookup(_reverse(self.address), "PTR")
        if answer.error or answer.void:
            return "unknown"
        names = [n.rstrip(".") for n in answer.records[:MAX_PTR]]
        valid = yield from self.validated(names)
        domain = domain.lower()
        for n in valid:
            if n.lower() == domain:
                return n
        for n in valid:
            if n.lower().endswith("." + domain):
                return n
        return valid[0] if valid else "unknown"

    # --- macros (7) and explanations (6.2) ---------------------------------------

    def macro_value(self, letter: str, domain: str) -> Generator:
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.domain
        if letter == "d":
            return domain
        if letter == "i":
            return _dotted(self.address)
        if letter == "p":
            return (yield from self.validated_name(domain))
        if letter == "v":
            return "in-addr" if self.address.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(self.address)
        if letter == "r":
            return self.receiver
        if letter == "t":
            return str(int(self.now))
        raise PermError(f"unknown macro letter {letter!r}")

    def expand(self, tokens: Tokens, domain: str) -> Generator:
        out = []
        for kind, value in tokens:
            if kind != "macro":
                out.append(value)
                continue
            text = yield from self.macro_value(value.letter, domain)
            parts = re.split("[" + re.escape(value.delimiters or ".") + "]", text)
            if value.reverse:
                parts.reverse()
            if value.digits:
                parts = parts[-value.digits:]
            text = ".".join(parts)
            if value.upper:
                text = quote(text, safe="")
            out.append(text)
        return "".join(out)

    def explain(self, spec: Tokens, domain: str) -> Generator:
        """The explanation string at the C{exp=} target, or C{None} if there is no good one."""
        try:
            name = _target((yield from self.expand(spec, domain)))
        except SPFError:
            return None
        answer = yield from self.lookup(name, "TXT")
        if answer.error or len(answer.records) != 1:
            return None
        try:
            text = answer.records[0].decode("ascii")
            tokens = parse_macro_string(text, EXPLAIN_LETTERS, spaces=True)
            return (yield from self.expand(tokens, domain))
        except (UnicodeDecodeError, SPFError):
            return None


def run(check: Check, resolve: Callable[[Query], Answer]) -> Result:
    """Evaluate C{check}, answering its queries with C{resolve} (blocking, in order)."""
    gen = check.evaluate()
    reply = None
    while True:
        try:
            request = gen.send(reply)
        except StopIteration as stop:
            return stop.value
        if isinstance(request, Query):
            reply = resolve(request)
        else:
            reply = tuple(resolve(q) for q in request)
