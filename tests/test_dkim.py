"""
The C{dkim_sign} and C{dkim_verify} built-ins (twisted_mta.builtins.dkim).

Unit tests call the hooks with values and a message file laid out as the
server spools it (its Received field, then the client's message); the
signatures made are checked by dkimpy's own C{dkim.verify}, with the
public keys computed here from the private keys (not taken from the
plugin), served by a C{dnsfunc}.  The verifier fetches key records from
a loopback L{DNSServer}.

End to end: an in-process MTA signs relayed mail (RSA and Ed25519) on
its way to a test SMTP sink; what the sink got verifies with dkimpy; the
same bytes sent to a second MTA with C{dkim_verify} and the DNS server
as its nameserver arrive in a Maildir with C{dkim=pass}, and altered or
unverifiable copies with fail, permerror or temperror.
"""

from __future__ import annotations

import base64
import email
import email.policy
import importlib.util
import re
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.dns_support import DNSServer
from tests.smtp_sink import SinkFactory, listen_sink
from twisted_mta.builtins import dkim as mod
from twisted_mta.builtins.dkim import DKIMSign, DKIMVerify
from twisted_mta.values import (
    Action, AddHeader, Message, PluginContext, RemoveHeader, Session, SharedState, Verdict,
    parse_headers,
)

NO_NACL = None if importlib.util.find_spec("nacl") else "PyNaCl is not installed (dkimpy[ed25519])"

HOST = "mx.example.test"
RECEIVED = (b"Received: from client.example.net (unknown [192.0.2.9])\r\n"
            b"\tby mx.example.test (twisted-mta) with ESMTPA id 4AbCdEf;\r\n"
            b"\tThu, 01 Jan 2026 00:00:01 +0000\r\n")


def body_lines(n: int = 3) -> bytes:
    return b"".join(b"Line %d of the body, with  two spaces and a tab\t.\r\n" % i
                    for i in range(n))


def make_message(sender: str = "alice@example.org", subject: str = "Hello",
                 body: bytes | None = None, extra: bytes = b"") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: bob@example.net\r\nSubject: {subject}\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <m1@example.org>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n").encode() \
        + extra + b"\r\n" + (body_lines() if body is None else body)


# --- keys, made once per run ---------------------------------------------------

_KEYS: dict = {}


def rsa_key(bits: int = 2048):
    if ("rsa", bits) not in _KEYS:
        _KEYS["rsa", bits] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _KEYS["rsa", bits]


def ed_key():
    if "ed" not in _KEYS:
        _KEYS["ed"] = ed25519.Ed25519PrivateKey.generate()
    return _KEYS["ed"]


def pem(key, pkcs8: bool = False) -> bytes:
    fmt = (serialization.PrivateFormat.PKCS8 if pkcs8 or isinstance(key, ed25519.Ed25519PrivateKey)
           else serialization.PrivateFormat.TraditionalOpenSSL)
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def record(key) -> str:
    """The DKIM key record for C{key}, made here (RFC 6376 3.6.1, RFC 8463 4)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def dnsfunc_for(records: dict):
    """A dkimpy dnsfunc answering C{records} (name without the final dot -> text)."""
    def dnsfunc(name, timeout=5):
        text = records.get(name.decode("ascii").rstrip(".").lower())
        return text.encode("ascii") if text is not None else None
    return dnsfunc


def verify_all(data: bytes, records: dict) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature of C{data}."""
    d = dkim.DKIM(data)
    n = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    return [dkim.DKIM(data).verify(i, dnsfunc=dnsfunc_for(records)) for i in range(n)]


def delivered(verdict: Verdict, spooled: bytes) -> bytes:
    """The message as the spool delivers it with C{verdict}'s added fields."""
    added = b"".join(f"{c.name}: {c.value}\r\n".encode() for c in verdict.changes
                     if isinstance(c, AddHeader))
    return added + spooled


