"""The deployment files under deploy/: Kubernetes (kustomize), Dockerfile, systemd unit.

Kubernetes overlays are rendered twice where possible: by a small strategic-merge
renderer here (enough for the patch shapes these files use, so the checks run without
kubectl) and by ``kubectl kustomize`` (offline) when kubectl is on PATH; both must agree.
What the gateway reads from the Kubernetes API comes from the gateway's own code
(``make_client`` and the discovery's plan of feeds), not from a list copied here.
"""

import configparser
import functools
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from odin_gw.config import parse_config
from odin_gw.mesh.kubernetes import KubernetesDiscovery
from odin_gw.mesh.manager import make_client

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")
KUBE = os.path.join(DEPLOY, "kubernetes")
TARGETS = ["base", "overlays/istio", "overlays/linkerd", "overlays/consul"]
KUBECTL = shutil.which("kubectl")
NO_KUBECTL = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH")


RENDERERS = ["python", pytest.param("kubectl", marks=NO_KUBECTL)]
#: (target, renderer) pairs, for the ``rendered`` fixture.
TARGET_RENDERS = [
    pytest.param((t, r), id=f"{t}-{r}", marks=[NO_KUBECTL] if r == "kubectl" else [])
    for t in TARGETS
    for r in ("python", "kubectl")
]

API_VERSIONS = {
    "Namespace": "v1",
    "ServiceAccount": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
}
# The istio-agent's file names in OUTPUT_CERTS (security/pkg/nodeagent/util OutputKeyCertToDir).
ISTIO_AGENT_FILES = {
    "cert_file": "cert-chain.pem",
    "key_file": "key.pem",
    "ca_file": "root-cert.pem",
}
# Stand-in values for what the kubelet fills in, so the configs' ${VAR}s expand.
FIELD_VALUES = {
    "status.hostIP": "10.0.0.7",
    "status.podIP": "10.1.0.9",
    "metadata.name": "odin-gateway-5d9c7b6f4-x2x7q",
    "metadata.namespace": "odin",
    "spec.serviceAccountName": "odin-gateway",
}
# Strategic merge keys of the lists these patches touch (Kubernetes' patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


