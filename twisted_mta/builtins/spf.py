"""
C{spf}: check the envelope sender's SPF record (RFC 7208).

    [[filter]]
    use = "spf"
    fail = "reject"          # what to do with each result: reject | tempfail | tag
    softfail = "tag"
    neutral = "tag"
    none = "tag"
    temperror = "tempfail"
    permerror = "tag"
    allow = ["198.51.100.0/24"]   # clients never checked
    skip_relay_networks = true    # nor clients in the [relay] networks
    time_limit = 20               # seconds one check may take in all (then temperror)

At MAIL the check of the client's address against the sender's domain
(for the null sender: against C{postmaster@<HELO name>}, the HELO
identity) starts, and MAIL is answered at once.  At RCPT the result is
awaited and acted on, as Postfix's policyd-spf does: C{reject} refuses
the recipient with the enhanced code C{5.7.23} (C{5.7.24} for permerror;
RFC 7372) and the server's code for a policy refusal at RCPT, C{tempfail}
with C{451 4.7.23} (C{4.7.24} for temperror), C{tag} lets it through.  At the end of DATA every checked message gets a C{Received-SPF}
field (RFC 7208 9.1) and an C{Authentication-Results} field (RFC 8601,
C{spf=<result> smtp.mailfrom=<domain>}, or C{smtp.helo=<name>}); fields
already in the message claiming our authserv-id are removed.

Authenticated sessions, clients in C{allow} and (with
C{skip_relay_networks}) clients in the C{[relay] networks} are not
checked, and their mail gets no field.  The DNS lookups go through the
server's resolver (C{context.resolver}); nothing is cached here.  The
evaluation itself is L{twisted_mta.builtins.spf_eval}, without I/O;
L{evaluate} drives it with twisted.names.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import weakref

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error as dns_error
from zope.interface import implementer

from twisted_mta.builtins._context import ContextResolver, reactor_of
from twisted_mta.builtins.spf_eval import (
    FAIL, NEUTRAL, NONE, PASS, PERMERROR, RESULTS, SOFTFAIL, TEMPERROR, Answer, Check, Query,
    Result,
)
from twisted_mta.network import client_address
from twisted_mta.interfaces import IDataFilter, IMailFilter, IRcptFilter
from twisted_mta.values import AddHeader, RemoveHeader, Verdict

log = Logger()

ACTIONS = ("reject", "tempfail", "tag")
DEFAULT_POLICY = {PASS: "tag", FAIL: "reject", SOFTFAIL: "tag", NEUTRAL: "tag", NONE: "tag",
                  TEMPERROR: "tempfail", PERMERROR: "tag"}
MAX_CNAME = 8  # links of a CNAME chain followed when the server left it unfinished
MAX_TEXT = 200  # characters of DNS-supplied text (an explanation, a problem) in replies


# --- twisted.names --------------------------------------------------------------

_LOOKUPS = {
    "TXT": ("lookupText", dns.TXT),
    "A": ("lookupAddress", dns.A),
    "AAAA": ("lookupIPV6Address", dns.AAAA),
    "MX": ("lookupMailExchange", dns.MX),
    "PTR": ("lookupPointer", dns.PTR),
}


def _text(name) -> str:
    value = name.name if isinstance(name, dns.Name) else name
    return value.decode("latin-1").rstrip(".")


def _data(rr):
    p = rr.payload
    if rr.type == dns.TXT:
        return b"".join(p.data)
    if rr.type == dns.A:
        return p.dottedQuad()
    if rr.type == dns.AAAA:
        return socket.inet_ntop(socket.AF_INET6, p.address)
    if rr.type == dns.MX:
        return (p.preference, _text(p.name))
    return _text(p.name)  # PTR


def _describe(failure_or_exc) -> str:
    e = failure_or_exc
    if isinstance(e, (dns_error.DNSQueryTimeoutError, defer.TimeoutError)):
        return "timeout"
    if isinstance(e, dns_error.DNSServerError):
        return "SERVFAIL"
    if isinstance(e, dns_error.DNSQueryRefusedError):
        return "REFUSED"
    return type(e).__name__


async def lookup(resolver, query: Query) -> Answer:
    """Ask C{resolver}; never fails (DNS trouble is an L{Answer} with C{error})."""
    method, qtype = _LOOKUPS[query.type]
    name = query.name
    seen = {name.lower()}
    for _ in range(MAX_CNAME + 1):
        try:
            answers, _, _ = await getattr(resolver, method)(name.encode("ascii"))
        except defer.CancelledError:
            raise
        except dns_error.DNSNameError:
            return Answer(nxdomain=True)
        except Exception as e:
            return Answer(error=_describe(e))
        records = tuple(_data(rr) for rr in answers if rr.type == qtype)
        if records:
            return Answer(records)
        # A CNAME chain the server did not finish: ask for its end.
        chain = {_text(rr.name).lower(): _text(rr.payload.name)
                 for rr in answers if rr.type == dns.CNAME}
        end, links = name.lower(), 0
        while end in chain and links < MAX_CNAME:
            end, links = chain[end].lower(), links + 1
        if end in seen or not end.isascii():
            return Answer()
        seen.add(end)
        name = end
    return Answer()


async def _drive(check: Check, resolver) -> Result:
    gen = check.evaluate()
    reply = None
    try:
        while True:
            try:
                request = gen.send(reply)
            except StopIteration as stop:
                return stop.value
            if isinstance(request, Query):
                reply = await lookup(resolver, request)
            else:
                reply = tuple(await defer.gatherResults(
                    [defer.Deferred.fromCoroutine(lookup(resolver, q)) for q in request],
                    consumeErrors=True))
    finally:
        gen.close()


def evaluate(check: Check, resolver, reactor=None, time_limit: float = 20) -> defer.Deferred:
    """
    Run C{check} with C{resolver} (a twisted.names IResolver): a Deferred
    that fires with its L{Result}, never fails.  A check still running
    after C{time_limit} seconds is a temperror.
    """
    if reactor is None:
        from twisted.internet import reactor
    d = defer.Deferred.fromCoroutine(_drive(check, resolver))

    def too_long(result, timeout):
        return check.result(TEMPERROR, problem=f"no result within {timeout:g} s")

    d.addTimeout(time_limit, reactor, onTimeoutCancel=too_long)

    def failed(failure):
        log.failure("spf: evaluating {sender} from [{ip}] failed", failure,
                    sender=check.sender, ip=check.ip)
        return check.result(TEMPERROR, problem="internal error")

    return d.addErrback(failed)


# --- header fields --------------------------------------------------------------

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TSPECIALS = set('()<>@,;:\\"/[]?=')


def _clean(text: str) -> str:
    return _CONTROL.sub("", text)


def _value(text: str) -> str:
    """A Received-SPF key-value: a dot-atom as it is, else a quoted-string."""
    text = _clean(text)
    if _DOT_ATOM.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    return "(" + re.sub(r"([()\\])", r"\\\1", _clean(text)) + ")"


def _pvalue(text: str) -> str:
    """An RFC 8601 property value: a token as it is, else a quoted-string."""
    text = _clean(text)
    if text and all(33 <= ord(c) < 127 and c not in _TSPECIALS for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _reply_text(text: str, limit: int = MAX_TEXT) -> str:
    """DNS-supplied text fit for a reply line: printable ASCII, at most C{limit} characters."""
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summary(r: Result) -> str:
    """What the result says, in words (the Received-SPF comment, after the receiver)."""
    who, ip = r.sender, r.ip
    if r.result == PASS:
        return f"domain of {who} designates {ip} as permitted sender"
    if r.result == FAIL:
        return f"domain of {who} does not designate {ip} as permitted sender"
    if r.result == SOFTFAIL:
        return f"domain of transitioning {who} does not designate {ip} as permitted sender"
    if r.result == NEUTRAL:
        return f"{ip} is neither permitted nor denied by domain of {who}"
    if r.result == NONE:
        return f"domain of {who} does not designate permitted sender hosts"
    if r.result == TEMPERROR:
        return f"error in processing during lookup of {who}: {r.problem}"
    return f"permanent error in processing domain of {who}: {r.problem}"


def received_spf(r: Result, receiver: str, envelope_from: str | None) -> str:
    """The value of a Received-SPF field (RFC 7208 9.1) for C{r}."""
    pairs = [("client-ip", r.ip)]
    if envelope_from is not None:
        pairs.append(("envelope-from", envelope_from))
    pairs += [("helo", r.helo), ("receiver", receiver), ("identity", r.identity)]
    if r.mechanism:
        pairs.append(("mechanism", r.mechanism))
    if r.problem:
        pairs.append(("problem", r.problem))
    values = " ".join(f"{k}={_value(v)};" for k, v in pairs)
    return f"{r.result} {_comment(f'{receiver}: {summary(r)}')}\r\n\t{values}"


def authentication_results(r: Result, authserv_id: str) -> str:
    """The value of an Authentication-Results field (RFC 8601) for C{r}."""
    prop = "smtp.mailfrom" if r.identity == "mailfrom" else "smtp.helo"
    return f"{authserv_id}; spf={r.result} {prop}={_pvalue(r.domain)}"


def authserv_pattern(authserv_id: str) -> str:
    """A regex matching an Authentication-Results value whose authserv-id is C{authserv_id}."""
    return r"(?i)^\s*(?:\([^()]*\)\s*)?" + re.escape(authserv_id) + r"(?![A-Za-z0-9.-])"


# --- the plugin -------------------------------------------------------------------


def _networks(value, option: str) -> tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{option}: expected a list of networks, got {value!r}")
    out = []
    for i, text in enumerate(value, 1):
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except (ValueError, TypeError):
            raise ValueError(f"{option}[{i}]: not a network (CIDR): {text!r}")
    return tuple(out)


def _a_label(domain: str) -> str:
    domain = domain.rstrip(".")
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain  # not queryable: the check says none


class _Pending:
    """One transaction's check: the result when it is known, and those waiting for it."""

    def __init__(self, key, d: defer.Deferred):
        self.key = key
        self.result: Result | None = None
        self._waiting: list[defer.Deferred] = []
        d.addCallback(self._done)

    def _done(self, result: Result) -> None:
        self.result = result
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.callback(result)

    def wait(self) -> defer.Deferred:
        if self.result is not None:
            return defer.succeed(self.result)
        d = defer.Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        return d


