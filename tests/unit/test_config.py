import glob
import os

import pytest
import yaml

from odin_gw.config import ConfigError, format_duration, load_config, parse_config, parse_duration

SPEC = sorted(
    glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "spec", "*.yaml"))
)
ENV = {"CONSUL_HTTP_TOKEN": "tok-1", "CONSUL_TOKEN": "tok-2"}


def _asks_policy_check(path: str) -> bool:
    with open(path) as fh:
        tree = yaml.safe_load(fh)
    return bool(tree.get("serviceMesh", {}).get("istio", {}).get("enablePolicyCheck"))


@pytest.mark.parametrize("path", SPEC, ids=os.path.basename)
def test_every_spec_example_loads(path, tmp_path):
    if not _asks_policy_check(path):
        cfg = load_config(path, env=ENV)
        assert cfg.raw  # loaded, not defaulted to nothing
        return
    # Mixer's policy check became an ext_authz authorizer that the spec cannot name: the
    # example as written is refused with the key to add, and loads once it is added.
    with pytest.raises(ConfigError, match=r"enablePolicyCheck needs authzAddr"):
        load_config(path, env=ENV)
    with open(path) as fh:
        tree = yaml.safe_load(fh)
    tree["serviceMesh"]["istio"]["authzAddr"] = "http://127.0.0.1:9191"
    patched = tmp_path / os.path.basename(path)
    patched.write_text(yaml.safe_dump(tree))
    cfg = load_config(str(patched), env=ENV)
    assert cfg.service_mesh.istio.authz_addr == "http://127.0.0.1:9191"


def test_spec_examples_asking_policy_checks():
    assert [os.path.basename(p) for p in SPEC if _asks_policy_check(p)] == [
        "example1-istio-mtls.yaml",
        "istio.yaml",
    ]


def test_spec_examples_were_all_found():
    assert len(SPEC) == 15


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("1m30s", 90),
        ("2h", 7200),
        (5, 5.0),
        ("2.5", 2.5),
        ("1h1m1s", 3661),
        (0.25, 0.25),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["5x", "", "ms", "-1s", -3, True, "1m 30s", None])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration_round_trips():
    for s in (0.5, 30, 90, 7200, 3661):
        assert parse_duration(format_duration(s)) == pytest.approx(s)


def problems(text, env=None):
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=env or {})
    return info.value.problems


def test_unknown_key_named_by_dotted_path():
    assert "serviceMesh.istio.pilotAdr: unknown field" in problems(
        "serviceMesh:\n  istio:\n    pilotAdr: x\n"
    )


def test_all_problems_reported_at_once():
    found = problems(
        "server: {timeout: 5x, port: 70000}\n"
        "admin: {token: '${NOPE}'}\n"
        "services:\n - {name: a, basePath: /a, targets: ['ftp://x']}\n"
    )
    assert "admin.token: environment variable NOPE is not set" in found
    assert any(p.startswith("server.timeout: not a duration") for p in found)
    assert any(p.startswith("server.port:") for p in found)
    assert any(p.startswith("services[0].targets[0]: invalid URL 'ftp://x'") for p in found)


def test_env_expansion_with_default_and_without():
    cfg = parse_config(
        "admin: {token: '${TOK}'}\nserviceMesh:\n  consul:\n    token: '${CT:-fallback}'\n",
        env={"TOK": "s3cret"},
    )
    assert cfg.admin.token == "s3cret"
    assert cfg.service_mesh.consul.token == "fallback"


def test_env_value_cannot_inject_yaml():
    cfg = parse_config("admin: {token: '${TOK}'}\n", env={"TOK": "a\nserver: {port: 1}"})
    assert cfg.admin.token == "a\nserver: {port: 1}"
    assert cfg.server.port == 8080


