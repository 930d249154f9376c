"""
C{dkim_sign} and C{dkim_verify}: DKIM signatures (RFC 6376) on outbound
mail, and their verification on inbound mail, with RSA-SHA256 and
Ed25519-SHA256 (RFC 8463).

    [[filter]]
    use = "dkim_sign"
    keys = [
      {domain = "example.org", selector = "s1", key_file = "keys/s1.pem"},
      {domain = "example.org", selector = "ed1", key_file = "keys/ed1.key",
       algorithm = "ed25519-sha256"},
    ]

    [[filter]]
    use = "dkim_verify"
    reject_fail = false

The cryptography and canonicalisation are dkimpy's (the reference Python
implementation); this module decides what is signed and verified, reads
the keys, fetches key records through twisted.names (never dkimpy's own
blocking DNS) and runs dkimpy in a thread: signing a 100 KB message with
RSA-2048 takes 11-16 ms of CPU on the development machine (dkimpy's RSA
is pure Python), too long for the reactor thread.

Signing (L{DKIMSign}, at the data stage).  Outbound mail only: from an
authenticated session or a client in C{networks} (default: the C{[relay]
networks}).  The signing domain is the domain of the (single) C{From:}
header field's addresses, as DMARC aligns on it; the message is signed
with every key configured for that domain (or, with C{subdomains}, for
its nearest parent that has keys), relaxed/relaxed, no C{l=}.  The
signature is an L{AddHeader}: it is prepended above the message as
stored (the server's C{Received} field, then the client's header), and
the stored message is delivered byte for byte, so the signature holds.
It does not hold if another filter adds or removes a signed field
(another C{From}, a rewritten C{Subject}): data filters all see the
message as received, so no position in the filter list protects against
that.

Verifying (L{DKIMVerify}, at the data stage).  Up to C{max_signatures}
C{DKIM-Signature} fields, top first; each key record
(C{selector._domainkey.domain} TXT) is fetched first, then the
signatures are checked against what was fetched.  The result goes into
one C{Authentication-Results} field (RFC 8601, with RFC 6008's
C{header.b}).  Existing C{Authentication-Results} fields that claim our
host name as their authserv-id are removed (RFC 8601 5): only we may
write those.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import threads
from twisted.internet.defer import gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.names import dns, error as dns_error
from zope.interface import implementer

from twisted_mta.builtins._context import ContextResolver, reactor_of
from twisted_mta.network import in_networks
from twisted_mta.interfaces import IDataFilter
from twisted_mta.smtp.grammar import is_domain
from twisted_mta.values import AddHeader, RemoveHeader, Verdict

log = Logger()

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")

#: Signed when present (each instance), RFC 6376 5.4.1's list.
DEFAULT_HEADERS = (
    "From", "Sender", "Reply-To", "Subject", "Date", "Message-ID", "To", "Cc",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-ID",
    "Content-Description", "Resent-Date", "Resent-From", "Resent-Sender", "Resent-To",
    "Resent-Cc", "Resent-Message-ID", "In-Reply-To", "References", "List-Id",
    "List-Help", "List-Unsubscribe", "List-Subscribe", "List-Post", "List-Owner",
    "List-Archive", "List-Unsubscribe-Post",
)
#: Signed once more than present, so that adding one breaks the signature.
DEFAULT_OVERSIGN = ("From",)
#: Never signed: changed or added on the way (RFC 6376 5.4.1), or secret (Bcc).
NOT_SIGNED = frozenset(n.decode("ascii") for n in dkim.DKIM.SHOULD_NOT)

_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
_SELECTOR = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*$")


def _networks(networks, context, option: str) -> tuple:
    if networks is None:
        config = getattr(context, "config", None)
        return tuple(config.relay.networks) if config is not None else ()
    if isinstance(networks, str) or not isinstance(networks, (list, tuple)):
        raise ValueError(f"{option}: expected a list of networks, got {networks!r}")
    out = []
    for n in networks:
        try:
            out.append(n if not isinstance(n, str) else ipaddress.ip_network(n, strict=False))
        except ValueError:
            raise ValueError(f"{option}: not a network (CIDR): {n!r}")
    return tuple(out)


def is_outbound(session, networks) -> bool:
    """Mail from an authenticated session or from a client in C{networks}."""
    return bool(session.user) or in_networks(session.client_ip, networks)


def _a_label(domain: str) -> str | None:
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return domain if is_domain(domain) else None


def from_domain(message) -> str | None:
    """
    The domain of the message's author: that of the addresses of its one
    C{From:} field (all the same domain), in lower case A-labels; or None.
    """
    fields = message.header("From")
    if len(fields) != 1:
        return None
    domains = set()
    for _name, addr in email.utils.getaddresses(fields):
        if "@" not in addr:
            return None
        domains.add(_a_label(addr.rpartition("@")[2]))
    if len(domains) != 1:
        return None
    return domains.pop()


def _run(reactor, f, *args):
    """C{f(*args)} in the reactor's thread pool (or at once without a real reactor)."""
    pool = getattr(reactor, "getThreadPool", None)
    if pool is None:
        return maybeDeferred(f, *args)
    return threads.deferToThreadPool(reactor, pool(), f, *args)


