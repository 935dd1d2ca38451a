"""Certificate material to `ssl.SSLContext`, and the TLS facts of a connection.

The user hands over the certificate file of the database service, base64
encoded, with its SHA-256. `load_material()` checks it strictly before any
network traffic: base64, size (500 KiB decoded), checksum, then the format:
PEM (one or more CA certificates), DER, or PKCS#12 with its password. The
result is one verifying context per distinct material, cached by checksum and
password, never mutated after it is built.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

from probe.errors import ErrorCode, ProbeFailure

MAX_CERT_BYTES = 500 * 1024


@dataclass(frozen=True, eq=False, repr=False)
class TLSMaterial:
    """A verifying client context and the CA certificates (PEM) it trusts."""

    context: ssl.SSLContext
    ca_pem: bytes
    checksum: str

    def __repr__(self) -> str:
        return f"TLSMaterial(sha256={self.checksum[:12]}...)"


def _invalid(cause: str) -> ProbeFailure:
    return ProbeFailure(ErrorCode.SSL_CERT_INVALID, cause=cause)


def decode(cert_b64: str) -> bytes:
    """The certificate file bytes; ProbeFailure(SSL_CERT_INVALID) unless strict base64."""
    compact = "".join(cert_b64.split())
    if len(compact) > (MAX_CERT_BYTES * 4) // 3 + 4:
        raise _invalid("larger than 500 KiB")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("ssl_cert_key is not valid base64") from None
    if base64.b64encode(data).decode("ascii") != compact:  # extra padding, stray bits
        raise _invalid("ssl_cert_key is not valid base64")
    if not data:
        raise _invalid("empty")
    if len(data) > MAX_CERT_BYTES:
        raise _invalid("larger than 500 KiB")
    return data


def _certificates(data: bytes, name: str, password: str | None) -> list[x509.Certificate]:
    lowered = name.lower()
    if b"-----BEGIN" in data:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise _invalid("the PEM file holds no readable certificate") from None
        return certs
    if lowered.endswith((".p12", ".pfx")) or password:
        try:
            _, cert, extra = pkcs12.load_key_and_certificates(
                data, password.encode("utf-8") if password else None
            )
        except ValueError:
            raise _invalid("not a PKCS#12 file, or the ssl_cert_password is wrong") from None
        found = ([cert] if cert is not None else []) + list(extra)
        if not found:
            raise _invalid("the PKCS#12 file holds no certificate")
        return found
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        pass
    try:  # a .p12 without the telling extension and without a password
        _, cert, extra = pkcs12.load_key_and_certificates(data, None)
        return ([cert] if cert is not None else []) + list(extra)
    except ValueError:
        raise _invalid("not a PEM, DER or PKCS#12 certificate") from None


def build_context(ca_pem: bytes, verify_hostname: bool = False) -> ssl.SSLContext:
    """A client context trusting exactly `ca_pem`, verifying the chain and expiry."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode("ascii"))
    context.check_hostname = verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class MaterialCache:
    """One TLSMaterial per (checksum, password, hostname setting); thread-safe, bounded."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, str, bool], TLSMaterial] = OrderedDict()
        self._lock = threading.Lock()
        self.built = 0

    def load(
        self,
        cert_b64: str,
        name: str,
        checksum: str,
        password: str | None = None,
        verify_hostname: bool = False,
    ) -> TLSMaterial:
        """The material for one endpoint; ProbeFailure(C10020/C10021) when it is unusable.

        Blocking (decoding, parsing, building the context): call it off the loop.
        """
        # The bytes are decoded and hashed once, hit or miss: the cache is keyed by
        # what they are, not by what the request claims.
        data = decode(cert_b64)
        actual = hashlib.sha256(data).hexdigest()
        if actual != checksum.lower():
            raise ProbeFailure(ErrorCode.SSL_CHECKSUM_MISMATCH)
        digest_key = hashlib.sha256((password or "").encode("utf-8")).hexdigest()
        key = (actual, digest_key, verify_hostname)
        with self._lock:
            cached = self._items.get(key)
            if cached is not None:
                self._items.move_to_end(key)
                return cached
        certs = _certificates(data, name, password)
        ca_pem = b"".join(c.public_bytes(Encoding.PEM) for c in certs)
        try:
            context = build_context(ca_pem, verify_hostname)
        except ssl.SSLError:
            raise _invalid("the certificate cannot be used as a CA") from None
        material = TLSMaterial(context=context, ca_pem=ca_pem, checksum=actual)
        with self._lock:
            self._items[key] = material
            self.built += 1
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return material


def tls_facts(ssl_object: Any) -> dict[str, str | None] | None:
    """Protocol version, cipher, and the peer certificate's expiry and subject."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    facts: dict[str, str | None] = {
        "version": ssl_object.version(),
        "cipher": cipher[0] if cipher else None,
        "peer_cert_not_after": None,
        "peer_cert_subject": None,
    }
    der = ssl_object.getpeercert(binary_form=True)
    if der:
        cert = x509.load_der_x509_certificate(der)
        facts["peer_cert_not_after"] = cert.not_valid_after_utc.isoformat()
        facts["peer_cert_subject"] = cert.subject.rfc4514_string()
    return facts