@pytest.mark.parametrize(
    ("services", "expected"),
    [
        (
            "- {name: a, basePath: /a, targets: ['http://h:1']}\n"
            "- {name: a, basePath: /b, targets: ['http://h:1']}",
            "services[1].name: duplicate of services[0]",
        ),
        (
            "- {name: a, basePath: /a/, targets: ['http://h:1']}\n"
            "- {name: b, basePath: /a, targets: ['http://h:1']}",
            "services[1].basePath: duplicate of services[0]",
        ),
        (
            "- {name: a, basePath: /admin/x, targets: ['http://h:1']}",
            "services[0].basePath: /admin/x is under the reserved path /admin",
        ),
        (
            "- {name: a, basePath: /metrics, targets: ['http://h:1']}",
            "services[0].basePath: /metrics is under the reserved path /metrics",
        ),
        (
            "- {name: a, basePath: /ready, targets: ['http://h:1']}",
            "services[0].basePath: /ready is under the reserved path /ready",
        ),
        (
            "- {name: a, basePath: api, targets: ['http://h:1']}",
            "services[0].basePath: must start with /",
        ),
        (
            "- {name: a, basePath: /a}",
            "services[0].targets: at least one target is needed when serviceMesh is off",
        ),
        (
            "- {name: a, basePath: /a, targets: ['http://h:1/path']}",
            "services[0].targets[0]: invalid URL 'http://h:1/path': a target is "
            "scheme://host[:port] only",
        ),
        (
            "- {name: a, basePath: /a, targets: ['http://h:notaport']}",
            "services[0].targets[0]: invalid URL 'http://h:notaport': Port could not be cast to "
            "integer value as 'notaport'",
        ),
        (
            "- {name: a, basePath: /a, targets: ['http://h:1'], loadBalancing: fastest}",
            "services[0].loadBalancing: Must be one of: round-robin, random, weighted, "
            "least-request.",
        ),
    ],
)
def test_service_rules(services, expected):
    assert expected in problems("services:\n" + services + "\n")


def test_service_defaults_and_timeout_inheritance():
    cfg = parse_config(
        "server: {timeout: 7s}\nservices:\n - {name: a, basePath: /a/, targets: ['http://h']}\n"
    )
    svc = cfg.services[0]
    assert svc.base_path == "/a"
    assert svc.load_balancing == "round-robin"
    assert svc.retries == 1
    assert svc.strip_base_path is False
    assert svc.targets[0].port == 80
    assert svc.timeout is None and cfg.server.timeout == 7


def test_weighted_targets():
    cfg = parse_config(
        "services:\n - name: a\n   basePath: /a\n   loadBalancing: weighted\n   targets:\n"
        "   - {url: 'http://h:1', weight: 3}\n   - http://h:2\n"
    )
    assert [t.weight for t in cfg.services[0].targets] == [3, 1]


def test_yaml_syntax_error_names_line():
    found = problems("services:\n  - {name: a\n")
    assert found[0].startswith("<yaml>: line")


def test_not_a_mapping():
    assert problems("- a\n- b\n") == ["<root>: must be a mapping of sections"]


def test_mtls_without_files_is_refused():
    found = problems("serviceMesh: {enabled: true, type: consul, mtlsEnabled: true}\n")
    assert any("mtlsEnabled needs certFile, keyFile, caFile" in p for p in found)


def test_mtls_with_connect_needs_no_files():
    cfg = parse_config(
        "serviceMesh: {enabled: true, type: consul, mtlsEnabled: true, "
        "consul: {enableConnect: true}}\n"
    )
    assert cfg.service_mesh.consul.enable_connect


def test_obsolete_keys_load_with_notice():
    cfg = parse_config(
        "serviceMesh:\n  istio: {mixerAddr: 'm:15004'}\n  linkerd: {controlPlaneAddr: 'c:8085'}\n"
    )
    assert any("Mixer was removed in Istio 1.8" in n for n in cfg.notices)
    assert any("controller API was removed" in n for n in cfg.notices)


def test_redaction_hides_secrets():
    cfg = parse_config(
        "admin: {token: adm}\nserviceMesh:\n  consul: {token: ctok}\nservices:\n"
        " - {name: a, basePath: /a, targets: ['http://h'], headers: {Authorization: 'Basic x'}}\n"
    )
    text = repr(cfg.redacted())
    assert "adm" not in text.replace("admin", "")
    assert "ctok" not in text
    assert "Basic x" not in text