def _read(message) -> bytes:
    with message.open() as f:
        return f.read()


# --- keys ---------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """
    One configured key.  C{private}: the key as dkimpy takes it (PKCS#1
    PEM for RSA, the base64 seed for Ed25519).  C{record}: the TXT record
    to publish at C{selector._domainkey.domain}.
    """

    domain: str
    selector: str
    algorithm: str
    private: bytes
    record: str
    path: str

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def read_key(path: Path, algorithm: str, where: str) -> tuple[bytes, str]:
    """
    Read a private key file and check it fits C{algorithm}.  Returns
    (dkimpy's form, the public key record).  ValueError names the file.
    RSA: a PEM key (PKCS#1 or PKCS#8) of at least 1024 bits (RFC 8301).
    Ed25519: a PEM PKCS#8 key (C{openssl genpkey -algorithm ed25519}) or
    the base64 32-byte seed that dkimpy's C{dknewkey} writes.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{where}: cannot read {path}: {e.strerror or e}")
    if algorithm == "rsa-sha256":
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {path}: not an unencrypted PEM private key ({e})")
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{where}: {path}: not an RSA key (algorithm is {algorithm})")
        if key.key_size < 1024:
            raise ValueError(f"{where}: {path}: RSA key of {key.key_size} bits; "
                             "at least 1024 are needed (RFC 8301), 2048 advised")
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode('ascii')}"
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {path}: not an unencrypted PEM private key ({e})")
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{where}: {path}: not an Ed25519 key (algorithm is {algorithm})")
    else:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise ValueError(f"{where}: {path}: not an Ed25519 key (PEM, or a base64 32-byte seed)")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    return base64.b64encode(seed), f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode('ascii')}"


