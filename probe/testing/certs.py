"""Test PKI for the TLS tests: a CA (``trustme``), server certificates, and
the certificate file formats users upload (PEM, DER, PKCS#12, bundles).

    pki = TestPKI()
    with PostgresServer(tls=pki.server_tls()) as pg:
        ctx = pki.client_context()                 # trusts pki.ca
        ...
    pki.server_tls("expired")                      # same CA, notAfter in the past
    pki.client_context(ca="other")                 # an unrelated CA: verification fails
    pki.ca_der(), pki.ca_pkcs12("secret"), pki.ca_bundle_pem()

Server certificates name ``127.0.0.1``, ``::1`` and ``localhost``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    KeySerializationEncryption,
    NoEncryption,
    PrivateFormat,
    pkcs12,
)

from probe.testing._proc import RunAs

__all__ = [
    "SERVER_IDENTITIES",
    "ServerTLS",
    "TLSFiles",
    "TestPKI",
    "pem_certificates",
    "pkcs12_truststore",
    "sha256_hex",
]

SERVER_IDENTITIES = ("127.0.0.1", "::1", "localhost")

ServerCertKind = Literal["valid", "expired", "not_yet_valid", "wrong_host", "other_ca", "chain"]


@dataclass(frozen=True)
class TLSFiles:
    """Where a server's TLS material was written (inside its private temp dir)."""

    cert_path: Path
    key_path: Path
    ca_path: Path


@dataclass(frozen=True)
class ServerTLS:
    """TLS material for a test server: certificate chain (leaf first), key, and CA, all PEM.

    The server writes them into its own temporary directory, owned by the
    server account with mode 0600 (PostgreSQL insists on that for the key).
    """

    cert_chain_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:
        return f"ServerTLS(cert_chain_pem=<{len(self.cert_chain_pem)} bytes>, key_pem=<hidden>)"

    @classmethod
    def from_paths(cls, cert_chain: str | Path, key: str | Path, ca: str | Path) -> ServerTLS:
        return cls(Path(cert_chain).read_bytes(), Path(key).read_bytes(), Path(ca).read_bytes())

    @classmethod
    def from_leaf(cls, leaf: trustme.LeafCert, ca: trustme.CA) -> ServerTLS:
        return cls(
            cert_chain_pem=b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
            key_pem=leaf.private_key_pem.bytes(),
            ca_pem=ca.cert_pem.bytes(),
        )

    def write(self, directory: Path, run_as: RunAs | None = None) -> TLSFiles:
        owner = run_as if run_as is not None else RunAs(None, None, "", "")
        directory.mkdir(mode=0o700, exist_ok=True)
        owner.chown(directory)
        return TLSFiles(
            cert_path=owner.write_file(directory / "server-chain.pem", self.cert_chain_pem),
            key_path=owner.write_file(directory / "server-key.pem", self.key_pem),
            ca_path=owner.write_file(directory / "ca.pem", self.ca_pem),
        )

    @property
    def leaf(self) -> x509.Certificate:
        return pem_certificates(self.cert_chain_pem)[0]

    def server_context(self) -> ssl.SSLContext:
        """A server-side context with this certificate and key (for the Mongo wire server)."""
        import tempfile

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory(prefix="probe-tls-") as tmp:
            files = self.write(Path(tmp))
            context.load_cert_chain(files.cert_path, files.key_path)
        return context


def pem_certificates(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def pkcs12_truststore(
    certs: Sequence[x509.Certificate],
    password: str | bytes | None,
    *,
    legacy: bool = False,
    friendly_name: bytes | None = b"probe test CA",
) -> bytes:
    """A certificate-only PKCS#12 (what a console's ``.p12``/``.pfx`` CA download is).

    ``legacy=True`` uses the old PBE-SHA1-3DES / SHA-1 MAC scheme (what
    ``openssl pkcs12 -legacy`` and older tools write) instead of AES-256/PBKDF2.
    """
    pw = password.encode() if isinstance(password, str) else password
    encryption: KeySerializationEncryption
    if not pw:
        encryption = NoEncryption()
    elif legacy:
        encryption = (
            PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(2048)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())
            .build(pw)
        )
    else:
        encryption = BestAvailableEncryption(pw)
    return pkcs12.serialize_key_and_certificates(friendly_name, None, None, list(certs), encryption)