def test_consul_datacenters_local_first():
    cfg = parse_config("serviceMesh:\n  consul: {datacenters: [dc1, dc2]}\n")
    assert cfg.service_mesh.consul.datacenter == "dc1"
    found = problems("serviceMesh:\n  consul: {datacenter: dc2, datacenters: [dc1, dc2]}\n")
    assert any("first entry of datacenters" in p for p in found)


def test_missing_file():
    with pytest.raises(ConfigError) as info:
        load_config("/nonexistent/odin.yaml")
    assert "cannot read /nonexistent/odin.yaml" in str(info.value)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "headers: {'X-Ä': v}",
            "services[0].headers: 'X-Ä' is not a valid header name",
        ),
        (
            "headers: {'X-\u0661': v}",  # an Arabic-Indic digit: str.isalnum() says yes
            "services[0].headers: 'X-\u0661' is not a valid header name",
        ),
        (
            "headers: {X-Price: '10 €'}",
            "services[0].headers: value of X-Price contains '€': header values are sent as Latin-1",
        ),
        (
            'headers: {X-Ctl: "a\\x01b"}',
            "services[0].headers: value of X-Ctl contains '\\x01'",
        ),
        (
            'headers: {X-Nl: "a\\nb"}',
            "services[0].headers: value of X-Nl contains CR, LF or NUL",
        ),
        (
            "meshService: 'users/../admin'",
            "services[0].meshService: must start with a letter or digit",
        ),
        (
            "meshService: '-users'",
            "services[0].meshService: must start with a letter or digit",
        ),
        (
            'meshService: "users\\n"',  # "$" in a regexp would let a trailing newline in
            "services[0].meshService: must start with a letter or digit",
        ),
    ],
)
def test_service_header_and_mesh_service_rules(entry, expected):
    text = f"services:\n - {{name: a, basePath: /a, targets: ['http://h:1'], {entry}}}\n"
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_latin1_header_value_and_mesh_service_load():
    cfg = parse_config(
        "services:\n - {name: a, basePath: /a, targets: ['http://h:1'], meshService: users.v2,"
        " headers: {X-Name: 'café', X-Tab: \"a\\tb\"}}\n",
        env={},
    )
    assert cfg.services[0].headers == (("X-Name", "café"), ("X-Tab", "a\tb"))
    assert cfg.services[0].mesh_service == "users.v2"


def test_name_with_trailing_newline_refused():
    found = problems("services:\n - {name: \"a\\n\", basePath: /a, targets: ['http://h:1']}\n")
    assert any(p.startswith("services[0].name: must start with a letter or digit") for p in found)


@pytest.mark.parametrize(
    ("monitoring", "base", "expected"),
    [
        ("/met/rics", "/", "monitoring.path: /met/rics is under services[0].basePath /"),
        ("/met/rics", "/met", "monitoring.path: /met/rics is under services[0].basePath /met"),
        (
            "/api/metrics",
            "/api",
            "monitoring.path: /api/metrics is under services[0].basePath /api",
        ),
        ("/api", "/api/", "monitoring.path: /api is under services[0].basePath /api"),
    ],
)
def test_monitoring_path_under_a_service_refused(monitoring, base, expected):
    found = problems(
        f"monitoring: {{enabled: true, path: {monitoring}}}\n"
        f"services:\n - {{name: a, basePath: {base}, targets: ['http://h:1']}}\n"
    )
    assert any(p.startswith(expected) for p in found), found


def test_monitoring_path_beside_a_service_loads():
    for base in ("/metrics2", "/me", "/api/metricsx"):
        parse_config(
            "monitoring: {enabled: true, path: /api/metrics}\n"
            f"services:\n - {{name: a, basePath: {base}, targets: ['http://h:1']}}\n",
            env={},
        )
    # Not served when disabled: a service may own the path (a root service, typically).
    parse_config(
        "monitoring: {enabled: false}\nservices:\n - {name: a, basePath: /, targets: ['http://h:1']}\n",
        env={},
    )


