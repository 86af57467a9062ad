"""``examples/`` and ``docs/service-mesh.md`` stay true.

Every example config passes the real ``odin-gw check-config`` (a subprocess); every
gateway config of the service-mesh spec has its file in ``examples/spec/`` (and each file
there comes from the spec, under the section its first line names); the guide's config
snippets load, and the admin paths and metric names it mentions exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from odin_gw.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
GUIDE = ROOT / "docs" / "service-mesh.md"
SPEC_NAME = "service-mesh-integration.md"
# The spec lives beside the checkout (the shared project folder) unless copied into docs/.
SPEC_CANDIDATES = (ROOT / "docs" / "spec" / SPEC_NAME, ROOT.parent / "shared" / "spec" / SPEC_NAME)

CONFIG_KEYS = frozenset({"serviceMesh", "services", "logging", "monitoring", "server"})
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")

# Spec examples the gateway refuses as written, with the one problem it names and the
# runnable file next to them (the same config plus the key the spec cannot name).
POLICY_PROBLEM = "serviceMesh.istio.enablePolicyCheck: enablePolicyCheck needs authzAddr"
REFUSED = {
    "spec/istio.yaml": "istio-policy-check.yaml",
    "spec/example1-istio-mtls.yaml": "istio-mtls-policy-check.yaml",
}
# Built by other parts of the same change; allowed in the guide while absent from the app.
PENDING_ADMIN_PATHS = frozenset({"/admin/", "/admin/openapi.json", "/admin/stats"})


def _rel(path: Path) -> str:
    return path.relative_to(EXAMPLES).as_posix()


EXAMPLE_FILES = sorted(EXAMPLES.glob("**/*.yaml"))
SPEC_FILES = sorted((EXAMPLES / "spec").glob("*.yaml"))


def _load(path: Path):
    with open(path) as fh:
        return yaml.safe_load(fh)


def _env_for(text: str) -> dict[str, str]:
    """The environment a config's ``${VAR}`` references need, with placeholder values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "ODIN_"))}
    for name in ENV_REF.findall(text):
        env[name] = f"example-{name.lower().replace('_', '-')}-0123456789abcdef"
    return env


def _check_config(path: Path) -> subprocess.CompletedProcess:
    """``odin-gw check-config <path>``: the installed console script when there is one."""
    script = Path(sys.executable).parent / "odin-gw"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "odin_gw.cli"]
    return subprocess.run(
        [*cmd, "check-config", str(path)],
        capture_output=True,
        text=True,
        env=_env_for(path.read_text()),
        cwd=ROOT,
        timeout=60,
    )


# -- markdown ------------------------------------------------------------------------------

FENCE = re.compile(r"^( *)```(\w*)\s*$")
HEADING = re.compile(r"^(#{2,6}) (.+?)\s*$")


def yaml_blocks(markdown: str) -> list[tuple[tuple[str, ...], str]]:
    """Every ```yaml block: ``(heading path from level 2 down, dedented text)``."""
    blocks: list[tuple[tuple[str, ...], str]] = []
    headings: list[tuple[int, str]] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            headings = [h for h in headings if h[0] < level] + [(level, heading.group(2))]
        fence = FENCE.match(line)
        if fence:
            indent, lang = len(fence.group(1)), fence.group(2)
            body = []
            i += 1
            while i < len(lines) and not FENCE.match(lines[i]):
                body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
                i += 1
            if lang == "yaml":
                blocks.append((tuple(h[1] for h in headings), "\n".join(body) + "\n"))
        i += 1
    return blocks


def gateway_configs(markdown: str) -> list[tuple[tuple[str, ...], dict]]:
    """The yaml blocks that are gateway configs (a ConfigMap's ``config.yaml`` counts)."""
    out = []
    for where, text in yaml_blocks(markdown):
        tree = yaml.safe_load(text)
        if isinstance(tree, dict) and tree.get("kind") == "ConfigMap":
            embedded = (tree.get("data") or {}).get("config.yaml")
            tree = yaml.safe_load(embedded) if embedded else None
        if isinstance(tree, dict) and CONFIG_KEYS & tree.keys():
            out.append((where, tree))
    return out


@pytest.fixture(scope="module")
def spec_configs():
    for path in SPEC_CANDIDATES:
        if path.exists():
            return gateway_configs(path.read_text())
    pytest.skip(f"the spec {SPEC_NAME} is not at any of {[str(p) for p in SPEC_CANDIDATES]}")


# -- examples ------------------------------------------------------------------------------


def test_examples_were_found():
    assert len(SPEC_FILES) == 15
    assert EXAMPLES / "demo" / "config.yaml" in EXAMPLE_FILES
    assert set(REFUSED.values()) <= {_rel(p) for p in EXAMPLE_FILES}