class TestPKI:
    """A test CA with server certificates, plus an unrelated CA for "wrong CA" tests.

    Certificates are generated lazily (ECDSA P-256 by default; pass
    ``key_type=trustme.KeyType.RSA`` for RSA).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> None:
        self.key_type = key_type
        self.ca = trustme.CA(organization_name="probe tests", key_type=key_type)

    # -- CAs ----------------------------------------------------------------------

    @cached_property
    def other_ca(self) -> trustme.CA:
        """An unrelated CA: trusting it must not validate the servers' certificates."""
        return trustme.CA(organization_name="probe tests (unrelated CA)", key_type=self.key_type)

    @cached_property
    def intermediate_ca(self) -> trustme.CA:
        return self.ca.create_child_ca(key_type=self.key_type)

    # -- server certificates ------------------------------------------------------

    @cached_property
    def server(self) -> trustme.LeafCert:
        return self.ca.issue_cert(
            *SERVER_IDENTITIES, common_name="localhost", key_type=self.key_type
        )

    @cached_property
    def expired_server(self) -> trustme.LeafCert:
        now = _utcnow()
        return self.ca.issue_cert(
            *SERVER_IDENTITIES,
            common_name="localhost",
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
            key_type=self.key_type,
        )

    @cached_property
    def not_yet_valid_server(self) -> trustme.LeafCert:
        now = _utcnow()
        return self.ca.issue_cert(
            *SERVER_IDENTITIES,
            common_name="localhost",
            not_before=now + dt.timedelta(days=1),
            not_after=now + dt.timedelta(days=30),
            key_type=self.key_type,
        )

    @cached_property
    def wrong_host_server(self) -> trustme.LeafCert:
        """Valid and signed by :attr:`ca`, but for another host name only."""
        return self.ca.issue_cert("db.invalid", common_name="db.invalid", key_type=self.key_type)

    @cached_property
    def other_ca_server(self) -> trustme.LeafCert:
        """A server certificate signed by :attr:`other_ca`."""
        return self.other_ca.issue_cert(
            *SERVER_IDENTITIES, common_name="localhost", key_type=self.key_type
        )

    @cached_property
    def chain_server(self) -> trustme.LeafCert:
        """Signed by an intermediate CA; the server sends leaf + intermediate."""
        return self.intermediate_ca.issue_cert(
            *SERVER_IDENTITIES, common_name="localhost", key_type=self.key_type
        )

    def server_tls(self, kind: ServerCertKind = "valid") -> ServerTLS:
        """TLS material for a server. ``ca_pem`` is always the CA that issued the cert."""
        if kind == "valid":
            leaf = self.server
        elif kind == "expired":
            leaf = self.expired_server
        elif kind == "not_yet_valid":
            leaf = self.not_yet_valid_server
        elif kind == "wrong_host":
            leaf = self.wrong_host_server
        elif kind == "other_ca":
            return ServerTLS.from_leaf(self.other_ca_server, self.other_ca)
        elif kind == "chain":
            leaf = self.chain_server
        else:
            raise ValueError(f"unknown server certificate kind {kind!r}")
        return ServerTLS.from_leaf(leaf, self.ca)

    # -- CA exports (what users upload) -------------------------------------------

    @property
    def ca_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())

    @property
    def other_ca_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.other_ca.cert_pem.bytes())

    def ca_pem(self, which: Literal["main", "other"] = "main") -> bytes:
        ca = self.ca if which == "main" else self.other_ca
        return ca.cert_pem.bytes()

    def ca_der(self, which: Literal["main", "other"] = "main") -> bytes:
        cert = self.ca_certificate if which == "main" else self.other_ca_certificate
        return cert.public_bytes(Encoding.DER)

    def ca_pkcs12(self, password: str | bytes | None, *, legacy: bool = False) -> bytes:
        """The CA certificate as a password-protected PKCS#12 trust store."""
        return pkcs12_truststore([self.ca_certificate], password, legacy=legacy)

    def ca_bundle_pem(self) -> bytes:
        """Several certificates in one PEM file, the right CA *not* first:
        the unrelated CA, the intermediate CA, then the main CA."""
        return (
            self.other_ca.cert_pem.bytes()
            + self.intermediate_ca.cert_pem.bytes()
            + self.ca.cert_pem.bytes()
        )

    def ca_key_pem(self) -> bytes:
        return self.ca.private_key_pem.bytes()

    # -- client side --------------------------------------------------------------

    def client_context(
        self,
        *,
        ca: Literal["main", "other"] = "main",
        check_hostname: bool = True,
    ) -> ssl.SSLContext:
        """A verifying client :class:`ssl.SSLContext` trusting one of the CAs."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = check_hostname
        ctx.load_verify_locations(cadata=self.ca_pem(ca).decode("ascii"))
        return ctx


def sha256_hex(data: bytes) -> str:
    """SHA-256 hex digest (what ``ssl_cert_check_sum`` carries)."""
    return hashlib.sha256(data).hexdigest()