@pytest.mark.parametrize("base", ["/api%2Fv1", "/api%2fv1", "/a/b%2F"])
def test_encoded_slash_in_base_path_refused(base):
    found = problems(f"services:\n - {{name: a, basePath: '{base}', targets: ['http://h:1']}}\n")
    assert (
        "services[0].basePath: must not contain %2F (an encoded slash): write the segments with /"
        in found
    )


def test_other_percent_in_base_path_still_refused():
    found = problems("services:\n - {name: a, basePath: '/api%41', targets: ['http://h:1']}\n")
    assert "services[0].basePath: must be a plain path (no ?, #, %, * or spaces)" in found


def test_monitoring_path_with_trailing_newline_refused():
    found = problems('monitoring: {path: "/metrics\\n"}\n')
    assert any(p.startswith("monitoring.path:") for p in found)


def test_trusted_proxies_parsed():
    cfg = parse_config("server: {trustedProxies: [10.0.0.0/8, '::1', 192.168.1.7]}\n", env={})
    assert [str(n) for n in cfg.server.trusted_proxies] == [
        "10.0.0.0/8",
        "::1/128",
        "192.168.1.7/32",
    ]
    found = problems("server: {trustedProxies: [nonsense]}\n")
    assert "server.trustedProxies[0]: not a CIDR or address: 'nonsense'" in found


def test_consul_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("secret\n")
    cfg = parse_config(f"serviceMesh:\n  consul: {{tokenFile: '{path}'}}\n")
    assert cfg.service_mesh.consul.token_file == str(path)
    assert cfg.service_mesh.consul.token is None
    both = problems(f"serviceMesh:\n  consul: {{token: t, tokenFile: '{path}'}}\n")
    assert any("not both" in p for p in both), both
    missing = problems(f"serviceMesh:\n  consul: {{tokenFile: '{tmp_path / 'nope'}'}}\n")
    assert any(p.startswith("serviceMesh.consul.tokenFile: cannot read") for p in missing)
    fwd = problems(f"serviceMesh:\n  consul: {{tokenFile: '{path}', forwardToken: true}}\n")
    assert any("forwardToken" in p for p in fwd), fwd


def test_consul_sub_second_blocking_wait():
    cfg = parse_config("serviceMesh:\n  consul: {blockingWait: 500ms}\n")
    assert cfg.service_mesh.consul.blocking_wait == 0.5


# -- consul.connectMode / services[].upstream / services[].port ----------------------
SIDECAR_MESH = "serviceMesh: {enabled: true, type: consul, consul: {connectMode: sidecar%s}}\n"


def sidecar_config(services: str, consul_extra: str = ""):
    return parse_config(SIDECAR_MESH % consul_extra + "services:\n" + services, env={})


def test_connect_mode_defaults_to_native_and_refuses_others():
    cfg = parse_config("serviceMesh: {enabled: true, type: consul}\n", env={})
    assert cfg.service_mesh.consul.connect_mode == "native"
    assert not cfg.service_mesh.consul.sidecar
    found = problems("serviceMesh: {enabled: true, type: consul, consul: {connectMode: agent}}\n")
    assert "serviceMesh.consul.connectMode: Must be one of: native, sidecar." in found


def test_sidecar_routes_go_to_the_upstream_or_the_virtual_name():
    from odin_gw.routing import RouteTable

    cfg = sidecar_config(
        " - {name: a, basePath: /a, upstream: '127.0.0.1:21000'}\n"
        " - {name: b, basePath: /b, meshService: bee, port: 8080}\n"
        " - {name: c, basePath: /c, targets: ['http://h:9090']}\n"
        " - {name: d, basePath: /d}\n"
        " - {name: e, basePath: /e, upstream: 'localhost:21001'}\n"
        " - {name: f, basePath: /f, upstream: '[::1]:21002'}\n"
    )
    got = {r.name: r.sidecar.key for r in RouteTable.from_config(cfg) if r.name != "f"}
    assert got == {
        "a": "http://127.0.0.1:21000",
        "b": "http://bee.virtual.consul:8080",
        "c": "http://c.virtual.consul:9090",
        "d": "http://d.virtual.consul:80",
        "e": "http://127.0.0.1:21001",
    }
    hosts = {r.name: r.sidecar.host_header for r in RouteTable.from_config(cfg)}
    assert hosts["d"] == "d.virtual.consul" and hosts["f"] == "[::1]:21002"
    ns = sidecar_config(" - {name: d, basePath: /d}\n", ", namespace: team-a")
    (route,) = RouteTable.from_config(ns)
    assert route.sidecar.address == "d.virtual.team-a.ns.consul"