@pytest.mark.parametrize("path", [p for p in EXAMPLE_FILES if _rel(p) not in REFUSED], ids=_rel)
def test_example_passes_check_config(path):
    done = _check_config(path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith(f"{path}: ok (")


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_spec_example_names_the_missing_key(name):
    done = _check_config(EXAMPLES / name)
    assert done.returncode == 2
    problems = [line.strip() for line in done.stderr.splitlines()[1:]]
    assert len(problems) == 1 and problems[0].startswith(POLICY_PROBLEM), done.stderr


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_runnable_version_only_adds_authz_addr(name):
    runnable = _load(EXAMPLES / REFUSED[name])
    assert runnable["serviceMesh"]["istio"].pop("authzAddr").startswith("http://")
    assert runnable == _load(EXAMPLES / name)


@pytest.mark.parametrize(
    ("name", "old", "new", "dotted"),
    [
        (
            "spec/example3-multi-dc-consul.yaml",
            "datacenter:",
            "datacentre:",
            "serviceMesh.consul.datacentre",
        ),
        ("spec/example2-linkerd-tap.yaml", "    basePath:", "    basePth:", "services[0].basePth"),
        ("istio-direct.yaml", "pilotAddr:", "pilotAdr:", "serviceMesh.istio.pilotAdr"),
    ],
)
def test_misspelled_key_fails_naming_its_path(name, old, new, dotted, tmp_path):
    text = (EXAMPLES / name).read_text()
    assert text.count(old) == 1
    broken = tmp_path / Path(name).name
    broken.write_text(text.replace(old, new))
    done = _check_config(broken)
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"  {dotted}: unknown field" in done.stderr.splitlines(), done.stderr


def test_every_spec_config_is_in_examples(spec_configs):
    ours = [_load(p) for p in SPEC_FILES]
    missing = [where for where, tree in spec_configs if tree not in ours]
    assert not missing, f"spec config blocks with no file in examples/spec/: {missing}"
    assert len(spec_configs) == len(SPEC_FILES)


@pytest.mark.parametrize("path", SPEC_FILES, ids=_rel)
def test_spec_example_comes_from_the_section_it_names(path, spec_configs):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Spec section: ")
    section = re.sub(r" \([^)]*\)$", "", first.removeprefix("# Spec section: "))
    # Two sections of the spec hold the same config (logging.level: debug).
    where = [" > ".join(w) for w, tree in spec_configs if tree == _load(path)]
    assert section in where, (section, where)


# -- the guide -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text()


def test_guide_config_snippets_load(guide):
    blocks = yaml_blocks(guide)
    configs = 0
    for where, text in blocks:
        tree = yaml.safe_load(text)
        if isinstance(tree, dict) and tree.get("kind") == "ConfigMap":
            text = tree["data"]["config.yaml"]
            tree = yaml.safe_load(text)
        if not (isinstance(tree, dict) and CONFIG_KEYS & tree.keys()):
            continue
        env = {name: "placeholder-value-0123456789" for name in ENV_REF.findall(text)}
        parse_config(text, env=env, source=" > ".join(where))  # raises with every problem
        configs += 1
    assert configs == len(blocks) >= 5  # every yaml block of the guide is a gateway config


def _admin_rules() -> list[re.Pattern]:
    from odin_gw.app import create_app

    cfg = parse_config("admin: {token: docs-check-token-0123456789abcdef}\n")
    app = create_app(cfg, start=False)
    patterns = []
    for rule in app.url_map.iter_rules():
        # admin.unknown is the catch-all that answers 404 for paths the admin API lacks.
        if rule.rule.startswith("/admin") and rule.endpoint != "admin.unknown":
            patterns.append(re.compile(re.sub(r"<[^>]+>", "[^/]+", re.escape(rule.rule))))
    return patterns


ADMIN_PATH = re.compile(r"/admin(?:/[\w.<>-]*)*")


def test_guide_admin_paths_exist(guide):
    mentioned = {p.rstrip(".") for p in ADMIN_PATH.findall(guide)}
    assert len(mentioned) >= 6
    rules = _admin_rules()
    served = {p for p in mentioned if any(r.fullmatch(p) for r in rules)}
    pending = {p for p in PENDING_ADMIN_PATHS if not any(r.fullmatch(p) for r in rules)}
    assert mentioned - served - pending == set()


METRIC = re.compile(r"(?<![\w./-])((?:odin|istio)_[a-z0-9_]+)(?![\w/]|\.\w)")


def _metric_names(monkeypatch) -> set[str]:
    """What a scrape can show: counters as ``_total``, histograms with their series."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # a private registry
    from odin_gw.istio_telemetry import IstioTelemetry, Workload
    from odin_gw.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    IstioTelemetry(metrics.registry, Workload(), {})
    names = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("", "_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return names


def test_guide_metric_names_exist(guide, monkeypatch):
    mentioned = set(METRIC.findall(guide)) - {"odin_gw"}
    assert len(mentioned) >= 10
    assert mentioned - _metric_names(monkeypatch) == set()
