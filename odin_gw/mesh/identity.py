"""Workload identity: SPIFFE IDs in certificates, checked after the TLS handshake.

Mesh certificates carry a URI SAN (``spiffe://<trust-domain>/...``), not a DNS name, so the
chain is verified against the mesh CA with hostname checks off and the identity is
checked here instead. Verification itself is never turned off.
"""

from __future__ import annotations

from urllib3.connection import HTTPSConnection
from urllib3.exceptions import SSLError


class PeerIdentityError(SSLError):
    """The peer's certificate chains to the mesh CA but names another workload."""

    def __init__(self, expected: str, presented: tuple[str, ...]) -> None:
        # ``expected`` is one ID, "one of ...", or "an identity in spiffe://<td>/".
        shown = ", ".join(presented) if presented else "no SPIFFE ID"
        super().__init__(f"peer identity mismatch: expected {expected}, peer presented {shown}")
        self.expected = expected
        self.presented = presented


def peer_uris(peercert: dict | None) -> tuple[str, ...]:
    """The URI SANs of a certificate as returned by ``SSLSocket.getpeercert()``."""
    if not peercert:
        return ()
    return tuple(v for k, v in peercert.get("subjectAltName", ()) if k == "URI")


def check_identity(
    presented: tuple[str, ...],
    expected: str | None,
    trust_domain: str | None,
    alternatives: tuple[str, ...] = (),
) -> None:
    """Raise :class:`PeerIdentityError` unless ``presented`` satisfies the expectation.

    ``expected`` (a full SPIFFE ID) must appear exactly; else one of ``alternatives``
    must (Envoy's SAN matchers: any one matching accepts the peer); without either, any
    ID in ``trust_domain`` is accepted; with none, the CA check alone decides.
    """
    if expected:
        if expected not in presented:
            raise PeerIdentityError(expected, presented)
        return
    if alternatives:
        if not any(uri in alternatives for uri in presented):
            shown = (
                alternatives[0] if len(alternatives) == 1 else "one of " + ", ".join(alternatives)
            )
            raise PeerIdentityError(shown, presented)
        return
    if trust_domain:
        prefix = f"spiffe://{trust_domain}/"
        if not any(uri.startswith(prefix) for uri in presented):
            raise PeerIdentityError(f"an identity in {prefix}", presented)


class IdentityCheckingHTTPSConnection(HTTPSConnection):
    """An urllib3 HTTPS connection that checks the peer's SPIFFE ID once connected."""

    def __init__(
        self,
        *args,
        expected_identity: str | None = None,
        trust_domain: str | None = None,
        expected_identities: tuple[str, ...] = (),
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.expected_identity = expected_identity
        self.expected_identities = expected_identities
        self.trust_domain = trust_domain

    def connect(self) -> None:
        super().connect()
        if self.expected_identity or self.expected_identities or self.trust_domain:
            try:
                check_identity(
                    peer_uris(self.sock.getpeercert()),
                    self.expected_identity,
                    self.trust_domain,
                    self.expected_identities,
                )
            except PeerIdentityError:
                self.close()
                raise