@implementer(IMailFilter, IRcptFilter, IDataFilter)
class SPF:
    """See the module docstring and docs/builtins/spf.md."""

    resolver = ContextResolver()

    def __init__(self, allow=(), skip_relay_networks: bool = True, time_limit: float = 20,
                 authserv_id: str | None = None, context=None, **results):
        policy = dict(DEFAULT_POLICY)
        for name, action in results.items():
            if name not in RESULTS:
                raise TypeError(f"unknown option {name!r} (options: {', '.join(RESULTS)}, "
                                f"allow, skip_relay_networks, time_limit, authserv_id)")
            allowed = ("tag",) if name == PASS else ACTIONS
            if action not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {action!r}")
            policy[name] = action
        self.policy = policy
        self.skip = _networks(allow, "allow")
        if not isinstance(skip_relay_networks, bool):
            raise ValueError(f"skip_relay_networks: expected true or false, "
                             f"got {skip_relay_networks!r}")
        config = getattr(context, "config", None)
        if skip_relay_networks and config is not None:
            self.skip += tuple(config.relay.networks)
        if (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                or not 0 < time_limit <= 300):
            raise ValueError(f"time_limit: expected a number of seconds from 0 to 300, "
                             f"got {time_limit!r}")
        self.time_limit = float(time_limit)
        if authserv_id is None:
            authserv_id = config.hostname if config is not None else None
        if not isinstance(authserv_id, str) or not authserv_id or any(
                c.isspace() or c in ";()" for c in authserv_id):
            raise ValueError(f"authserv_id: expected a host name, got {authserv_id!r}")
        self.authserv_id = authserv_id
        self.pattern = authserv_pattern(authserv_id)
        self._forged = re.compile(self.pattern)
        self.context = context
        self.reactor = reactor_of(context)
        # Session -> _Pending: gone with the session (a new value after
        # HELO, STARTTLS or AUTH, and at the end of the connection).
        self._checks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


    # --- who is checked ----------------------------------------------------------

    def skips(self, session) -> bool:
        if session.user:
            return True
        ip = client_address(session.client_ip)
        if ip is None:
            return True  # not an IP client (a unix socket): nothing to check
        return any(ip in net for net in self.skip)

    def _pending(self, session, sender) -> _Pending:
        text = f"{sender.local}@{_a_label(sender.domain or '')}" if sender is not None else ""
        key = (text, session.helo or "", session.client_ip)
        pending = self._checks.get(session)
        if pending is None or pending.key != key:
            check = Check(session.client_ip, text, session.helo or "", receiver=self.authserv_id,
                          now=self.reactor.seconds())
            d = evaluate(check, self.resolver, self.reactor, self.time_limit)
            d.addCallback(self._log, session)
            pending = _Pending(key, d)
            self._checks[session] = pending
        return pending

    def _log(self, r: Result, session) -> Result:
        log.info("spf: session={sid}: {result} identity={identity} sender=<{sender}> "
                 "ip={ip}{mechanism}{problem}",
                 sid=session.id, result=r.result, identity=r.identity, sender=r.sender, ip=r.ip,
                 mechanism=f" mechanism={r.mechanism}" if r.mechanism else "",
                 problem=f" problem={r.problem!r}" if r.problem else "")
        return r

    # --- hooks ------------------------------------------------------------------

    def mail(self, session, envelope):
        if not self.skips(session):
            self._pending(session, envelope.sender)  # starts the check; MAIL is not held
        return None

    def rcpt(self, session, envelope, recipient):
        if self.skips(session):
            return None
        return self._pending(session, envelope.sender).wait().addCallback(self.verdict)

    def data(self, session, envelope, message):
        if self.skips(session):
            return None
        changes = []
        if any(self._forged.search(v) for v in message.header("Authentication-Results")):
            changes.append(RemoveHeader("Authentication-Results", self.pattern))
        sender = envelope.sender

        def tag(r: Result) -> Verdict:
            envelope_from = None if sender is None else str(sender)
            changes.append(AddHeader("Received-SPF",
                                     received_spf(r, self.authserv_id, envelope_from)))
            changes.append(AddHeader("Authentication-Results",
                                     authentication_results(r, self.authserv_id)))
            return Verdict.continue_(*changes)

        return self._pending(session, sender).wait().addCallback(tag)

    # --- decisions ---------------------------------------------------------------

    def detail(self, r: Result) -> str:
        """The reason given to a refused client."""
        domain, ip = r.domain, r.ip
        if r.result in (FAIL, SOFTFAIL):
            if r.explanation:
                return f"{domain} explains: {_reply_text(r.explanation)}"
            return f"{domain} does not designate {ip} as permitted sender"
        if r.result == NEUTRAL:
            return f"{domain} neither permits nor denies {ip}"
        if r.result == NONE:
            return f"{domain} publishes no SPF record"
        if r.result == TEMPERROR:
            return f"temporary error looking up the SPF record of {domain}: " \
                   f"{_reply_text(r.problem)}"
        return f"error in the SPF record of {domain}: {_reply_text(r.problem)}"

    def verdict(self, r: Result) -> Verdict | None:
        """What the policy says for C{r}: None (tag: let it through), or a refusal."""
        action = self.policy[r.result]
        if action == "tag":
            return None
        code = "7.24" if r.result in (TEMPERROR, PERMERROR) else "7.23"
        if action == "reject":
            return Verdict.reject(f"Message rejected due to SPF {r.result}: {self.detail(r)}",
                                  "5." + code)
        return Verdict.tempfail(f"Message deferred due to SPF {r.result}: {self.detail(r)}",
                                "4." + code)