def _key(table, i: int, folder: Path) -> SigningKey:
    where = f"keys[{i}]"
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table {{domain, selector, key_file, algorithm}}")
    table = dict(table)
    domain = table.pop("domain", None)
    if not isinstance(domain, str) or _a_label(domain) is None:
        raise ValueError(f"{where}.domain: expected a domain name, got {domain!r}")
    selector = table.pop("selector", None)
    if not isinstance(selector, str) or not _SELECTOR.match(selector):
        raise ValueError(f"{where}.selector: expected a selector (DNS labels), got {selector!r}")
    key_file = table.pop("key_file", None)
    if not isinstance(key_file, str) or not key_file:
        raise ValueError(f"{where}.key_file: expected a file name, got {key_file!r}")
    algorithm = table.pop("algorithm", "rsa-sha256")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{where}.algorithm: expected one of {', '.join(ALGORITHMS)}, "
                         f"got {algorithm!r}")
    for key in table:
        raise ValueError(f"{where}.{key}: unknown key")
    path = Path(folder) / key_file
    private, record = read_key(path, algorithm, f"{where}.key_file")
    key = SigningKey(_a_label(domain), selector.lower(), algorithm, private, record, str(path))
    try:  # dkimpy's own check, and PyNaCl's presence for Ed25519
        dkim.sign(b"From: <test@" + key.domain.encode() + b">\r\n\r\n", key.selector.encode(),
                  key.domain.encode(), key.private, signature_algorithm=algorithm.encode(),
                  canonicalize=(b"relaxed", b"relaxed"), include_headers=[b"from"])
    except dkim.NaClNotFoundError:
        raise ValueError(f"{where}.algorithm: {algorithm} needs PyNaCl, which is not "
                         "installed (pip install 'dkimpy[ed25519]')")
    except dkim.DKIMException as e:
        raise ValueError(f"{where}.key_file: {path}: dkimpy cannot sign with it: {e}")
    return key


