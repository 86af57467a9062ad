"""TLS material and SPIFFE identity rules, on certificates minted here."""

import threading

import pytest

from odin_gw.mesh.identity import PeerIdentityError, check_identity, peer_uris
from odin_gw.mesh.tls import TlsMaterial, TlsMaterialError, TlsPairing
from tests.doubles.pki import CertificateAuthority, consul_service_uri

CA = CertificateAuthority()
WEB = consul_service_uri(CA.trust_domain, "web")


def test_material_version_and_facts():
    leaf = CA.issue(uri=WEB)
    a = TlsMaterial(leaf.cert_pem, leaf.key_pem, CA.cert_pem, source="test")
    b = TlsMaterial(leaf.cert_pem, leaf.key_pem, CA.cert_pem, source="test")
    assert a.version == b.version
    facts = a.describe()
    assert facts["spiffeId"] == WEB and facts["secondsLeft"] > 0
    # Neither the key's PEM nor any line of its base64 body shows in repr or facts (a
    # search for the word "key" would also match random certificate text).
    key_lines = [ln for ln in leaf.key_pem.splitlines() if ln and not ln.startswith("-----")]
    for text in (repr(a), str(facts)):
        assert "PRIVATE KEY" not in text
        assert not any(ln in text for ln in key_lines)
    a.context()  # builds


def test_mismatched_key_is_refused():
    one, two = CA.issue(uri=WEB), CA.issue(uri=WEB)
    material = TlsMaterial(one.cert_pem, two.key_pem, CA.cert_pem, source="files")
    with pytest.raises(TlsMaterialError, match="key does not match the certificate"):
        material.context()


def test_from_files_names_the_missing_file(tmp_path):
    with pytest.raises(TlsMaterialError, match=r"certFile .*nope\.pem"):
        TlsMaterial.from_files(str(tmp_path / "nope.pem"), "k", "c")


def test_garbage_certificate():
    with pytest.raises(TlsMaterialError, match="not a PEM certificate"):
        TlsMaterial("garbage", "k", "c", source="x")


def test_identity_rules():
    check_identity((WEB,), WEB, None)
    check_identity((WEB,), None, CA.trust_domain)
    check_identity((), None, None)  # CA check only
    with pytest.raises(PeerIdentityError, match=r"expected .*svc/web, peer presented .*svc/db"):
        check_identity((consul_service_uri(CA.trust_domain, "db"),), WEB, None)
    with pytest.raises(PeerIdentityError, match="no SPIFFE ID"):
        check_identity((), WEB, None)
    with pytest.raises(PeerIdentityError):
        check_identity(("spiffe://other.example/ns/default/sa/web",), None, CA.trust_domain)


def test_peer_uris_from_getpeercert_shape():
    cert = {"subjectAltName": (("DNS", "x"), ("URI", WEB))}
    assert peer_uris(cert) == (WEB,)
    assert peer_uris(None) == ()


def test_pairing_publishes_the_newest_leaf_and_roots_last():
    """The leaf watch publishes (old roots, new leaf) while the roots watch brings new
    roots: whatever the threads do, the last material published holds both new parts."""
    old_ca, new_ca = CA, CertificateAuthority(trust_domain=CA.trust_domain)
    old_leaf = old_ca.issue(uri=WEB)
    new_leaf = new_ca.issue(uri=WEB)
    published: list[TlsMaterial] = []
    roots_thread: list[threading.Thread] = []

    def publish(material: TlsMaterial) -> None:
        if material.cert_pem == new_leaf.cert_pem and material.ca_pem == old_ca.cert_pem:
            # The roots watch answers while this publish is under way.
            t = threading.Thread(target=pair.roots, args=(CA.trust_domain, new_ca.cert_pem))
            roots_thread.append(t)
            t.start()
            t.join(0.3)  # without the lock, the roots thread publishes first
        published.append(material)

    pair = TlsPairing(publish, source="test")
    pair.leaf(old_leaf.cert_pem, old_leaf.key_pem)
    assert published == []  # no roots yet: nothing to publish
    pair.roots(CA.trust_domain, old_ca.cert_pem)
    pair.roots(CA.trust_domain, old_ca.cert_pem)  # unchanged: not published again
    assert len(published) == 1
    pair.leaf(new_leaf.cert_pem, new_leaf.key_pem)
    roots_thread[0].join(5)
    last = published[-1]
    assert (last.cert_pem, last.ca_pem) == (new_leaf.cert_pem, new_ca.cert_pem)
    assert last.trust_domain == CA.trust_domain and last.source == "test"


def test_identity_alternatives_accept_any_listed_one():
    a, b = (f"spiffe://{CA.trust_domain}/ns/shop/sa/{n}" for n in ("a", "b"))
    check_identity((b,), None, CA.trust_domain, (a, b))
    with pytest.raises(PeerIdentityError, match=f"expected {a}, peer presented"):
        check_identity((WEB,), None, CA.trust_domain, (a,))
    with pytest.raises(PeerIdentityError, match=r"expected one of .*/sa/a, .*/sa/b"):
        check_identity((WEB,), None, None, (a, b))
    with pytest.raises(PeerIdentityError):  # the exact identity wins over the alternatives
        check_identity((b,), a, None, (a, b))


def test_peer_uris_of_a_certificate_without_sans():
    assert peer_uris({"subject": ()}) == ()
    assert peer_uris(None) == ()
    assert peer_uris({"subjectAltName": (("DNS", "a"), ("URI", WEB))}) == (WEB,)
    err = PeerIdentityError(WEB, ())
    assert str(err).endswith(f"expected {WEB}, peer presented no SPIFFE ID")
    two = PeerIdentityError(WEB, ("spiffe://a/x", "spiffe://a/y"))
    assert "peer presented spiffe://a/x, spiffe://a/y" in str(two)
