"""
TLS for the server side: the certificate chain from C{[tls]} or a
generated self-signed one, the context options (TLS 1.2 and newer), and
what a session's TLS is (version, cipher) for logs and Received headers.

Keys and certificates are C{cryptography} objects throughout; pyOpenSSL's
C{X509} and C{PKey} wrappers are deprecated and never made here.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ISSLTransport
from zope.interface import implementer

from twisted_mta.values import TLSInfo


class CertificateError(ValueError):
    pass


def self_signed(hostname: str, days: int = 365):
    """
    A new P-256 key and a self-signed certificate for C{hostname} (and
    localhost, 127.0.0.1, ::1), for the development default and for tests.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = {x509.DNSName(hostname), x509.DNSName("localhost")}
    alt |= {x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")}
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sorted(alt, key=str)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, [cert]


def load_chain(certificate: Path, key: Path):
    """
    Read a PEM certificate chain (the server's certificate first) and its
    private key.  Raises L{CertificateError} naming the file and the
    problem.
    """
    try:
        chain = x509.load_pem_x509_certificates(certificate.read_bytes())
    except (OSError, ValueError) as e:
        raise CertificateError(f"{certificate}: not a PEM certificate chain ({e})")
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CertificateError(f"{key}: not an unencrypted PEM private key ({e})")
    if private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != chain[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertificateError(f"{key}: does not match the certificate in {certificate}")
    return private, chain


def server_options(key, chain) -> ssl.CertificateOptions:
    """Server TLS options for a key and chain: TLS 1.2 and newer."""
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=list(chain[1:]),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def pem(key, chain) -> tuple[bytes, bytes]:
    """The key and chain as PEM bytes (to write them for tests and tools)."""
    return (
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
    )


def tls_info(transport) -> TLSInfo | None:
    """What TLS C{transport} runs under, or C{None} if it is not encrypted."""
    if transport is None or not ISSLTransport.providedBy(transport):
        return None
    try:
        conn = transport.getHandle()
        return TLSInfo(
            conn.get_protocol_version_name(),
            conn.get_cipher_name() or "",
            conn.get_cipher_bits() or 0,
        )
    except Exception:
        return TLSInfo("TLS", "", 0)


@implementer(IOpenSSLServerConnectionCreator)
class SwappableServerTLS:
    """
    Server TLS whose certificate can be replaced while listeners keep
    running: each new TLS connection (STARTTLS or implicit) is made with
    the options current at that moment.  Connections already in TLS keep
    theirs.
    """

    def __init__(self, options: ssl.CertificateOptions):
        self.options = options

    def serverConnectionForTLS(self, protocol):
        return self.options.serverConnectionForTLS(protocol)