def _names(value, option: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{option}: expected a list of header field names, got {value!r}")
    for name in value:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{option}: not a header field name: {name!r}")
    return tuple(value)


def _bool(value, option: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{option}: expected true or false, got {value!r}")
    return value


# --- signing ------------------------------------------------------------------


@implementer(IDataFilter)
class DKIMSign:
    """See the module docstring and docs/builtins/dkim_sign.md."""

    def __init__(self, keys=(), headers=DEFAULT_HEADERS, oversign=DEFAULT_OVERSIGN,
                 networks=None, subdomains: bool = False, context=None):
        folder = Path(getattr(context, "folder", None) or ".")
        if isinstance(keys, dict) or not isinstance(keys, (list, tuple)) or not keys:
            raise ValueError("keys: expected a list of tables {domain, selector, key_file, "
                             f"algorithm}}, got {keys!r}")
        self.keys = tuple(_key(t, i, folder) for i, t in enumerate(keys, 1))
        seen = set()
        for i, key in enumerate(self.keys, 1):
            if (key.domain, key.selector) in seen:
                raise ValueError(f"keys[{i}]: selector {key.selector!r} of {key.domain} "
                                 "given twice")
            seen.add((key.domain, key.selector))
        self.by_domain: dict[str, list[SigningKey]] = {}
        for key in self.keys:
            self.by_domain.setdefault(key.domain, []).append(key)
        self.headers = tuple(h.lower() for h in _names(headers, "headers"))
        if "from" not in self.headers:
            raise ValueError("headers: From must be signed (RFC 6376 5.4)")
        for name in self.headers:
            if name in NOT_SIGNED:
                raise ValueError(f"headers: {name} must not be signed (RFC 6376 5.4.1)")
        self.oversign = tuple(h.lower() for h in _names(oversign, "oversign"))
        for name in self.oversign:
            if name in NOT_SIGNED:
                raise ValueError(f"oversign: {name} must not be signed (RFC 6376 5.4.1)")
        self.networks = _networks(networks, context, "networks")
        self.subdomains = _bool(subdomains, "subdomains")
        self.reactor = reactor_of(context)
        for key in self.keys:
            log.info("dkim_sign: {name} IN TXT \"{record}\"", name=key.dns_name,
                     record=key.record)

    def keys_for(self, domain: str | None) -> list[SigningKey]:
        """The keys to sign a message from C{domain} with."""
        while domain:
            if domain in self.by_domain:
                return self.by_domain[domain]
            if not self.subdomains:
                return []
            domain = domain.partition(".")[2]
        return []

    def include(self, present: list[bytes]) -> list[bytes]:
        """The h= list for a message whose header field names are C{present}."""
        counts: dict[str, int] = {}
        for name in present:
            lname = name.decode("ascii", "replace").lower()
            counts[lname] = counts.get(lname, 0) + 1
        out = []
        for name in self.headers:
            out += [name.encode("ascii")] * (counts.get(name, 0) + (name in self.oversign))
        for name in self.oversign:
            if name not in self.headers:
                out += [name.encode("ascii")] * (counts.get(name, 0) + 1)
        return out

    def sign(self, data: bytes, keys) -> list[str]:
        """The DKIM-Signature values (folded) for C{data}, one per key.  Blocking."""
        signer = dkim.DKIM(data, linesep=b"\r\n")
        include = self.include([name for name, _ in signer.headers])
        values = []
        for key in keys:
            line = signer.sign(key.selector.encode("ascii"), key.domain.encode("ascii"),
                               key.private, signature_algorithm=key.algorithm.encode("ascii"),
                               canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
            name, _, value = line.decode("ascii").partition(":")
            values.append(value.strip(" ").removesuffix("\r\n"))
        return values

    def data(self, session, envelope, message):
        if not is_outbound(session, self.networks):
            return None
        domain = from_domain(message)
        keys = self.keys_for(domain)
        if not keys:
            if domain is None:
                log.info("dkim_sign: session={sid}: no single From: domain, not signed",
                         sid=session.id)
            return None

        def job():
            return self.sign(_read(message), keys)

        def signed(values):
            for key in keys:
                log.debug("dkim_sign: session={sid}: signed d={d} s={s}", sid=session.id,
                          d=key.domain, s=key.selector)
            return Verdict.continue_(*(AddHeader("DKIM-Signature", v) for v in values))

        def failed(failure):
            failure.trap(dkim.DKIMException)
            log.warn("dkim_sign: session={sid}: not signed: {error}", sid=session.id,
                     error=failure.getErrorMessage())
            return None

        return _run(self.reactor, job).addCallbacks(signed, failed)


# --- verifying ----------------------------------------------------------------


PASS, FAIL, NONE, TEMPERROR, PERMERROR = "pass", "fail", "none", "temperror", "permerror"
_TSPECIALS = set('()<>@,;:\\"/[]?=')


def _pvalue(text: str) -> str:
    """An RFC 8601 property value: a token as it is, else a quoted-string."""
    if text and all(33 <= ord(c) < 127 and c not in _TSPECIALS for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Result:
    """One signature's outcome."""

    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""
    reason: str = ""
    key: str | None = None   # the key record's name, lower case, no final dot

    def resinfo(self, b_length: int = 8) -> str:
        parts = [f"dkim={self.result}"]
        if self.reason:
            parts.append(f"reason={_pvalue(self.reason)}")
        if self.domain:
            parts.append(f"header.d={_pvalue(self.domain)}")
        if self.selector:
            parts.append(f"header.s={_pvalue(self.selector)}")
        if self.algorithm:
            parts.append(f"header.a={_pvalue(self.algorithm)}")
        if self.b:
            parts.append(f"header.b={_pvalue(self.b[:b_length])}")
        return " ".join(parts)


def _b_lengths(results: list[Result]) -> list[int]:
    """RFC 6008 2: at least 8 characters of b=, more where needed to tell signatures apart."""
    out = []
    for r in results:
        n = 8
        while n < len(r.b) and any(o is not r and o.b and o.b[:n] == r.b[:n] and o.b != r.b
                                   for o in results):
            n += 1
        out.append(n)
    return out


def authentication_results(authserv_id: str, results: list[Result]) -> str:
    """The value of an Authentication-Results field with C{results} (folded if several)."""
    if not results:
        results = [Result(NONE)]
    infos = [r.resinfo(n) for r, n in zip(results, _b_lengths(results))]
    if len(infos) == 1:
        return f"{authserv_id}; {infos[0]}"
    return f"{authserv_id};\r\n\t" + ";\r\n\t".join(infos)


def authserv_pattern(authserv_id: str) -> str:
    """A regex matching an Authentication-Results value whose authserv-id is C{authserv_id}."""
    return r"(?i)^\s*(?:\([^()]*\)\s*)?" + re.escape(authserv_id) + r"(?![A-Za-z0-9.-])"


def _text(value: bytes) -> str:
    return re.sub(r"\s+", "", value.decode("ascii", "replace"))


def prepare(data: bytes, limit: int, minkey: int):
    """
    Parse C{data} and the first C{limit} signatures.  Returns the dkimpy
    object and one L{Result} per signature: PERMERROR for those that
    cannot be verified at all, else with C{key} set and C{result} empty.
    Blocking (CPU).
    """
    try:
        verifier = dkim.DKIM(data, minkey=minkey)
    except dkim.DKIMException as e:  # a header line that is not a field
        return None, [Result(PERMERROR, reason=f"message not parsable: {e}")], 1
    values = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
    results = []
    for idx, value in enumerate(values[:limit]):
        try:
            tags = dkim.util.parse_tag_value(value)
        except dkim.util.InvalidTagValueList:
            tags = {}
        r = Result("", domain=_text(tags.get(b"d", b"")), selector=_text(tags.get(b"s", b"")),
                   algorithm=_text(tags.get(b"a", b"")), b=_text(tags.get(b"b", b"")))
        try:
            verifier.verify_headerprep(idx)
        except dkim.DKIMException as e:
            r.result, r.reason = PERMERROR, str(e)
            results.append(r)
            continue
        if r.algorithm.lower() == "rsa-sha1":
            r.result, r.reason = PERMERROR, "rsa-sha1 is not accepted (RFC 8301)"
        else:
            domain, selector = _a_label(r.domain), r.selector.lower()
            if domain is None or not _SELECTOR.match(selector):
                r.result, r.reason = PERMERROR, "bad d= or s="
            else:
                r.key = f"{selector}._domainkey.{domain}"
        results.append(r)
    return verifier, results, len(values)


def check(verifier, results: list[Result], records: dict) -> list[Result]:
    """
    Verify each signature in C{results} still open against the key
    records fetched (C{records}: name -> bytes, or a L{Result} saying why
    there is none).  Blocking (CPU).
    """
    for idx, r in enumerate(results):
        if r.result:
            continue
        record = records.get(r.key)
        if isinstance(record, Result):
            r.result, r.reason = record.result, record.reason
            continue
        try:
            dkim.evaluate_pk(r.key, record)
        except dkim.NaClNotFoundError:
            r.result, r.reason = PERMERROR, "ed25519 keys are not supported here (no PyNaCl)"
            continue
        except (dkim.DKIMException, binascii.Error, ValueError, TypeError) as e:
            r.result, r.reason = PERMERROR, f"bad key record: {e}"
            continue
        try:
            ok = verifier.verify(idx, dnsfunc=lambda name, timeout=5, record=record: record)
        except dkim.ValidationError as e:
            if str(e).startswith("body hash mismatch"):
                r.result, r.reason = FAIL, "body hash mismatch"
            else:
                r.result, r.reason = PERMERROR, str(e)
            continue
        except dkim.DKIMException as e:  # a key too small, a bad c= ...
            r.result, r.reason = PERMERROR, str(e)
            continue
        r.result, r.reason = (PASS, "") if ok else (FAIL, "signature did not verify")
    return results


@implementer(IDataFilter)
class DKIMVerify:
    """See the module docstring and docs/builtins/dkim_verify.md."""

    resolver = ContextResolver()

    def __init__(self, reject_fail: bool = False, max_signatures: int = 5,
                 inbound_only: bool = True, networks=None, min_key_bits: int = 1024,
                 authserv_id: str | None = None, context=None):
        self.reject_fail = _bool(reject_fail, "reject_fail")
        self.inbound_only = _bool(inbound_only, "inbound_only")
        if isinstance(max_signatures, bool) or not isinstance(max_signatures, int) \
                or not 1 <= max_signatures <= 50:
            raise ValueError(f"max_signatures: expected a number from 1 to 50, "
                             f"got {max_signatures!r}")
        self.max_signatures = max_signatures
        if isinstance(min_key_bits, bool) or not isinstance(min_key_bits, int) \
                or not 1024 <= min_key_bits <= 16384:
            raise ValueError(f"min_key_bits: expected a number from 1024 (RFC 8301) to 16384, "
                             f"got {min_key_bits!r}")
        self.min_key_bits = min_key_bits
        self.networks = _networks(networks, context, "networks")
        if authserv_id is None:
            config = getattr(context, "config", None)
            authserv_id = config.hostname if config is not None else None
        if not isinstance(authserv_id, str) or not is_domain(authserv_id):
            raise ValueError(f"authserv_id: expected a host name, got {authserv_id!r}")
        self.authserv_id = authserv_id
        self.pattern = authserv_pattern(authserv_id)
        self._forged = re.compile(self.pattern)
        self.context = context
        self.reactor = reactor_of(context)


    def data(self, session, envelope, message):
        changes = []
        if any(self._forged.search(v) for v in message.header("Authentication-Results")):
            changes.append(RemoveHeader("Authentication-Results", self.pattern))
            log.info("dkim_verify: session={sid}: removing Authentication-Results claiming "
                     "{id}", sid=session.id, id=self.authserv_id)
        if self.inbound_only and is_outbound(session, self.networks):
            return Verdict.continue_(*changes) if changes else None
        if not message.header("DKIM-Signature"):
            changes.append(AddHeader("Authentication-Results",
                                     authentication_results(self.authserv_id, [])))
            return Verdict.continue_(*changes)
        d = _run(self.reactor, lambda: prepare(_read(message), self.max_signatures,
                                               self.min_key_bits))
        d.addCallback(self._fetch)
        return d.addCallback(self._decide, session, changes)

    def _fetch(self, prepared):
        verifier, results, count = prepared
        names = sorted({r.key for r in results if not r.result})
        d = gatherResults([self.lookup(name) for name in names])
        d.addCallback(lambda answers: _run(self.reactor, check, verifier, results,
                                           dict(zip(names, answers))))
        return d.addCallback(lambda checked: (checked, count))

    def lookup(self, name: str):
        """
        The key record at C{name} (bytes, its strings joined), or a
        L{Result}: permerror when there is none (NXDOMAIN, no TXT),
        temperror when DNS failed.  Never fails.
        """
        try:
            d = self.resolver.lookupText(name)
        except Exception as e:  # a resolver that raises is a DNS failure
            return succeed(Result(TEMPERROR, reason=f"key record lookup failed: {e}"))

        def answered(result):
            answers = result[0] if isinstance(result, tuple) else result
            records = [b"".join(rr.payload.data) for rr in answers
                       if rr.type == dns.TXT and isinstance(rr.payload, dns.Record_TXT)]
            keys = [r for r in records if b"p=" in r] or records
            if not keys:
                return Result(PERMERROR, reason="no key record")
            return keys[0]

        def failed(failure):
            if failure.check(dns_error.DNSNameError):
                return Result(PERMERROR, reason="no key record")
            return Result(TEMPERROR, reason="key record lookup failed: "
                          + (type(failure.value).__name__))

        return d.addCallbacks(answered, failed)

    def _decide(self, checked, session, changes):
        results, count = checked
        if count > len(results):
            log.info("dkim_verify: session={sid}: {n} signatures, only the first {m} checked",
                     sid=session.id, n=count, m=len(results))
        for r in results:
            log.info("dkim_verify: session={sid}: dkim={result} d={d} s={s}{why}",
                     sid=session.id, result=r.result, d=r.domain, s=r.selector,
                     why=f" ({r.reason})" if r.reason else "")
        found = {r.result for r in results}
        if self.reject_fail and FAIL in found and not found & {PASS, TEMPERROR}:
            return Verdict.reject("No passing DKIM signature found", "5.7.20")
        changes.append(AddHeader("Authentication-Results",
                                 authentication_results(self.authserv_id, results)))
        return Verdict.continue_(*changes)
