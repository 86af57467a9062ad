"""A real Envoy as an Istio workload's inbound sidecar, PERMISSIVE like Istio's default.

Its listener picks the filter chain as Istio's inbound listener does (a TLS inspector,
then ``filter_chain_match``): TLS offering ALPN ``istio-http/1.1``/``istio-h2``/``istio``
gets the mTLS chain (client certificate from the mesh root required, SPIFFE ID in the
trust domain); plain text gets the plaintext chain; TLS without an Istio ALPN finds no
chain and is closed, which is what a gateway that forgets the ALPN meets in a cluster.
The chosen chain is told to the backend in ``x-envoy-inbound-chain``.
"""

from __future__ import annotations

import copy

from tests.support.envoy import EnvoySidecar

ISTIO_ALPNS = ["istio-http/1.0", "istio-http/1.1", "istio-h2", "istio"]


class EnvoyIstioInbound(EnvoySidecar):
    """``EnvoyIstioInbound("web", cert_pem=..., key_pem=..., ca_pem=..., backend_port=p,
    allowed_client_spiffe_prefix="spiffe://cluster.local/")``."""

    def _bootstrap(self) -> dict:
        doc = super()._bootstrap()
        listener = doc["static_resources"]["listeners"][0]
        mtls = listener["filter_chains"][0]
        mtls["name"] = "virtualInbound-mtls"
        mtls["filter_chain_match"] = {
            "transport_protocol": "tls",
            "application_protocols": ISTIO_ALPNS,
        }
        _tag(mtls, "mtls")
        plain = copy.deepcopy(mtls)
        plain["name"] = "virtualInbound-plaintext"
        plain["filter_chain_match"] = {"transport_protocol": "raw_buffer"}
        del plain["transport_socket"]
        _tag(plain, "plaintext")
        listener["filter_chains"] = [mtls, plain]
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
                },
            }
        ]
        return doc


def _tag(chain: dict, name: str) -> None:
    hcm = chain["filters"][0]["typed_config"]
    route = hcm["route_config"]
    route["request_headers_to_add"] = [
        {
            "header": {"key": "x-envoy-inbound-chain", "value": name},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]