# -- rendering ----------------------------------------------------------------------------
def _load_all(path):
    with open(path, encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _kustomization(directory):
    (doc,) = _load_all(os.path.join(directory, "kustomization.yaml"))
    return doc


def _merge(base, patch, key=None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        # As kustomize orders them: the patch's items first, then the others.
        mk = MERGE_KEYS[key]
        by_key = {b.get(mk): b for b in base}
        named = {item.get(mk) for item in patch}
        out = [_merge(by_key[i[mk]], i) if i.get(mk) in by_key else i for i in patch]
        return out + [b for b in base if b.get(mk) not in named]
    return patch


def _ident(obj):
    meta = obj["metadata"]
    return obj["kind"], meta["name"], meta.get("namespace")


def _render_python(directory, objs=None):
    """What kustomize builds from ``directory``: resources, components, then patches."""
    k = _kustomization(directory)
    objs = [] if objs is None else list(objs)
    for res in k.get("resources", []):
        path = os.path.join(directory, res)
        objs += _render_python(path) if os.path.isdir(path) else _load_all(path)
    for comp in k.get("components", []):
        objs = _render_python(os.path.join(directory, comp), objs)
    for patch in k.get("patches", []):
        (doc,) = _load_all(os.path.join(directory, patch["path"]))
        hits = [i for i, o in enumerate(objs) if _ident(o) == _ident(doc)]
        assert len(hits) == 1, f"{directory}: patch {patch['path']} matches {len(hits)} objects"
        objs[hits[0]] = _merge(objs[hits[0]], doc)
    return objs


def _render_kubectl(directory):
    out = subprocess.run(
        [KUBECTL, "kustomize", directory], capture_output=True, text=True, timeout=60, check=True
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def render(target, renderer):
    directory = os.path.join(KUBE, target)
    return _render_python(directory) if renderer == "python" else _render_kubectl(directory)


class Rendered:
    """One rendered target: its objects, the gateway Deployment and its config."""

    def __init__(self, target, renderer):
        self.objs = render(target, renderer)
        (self.deployment,) = self.of("Deployment")
        self.pod = self.deployment["spec"]["template"]
        self.spec = self.pod["spec"]
        (self.gateway,) = [c for c in self.spec["containers"] if c["name"] == "gateway"]
        self.env = _container_env(self.gateway)
        (cm,) = [o for o in self.of("ConfigMap") if o["metadata"]["name"] == "odin-config"]
        self.config_text = cm["data"]["config.yaml"]
        self.config = parse_config(self.config_text, self.env, source=f"{target} config.yaml")

    def of(self, kind):
        return [o for o in self.objs if o["kind"] == kind]

    def mounts(self):
        return {m["mountPath"].rstrip("/"): m for m in self.gateway.get("volumeMounts", [])}

    def volume(self, name):
        (vol,) = [v for v in self.spec.get("volumes", []) if v["name"] == name]
        return vol

    def annotations(self):
        return self.pod.get("metadata", {}).get("annotations", {})


def _container_env(container):
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = FIELD_VALUES[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"secret-{ref['name']}-{ref['key']}"
    return env


@functools.cache
def _rendered(target, renderer):
    return Rendered(target, renderer)


@pytest.fixture(params=TARGET_RENDERS)
def rendered(request):
    return _rendered(*request.param)


# -- files and kustomizations -------------------------------------------------------------
def _yaml_files():
    for top, _dirs, files in os.walk(KUBE):
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")):
                yield os.path.relpath(os.path.join(top, name), KUBE)


def test_deploy_tree_has_every_target():
    assert sorted(_yaml_files())  # not vacuous
    for target in TARGETS:
        assert os.path.isfile(os.path.join(KUBE, target, "kustomization.yaml")), target


@pytest.mark.parametrize("rel", list(_yaml_files()))
def test_every_yaml_file_has_a_known_kind(rel):
    docs = _load_all(os.path.join(KUBE, rel))
    assert docs, f"{rel} is empty"
    for doc in docs:
        kind = doc.get("kind")
        assert kind in API_VERSIONS, f"{rel}: unexpected kind {kind!r}"
        assert doc.get("apiVersion") == API_VERSIONS[kind], f"{rel}: {kind} apiVersion"
        if kind not in ("Kustomization", "Component"):
            assert doc["metadata"]["name"], rel


@pytest.mark.parametrize("target", [*TARGETS, "components/kube-discovery"])
def test_kustomization_references_exist(target):
    directory = os.path.join(KUBE, target)
    k = _kustomization(directory)
    refs = k.get("resources", []) + k.get("components", [])
    refs += [p["path"] for p in k.get("patches", [])]
    assert refs
    for ref in refs:
        assert os.path.exists(os.path.join(directory, ref)), f"{target}: {ref} missing"
    for comp in k.get("components", []):
        assert _kustomization(os.path.join(directory, comp))["kind"] == "Component"


@NO_KUBECTL
@pytest.mark.parametrize("target", TARGETS)
def test_python_rendering_matches_kubectl_kustomize(target):
    def key(objs):
        return {_ident(o): o for o in objs}

    ours, theirs = key(render(target, "python")), key(render(target, "kubectl"))
    assert set(ours) == set(theirs)
    for ident, obj in ours.items():
        other = theirs[ident]
        # kustomize's `labels` transformer adds metadata labels only; compare the rest.
        strip = {k: v for k, v in obj.items() if k != "metadata"}
        assert strip == {k: v for k, v in other.items() if k != "metadata"}, ident


def _cluster_configured():
    return bool(os.environ.get("KUBECONFIG")) or os.path.isfile(
        os.path.expanduser("~/.kube/config")
    )


@pytest.mark.parametrize("target", TARGETS)
def test_kubectl_apply_dry_run(target):
    if KUBECTL is None:
        pytest.skip("kubectl is not on PATH")
    if not _cluster_configured():
        # Without a kubeconfig kubectl would ask http://localhost:8080 (maybe a gateway).
        pytest.skip("no cluster configured: kubectl apply --dry-run=client needs an API server")
    out = subprocess.run(
        [KUBECTL, "apply", "--dry-run=client", "-k", os.path.join(KUBE, target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


# -- the Deployment -----------------------------------------------------------------------
def _port_number(container, port):
    if isinstance(port, int):
        return port
    (p,) = [p for p in container["ports"] if p.get("name") == port]
    return p["containerPort"]


def test_probes_are_live_and_ready_on_the_gateway_port(rendered):
    gw = rendered.gateway
    port = rendered.config.server.port
    assert [p["containerPort"] for p in gw["ports"]] == [port]
    live, ready = gw["livenessProbe"]["httpGet"], gw["readinessProbe"]["httpGet"]
    assert live["path"] == "/live"
    assert ready["path"] == "/ready"
    assert _port_number(gw, live["port"]) == port
    assert _port_number(gw, ready["port"]) == port
    (svc,) = rendered.of("Service")
    assert svc["spec"]["selector"].items() <= rendered.pod["metadata"]["labels"].items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [live["port"]]


def test_config_is_the_mounted_odin_config(rendered):
    path = rendered.env["ODIN_CONFIG"]
    mount = rendered.mounts()[os.path.dirname(path)]
    assert mount.get("readOnly") is True
    assert rendered.volume(mount["name"])["configMap"]["name"] == "odin-config"
    assert os.path.basename(path) == "config.yaml"


def _secret_env(rendered, value):
    """The env var a config value names as ``${VAR}``, which must come from a Secret."""
    m = re.fullmatch(r"\$\{(\w+)\}", value or "")
    assert m, f"a secret in the config must be ${{VAR}}, not {value!r}"
    (var,) = [e for e in rendered.gateway["env"] if e["name"] == m.group(1)]
    assert "secretKeyRef" in var.get("valueFrom", {}), var
    return var


def test_secrets_come_from_secrets(rendered):
    raw = yaml.safe_load(rendered.config_text)
    _secret_env(rendered, raw["admin"]["token"])
    assert rendered.config.admin.token == rendered.env["ODIN_ADMIN_TOKEN"]
    consul = raw.get("serviceMesh", {}).get("consul") or {}
    if "token" in consul:
        _secret_env(rendered, consul["token"])
        assert rendered.config.service_mesh.consul.token.startswith("secret-")


def test_pod_is_non_root_with_a_read_only_root(rendered):
    pod_sc, sc = rendered.spec["securityContext"], rendered.gateway["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] > 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert rendered.gateway["resources"]["requests"]
    assert rendered.gateway["resources"]["limits"]["memory"]


def _writable_mount(rendered, path):
    for mount_path, mount in rendered.mounts().items():
        if path == mount_path or path.startswith(mount_path + "/"):
            vol = rendered.volume(mount["name"])
            return "emptyDir" in vol and not mount.get("readOnly")
    return False


def test_what_the_gateway_writes_is_on_writable_volumes(rendered):
    env = rendered.env
    written = [env["RUNTIME_DIRECTORY"], env["PROMETHEUS_MULTIPROC_DIR"], "/tmp"]
    if rendered.config.service_mesh.state_dir:
        written.append(rendered.config.service_mesh.state_dir)
    for path in written:
        assert _writable_mount(rendered, path), f"{path} is not on a writable emptyDir"


def _pre_stop_seconds(container):
    cmd = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    return float(cmd[1]) if cmd and cmd[0] == "sleep" else 0.0


def test_grace_period_covers_the_graceful_stop(rendered):
    grace = rendered.spec["terminationGracePeriodSeconds"]
    stop = _pre_stop_seconds(rendered.gateway) + rendered.config.server.graceful_timeout
    assert stop < grace
    wait = rendered.annotations().get("config.alpha.linkerd.io/proxy-wait-before-exit-seconds")
    if wait is not None:  # the Linkerd proxy stays for the gateway's requests, within grace
        assert stop <= int(wait) < grace


def test_certificate_files_are_mounted_where_the_config_names_them(rendered):
    mesh = rendered.config.service_mesh
    files = {a: getattr(mesh, a) for a in ISTIO_AGENT_FILES if getattr(mesh, a)}
    mounts = rendered.mounts()
    for path in files.values():
        mount = mounts.get(os.path.dirname(path))
        assert mount is not None, f"{path}: no volume mounted at {os.path.dirname(path)}"
        assert mount.get("readOnly") is True
    if mesh.kind == "istio" and not mesh.istio.inject_sidecar:
        assert files, "direct mode needs the workload certificate files"


@pytest.mark.parametrize("renderer", RENDERERS)
def test_istio_overlay_wires_output_certs_to_the_config(renderer):
    rendered = _rendered("overlays/istio", renderer)
    mesh = rendered.config.service_mesh
    assert mesh.kind == "istio"
    ann = rendered.annotations()
    out_dir = yaml.safe_load(ann["proxy.istio.io/config"])["proxyMetadata"]["OUTPUT_CERTS"]
    (agent_mount,) = [
        m
        for m in json.loads(ann["sidecar.istio.io/userVolumeMount"])
        if m["mountPath"].rstrip("/") == out_dir.rstrip("/")
    ]
    for attr, name in ISTIO_AGENT_FILES.items():
        path = getattr(mesh, attr)
        assert os.path.basename(path) == name, f"{attr}: the istio-agent writes {name}"
        gw_mount = rendered.mounts()[os.path.dirname(path)]
        # The same pod volume: the agent writes it, the gateway reads it.
        assert gw_mount["name"] == agent_mount["name"]
    assert rendered.volume(agent_mount["name"])["emptyDir"]["medium"] == "Memory"
    # Injection: the gateway's namespace carries the label (spec step 2).
    ns = rendered.deployment["metadata"]["namespace"]
    (namespace,) = [o for o in rendered.of("Namespace") if o["metadata"]["name"] == ns]
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
    if not mesh.istio.inject_sidecar:
        # Direct mode: istiod on 15012 wants a projected token for its audience.
        mount = rendered.mounts()[os.path.dirname(mesh.istio.token_file)]
        (src,) = rendered.volume(mount["name"])["projected"]["sources"]
        token = src["serviceAccountToken"]
        assert token["audience"] == "istio-ca"
        assert token["path"] == os.path.basename(mesh.istio.token_file)
        assert ann["traffic.sidecar.istio.io/includeOutboundIPRanges"] == ""
        for var in ("POD_NAME", "POD_NAMESPACE", "INSTANCE_IP", "SERVICE_ACCOUNT"):
            assert var in rendered.env, f"istiod checks the node's {var}"


@pytest.mark.parametrize("renderer", RENDERERS)
def test_linkerd_overlay_runs_the_proxy_in_ingress_mode(renderer):
    rendered = _rendered("overlays/linkerd", renderer)
    assert rendered.config.service_mesh.kind == "linkerd"
    assert rendered.annotations()["linkerd.io/inject"] == "ingress"


@pytest.mark.parametrize("renderer", RENDERERS)
def test_consul_overlay_reaches_the_node_agent(renderer):
    rendered = _rendered("overlays/consul", renderer)
    mesh = rendered.config.service_mesh
    assert mesh.kind == "consul"
    raw = yaml.safe_load(rendered.config_text)["serviceMesh"]["consul"]["httpAddr"]
    (var,) = re.findall(r"\$\{(\w+)\}", raw)
    (env,) = [e for e in rendered.gateway["env"] if e["name"] == var]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert mesh.consul.http_addr == f"http://{FIELD_VALUES['status.hostIP']}:8500"


# -- RBAC ---------------------------------------------------------------------------------
def _feeds(config):
    """(apiGroup, plural, namespace) of every list+watch the gateway's discovery makes
    for ``config``: empty when it does not read the Kubernetes API."""
    client = make_client(config)
    try:
        if not isinstance(client, KubernetesDiscovery):
            return set()
        services = tuple(dict.fromkeys(s.mesh_service or s.name for s in config.discovered))
        _wanted, feeds = client._plan(services)  # what watch() and discover() read
    finally:
        client.close()
    out = set()
    for feed in feeds.values():
        info = feed.kind.resource._api_info
        out.add((info.resource.group, info.plural, feed.namespace))
    return out


def _grants(rendered):
    """{(group, resource, namespace): verbs} granted to the gateway's ServiceAccount."""
    sa = rendered.spec["serviceAccountName"]
    sa_ns = rendered.deployment["metadata"]["namespace"]
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in rendered.of("Role")}
    grants = {}
    for rb in rendered.of("RoleBinding"):
        ns = rb["metadata"]["namespace"]
        subject = {"kind": "ServiceAccount", "name": sa, "namespace": sa_ns}
        if subject not in rb["subjects"]:
            continue
        assert rb["roleRef"]["kind"] == "Role"
        for rule in roles[(ns, rb["roleRef"]["name"])]["rules"]:
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    grants.setdefault((group, res, ns), set()).update(rule["verbs"])
    return grants


def test_rbac_grants_exactly_what_discovery_reads(rendered):
    assert not rendered.of("ClusterRole")
    assert not rendered.of("ClusterRoleBinding")
    needed = _feeds(rendered.config)
    grants = _grants(rendered)
    for group, plural, ns in needed:
        verbs = grants.get((group, plural, ns), set())
        assert {"list", "watch"} <= verbs, f"{plural}.{group} in {ns}: has {sorted(verbs)}"
    assert set(grants) == needed, "a Role grants what discovery never reads"
    for verbs in grants.values():
        assert verbs <= {"get", "list", "watch"}
    # The in-cluster token is there exactly when the gateway reads the API.
    (sa,) = rendered.of("ServiceAccount")
    mounted = rendered.spec.get(
        "automountServiceAccountToken", sa.get("automountServiceAccountToken", True)
    )
    assert mounted is bool(needed)


def test_linkerd_reads_slices_services_and_profiles():
    # The check above must have something to check for Linkerd.
    groups = {(g, p) for g, p, _ns in _feeds(_rendered("overlays/linkerd", "python").config)}
    assert groups == {
        ("discovery.k8s.io", "endpointslices"),
        ("", "services"),
        ("linkerd.io", "serviceprofiles"),
    }


# -- Dockerfile ---------------------------------------------------------------------------
def _dockerfile():
    with open(os.path.join(DEPLOY, "Dockerfile"), encoding="utf-8") as fh:
        text = re.sub(r"\\\n", " ", fh.read())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages(instructions):
    stages = []
    for word, rest in instructions:
        if word == "FROM":
            stages.append([])
        stages[-1].append((word, rest))
    return stages


def test_dockerfile_runs_gunicorn_as_a_numeric_non_root_user():
    final = _stages(_dockerfile())[-1]
    froms = [rest for w, rest in _dockerfile() if w == "FROM"]
    for image in froms:
        assert re.match(r"python:3\.1[12]-slim", image), image
    users = [rest for w, rest in final if w == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, users
    (cmd,) = [rest for w, rest in final if w == "CMD"]
    assert json.loads(cmd) == ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    assert ("EXPOSE", "8080") in final
    text = " ".join(rest for _w, rest in _dockerfile())
    assert "requirements-dev" not in text
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert "RUNTIME_DIRECTORY=/run/odin-gw" in env
    assert "PROMETHEUS_MULTIPROC_DIR=/run/odin-gw/" in env


def _docker_pattern(pattern):
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _ignored(path, rules):
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            ignored = not negate
    return ignored


def _dockerignore():
    rules = []
    with open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                negate = line.startswith("!")
                rules.append((negate, _docker_pattern(line.lstrip("!").strip("/"))))
    return rules


def test_build_context_has_what_the_dockerfile_copies_and_nothing_else():
    rules = _dockerignore()
    copied = []
    for word, rest in _dockerfile():
        if word == "COPY" and "--from=" not in rest:
            copied += shlex.split(rest)[:-1]
    assert "odin_gw" in copied and "requirements.txt" in copied
    for src in copied:
        assert os.path.exists(os.path.join(ROOT, src)), src
        assert not _ignored(src, rules), f"{src} is excluded from the build context"
    assert not _ignored("odin_gw/app.py", rules)
    for kept_out in (".git/HEAD", ".venv/bin/python", "mutants/x.py", "tests/unit/x.py"):
        assert _ignored(kept_out, rules), kept_out
    assert _ignored("odin_gw/__pycache__/app.cpython-311.pyc", rules)


def _package_data_globs():
    """{package dir relative to the root: [glob, ...]} from setup.cfg's package_data."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    if not cfg.has_section("options.package_data"):
        return {}
    return {
        ("" if pkg in ("", "*") else pkg.replace(".", "/")): value.replace(",", " ").split()
        for pkg, value in cfg["options.package_data"].items()
    }


def test_package_data_reaches_the_installed_package():
    # The image installs the package, not the checkout: every non-Python file under
    # odin_gw/ (the OpenAPI document, the dashboard's static files) must be package data.
    declared = _package_data_globs()
    missing = []
    for top, dirs, files in os.walk(os.path.join(ROOT, "odin_gw")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            # ".py.<x>" files are tools' notes on a module (mutmut's .meta/.spans), not data.
            if name.endswith((".py", ".pyc")) or ".py." in name:
                continue
            rel = os.path.relpath(os.path.join(top, name), ROOT)
            if not any(
                (not pkg or rel.startswith(pkg + "/"))
                and _docker_pattern(g).match(rel[len(pkg) + 1 :] if pkg else os.path.basename(rel))
                for pkg, globs in declared.items()
                for g in globs
            ):
                missing.append(rel)
    assert not missing, f"not package data in setup.cfg (the image would lack them): {missing}"


# -- systemd ------------------------------------------------------------------------------
def _unit():
    path = os.path.join(DEPLOY, "systemd", "odin-gw.service")
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path, encoding="utf-8")
    with open(path, encoding="utf-8") as fh:
        env = [line.split("=", 1)[1].strip() for line in fh if line.startswith("Environment=")]
    return parser["Service"], dict(e.split("=", 1) for e in env)


def _max_graceful_timeout():
    configs = [_rendered(t, "python").config for t in TARGETS]
    return max(c.server.graceful_timeout for c in [*configs, parse_config("", {})])


def test_systemd_unit_runs_gunicorn_and_reloads_on_hup():
    svc, env = _unit()
    argv = shlex.split(svc["ExecStart"])
    assert os.path.basename(argv[0]) == "gunicorn"
    assert argv[1:] == ["-c", "gunicorn.conf.py", "wsgi:app"]
    assert svc["WorkingDirectory"]
    assert shlex.split(svc["ExecReload"]) == ["/bin/kill", "-HUP", "$MAINPID"]
    assert svc["KillSignal"] == "SIGTERM"
    assert env["ODIN_CONFIG"] == "/etc/odin-gw/config.yaml"
    assert float(svc["TimeoutStopSec"].rstrip("s")) > _max_graceful_timeout()


def test_systemd_unit_is_hardened_and_writes_to_its_runtime_dir():
    svc, env = _unit()
    assert svc["User"] not in ("", "root")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
    }.items():
        assert svc[key] == value, key
    runtime = os.path.join("/run", svc["RuntimeDirectory"])
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith(runtime + "/")
    assert svc["RuntimeDirectoryMode"] == "0700"


def test_systemd_notify_type_matches_gunicorn():
    svc, _env = _unit()
    from gunicorn.arbiter import Arbiter

    # Type=notify only works if the master itself sends READY=1 once it listens.
    ready = "READY=1" in inspect.getsource(Arbiter.start)
    assert svc["Type"] == ("notify" if ready else "exec")
    assert svc.get("NotifyAccess", "main") == "main"
