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
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
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
            return _pkcs12_certificates(data, password)
        except ValueError:
            if password is None:
                raise _invalid("not a PKCS#12 file, or it needs an ssl_cert_password, which "
                               "is not given") from None
            raise _invalid("not a PKCS#12 file, or the ssl_cert_password is wrong") from None
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        pass
    try:  # a .p12 without the telling extension and without a password
        return _pkcs12_certificates(data, None)
    except ValueError:
        raise _invalid("not a PEM, DER or PKCS#12 certificate") from None


def _pkcs12_certificates(data: bytes, password: str | None) -> list[x509.Certificate]:
    """The certificates of a PKCS#12 file; ValueError when it is not one (or the password
    is wrong), SSL_CERT_INVALID when it holds none."""
    _, cert, extra = pkcs12.load_key_and_certificates(
        data, password.encode("utf-8") if password else None
    )
    found = ([cert] if cert is not None else []) + list(extra)
    if not found:
        raise _invalid("the PKCS#12 file holds no certificate")
    return found


def build_context(ca_pem: bytes, verify_hostname: bool = False) -> ssl.SSLContext:
    """A client context trusting exactly `ca_pem`, verifying the chain and expiry."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode("ascii"))
    context.check_hostname = verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    observe_handshakes(context)
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


# ---------------------------------------------------------------- the handshake as it happened


@dataclass(slots=True)
class PeerHandshake:
    """The server's side of a probe's last TLS handshake, recorded as it arrived.

    Python's ssl module shows the peer certificate only after a handshake that
    succeeded; this record also holds it when verification failed, which is when
    the user most needs to know what the server presented.
    """

    version: str | None = None
    cipher: str | None = None
    certificates: list[bytes] = field(default_factory=list)  # DER, the server's first

    def clear(self) -> None:
        self.version, self.cipher, self.certificates = None, None, []

    def facts(self) -> dict[str, str | None] | None:
        """The TLS facts of this handshake (the shape `tls_facts` gives), or None."""
        if not self.certificates:
            return None
        cert = _leaf(self.certificates)
        return {
            "version": self.version,
            "cipher": self.cipher,
            "peer_cert_not_after": cert.not_valid_after_utc.isoformat() if cert else None,
            "peer_cert_subject": cert.subject.rfc4514_string() if cert else None,
        }

    def describe(self) -> str:
        """The server certificate in a few words, for a verification failure's message."""
        cert = _leaf(self.certificates)
        if cert is None:
            return ""
        return (f"the server presented {cert.subject.rfc4514_string() or 'a certificate'}, "
                f"issued by {cert.issuer.rfc4514_string() or '?'}, "
                f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")


_handshake: ContextVar[PeerHandshake | None] = ContextVar("probe_tls_handshake", default=None)


@contextmanager
def recording_handshakes(record: PeerHandshake) -> Iterator[None]:
    """Record the TLS handshakes made in this context (tasks started here included)."""
    token = _handshake.set(record)
    try:
        yield
    finally:
        _handshake.reset(token)


def observe_handshakes(context: ssl.SSLContext) -> None:
    """Have `context` report each handshake to the probe it runs for.

    `_msg_callback` is CPython's (private, present since 3.8) hook into OpenSSL's
    message callback: it sees the server's handshake messages in the clear,
    TLS 1.3 ones included, before verification can fail.
    """
    if getattr(context, "_msg_callback", None) is None:
        context._msg_callback = _on_message  # type: ignore[attr-defined]


_SERVER_HELLO = 2
_CERTIFICATE = 11


def _on_message(
    conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any, data: bytes
) -> None:
    record = _handshake.get()
    if record is None or direction != "read" or content_type != ssl._TLSContentType.HANDSHAKE:  # type: ignore[attr-defined]
        return
    try:  # never let a malformed message break the handshake it describes
        if msg_type == _SERVER_HELLO:
            record.clear()  # a new handshake
            record.cipher = _cipher_name(data)
        elif msg_type == _CERTIFICATE:
            record.version = str(version.name).replace("_", ".")
            record.certificates = _certificate_list(data, tls13=version == ssl.TLSVersion.TLSv1_3)
    except Exception:
        pass


def _certificate_list(message: bytes, tls13: bool) -> list[bytes]:
    """The DER certificates of a Certificate handshake message (RFC 5246 7.4.2, RFC 8446 4.4.2)."""
    at = 4  # type (1) and length (3)
    if tls13:
        at += 1 + message[at]  # certificate_request_context
    end = at + 3 + int.from_bytes(message[at:at + 3], "big")
    at += 3
    certificates = []
    while at + 3 <= end:
        length = int.from_bytes(message[at:at + 3], "big")
        certificates.append(message[at + 3:at + 3 + length])
        at += 3 + length
        if tls13:
            at += 2 + int.from_bytes(message[at:at + 2], "big")  # per-certificate extensions
    return certificates


_cipher_names: dict[int, str] = {}


def _cipher_name(server_hello: bytes) -> str | None:
    """The cipher suite a ServerHello chose, by OpenSSL's name (as `SSLObject.cipher()`)."""
    at = 4 + 2 + 32  # header, legacy_version, random
    at += 1 + server_hello[at]  # legacy_session_id
    suite = int.from_bytes(server_hello[at:at + 2], "big")
    if not _cipher_names:
        _cipher_names.update(
            {c["id"] & 0xFFFF: c["name"] for c in ssl.create_default_context().get_ciphers()}
        )
    return _cipher_names.get(suite)


def _leaf(certificates: list[bytes]) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(certificates[0]) if certificates else None
    except ValueError:
        return None