class Base(unittest.TestCase):
    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir()
        (self.folder / "keys").mkdir()
        self.context = PluginContext(folder=self.folder, state_folder=self.folder,
                                     shared=SharedState(), where="test", reactor=reactor)

    def write_key(self, name: str, data: bytes) -> str:
        path = self.folder / "keys" / name
        path.write_bytes(data)
        return f"keys/{name}"

    def spool(self, message: bytes) -> tuple[Message, bytes]:
        """A L{Message} as the data hook sees it, and the spooled bytes."""
        data = RECEIVED + message
        path = self.folder / f"msg{len(list(self.folder.glob('msg*')))}"
        path.write_bytes(data)
        head = message[:message.index(b"\r\n\r\n") + 2]
        return Message(size=len(data), headers=parse_headers(head), path=str(path)), data


AUTHENTICATED = Session(id="s1", client_ip="203.0.113.5", user="alice")
STRANGER = Session(id="s2", client_ip="203.0.113.5")


# --- signing --------------------------------------------------------------------


class SignTests(Base):
    def signer(self, **options) -> DKIMSign:
        keys = options.pop("keys", None)
        if keys is None:
            keys = [{"domain": "example.org", "selector": "s1",
                     "key_file": self.write_key("s1.pem", pem(rsa_key()))}]
        return DKIMSign(keys=keys, context=self.context, **options)

    async def sign(self, signer, message: bytes, session=AUTHENTICATED):
        msg, spooled = self.spool(message)
        verdict = await defer.maybeDeferred(signer.data, session, None, msg)
        return verdict, spooled

    async def test_signs_rsa(self):
        """An authenticated session's mail is signed; dkimpy verifies what is delivered."""
        verdict, spooled = await self.sign(self.signer(), make_message())
        self.assertEqual(verdict.action, Action.CONTINUE)
        [change] = verdict.changes
        self.assertEqual(change.name, "DKIM-Signature")
        tags = dkim.util.parse_tag_value(change.value.encode())
        self.assertEqual(tags[b"a"], b"rsa-sha256")
        self.assertEqual(tags[b"c"], b"relaxed/relaxed")
        self.assertEqual((tags[b"d"], tags[b"s"]), (b"example.org", b"s1"))
        self.assertNotIn(b"l", tags)
        signed = [h.strip() for h in tags[b"h"].split(b":")]
        self.assertEqual(signed.count(b"from"), 2)  # oversigned
        for name in (b"to", b"subject", b"date", b"message-id", b"mime-version",
                     b"content-type"):
            self.assertIn(name, signed)
        self.assertNotIn(b"received", signed)
        self.assertNotIn(b"cc", signed)  # absent, and not oversigned
        out = delivered(verdict, spooled)
        self.assertTrue(out.startswith(b"DKIM-Signature: v=1;"))
        self.assertEqual(verify_all(out, {"s1._domainkey.example.org": record(rsa_key())}),
                         [True])

    async def test_rsa_and_ed25519(self):
        """Two keys for the domain: two signatures, both valid (RFC 8463 allows both)."""
        if NO_NACL:
            raise unittest.SkipTest(NO_NACL)
        keys = [{"domain": "example.org", "selector": "s1",
                 "key_file": self.write_key("s1.pem", pem(rsa_key(), pkcs8=True))},
                {"domain": "Example.ORG", "selector": "ed1", "algorithm": "ed25519-sha256",
                 "key_file": self.write_key("ed1.key", pem(ed_key()))}]
        verdict, spooled = await self.sign(self.signer(keys=keys), make_message())
        self.assertEqual([c.name for c in verdict.changes], ["DKIM-Signature"] * 2)
        algs = [dkim.util.parse_tag_value(c.value.encode())[b"a"] for c in verdict.changes]
        self.assertEqual(algs, [b"rsa-sha256", b"ed25519-sha256"])
        records = {"s1._domainkey.example.org": record(rsa_key()),
                   "ed1._domainkey.example.org": record(ed_key())}
        self.assertEqual(verify_all(delivered(verdict, spooled), records), [True, True])

    async def test_ed25519_seed_file(self):
        """An Ed25519 key as dkimpy's dknewkey writes it: the base64 seed."""
        if NO_NACL:
            raise unittest.SkipTest(NO_NACL)
        seed = ed_key().private_bytes(serialization.Encoding.Raw,
                                      serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())
        keys = [{"domain": "example.org", "selector": "ed1", "algorithm": "ed25519-sha256",
                 "key_file": self.write_key("ed1.seed", base64.b64encode(seed) + b"\n")}]
        signer = self.signer(keys=keys)
        self.assertEqual(signer.keys[0].record, record(ed_key()))
        verdict, spooled = await self.sign(signer, make_message())
        self.assertEqual(verify_all(delivered(verdict, spooled),
                                    {"ed1._domainkey.example.org": record(ed_key())}), [True])

    async def test_large_message(self):
        """A 100 KB message is signed (in a thread) and verifies."""
        body = b"x" * 76 + b"\r\n"
        verdict, spooled = await self.sign(self.signer(), make_message(body=body * 1300))
        self.assertEqual(verify_all(delivered(verdict, spooled),
                                    {"s1._domainkey.example.org": record(rsa_key())}), [True])

    async def test_inbound_not_signed(self):
        """A client that neither authenticated nor is in the networks: not signed."""
        verdict, _ = await self.sign(self.signer(), make_message(), STRANGER)
        self.assertIsNone(verdict)

    async def test_relay_network_signed(self):
        signer = self.signer(networks=["203.0.113.0/24"])
        verdict, _ = await self.sign(signer, make_message(), STRANGER)
        self.assertEqual([c.name for c in verdict.changes], ["DKIM-Signature"])
        verdict, _ = await self.sign(signer, make_message(),
                                     Session(id="s3", client_ip="::ffff:203.0.113.7"))
        self.assertEqual(len(verdict.changes), 1)

    async def test_other_domain_not_signed(self):
        """Only mail whose From: domain has a key is signed; the envelope does not count."""
        verdict, _ = await self.sign(self.signer(), make_message("alice@example.net"))
        self.assertIsNone(verdict)
        verdict, _ = await self.sign(self.signer(), make_message("alice@sub.example.org"))
        self.assertIsNone(verdict)

    async def test_subdomains(self):
        verdict, spooled = await self.sign(self.signer(subdomains=True),
                                           make_message("alice@sub.example.org"))
        [change] = verdict.changes
        self.assertIn("d=example.org;", change.value)
        self.assertEqual(verify_all(delivered(verdict, spooled),
                                    {"s1._domainkey.example.org": record(rsa_key())}), [True])

    async def test_no_single_from(self):
        """Two From: fields, or none: not signed."""
        two = make_message(extra=b"From: mallory@example.org\r\n")
        verdict, _ = await self.sign(self.signer(), two)
        self.assertIsNone(verdict)
        none = make_message().replace(b"From: Alice <alice@example.org>\r\n", b"")
        verdict, _ = await self.sign(self.signer(), none)
        self.assertIsNone(verdict)

    async def test_changes_that_break_and_that_do_not(self):
        """
        Fields prepended above the signature (Received, X-*) keep it valid;
        a second From (oversigned), an edited Subject or body break it.
        """
        verdict, spooled = await self.sign(self.signer(), make_message())
        out = delivered(verdict, spooled)
        keys = {"s1._domainkey.example.org": record(rsa_key())}
        self.assertEqual(verify_all(b"Received: from a by b; now\r\nX-Spam: no\r\n" + out,
                                    keys), [True])
        self.assertEqual(verify_all(b"From: mallory@example.org\r\n" + out, keys), [False])
        self.assertEqual(verify_all(out.replace(b"Subject: Hello", b"Subject: Hallo"), keys),
                         [False])
        with self.assertRaises(dkim.ValidationError):  # body hash mismatch
            dkim.DKIM(out.replace(b"Line 1", b"Line 9")).verify(
                0, dnsfunc=dnsfunc_for(keys))

    async def test_unparsable_message_not_signed(self):
        """A header dkimpy cannot parse: delivered unsigned, not refused."""
        msg, _ = self.spool(make_message(extra=b"not a header line\r\n"))
        verdict = await defer.maybeDeferred(self.signer().data, AUTHENTICATED, None, msg)
        self.assertIsNone(verdict)

    def test_options_checked(self):
        good = {"domain": "example.org", "selector": "s1",
                "key_file": self.write_key("s1.pem", pem(rsa_key()))}
        cases = [
            (dict(keys=[]), "keys: expected"),
            (dict(keys=[{**good, "key_file": "keys/missing.pem"}]), "keys[1].key_file: cannot read"),
            (dict(keys=[{**good, "algorithm": "rsa-sha1"}]), "keys[1].algorithm"),
            (dict(keys=[{**good, "selector": "a b"}]), "keys[1].selector"),
            (dict(keys=[{**good, "domain": "-x-"}]), "keys[1].domain"),
            (dict(keys=[{**good, "colour": "red"}]), "keys[1].colour: unknown key"),
            (dict(keys=[good, dict(good)]), "keys[2]: selector 's1' of example.org given twice"),
            (dict(keys=[good], headers=["To", "Subject"]), "headers: From must be signed"),
            (dict(keys=[good], headers=["From", "Received"]), "headers: received must not"),
            (dict(keys=[good], oversign=["Bcc"]), "oversign: bcc must not"),
            (dict(keys=[good], networks=["nonsense"]), "networks: not a network"),
            (dict(keys=[good], subdomains="yes"), "subdomains: expected true or false"),
        ]
        for options, text in cases:
            with self.assertRaises(ValueError) as cm:
                DKIMSign(context=self.context, **options)
            self.assertIn(text, str(cm.exception))

    def test_bad_key_files(self):
        """A key that is not a key, or not of the algorithm: the error names the file."""
        junk = self.write_key("junk.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        ed = self.write_key("ed.pem", pem(ed_key()))
        rsa_file = self.write_key("rsa.pem", pem(rsa_key()))
        seed = self.write_key("short.seed", base64.b64encode(b"x" * 16))
        cases = [
            ({"key_file": junk}, "junk.pem: not an unencrypted PEM private key"),
            ({"key_file": ed}, "ed.pem: not an RSA key"),
            ({"key_file": rsa_file, "algorithm": "ed25519-sha256"}, "rsa.pem: not an Ed25519 key"),
            ({"key_file": seed, "algorithm": "ed25519-sha256"}, "short.seed: not an Ed25519 key"),
        ]
        for key, text in cases:
            with self.assertRaises(ValueError) as cm:
                DKIMSign(keys=[{"domain": "example.org", "selector": "s", **key}],
                         context=self.context)
            self.assertIn(text, str(cm.exception))
            self.assertIn(str(self.folder / "keys"), str(cm.exception))

    def test_ed25519_without_pynacl(self):
        """Without PyNaCl an Ed25519 key fails the load, saying what to install."""
        def sign(*args, **kw):
            raise dkim.NaClNotFoundError("pynacl module required")
        self.patch(dkim, "sign", sign)
        keys = [{"domain": "example.org", "selector": "ed1", "algorithm": "ed25519-sha256",
                 "key_file": self.write_key("ed1.key", pem(ed_key()))}]
        with self.assertRaises(ValueError) as cm:
            DKIMSign(keys=keys, context=self.context)
        self.assertIn("keys[1].algorithm: ed25519-sha256 needs PyNaCl", str(cm.exception))
        self.assertIn("dkimpy[ed25519]", str(cm.exception))

    def test_include_list(self):
        signer = self.signer(headers=["From", "To", "Subject", "Reply-To"],
                             oversign=["From", "Reply-To", "X-Frozen"])
        got = signer.include([b"Received", b"From", b"To", b"to", b"Subject", b"X-Other"])
        self.assertEqual(got, [b"from", b"from", b"to", b"to", b"subject", b"reply-to",
                               b"x-frozen"])

    def test_through_the_loader(self):
        """Loaded by name from a config file: relative key paths, errors naming the file."""
        from twisted_mta import config as configmod
        from twisted_mta.loader import PluginError, build_pipeline
        self.write_key("s1.pem", pem(rsa_key()))
        path = self.folder / "mta.toml"
        base = ('hostname = "mx.example.test"\nspool = "spool"\n'
                '[relay]\nnetworks = ["192.0.2.0/24"]\n')
        path.write_text(base + '[[filter]]\nuse = "dkim_sign"\n'
                        'keys = [{domain = "example.org", selector = "s1", key_file = "keys/s1.pem"}]\n')
        pipeline = build_pipeline(configmod.load(path), 1)
        [loaded] = pipeline.filters
        self.assertEqual(loaded.plugin.networks[0].compressed, "192.0.2.0/24")
        self.assertEqual(loaded.plugin.keys[0].path, str(self.folder / "keys" / "s1.pem"))
        path.write_text(base + '[[filter]]\nuse = "dkim_sign"\n'
                        'keys = [{domain = "example.org", selector = "s1", key_file = "keys/gone.pem"}]\n')
        with self.assertRaises(PluginError) as cm:
            build_pipeline(configmod.load(path), 2)
        self.assertIn("gone.pem", str(cm.exception))
        self.assertIn("filter[1]", str(cm.exception))


# --- verifying ------------------------------------------------------------------


class Signed:
    """Messages signed with dkimpy directly, for the verifier's tests."""

    @staticmethod
    def sign(message: bytes, selector="s1", domain="example.org", key=None,
             algorithm=b"rsa-sha256", **kw) -> bytes:
        key = key or rsa_key()
        if isinstance(key, ed25519.Ed25519PrivateKey):
            private = base64.b64encode(key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption()))
            algorithm = b"ed25519-sha256"
        else:
            private = pem(key)
        return dkim.sign(message, selector.encode(), domain.encode(), private,
                         signature_algorithm=algorithm, canonicalize=(b"relaxed", b"relaxed"),
                         include_headers=[b"from", b"to", b"subject", b"date", b"from"],
                         **kw) + message