def test_native_routes_have_no_sidecar():
    from odin_gw.routing import RouteTable

    cfg = parse_config(
        "serviceMesh: {enabled: true, type: consul}\nservices:\n - {name: a, basePath: /a}\n",
        env={},
    )
    assert [r.sidecar for r in RouteTable.from_config(cfg)] == [None]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ("'10.0.0.5:21000'", "'10.0.0.5:21000' is not a loopback address"),
        ("'0.0.0.0:21000'", "'0.0.0.0:21000' is not a loopback address"),
        ("'web:21000'", "the host must be a loopback IP address"),
        ("'127.0.0.1'", "'127.0.0.1' must be host:port with a port 1-65535"),
        ("'127.0.0.1:0'", "must be host:port with a port 1-65535"),
        ("'127.0.0.1:70000'", "must be host:port with a port 1-65535"),
        ("'::1:80'", "write an IPv6 address in brackets"),
        ("21000", "must be host:port such as 127.0.0.1:21000"),
    ],
)
def test_upstream_must_be_a_loopback_host_port(upstream, expected):
    found = problems(
        SIDECAR_MESH % "" + f"services:\n - {{name: a, basePath: /a, upstream: {upstream}}}\n"
    )
    assert any(p.startswith("services[0].upstream: ") and expected in p for p in found), found


@pytest.mark.parametrize(
    ("mesh", "why"),
    [
        ("{enabled: true, type: consul}", "here connectMode is native"),
        ("{enabled: true, type: consul, consul: {connectMode: native}}", "connectMode is native"),
        ("{}", "here serviceMesh is none"),
    ],
)
def test_upstream_and_port_only_with_sidecar_mode(mesh, why):
    found = problems(
        f"serviceMesh: {mesh}\nservices:\n"
        " - {name: a, basePath: /a, targets: ['http://h'], upstream: '127.0.0.1:1', port: 8}\n"
    )
    for key in ("upstream", "port"):
        line = f"services[0].{key}: only used with serviceMesh.consul.connectMode: sidecar"
        assert any(p.startswith(line) and why in p for p in found), found


def test_istio_takes_port_but_not_upstream_and_identity_only_in_direct_mode():
    service = " - {name: a, basePath: /a, upstream: '127.0.0.1:1', port: 8, identity: sa-a}\n"
    found = problems("serviceMesh: {enabled: true, type: istio}\nservices:\n" + service)
    assert not any(p.startswith("services[0].port") for p in found), found
    assert any(p.startswith("services[0].upstream: only used with") for p in found), found
    assert any(
        p.startswith(
            "services[0].identity: only used with serviceMesh.type: istio with injectSidecar: false"
        )
        and "injectSidecar is true" in p
        for p in found
    ), found
    direct = (
        "serviceMesh: {enabled: true, type: istio, istio: {injectSidecar: false},\n"
        "  certFile: c.pem, keyFile: k.pem, caFile: r.pem}\n"
        "services:\n - {name: a, basePath: /a, port: 8, identity: sa-a}\n"
    )
    assert dict(parse_config(direct, env={}).services[0].__dict__)["identity"] == "sa-a"


