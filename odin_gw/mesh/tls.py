"""TLS material as a value that changes: certificate, key and CA bundle, versioned.

Material comes from files (reloaded when they change, key and cert together) or from
the Consul agent (leaf and roots). Each version builds its own ``ssl.SSLContext``; a new
version means new connection pools, while requests in flight finish on the old ones.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from ..errors import GatewayError


class TlsMaterialError(GatewayError):
    """Certificate, key or CA could not be read, parsed, or do not belong together."""

    code = "tls_material_error"


@dataclass(frozen=True)
class CertFacts:
    """What an operator wants to know about a certificate, without the key."""

    subject: str
    issuer: str
    serial: str
    spiffe_ids: tuple[str, ...]
    not_before: float
    not_after: float

    def to_dict(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "spiffeId": self.spiffe_ids[0] if self.spiffe_ids else None,
            "uriSans": list(self.spiffe_ids),
            "notBefore": _iso(self.not_before),
            "notAfter": _iso(self.not_after),
            "secondsLeft": round(self.not_after - now, 1),
        }


def cert_facts(pem: str) -> CertFacts:
    """Facts of the first certificate in ``pem``."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise TlsMaterialError(f"not a PEM certificate: {exc}") from exc
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        uris = tuple(san.value.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    return CertFacts(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        spiffe_ids=tuple(u for u in uris if u.startswith("spiffe://")),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class TlsMaterial:
    """A client certificate, its key and the CA bundle that verifies peers.

    ``version`` is a digest of all three: equal material, equal version. ``alpn`` lists
    protocols to offer (Istio's sidecars pick their mTLS chain by ALPN).
    """

    cert_pem: str
    key_pem: str = field(repr=False)
    ca_pem: str
    source: str
    trust_domain: str | None = None
    alpn: tuple[str, ...] = ()
    version: str = ""
    facts: CertFacts | None = None

    def __post_init__(self) -> None:
        digest = hashlib.sha256(
            "\0".join((self.cert_pem, self.key_pem, self.ca_pem)).encode()
        ).hexdigest()[:16]
        object.__setattr__(self, "version", digest)
        object.__setattr__(self, "facts", cert_facts(self.cert_pem))

    @classmethod
    def from_files(cls, cert_file: str, key_file: str, ca_file: str, **kwargs) -> TlsMaterial:
        """Read the three files; raises :class:`TlsMaterialError` naming the bad one."""
        texts = []
        for label, path in (("certFile", cert_file), ("keyFile", key_file), ("caFile", ca_file)):
            try:
                with open(path, encoding="ascii") as fh:
                    texts.append(fh.read())
            except (OSError, UnicodeDecodeError) as exc:
                raise TlsMaterialError(f"{label} {path}: {getattr(exc, 'strerror', exc)}") from exc
        material = cls(texts[0], texts[1], texts[2], source="files", **kwargs)
        material.context()  # proves the key matches the certificate
        return material

    def context(self) -> ssl.SSLContext:
        """A client context: our certificate, peers verified against ``ca_pem``.

        Hostname checks are off because mesh peers are named by SPIFFE ID, which
        :mod:`odin_gw.mesh.identity` checks after the handshake.
        """
        cached = self.__dict__.get("_context")
        if cached is not None:
            return cached
        ctx = _MeshContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.alpn = self.alpn
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cadata=self.ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise TlsMaterialError(f"CA bundle from {self.source} is unusable: {exc}") from exc
        _load_chain(ctx, self.cert_pem, self.key_pem, self.source)
        if self.alpn:
            ctx.set_alpn_protocols(list(self.alpn))
        object.__setattr__(self, "_context", ctx)
        return ctx

    def describe(self) -> dict:
        """Admin view: certificate facts and version; never the key."""
        out = {"source": self.source, "version": self.version, "trustDomain": self.trust_domain}
        if self.facts:
            out.update(self.facts.to_dict())
        return out


class _MeshContext(ssl.SSLContext):
    """A client context that keeps the mesh's ALPN.

    urllib3 sets its own ALPN (``["http/1.1"]``) on the context at every handshake
    (``ssl_wrap_socket``; pinned by ``test_pin_urllib3_sets_its_alpn_at_every_handshake``).
    Istio's sidecars choose their inbound mTLS filter chain by ALPN: a context whose
    material names protocols offers those, whatever urllib3 asks for.
    """

    alpn: tuple[str, ...] = ()

    def set_alpn_protocols(self, alpn_protocols) -> None:
        super().set_alpn_protocols(list(self.alpn) or list(alpn_protocols))


class TlsPairing:
    """Joins a leaf and the CA roots that arrive from two watches into one material.

    Each watch runs in its own thread. Reading the latest pair and publishing it happen
    under one lock, so publishes reach ``publish`` in the order the parts changed: the
    last material published always holds the newest leaf *and* the newest roots. (Built
    and published outside a lock, a leaf thread holding the old roots could publish after
    the roots thread and leave the gateway trusting only a CA that was rotated out.)
    """

    def __init__(self, publish: Callable[[TlsMaterial], None], source: str) -> None:
        self._publish = publish
        self._source = source
        self._lock = threading.Lock()
        self._roots: tuple[str, str] | None = None
        self._leaf: tuple[str, str] | None = None

    def roots(self, trust_domain: str, bundle_pem: str) -> None:
        """New roots: publish with the current leaf, if one has arrived."""
        with self._lock:
            if self._roots != (trust_domain, bundle_pem):
                self._roots = (trust_domain, bundle_pem)
                self._publish_locked()

    def leaf(self, cert_pem: str, key_pem: str) -> None:
        """A new leaf: publish with the current roots, if they have arrived."""
        with self._lock:
            if self._leaf != (cert_pem, key_pem):
                self._leaf = (cert_pem, key_pem)
                self._publish_locked()

    def _publish_locked(self) -> None:
        if self._roots is None or self._leaf is None:
            return
        trust_domain, bundle = self._roots
        cert, key = self._leaf
        material = TlsMaterial(cert, key, bundle, source=self._source, trust_domain=trust_domain)
        self._publish(material)


def _load_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str, source: str) -> None:
    # ssl can only load a key from a path: write both to a private directory, load, and
    # remove them at once so the key does not linger on disk.
    with tempfile.TemporaryDirectory(prefix="odin-tls-") as tmp:
        os.chmod(tmp, 0o700)
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key_pem)
        with open(cert_path, "w") as fh:
            fh.write(cert_pem)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            reason = (
                "the key does not match the certificate"
                if "KEY_VALUES_MISMATCH" in str(exc)
                else str(exc)
            )
            raise TlsMaterialError(f"certificate/key from {source}: {reason}") from exc