def results(verdict: Verdict) -> str:
    [value] = [c.value for c in verdict.changes
               if isinstance(c, AddHeader) and c.name == "Authentication-Results"]
    return value


class VerifyTests(Base):
    def setUp(self):
        super().setUp()
        self.dns = DNSServer.started(self, {
            "s1._domainkey.example.org": {"TXT": record(rsa_key())},
            "small._domainkey.example.org": {"TXT": record(rsa_key(1024))},
            "bad._domainkey.example.org": {"TXT": "v=DKIM1; k=rsa; p=bm90IGEga2V5"},
            "nop._domainkey.example.org": {"A": "192.0.2.1"},
        }, servfail={"broken.example.org"}, timeout={"slow.example.org"})
        if not NO_NACL:
            self.dns.set("ed1._domainkey.example.org", "TXT", record(ed_key()))

    def verifier(self, **options) -> DKIMVerify:
        plugin = DKIMVerify(authserv_id=HOST, context=self.context, **options)
        plugin.resolver = self.dns.resolver(timeout=(0.3,))
        return plugin

    async def verify(self, message: bytes, session=STRANGER, **options) -> Verdict:
        msg, _ = self.spool(message)
        return await defer.maybeDeferred(self.verifier(**options).data, session, None, msg)

    async def test_pass_rsa(self):
        verdict = await self.verify(Signed.sign(make_message()))
        value = results(verdict)
        self.assertRegex(value, r"^mx\.example\.test; dkim=pass header\.d=example\.org "
                                r"header\.s=s1 header\.a=rsa-sha256 header\.b=")
        self.assertEqual(verdict.action, Action.CONTINUE)

    async def test_header_b(self):
        """header.b: the first 8 characters of b=, quoted when not a token (RFC 6008)."""
        signed = Signed.sign(make_message())
        verdict = await self.verify(signed)
        sig = dkim.util.parse_tag_value(signed.split(b"\r\nFrom:")[0][len("DKIM-Signature:"):])
        b = re.sub(rb"\s+", b"", sig[b"b"]).decode()[:8]
        value = results(verdict)
        self.assertTrue(value.endswith(f"header.b={mod._pvalue(b)}"), value)

    async def test_pass_ed25519(self):
        if NO_NACL:
            raise unittest.SkipTest(NO_NACL)
        verdict = await self.verify(Signed.sign(make_message(), "ed1", key=ed_key()))
        self.assertIn("dkim=pass header.d=example.org header.s=ed1 header.a=ed25519-sha256",
                      results(verdict))

    async def test_ed25519_without_pynacl(self):
        """A verifier without PyNaCl reports Ed25519 signatures as permerror, not a crash."""
        def evaluate_pk(name, record):
            raise dkim.NaClNotFoundError("pynacl module required")
        self.patch(dkim, "evaluate_pk", evaluate_pk)
        value = results(await self.verify(Signed.sign(make_message())))
        self.assertIn('dkim=permerror reason="ed25519 keys are not supported here', value)

    async def test_unsigned(self):
        verdict = await self.verify(make_message())
        self.assertEqual(results(verdict), f"{HOST}; dkim=none")

    async def test_body_changed(self):
        signed = Signed.sign(make_message()).replace(b"Line 1", b"Line 7")
        value = results(await self.verify(signed))
        self.assertIn('dkim=fail reason="body hash mismatch" header.d=example.org', value)

    async def test_header_changed(self):
        signed = Signed.sign(make_message()).replace(b"Subject: Hello", b"Subject: Win")
        value = results(await self.verify(signed))
        self.assertIn('dkim=fail reason="signature did not verify"', value)

    async def test_no_key(self):
        """NXDOMAIN and NODATA for the key: permerror (RFC 6376 6.1.2)."""
        for selector in ("gone", "nop"):
            value = results(await self.verify(Signed.sign(make_message(), selector)))
            self.assertIn(f'dkim=permerror reason="no key record" header.d=example.org '
                          f'header.s={selector}', value)

    async def test_bad_key(self):
        value = results(await self.verify(Signed.sign(make_message(), "bad")))
        self.assertIn("dkim=permerror reason=\"bad key record", value)

    async def test_small_key(self):
        value = results(await self.verify(Signed.sign(make_message(), "small", key=rsa_key(1024)),
                                          min_key_bits=2048))
        self.assertIn("dkim=permerror reason=\"public key too small", value)
        value = results(await self.verify(Signed.sign(make_message(), "small", key=rsa_key(1024))))
        self.assertIn("dkim=pass", value)

    async def test_dns_failure(self):
        """SERVFAIL or no answer at all: temperror."""
        for domain in ("broken.example.org", "slow.example.org"):
            value = results(await self.verify(Signed.sign(make_message(), domain=domain)))
            self.assertIn("dkim=temperror", value)
            self.assertIn(f"header.d={domain}", value)

    async def test_rsa_sha1_refused(self):
        signed = Signed.sign(make_message(), algorithm=b"rsa-sha1")
        value = results(await self.verify(signed))
        self.assertIn('dkim=permerror reason="rsa-sha1 is not accepted (RFC 8301)"', value)

    async def test_malformed_signature(self):
        message = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1\r\n" + make_message()
        value = results(await self.verify(message))
        self.assertIn("dkim=permerror", value)
        self.assertIn("missing", value)

    async def test_one_result_per_signature(self):
        """Several signatures: one result each, top first, in one field."""
        signed = Signed.sign(Signed.sign(make_message()).replace(b"Line 1", b"Line 7"), "gone")
        value = results(await self.verify(signed))
        self.assertTrue(value.startswith(f"{HOST};\r\n\tdkim=permerror"), value)
        infos = value.split(";\r\n\t")[1:]
        self.assertEqual([i.split()[0] for i in infos], ["dkim=permerror", "dkim=fail"])

    async def test_limit(self):
        message = make_message()
        for i in range(4):
            message = Signed.sign(message)
        value = results(await self.verify(message, max_signatures=3))
        self.assertEqual(value.count("dkim=pass"), 3)

    async def test_forged_results_removed(self):
        """Authentication-Results claiming our name are removed (RFC 8601 5); others kept."""
        extra = (f"Authentication-Results: {HOST}; dkim=pass header.d=bank.example\r\n"
                 f"Authentication-Results: (forged) {HOST.upper()} 1; spf=pass\r\n"
                 f"Authentication-Results: {HOST}.evil.example; dkim=pass\r\n").encode()
        verdict = await self.verify(make_message(extra=extra))
        [remove] = [c for c in verdict.changes if isinstance(c, RemoveHeader)]
        self.assertEqual(remove.name, "Authentication-Results")
        values = [v for n, v in parse_headers(extra)]
        self.assertEqual([bool(re.search(remove.pattern, v)) for v in values],
                         [True, True, False])
        # Outbound mail is not verified, but forged fields still go.
        verdict = await self.verify(make_message(extra=extra), AUTHENTICATED)
        self.assertEqual([type(c) for c in verdict.changes], [RemoveHeader])
        self.assertIsNone(await self.verify(make_message(), AUTHENTICATED))
        verdict = await self.verify(make_message(), AUTHENTICATED, inbound_only=False)
        self.assertEqual(results(verdict), f"{HOST}; dkim=none")

    async def test_reject_fail(self):
        """With reject_fail: 554 5.7.20 when signatures fail and none passes (RFC 7372)."""
        broken = Signed.sign(make_message()).replace(b"Line 1", b"Line 7")
        verdict = await self.verify(broken, reject_fail=True)
        self.assertEqual((verdict.action, verdict.enhanced), (Action.REJECT, "5.7.20"))
        self.assertEqual(verdict.text, "No passing DKIM signature found")
        # One good signature is enough; DNS trouble and missing keys never refuse.
        for message in (Signed.sign(broken),
                        Signed.sign(broken, domain="broken.example.org"),
                        Signed.sign(make_message(), "gone"),
                        make_message()):
            verdict = await self.verify(message, reject_fail=True)
            self.assertEqual(verdict.action, Action.CONTINUE)
        self.assertEqual((await self.verify(broken)).action, Action.CONTINUE)

    def test_options_checked(self):
        cases = [
            (dict(reject_fail="no"), "reject_fail: expected true or false"),
            (dict(max_signatures=0), "max_signatures"),
            (dict(max_signatures=True), "max_signatures"),
            (dict(min_key_bits=512), "min_key_bits"),
            (dict(inbound_only=1), "inbound_only"),
            (dict(authserv_id="not a host"), "authserv_id"),
            (dict(networks="10.0.0.0/8"), "networks: expected a list"),
        ]
        for options, text in cases:
            with self.assertRaises(ValueError) as cm:
                DKIMVerify(context=self.context, **{"authserv_id": HOST, **options})
            self.assertIn(text, str(cm.exception))

    def test_authentication_results_format(self):
        r = [mod.Result("pass", "example.org", "s1", "rsa-sha256", "abcdefgh1234"),
             mod.Result("fail", "example.org", "s2", "rsa-sha256", "abcdefgh5678", "x y"),
             mod.Result("pass", "example.org", "s3", "ed25519-sha256", "a/b+c=dd99")]
        self.assertEqual(mod.authentication_results("h.example", r), (
            "h.example;\r\n"
            "\tdkim=pass header.d=example.org header.s=s1 header.a=rsa-sha256 header.b=abcdefgh1;\r\n"
            '\tdkim=fail reason="x y" header.d=example.org header.s=s2 header.a=rsa-sha256 '
            "header.b=abcdefgh5;\r\n"
            '\tdkim=pass header.d=example.org header.s=s3 header.a=ed25519-sha256 '
            'header.b="a/b+c=dd"'))
        self.assertEqual(mod.authentication_results("h.example", []), "h.example; dkim=none")


