"""The README's Metrics section and the Grafana dashboard stay true to the code.

Every metric family the gateway registers (``GatewayMetrics`` and Istio's standard
metrics) has a row in README's "### Metrics" tables, with its type and exactly its
labels, and the section names no metric that does not exist. The dashboard in
``deploy/grafana/`` imports (ids, layout, the datasource variable) and its queries, like
the README's example queries, use only metrics and labels the gateway exports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from odin_gw import errors
from odin_gw.istio_telemetry import LABELS as ISTIO_LABELS
from odin_gw.istio_telemetry import RESPONSE_FLAGS, IstioTelemetry, Workload
from odin_gw.metrics import METHODS, STATUS_CLASS, GatewayMetrics
from odin_gw.passive_health import ANSWERS_5XX, CONNECT_FAILURE
from odin_gw.proxy.retry import Failure, RetryPolicy
from odin_gw.proxy.tunnel import TunnelLimit

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "odin-gateway.json"

#: Labels Prometheus adds to every scraped series (target labels).
SCRAPE_LABELS = frozenset({"instance", "job"})
#: What the labels cell says for the Istio metrics, whose labels have a table of their own.
ISTIO_STANDARD = "Istio's standard labels"


@dataclass(frozen=True)
class Family:
    """One metric family as a scrape shows it."""

    name: str  # as documented: counters with ``_total``, histograms by their base name
    type: str
    labels: frozenset[str]
    #: Series names a query may use, each with the labels it carries.
    series: dict[str, frozenset[str]] = field(hash=False)


def _families(monkeypatch) -> dict[str, Family]:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # a private registry
    metrics = GatewayMetrics()
    istio = IstioTelemetry(metrics.registry, Workload(), {})
    wrappers = [
        value
        for owner in (metrics, istio)
        for value in vars(owner).values()
        if isinstance(value, MetricWrapperBase)
    ]
    out: dict[str, Family] = {}
    for wrapper in wrappers:
        (described,) = wrapper.describe()
        # prometheus-client keeps a wrapper's label names only here.
        labels = frozenset(wrapper._labelnames)
        if described.type == "counter":
            name = described.name + "_total"
            series = {name: labels}
        elif described.type == "histogram":
            name = described.name
            series = {name + "_sum": labels, name + "_count": labels}
            series[name + "_bucket"] = labels | {"le"}
        else:
            name = described.name
            series = {name: labels}
        out[name] = Family(name, described.type, labels, series)
    # Nothing registered behind the objects' backs (a family only a scrape would show).
    registered = {family.name for family in metrics.registry.collect()}
    assert {f.name.removesuffix("_total") for f in out.values()} == registered
    return out


@pytest.fixture
def families(monkeypatch) -> dict[str, Family]:
    return _families(monkeypatch)


@pytest.fixture
def series(families) -> dict[str, frozenset[str]]:
    """Every series name a query may use, with its labels."""
    return {name: labels for f in families.values() for name, labels in f.series.items()}


# -- the README section -------------------------------------------------------------------

BACKTICKED = re.compile(r"`([^`]+)`")
METRIC_NAME = re.compile(r"(?<![\w./-])((?:odin|istio)_[a-z0-9_]+)(?![\w/]|\.\w)")


def metrics_section() -> str:
    """README's ``### Metrics``, up to the next heading of its level or above."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n### Metrics\n")
    end = re.compile(r"^#{2,3} ", re.M).search(text, start + 2)  # `# ` is a PromQL comment
    return text[start : end.start() if end else len(text)]


def tables(section: str) -> list[tuple[list[str], list[list[str]]]]:
    """The section's Markdown tables: (header cells, body rows of cells)."""
    out, block = [], []
    for line in [*section.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split(" | ")])
            continue
        if block:
            out.append((block[0], block[2:]))  # block[1] is the --- line
            block = []
    return out


def metric_rows(section: str) -> dict[str, list[str]]:
    """Rows of the tables whose first column is "Metric", by the metric they document."""
    rows = {}
    for header, body in tables(section):
        if header[0] != "Metric":
            continue
        assert header == ["Metric", "Type", "Labels", "What it says"], header
        for cells in body:
            assert len(cells) == 4, cells
            (name,) = BACKTICKED.findall(cells[0])
            assert name not in rows, f"{name} documented twice"
            rows[name] = cells
    return rows


