"""Certificates minted at test time, shaped like Consul Connect's built-in CA.

Everything here is generated in memory with ``cryptography`` (EC P-256 keys, which are
fast to create): a self-signed root whose SAN is the SPIFFE trust domain
(``spiffe://<uuid>.consul``), optional intermediates, and leaf certificates for
services (URI SAN ``spiffe://<td>/ns/default/dc/<dc>/svc/<name>``) or plain TLS
servers (DNS / IP SANs).  Leaves carry both the serverAuth and clientAuth EKUs so the
same certificate works on either end of an mTLS connection.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "CertificateAuthority",
    "IssuedCert",
    "consul_service_uri",
    "hex_colon",
    "serial_to_hex",
]

DEFAULT_TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"

#: Leaves are back-dated by this much, as Consul does, to tolerate clock skew.
LEAF_BACKDATE = timedelta(minutes=1)


def hex_colon(data: bytes) -> str:
    """Lower-case, colon separated hex of ``data`` (Consul's ``connect.HexString``)."""
    return ":".join(f"{b:02x}" for b in data)


def serial_to_hex(serial: int) -> str:
    """Format a certificate serial the way Consul reports ``SerialNumber`` on leaves."""
    length = max(1, (serial.bit_length() + 7) // 8)
    return hex_colon(serial.to_bytes(length, "big"))


def consul_service_uri(
    trust_domain: str, service: str, dc: str = "dc1", ns: str = "default"
) -> str:
    """SPIFFE ID Consul puts in a service leaf: ``spiffe://<td>/ns/<ns>/dc/<dc>/svc/<svc>``."""
    return f"spiffe://{trust_domain}/ns/{ns}/dc/{dc}/svc/{service}"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _serial() -> int:
    # Positive and < 2**63 so it also fits Consul's uint64 CARoot.SerialNumber field.
    return secrets.randbits(63) | 1


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate and its private key.

    ``cert_pem`` is the leaf alone; ``chain_pem`` is the leaf followed by any
    intermediate certificates (what a TLS endpoint should present).  ``key_pem`` is
    PKCS#8; ``ec_key_pem`` is the same key in SEC1 ("EC PRIVATE KEY") form, which is
    what Consul's built-in CA hands out.
    """

    cert_pem: str
    key_pem: str
    serial: int
    serial_hex: str
    not_before: datetime
    not_after: datetime
    uri: str | None
    chain_pem: str
    ec_key_pem: str

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf as a ``cryptography`` certificate object."""
        return x509.load_pem_x509_certificate(self.cert_pem.encode("ascii"))

    def write(
        self, directory: str | Path, cert_name: str = "cert.pem", key_name: str = "key.pem"
    ) -> tuple[Path, Path]:
        """Write the chain (leaf + intermediates) and the PKCS#8 key; return both paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / cert_name
        key_path = directory / key_name
        cert_path.write_text(self.chain_pem)
        key_path.write_text(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path


class CertificateAuthority:
    """A root (or intermediate) CA with an EC P-256 key.

    The certificate is CA:true and carries the URI SAN ``spiffe://<trust_domain>``
    like the roots of Consul's built-in CA provider.  ``id`` is the colon separated
    SHA-1 fingerprint of the DER certificate, which is how Consul names its roots.
    """

    def __init__(
        self,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        common_name: str | None = None,
        *,
        ttl: timedelta = timedelta(days=3650),
        _parent: CertificateAuthority | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self._key = _new_key()
        self._parent = _parent
        if common_name is None:
            kind = "int" if _parent else "pri"
            common_name = f"{kind}-{secrets.token_hex(4)}.consul.ca.{trust_domain[:8]}.consul"
        self.common_name = common_name
        now = _now()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        issuer_key = _parent._key if _parent else self._key
        issuer_name = _parent.certificate.subject if _parent else subject
        public_key = self._key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
        )
        self.certificate: x509.Certificate = builder.sign(issuer_key, hashes.SHA256())
        self.cert_pem: str = _pem(self.certificate)
        self.key_pem: str = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        self.id: str = hex_colon(hashlib.sha1(der).digest())
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        self.signing_key_id: str = hex_colon(ski.value.digest)

    # -- properties -------------------------------------------------------------------
    @property
    def serial(self) -> int:
        """Serial number of the CA certificate."""
        return self.certificate.serial_number

    @property
    def not_before(self) -> datetime:
        """Start of validity (aware UTC)."""
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        """End of validity (aware UTC)."""
        return self.certificate.not_valid_after_utc

    @property
    def is_root(self) -> bool:
        """True for a self-signed root."""
        return self._parent is None

    @property
    def root(self) -> CertificateAuthority:
        """The self-signed root at the top of this CA's chain."""
        return self if self._parent is None else self._parent.root

    @property
    def root_pem(self) -> str:
        """PEM of the trust anchor (the root certificate)."""
        return self.root.cert_pem

    @property
    def chain_pem(self) -> str:
        """This CA's certificate followed by its parents', excluding the root.

        For a root CA this is just ``cert_pem``.
        """
        if self._parent is None:
            return self.cert_pem
        return self.cert_pem + self._parent._intermediates_pem()

    def _intermediates_pem(self) -> str:
        if self._parent is None:
            return ""
        return self.cert_pem + self._parent._intermediates_pem()

    @property
    def intermediate_pems(self) -> list[str]:
        """Intermediate certificates between a leaf issued here and the root."""
        out: list[str] = []
        node: CertificateAuthority | None = self
        while node is not None and node._parent is not None:
            out.append(node.cert_pem)
            node = node._parent
        return out

    # -- operations -------------------------------------------------------------------
    def intermediate(
        self, common_name: str | None = None, *, ttl: timedelta = timedelta(days=365)
    ) -> CertificateAuthority:
        """Return a new CA whose certificate is signed by this one (same trust domain)."""
        return CertificateAuthority(self.trust_domain, common_name, ttl=ttl, _parent=self)

    def issue(
        self,
        *,
        uri: str | None = None,
        dns_names: Iterable[str] = (),
        ips: Iterable[str] = ("127.0.0.1",),
        ttl: timedelta = timedelta(hours=72),
        not_before: datetime | None = None,
        common_name: str | None = None,
    ) -> IssuedCert:
        """Issue a leaf (serverAuth + clientAuth) signed by this CA.

        ``not_before`` defaults to one minute ago (Consul back-dates leaves the same
        way); ``not_after`` is ``(not_before if given else now) + ttl``, so an explicit
        past ``not_before`` with a short ``ttl`` yields an expired certificate.
        """
        now = _now()
        if not_before is None:
            start, end = now - LEAF_BACKDATE, now + ttl
        else:
            if not_before.tzinfo is None:
                not_before = not_before.replace(tzinfo=UTC)
            start = not_before.astimezone(UTC).replace(microsecond=0)
            end = start + ttl
        dns_names = list(dns_names)
        sans: list[x509.GeneralName] = []
        if uri:
            sans.append(x509.UniformResourceIdentifier(uri))
        sans.extend(x509.DNSName(name) for name in dns_names)
        sans.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)
        if common_name is None:
            if uri:
                common_name = uri.rstrip("/").rsplit("/", 1)[-1]
            elif dns_names:
                common_name = dns_names[0]
            else:
                common_name = "leaf"
        key = _new_key()
        serial = _serial()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=True,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_pem = _pem(cert)
        return IssuedCert(
            cert_pem=cert_pem,
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode("ascii"),
            serial=serial,
            serial_hex=serial_to_hex(serial),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            uri=uri,
            chain_pem=cert_pem + "".join(self.intermediate_pems),
            ec_key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ).decode("ascii"),
        )

    def write_ca(self, path: str | Path) -> Path:
        """Write the trust anchor (root certificate PEM) to ``path`` and return it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.root_pem)
        return path

    def __repr__(self) -> str:
        return f"CertificateAuthority(trust_domain={self.trust_domain!r}, id={self.id!r})"