# --- end to end -----------------------------------------------------------------


SENDER = "alice@example.org"
FAR = "dave@elsewhere.example.net"
BOB = "bob@example.test"


def header_fields(data: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return [(n, re.sub(r"\s+", " ", v).strip()) for n, v in msg.items()]


class EndToEndTests(unittest.TestCase):
    """Two in-process MTAs: one signs on the way out, the other verifies on the way in."""

    def start_sink(self) -> tuple[SinkFactory, int]:
        return listen_sink(self)

    def signing_site(self, sink_port: int) -> e2e.Site:
        folder = Path(self.mktemp())
        (folder / "keys").mkdir(parents=True)
        (folder / "keys" / "s1.pem").write_bytes(pem(rsa_key()))
        keys = '{domain = "example.org", selector = "s1", key_file = "keys/s1.pem"}'
        if not NO_NACL:
            (folder / "keys" / "ed1.key").write_bytes(pem(ed_key()))
            keys += (', {domain = "example.org", selector = "ed1", key_file = "keys/ed1.key",'
                     ' algorithm = "ed25519-sha256"}')
        extra = f'[[filter]]\nuse = "dkim_sign"\nkeys = [{keys}]\n'
        return e2e.Site(folder, {"smtp": "none"}, hostname="out.example.org",
                        networks=["127.0.0.0/8"], relay_route=("127.0.0.1", sink_port),
                        tls=False, extra=extra, fixed_ports=False)

    def verifying_site(self, dns: DNSServer) -> e2e.Site:
        extra = '[[filter]]\nuse = "dkim_verify"\n'
        return e2e.Site(self.mktemp(), {"smtp": "none"}, hostname=HOST, tls=False,
                        delivery={"nameservers": [dns.address]}, extra=extra,
                        fixed_ports=False)

    async def test_signed_out_verified_in(self):
        sink, sink_port = self.start_sink()
        out = self.signing_site(sink_port)
        e2e.start_in_process(self, out)
        records = {"s1._domainkey.example.org": record(rsa_key())}
        if not NO_NACL:
            records["ed1._domainkey.example.org"] = record(ed_key())
        dns = DNSServer.started(self, {name: {"TXT": text} for name, text in records.items()},
                                servfail={"s1._domainkey.broken.example"})

        # 1. Relayed from a relay-network client: signed, and dkimpy agrees.
        body = b"".join(b"line %d: caf\xc3\xa9  \t\r\n" % i for i in range(2000))
        message = make_message(sender=SENDER, body=body + b".leading dot\r\n")
        message = message.replace(b"To: bob@example.net", f"To: <{FAR}>".encode())
        code, _ = await e2e.in_thread(e2e.send, out.host, out.port(), SENDER, [FAR], message,
                                      mail_options=["BODY=8BITMIME"])
        self.assertEqual(code, 250)
        await e2e.wait_for(lambda: sink.messages, "the relayed message")
        data = sink.messages[0].data
        fields = header_fields(data)
        names = [n for n, _ in fields]
        count = len(records)
        self.assertEqual(names[:count + 1], ["DKIM-Signature"] * count + ["Received"])
        self.assertTrue(data.endswith(body + b".leading dot\r\n"))
        self.assertEqual(verify_all(data, records), [True] * count)
        if not NO_NACL:
            self.assertIn("a=ed25519-sha256", fields[1][1])

        # 2. The delivered bytes, sent to a verifier: dkim=pass for each.
        inn = self.verifying_site(dns)
        e2e.start_in_process(self, inn)

        async def arrive(msg: bytes, tag: str) -> str:
            """Send C{msg} with an unsigned X-Test field on top; its Authentication-Results."""
            marker = f"X-Test: {tag}\r\n".encode()
            code, _ = await e2e.in_thread(e2e.send, inn.host, inn.port(), SENDER, [BOB],
                                          marker + msg, mail_options=["BODY=8BITMIME"])
            self.assertEqual(code, 250)

            def found():
                for path in inn.delivered(BOB):
                    stored = path.read_bytes()
                    if marker in stored:
                        return stored
            stored = await e2e.wait_for(found, f"delivery of {tag}")
            [ar] = [v for n, v in header_fields(stored) if n == "Authentication-Results"]
            return ar

        forged = f"Authentication-Results: {HOST}; dkim=pass header.d=bank.example\r\n".encode()
        ar = await arrive(forged + data, "good")
        self.assertTrue(ar.startswith(f"{HOST};"), ar)
        self.assertEqual(ar.count("dkim=pass"), count, ar)
        self.assertNotIn("bank.example", ar)
        self.assertIn("header.s=s1 header.a=rsa-sha256", ar)
        if not NO_NACL:
            self.assertIn("header.s=ed1 header.a=ed25519-sha256", ar)

        # 3. A tampered body: fail.
        ar = await arrive(data.replace(b"line 7: ", b"line 8: "), "tampered")
        self.assertEqual(ar.count("dkim=fail"), count, ar)
        self.assertIn('reason="body hash mismatch"', ar)

        # 4. The key records gone: permerror; SERVFAIL: temperror.
        for name in records:
            dns.remove(name)
        ar = await arrive(data, "nokey")
        self.assertEqual(ar.count("dkim=permerror"), count, ar)
        self.assertIn('reason="no key record"', ar)
        for name in records:
            dns.servfail.add(name)
        ar = await arrive(data, "servfail")
        self.assertEqual(ar.count("dkim=temperror"), count, ar)