def label_rows(section: str) -> dict[str, str]:
    """The Istio standard labels table: label -> the value documented."""
    found = [body for header, body in tables(section) if header == ["Label", "Value"]]
    assert len(found) == 1, "one table of Istio's standard labels"
    return {BACKTICKED.findall(cells[0])[0]: cells[1] for cells in found[0]}


@pytest.fixture(scope="module")
def section() -> str:
    return metrics_section()


def test_every_metric_has_a_row_with_its_type_and_labels(families, section):
    rows = metric_rows(section)
    assert set(rows) == set(families), "rows and registered families differ"
    istio_labels = set(label_rows(section))
    for name, family in families.items():
        _, type_cell, labels_cell, meaning = rows[name]
        assert type_cell.split()[0] == family.type, name
        if labels_cell == ISTIO_STANDARD:
            documented = istio_labels
        else:
            documented = set(BACKTICKED.findall(labels_cell))
        assert documented == set(family.labels), name
        assert len(meaning) > 20, f"{name}: say what it counts"


def test_istio_labels_table_is_the_filters_labels(section):
    assert list(label_rows(section)) == list(ISTIO_LABELS)


def test_gauges_say_how_workers_add_up(families, section):
    rows = metric_rows(section)
    for name, family in families.items():
        if family.type == "gauge" and name.startswith("odin_"):
            assert re.fullmatch(r"gauge \(live(sum|max|min)\)", rows[name][1]), name


def test_section_names_no_unknown_metric(families, section, series):
    known = set(series) | {f.name for f in families.values()}
    mentioned = set(METRIC_NAME.findall(section))
    assert len(mentioned) >= len(families)
    assert mentioned - known == set()


def _values(cell: str, label: str) -> set[str]:
    """The values a row's text gives ``label``: after `` `label`: ``, up to the sentence's
    end or the next label's values."""
    m = re.search(rf"`{label}`: (.*?)(?:\. |\.$|; `|$)", cell)
    assert m, f"no values of {label} in {cell!r}"
    return set(BACKTICKED.findall(m.group(1)))


def test_fixed_label_values_are_documented(section):
    rows = metric_rows(section)
    requests = rows["odin_requests_total"][3]
    assert set(STATUS_CLASS.values()) <= _values(requests, "status_class")
    assert METHODS | {"OTHER"} == _values(requests, "method")
    # What a policy that allows every retry retries: each such failure can be a reason.
    policy = RetryPolicy(others=5, stale=5, statuses=frozenset({503}), answers=None)
    retried = {f.value for f in Failure if policy.after(f, "GET", True) is not None}
    documented = _values(rows["odin_retries_total"][3], "reason")
    assert retried <= documented
    assert documented <= {f.value for f in Failure}, "a documented reason is not a Failure"
    ejections = _values(rows["odin_outlier_ejections_total"][3], "reason")
    assert {CONNECT_FAILURE, ANSWERS_5XX} == ejections
    kinds = {errors.NoHealthyTarget.code, errors.ServiceOverloaded.code, TunnelLimit.code}
    stack = [errors.UpstreamError]
    while stack:
        cls = stack.pop()
        kinds.add(cls.code)
        stack.extend(cls.__subclasses__())
    kinds |= {k for k in RESPONSE_FLAGS if k != errors.RouteNotFound.code}
    assert kinds <= _values(rows["odin_upstream_errors_total"][3], "kind")
    flags = set(BACKTICKED.findall(label_rows(section)["response_flags"]))
    assert set(RESPONSE_FLAGS.values()) | {"-"} <= flags


# -- PromQL, as far as these queries need it ----------------------------------------------

TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*")
    |(?P<range>\[[^\]\[]*\])
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<number>\d+(?:\.\d+)?)
    |(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}])
    |(?P<space>\s+)""",
    re.X,
)
AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile"})
FUNCTIONS = AGGREGATIONS | {
    "rate",
    "increase",
    "irate",
    "delta",
    "histogram_quantile",
    "time",
    "vector",
    "abs",
    "clamp_min",
    "max_over_time",
    "min_over_time",
    "changes",
    "resets",
}
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
BINARY = frozenset({"and", "or", "unless", "bool", "offset"})
MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})
PAIRS = {")": "(", "}": "{"}


@dataclass
class Query:
    """What a PromQL expression uses."""

    metrics: list[str] = field(default_factory=list)
    #: (metric, label, operator, value) of every ``{...}`` matcher.
    matchers: list[tuple[str, str, str, str]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    aggregated: bool = False


def read_query(expr: str) -> Query:
    """The metrics, matchers and grouping labels of ``expr``; ``ValueError`` when it is
    not PromQL this reader understands (unbalanced, an unknown function, stray text)."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos:]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
    stack: list[str] = []
    for kind, text in tokens:
        if kind == "op" and text in "({":
            stack.append(text)
        elif kind == "op" and text in PAIRS and (not stack or stack.pop() != PAIRS[text]):
            raise ValueError(f"unbalanced {text!r} in {expr!r}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r} in {expr!r}")

    query = Query()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        after = tokens[i + 1][1] if i + 1 < len(tokens) else None
        i += 1
        if kind != "ident":
            if text == "{":
                raise ValueError(f"a selector without a metric name in {expr!r}")
            continue
        if text in GROUPING:
            if after != "(":
                raise ValueError(f"{text} without a label list in {expr!r}")
            i += 1
            while tokens[i][1] != ")":
                label_kind, label = tokens[i]
                if label_kind == "ident":
                    query.grouping.add(label)
                elif label != ",":
                    raise ValueError(f"{label!r} in the {text} list of {expr!r}")
                i += 1
            i += 1
        elif after == "(" or (text in AGGREGATIONS and after in GROUPING):
            if text not in FUNCTIONS:
                raise ValueError(f"unknown function {text!r} in {expr!r}")
            query.aggregated |= text in AGGREGATIONS
        elif text in BINARY:
            continue
        else:
            query.metrics.append(text)
            if after == "{":
                i += 1
                while tokens[i][1] != "}":
                    (lk, label), (_, op), (vk, value) = tokens[i : i + 3]
                    if lk != "ident" or op not in MATCH_OPS or vk != "string":
                        raise ValueError(f"bad matcher {label}{op}{value} in {expr!r}")
                    query.matchers.append((text, label, op, value[1:-1]))
                    i += 3
                    if tokens[i][1] == ",":
                        i += 1
                i += 1
    if not query.metrics:
        raise ValueError(f"no metric in {expr!r}")
    return query


def check_query(expr: str, series: dict[str, frozenset[str]], legend: str = "") -> Query:
    """``read_query``, and every name it uses exists: metrics, matcher labels, grouping
    labels (on every metric of the expression) and the labels a legend shows."""
    query = read_query(expr)
    unknown = [m for m in query.metrics if m not in series]
    assert not unknown, f"unknown metrics {unknown} in {expr!r}"
    for metric, label, _, _ in query.matchers:
        assert label in series[metric], f"{metric} has no label {label!r}: {expr!r}"
    for metric in query.metrics:
        missing = query.grouping - series[metric] - SCRAPE_LABELS
        assert not missing, f"{metric} has no labels {missing}: {expr!r}"
    shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    if query.grouping:
        allowed = query.grouping
    elif query.aggregated:
        allowed = set()
    else:
        allowed = set().union(*(series[m] for m in query.metrics)) | SCRAPE_LABELS
    assert shown <= allowed, f"legend {legend!r} shows labels {expr!r} does not keep"
    return query


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(odin_requests_total[5m])",
        'odin_requests_total{service="a"',
        "rat(odin_requests_total[5m])",
        'odin_requests_total{service=a"}',
        "sum by (service (odin_requests_total)",
        "{service='a'}",
        "$service",
    ],
)
def test_query_reader_refuses_what_it_cannot_read(expr):
    with pytest.raises(ValueError):
        read_query(expr)