@pytest.mark.parametrize(
    ("istio", "expected"),
    [
        ("{enablePolicyCheck: true}", "istio.enablePolicyCheck: enablePolicyCheck needs authzAddr"),
        ("{authzAddr: 'tcp://x:1'}", "istio.authzAddr: 'tcp://x:1' must be http://host:port"),
        ("{authzAddr: 'http://x:1/?a=1'}", "may not have a query or fragment"),
        ("{pilotAddr: istiod}", "istio.pilotAddr: 'istiod' must be host:port"),
        ("{pilotAddr: 'istiod:99999'}", "must be host:port"),
        ("{pilotTls: maybe}", "istio.pilotTls: Must be one of: auto, true, false"),
        ("{samplingRate: 1.5}", "istio.samplingRate: Must be greater than or equal to 0.0"),
        ("{authzTimeout: 0s}", "istio.authzTimeout: must be greater than zero"),
    ],
)
def test_istio_keys_are_checked(istio, expected):
    found = problems(f"serviceMesh: {{enabled: true, type: istio, istio: {istio}}}\n")
    assert any(expected in p for p in found), found


def test_istio_direct_mode_needs_the_workload_certificate_files():
    found = problems("serviceMesh: {enabled: true, type: istio, istio: {injectSidecar: false}}\n")
    assert any(
        p.startswith(
            "serviceMesh.istio: istio.injectSidecar: false needs certFile, keyFile, caFile"
        )
        for p in found
    ), found


def test_istio_defaults():
    cfg = parse_config(
        "serviceMesh: {enabled: true, type: istio, istio: {pilotAddr: 'unix:///etc/istio/proxy/XDS'}}\n"
    )
    istio = cfg.service_mesh.istio
    assert istio.pilot_tls == "auto" and istio.token_file == "/var/run/secrets/tokens/istio-token"
    assert istio.sampling_rate == 1.0 and istio.authz_timeout == 1.0
    assert istio.authz_fail_open is False and istio.authz_addr is None


def test_one_upstream_listener_leads_to_one_service():
    found = problems(
        SIDECAR_MESH % "" + "services:\n"
        " - {name: a, basePath: /a, upstream: '127.0.0.1:21000'}\n"
        " - {name: a2, basePath: /a2, meshService: a, upstream: '127.0.0.1:21000'}\n"
        " - {name: b, basePath: /b, upstream: 'localhost:21000'}\n"
    )
    assert found == [
        "services[2].upstream: the same listener as services[0].upstream, which leads to a: "
        "one explicit upstream leads to one Consul service"
    ]


def test_sidecar_mode_needs_no_tls_material():
    from odin_gw.mesh.manager import MeshManager

    cfg = parse_config(
        "serviceMesh: {enabled: true, type: consul, mtlsEnabled: true, "
        "consul: {enableConnect: true, connectMode: sidecar}}\n",
        env={},
    )
    manager = MeshManager(cfg, metrics=None, on_change=lambda *_: None)
    try:
        assert not manager.needs_tls()
        client = manager.client
        assert not client.cfg.enable_connect and not client.mesh.mtls_enabled  # no leaf/roots
    finally:
        manager.client.close()
    native = parse_config(
        "serviceMesh: {enabled: true, type: consul, mtlsEnabled: true, "
        "consul: {enableConnect: true}}\n",
        env={},
    )
    manager = MeshManager(native, metrics=None, on_change=lambda *_: None)
    try:
        assert manager.needs_tls()
    finally:
        manager.client.close()


@pytest.mark.parametrize(
    ("mesh", "uses"),
    [
        ("type: istio", False),  # injectSidecar: the sidecar holds the certificates
        ("type: istio, istio: {injectSidecar: false}", True),
        ("type: istio, mtlsEnabled: false, istio: {injectSidecar: false}", True),
        ("type: consul, consul: {connectMode: sidecar}", False),
        ("type: consul", True),
        ("type: consul, mtlsEnabled: false", False),
    ],
)
def test_certificate_files_are_used_only_where_the_gateway_does_mtls(mesh, uses):
    cfg = parse_config(
        f"serviceMesh: {{enabled: true, mtlsEnabled: true, {mesh},\n"
        "  certFile: c.pem, keyFile: k.pem, caFile: r.pem}\n",
        env={},
    )
    assert cfg.service_mesh.uses_cert_files is uses