def test_query_checker_finds_unknown_names(series):
    query = check_query(
        'sum by (service, le) (rate(odin_request_duration_seconds_bucket{service=~"a|b"}[5m]))',
        series,
        "{{service}}",
    )
    assert query.metrics == ["odin_request_duration_seconds_bucket"]
    assert query.matchers == [("odin_request_duration_seconds_bucket", "service", "=~", "a|b")]
    assert query.grouping == {"service", "le"}
    bad = [
        ("rate(odin_requests[5m])", ""),  # a counter's family name is not a series
        ('odin_retries_total{kind="x"}', ""),
        ("sum by (le) (rate(odin_request_duration_seconds_sum[5m]))", ""),
        ("sum(rate(odin_retries_total[5m]))", "{{reason}}"),
        ("sum by (service) (rate(odin_retries_total[5m]))", "{{reason}}"),
    ]
    for expr, legend in bad:
        with pytest.raises(AssertionError):
            check_query(expr, series, legend)


def readme_queries(section: str) -> list[str]:
    """The section's ``promql`` examples, one per comment line."""
    (block,) = re.findall(r"```promql\n(.*?)```", section, re.S)
    queries, current = [], []
    for line in [*block.splitlines(), "# end"]:
        if line.startswith("#"):
            if current:
                queries.append(" ".join(current))
            current = []
        elif line.strip():
            current.append(line.strip())
    return queries


def test_readme_example_queries_use_real_names(section, series):
    queries = readme_queries(section)
    assert len(queries) >= 4
    used = set()
    for expr in queries:
        used.update(check_query(expr, series).metrics)
    assert {
        "odin_requests_total",
        "odin_request_duration_seconds_bucket",
        "odin_mesh_certificate_expiry_timestamp_seconds",
        "odin_mesh_snapshot_age_seconds",
    } <= used


# -- the Grafana dashboard ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", ()))  # a collapsed row keeps its panels inside
    return out


def _targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(p, t) for p in _panels(dashboard) for t in p.get("targets", ())]


def test_dashboard_is_importable(dashboard):
    assert dashboard["schemaVersion"] >= 39
    assert re.fullmatch(r"[A-Za-z0-9_-]{8,40}", dashboard["uid"])
    assert dashboard["title"] and dashboard["id"] is None
    assert dashboard["time"]["from"].startswith("now-") and dashboard["refresh"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    service = variables["service"]
    assert service["type"] == "query"
    assert service["query"] == "label_values(odin_requests_total, service)"
    assert service["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    for panel in _panels(dashboard):
        assert {"id", "type", "title", "gridPos"} <= set(panel), panel.get("title")
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            assert "defaults" in panel["fieldConfig"]
    for panel, target in _targets(dashboard):
        assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    ref_ids = [[t["refId"] for t in p.get("targets", ())] for p in _panels(dashboard)]
    assert all(len(ids) == len(set(ids)) for ids in ref_ids)


def test_dashboard_ids_are_unique_and_panels_do_not_overlap(dashboard):
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["y"] >= 0
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_queries_use_real_metrics_and_labels(dashboard, series):
    targets = _targets(dashboard)
    assert len(targets) >= 20
    for _, target in targets:
        expr = target["expr"].replace("$__rate_interval", "5m")
        check_query(expr, series, target.get("legendFormat", ""))


def _used(dashboard: dict) -> dict[str, list[Query]]:
    used: dict[str, list[Query]] = {}
    for _, target in _targets(dashboard):
        query = read_query(target["expr"])
        for metric in query.metrics:
            used.setdefault(metric, []).append(query)
    return used


@pytest.mark.parametrize(
    "metric",
    [
        "odin_mesh_certificate_expiry_timestamp_seconds",
        "odin_mesh_discovery_attempts_total",
        "odin_mesh_snapshot_age_seconds",
        "odin_circuit_open",
        "odin_outlier_ejections_total",
        "odin_retries_total",
        "odin_rate_limited_total",
    ],
)
def test_dashboard_shows_what_the_issue_asks_for(dashboard, metric):
    assert metric in _used(dashboard)


def test_dashboard_discovery_panel_shows_failures(dashboard):
    queries = _used(dashboard)["odin_mesh_discovery_attempts_total"]
    failures = [
        q
        for q in queries
        if ("odin_mesh_discovery_attempts_total", "result", "!=", "ok") in q.matchers
    ]
    assert failures and all("result" in q.grouping for q in failures)


def test_dashboard_has_every_gateway_metric(dashboard, families):
    used = {m.removesuffix("_bucket") for m in _used(dashboard)}
    odin = {name for name in families if name.startswith("odin_")}
    assert odin - used == set()
