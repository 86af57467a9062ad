"""Per-route policy: timeout, which answers are retried, how often, and under what budget.

A :class:`RoutePolicy` is the one value the forwarder reads for a request, whoever wrote
it: a Linkerd ServiceProfile route, the Linkerd 2.16 annotations on a Service, or the
gateway's own config (``tryTimeout``, ``retryPolicy``: :func:`config_policy`); ``source``
says which, and ``origins`` where each value came from when a mesh route was laid over
the config's (:meth:`RoutePolicy.over`: a value the mesh gives wins, the config fills in
the rest). A :class:`ServicePolicy` is what one
service's mesh policy compiles to, once per change of the snapshot's policy text:
``match(method, path)`` is the per-request call (precompiled conditions, no parsing).

Linkerd's rules, as its controller and proxy apply them:

- **ServiceProfile** (``linkerd.io/v1alpha2``): routes in order, the first whose
  ``condition`` matches wins (``method``, ``pathRegex``, ``all``/``any``/``not``; several
  fields in one condition must all match). ``pathRegex`` is anchored as the proxy does
  (``^`` and ``$`` added when missing) and matched against the request path as sent to
  the service (still percent-encoded). A route's ``timeout`` (Go duration; none when
  absent) bounds the answer, retries included. ``isRetryable`` routes retry failures
  (``responseClasses`` decide, first match wins; unmatched 5xx are failures) with no
  per-request limit: only the profile's ``retryBudget`` (one budget for the whole
  profile; defaults retryRatio 0.2, minRetriesPerSecond 10, ttl 10s; ttl 1s..60s).
- A profile with routes or ``dstOverrides`` wins over the Service's annotations; one
  without either does not (the proxy then uses the annotations' policy).
- **Annotations** (``timeout.linkerd.io/request``, ``retry.linkerd.io/http``,
  ``retry.linkerd.io/limit`` (default 1), ``retry.linkerd.io/timeout``): one policy for
  every request to the service; durations are whole numbers with ``ms``/``s``/``m``/
  ``h``/``d``; retries back off 25-250 ms with full jitter, as the proxy is configured;
  no budget. A value that does not parse is reported and ignored, the others apply.
- A profile that does not parse is reported and ignored as a whole: the service then
  behaves as with no profile.

``pathRegex`` is RE2 syntax (the proxy's Rust ``regex`` crate is RE2-compatible), compiled
by RE2 itself (PyPI's ``google-re2``): what RE2 does not have (backreferences,
lookaround, atomic groups, possessive repeats) is refused with RE2's own message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import re2

from .retry_budget import BudgetStore, RetryBudget

Matcher = Callable[[str, str], bool]

#: Linkerd's retry budget when a ServiceProfile gives none (controller's defaults).
DEFAULT_BUDGET = {"retryRatio": 0.2, "minRetriesPerSecond": 10, "ttl": "10s"}
#: Retry back-off of annotation-configured retries (the policy controller's values).
ANNOTATION_BACKOFF = (0.025, 0.25)
SERVER_ERRORS = frozenset(range(500, 600))
_PROFILE_KEYS = frozenset({"routes", "retryBudget", "dstOverrides", "opaquePorts"})
_ROUTE_KEYS = frozenset({"name", "condition", "responseClasses", "isRetryable", "timeout"})
_MATCH_KEYS = frozenset({"all", "any", "not", "pathRegex", "method"})
_RESPONSE_KEYS = frozenset({"all", "any", "not", "status"})
_APPLIED_ANNOTATIONS = frozenset(
    {
        "timeout.linkerd.io/request",
        "retry.linkerd.io/http",
        "retry.linkerd.io/limit",
        "retry.linkerd.io/timeout",
    }
)


class PolicyError(ValueError):
    """A policy document (or one of its values) that cannot be used; says where and why."""


# -- the per-request value ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """What applies to the requests of one route.

    ``timeout``: seconds for the answer head, every attempt included (``None``: the
    service's own timeout only; the shorter of the two wins). ``retry_statuses``: the
    answers retried. ``limit``: retries per request (``None``: the budget alone decides).
    ``try_timeout``: seconds per attempt after which it is abandoned and retried (not for
    the last attempt allowed). ``budget``: the :class:`RetryBudget` every retry draws on
    (``None``: none). ``backoff``: (first, cap) seconds between retries, jittered.
    ``source`` says where the values came from; ``condition`` is the match as written.
    """

    name: str
    source: str
    timeout: float | None = None
    retry_statuses: frozenset[int] = frozenset()
    limit: int | None = None
    try_timeout: float | None = None
    budget: RetryBudget | None = field(default=None, compare=False)
    backoff: tuple[float, float] | None = None
    condition: Any = field(default=None, compare=False)
    #: Answer retries count against the service's ``retries`` (the gateway's own policy).
    shared_limit: bool = False
    #: (value, source) for each value set, e.g. ``("timeout", "serviceprofile ns/x ...")``.
    origins: tuple[tuple[str, str], ...] = ()

    def over(self, base: RoutePolicy | None) -> RoutePolicy:
        """This (mesh) policy with the gateway's own ``base`` filling what it leaves
        unset. The retry values go as one: a retryable mesh route keeps its statuses,
        limit, back-off and budget (none for Linkerd's annotations, as the proxy has
        none there); otherwise the config's apply."""
        if base is None:
            return self
        retry = self if self.retryable else base
        mine = dict(self.origins or _origins(self, self.source))
        theirs = dict(base.origins or _origins(base, base.source))
        origins = {}
        for key, value in (("timeout", self.timeout), ("tryTimeout", self.try_timeout)):
            origins[key] = mine.get(key) if value is not None else theirs.get(key)
        for key in ("retryOn", "limit", "backoff", "budget"):
            origins[key] = (mine if retry is self else theirs).get(key)
        return RoutePolicy(
            name=self.name,
            source=self.source,
            timeout=self.timeout if self.timeout is not None else base.timeout,
            retry_statuses=retry.retry_statuses,
            limit=retry.limit,
            try_timeout=self.try_timeout if self.try_timeout is not None else base.try_timeout,
            budget=retry.budget,
            backoff=retry.backoff,
            condition=self.condition,
            shared_limit=retry.shared_limit,
            origins=tuple((k, v) for k, v in origins.items() if v is not None),
        )

    @property
    def retryable(self) -> bool:
        """Whether requests on this route are ever retried for their answer."""
        return bool(self.retry_statuses) or self.try_timeout is not None

    def to_dict(self) -> dict:
        """The admin view of this route (``/admin/services/<name>``)."""
        doc: dict[str, Any] = {
            "name": self.name,
            "condition": self.condition,
            "timeout": self.timeout,
            "retryable": self.retryable,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "source": self.source,
        }
        if self.retryable:
            doc["retryOn"] = _ranges(self.retry_statuses)
            doc["limit"] = self.limit
            if self.try_timeout is not None:
                doc["tryTimeout"] = self.try_timeout
        if self.backoff is not None:
            doc["backoff"] = {"base": self.backoff[0], "max": self.backoff[1]}
        doc["origins"] = dict(self.origins or _origins(self, self.source))
        return doc


def _origins(policy: RoutePolicy, source: str) -> tuple[tuple[str, str], ...]:
    """Every value ``policy`` sets, attributed to ``source``."""
    values = {
        "timeout": policy.timeout,
        "tryTimeout": policy.try_timeout,
        "budget": policy.budget,
        "retryOn": policy.retry_statuses or None,
        "limit": policy.limit if policy.retryable else None,
        "backoff": policy.backoff,
    }
    return tuple((k, source) for k, v in values.items() if v is not None)


def config_policy(svc, store: BudgetStore | None) -> RoutePolicy | None:
    """The gateway's own per-route policy for ``svc`` (a ``ServiceConfig``): its
    ``tryTimeout`` and ``retryPolicy`` (statuses, back-off, budget), or ``None`` when it
    sets none of them (the request path then pays nothing for it). The budget counts in
    ``store`` under ``config:<service>``: every worker of the host shares it."""
    rp = svc.retry_policy
    budget = None
    if rp.budget is not None and store is not None and svc.retries > 0:
        b = rp.budget
        budget = store.budget(f"config:{svc.name}", b.ratio, b.min_per_second, b.ttl)
    if not rp.statuses and svc.try_timeout is None and budget is None:
        return None
    return RoutePolicy(
        name="default",
        source="config",
        retry_statuses=rp.statuses,
        limit=svc.retries,
        try_timeout=svc.try_timeout,
        budget=budget,
        backoff=(rp.backoff.base, rp.backoff.max),
        shared_limit=True,
    )


@dataclass(frozen=True, slots=True)
class _Route:
    matches: Matcher
    policy: RoutePolicy


class ServicePolicy:
    """One service's compiled mesh policy: its routes (first match wins), the policy for
    every request when it comes from annotations, and what could not be used."""

    __slots__ = (
        "annotations",
        "default",
        "errors",
        "notes",
        "profile",
        "routes",
        "service",
        "source",
        "text",
    )

    def __init__(
        self,
        service: str,
        text: str = "",
        source: str | None = None,
        routes: tuple[_Route, ...] = (),
        default: RoutePolicy | None = None,
        annotations: dict | None = None,
        profile: str | None = None,
        errors: list[str] | None = None,
        notes: list[str] | None = None,
    ) -> None:
        self.service = service
        self.text = text
        self.source = source
        self.routes = routes
        self.default = default
        self.annotations = annotations or {}
        self.profile = profile
        self.errors = errors or []
        self.notes = notes or []

    @classmethod
    def compile(
        cls,
        policy_text: str,
        service_name: str,
        budgets: BudgetStore | None = None,
        service_ref: str | None = None,
    ) -> ServicePolicy:
        """Compile a service's policy text (``ServiceEndpoints.policy``: canonical JSON,
        ``""`` for none). Never raises: what cannot be used is listed in ``errors``.

        ``budgets``: where retry budgets count (shared by the host's workers); ``None``
        counts in this process only. ``service_ref``: the Kubernetes Service as
        ``<namespace>/<name>``, for the source of annotation values.
        """
        if not policy_text:
            return cls(service_name)
        try:
            doc = json.loads(policy_text)
            if not isinstance(doc, dict):
                raise PolicyError("the policy document must be an object")
        except (ValueError, RecursionError) as exc:
            return cls(service_name, policy_text, errors=[f"policy: not usable: {exc}"])
        errors: list[str] = []
        notes: list[str] = []
        annotations = doc.get("annotations") or {}
        if not isinstance(annotations, dict):
            errors.append("annotations: must be an object; ignored")
            annotations = {}
        annotations = {str(k): str(v) for k, v in annotations.items()}
        service_ref = service_ref or _service_ref(doc, service_name)
        profile = doc.get("profile")
        store = budgets if budgets is not None else BudgetStore(None)
        if profile is not None:
            try:
                name, routes, overrides = _compile_profile(profile, store)
            except PolicyError as exc:
                errors.append(f"{exc}; the profile is ignored")
            except RecursionError:
                errors.append("profile: conditions nested too deep; the profile is ignored")
            else:
                if routes or overrides:
                    if _APPLIED_ANNOTATIONS & annotations.keys():
                        notes.append(f"annotations ignored: ServiceProfile {name} exists (it wins)")
                    if overrides:
                        notes.append("dstOverrides are the Linkerd proxy's to apply")
                    return cls(
                        service_name,
                        policy_text,
                        f"serviceprofile {name}",
                        routes,
                        None,
                        annotations,
                        name,
                        errors,
                        notes,
                    )
                notes.append(
                    f"ServiceProfile {name} has no routes: the annotations apply, as in Linkerd"
                )
        default = _compile_annotations(annotations, service_ref, errors, notes)
        return cls(
            service_name,
            policy_text,
            default.source if default is not None else None,
            (),
            default,
            annotations,
            None,
            errors,
            notes,
        )

    def with_base(self, base: RoutePolicy | None) -> ServicePolicy:
        """This mesh policy with the gateway's own ``base`` under every route (and as
        the policy of requests no mesh route matches)."""
        if base is None:
            return self
        routes = tuple(_Route(r.matches, r.policy.over(base)) for r in self.routes)
        default = self.default.over(base) if self.default is not None else base
        return ServicePolicy(
            self.service,
            self.text,
            self.source or "config",
            routes,
            default,
            self.annotations,
            self.profile,
            self.errors,
            self.notes,
        )

    def match(self, method: str, path: str) -> RoutePolicy | None:
        """The policy for a request (``path`` as sent upstream, no query), or ``None``."""
        for route in self.routes:
            if route.matches(method, path):
                return route.policy
        return self.default

    def describe(self) -> dict:
        """The admin view: where the policy comes from, its routes, what was wrong."""
        routes = [r.policy.to_dict() for r in self.routes]
        if self.default is not None:
            routes.append(self.default.to_dict())
        return {
            "source": self.source,
            "routes": routes,
            "annotations": self.annotations,
            "errors": list(self.errors),
            "notes": list(self.notes),
        }


def _service_ref(doc: dict, service_name: str) -> str:
    svc = doc.get("service")
    if isinstance(svc, dict) and svc.get("name"):
        ns = svc.get("namespace")
        return f"{ns}/{svc['name']}" if ns else str(svc["name"])
    ns = doc.get("namespace")
    return f"{ns}/{service_name}" if isinstance(ns, str) and ns else service_name


# -- ServiceProfile ------------------------------------------------------------------------


def _compile_profile(profile: Any, store: BudgetStore) -> tuple[str, tuple[_Route, ...], bool]:
    """(``<ns>/<name>``, routes, has dstOverrides); raises PolicyError naming the field."""
    if not isinstance(profile, dict):
        raise PolicyError("profile: must be an object")
    pname = profile.get("name")
    if not isinstance(pname, str) or not pname:
        raise PolicyError("profile.name: missing")
    ns = profile.get("namespace") or ""
    ref = f"{ns}/{pname}" if ns else pname
    if profile.get("error"):  # discovery could not even read it as an object with a spec
        raise PolicyError(str(profile["error"]))
    spec = profile.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise PolicyError(f"ServiceProfile {ref}: spec: must be an object")
    where = f"ServiceProfile {ref}: "
    _no_unknown(spec, _PROFILE_KEYS, where + "spec")
    budget_doc = spec.get("retryBudget")
    budget_spec = _budget_spec(budget_doc, where) if budget_doc is not None else None
    if budget_spec is None:
        budget_spec = (
            DEFAULT_BUDGET["retryRatio"],
            DEFAULT_BUDGET["minRetriesPerSecond"],
            go_duration(DEFAULT_BUDGET["ttl"]),
        )
    budget: RetryBudget | None = None
    raw_routes = spec.get("routes") or []
    if not isinstance(raw_routes, list):
        raise PolicyError(where + "routes: must be a list")
    routes = []
    for i, raw in enumerate(raw_routes):
        at = f"{where}routes[{i}]"
        if not isinstance(raw, dict):
            raise PolicyError(f"{at}: must be an object")
        _no_unknown(raw, _ROUTE_KEYS, at)
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise PolicyError(f"{at}.name: a route needs a name")
        if raw.get("condition") is None:
            raise PolicyError(f"{at}.condition: a route needs a condition")
        matches = _request_match(raw["condition"], f"{at}.condition")
        timeout = None
        if raw.get("timeout") not in (None, ""):
            try:
                timeout = go_duration(raw["timeout"])
            except PolicyError as exc:
                raise PolicyError(f"{at}.timeout: {exc}") from None
            if timeout < 0:
                raise PolicyError(f"{at}.timeout: must not be negative")
            timeout = timeout or None  # 0: no timeout, as the controller sends it
        retryable = raw.get("isRetryable", False)
        if not isinstance(retryable, bool):
            raise PolicyError(f"{at}.isRetryable: must be true or false")
        failures = _failure_statuses(raw.get("responseClasses"), f"{at}.responseClasses")
        route_budget = None
        if retryable:
            if budget is None:  # one budget per profile, shared by its retryable routes
                budget = store.budget(f"serviceprofile:{ref}", *budget_spec)
            route_budget = budget
        policy = RoutePolicy(
            name=name,
            source=f"serviceprofile {ref} route {name}",
            timeout=timeout,
            retry_statuses=failures if retryable else frozenset(),
            limit=None,
            budget=route_budget,
            condition=raw["condition"],
        )
        routes.append(_Route(matches, policy))
    return ref, tuple(routes), bool(spec.get("dstOverrides"))


def _budget_spec(doc: Any, where: str) -> tuple[float, int, float]:
    at = where + "retryBudget"
    if not isinstance(doc, dict):
        raise PolicyError(f"{at}: must be an object")
    _no_unknown(doc, frozenset({"retryRatio", "minRetriesPerSecond", "ttl"}), at)
    ratio = doc.get("retryRatio", 0)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1000:
        raise PolicyError(f"{at}.retryRatio: must be a number from 0 to 1000")
    floor = doc.get("minRetriesPerSecond", 0)
    if isinstance(floor, bool) or not isinstance(floor, int) or not 0 <= floor < 2**31:
        raise PolicyError(f"{at}.minRetriesPerSecond: must be a whole number >= 0")
    if not doc.get("ttl"):
        raise PolicyError(f"{at}.ttl: missing")
    try:
        ttl = go_duration(doc["ttl"])
    except PolicyError as exc:
        raise PolicyError(f"{at}.ttl: {exc}") from None
    if not 1 <= ttl <= 60:
        raise PolicyError(f"{at}.ttl: must be from 1s to 60s (the proxy refuses others)")
    return float(ratio), floor, ttl


def _no_unknown(doc: dict, known: frozenset[str], at: str) -> None:
    extra = sorted(set(doc) - known)
    if extra:
        raise PolicyError(f"{at}: unknown field {extra[0]!r}")


def _request_match(cond: Any, at: str) -> Matcher:
    if not isinstance(cond, dict):
        raise PolicyError(f"{at}: must be an object")
    _no_unknown(cond, _MATCH_KEYS, at)
    parts: list[Matcher] = []
    for key, subs in _nested(cond, at, _request_match):
        parts.append(_all(subs) if key == "all" else _any(subs))
    method = cond.get("method")
    if method not in (None, ""):
        if not isinstance(method, str):
            raise PolicyError(f"{at}.method: must be a string")
        wanted = method.upper()
        parts.append(lambda m, p, wanted=wanted: m == wanted)
    if cond.get("not") is not None:
        inner = _request_match(cond["not"], f"{at}.not")
        parts.append(lambda m, p, inner=inner: not inner(m, p))
    regex = cond.get("pathRegex")
    if regex not in (None, ""):
        if not isinstance(regex, str):
            raise PolicyError(f"{at}.pathRegex: must be a string")
        try:
            search = compile_path_regex(regex).search
        except PolicyError as exc:
            raise PolicyError(f"{at}.pathRegex: {exc}") from None
        parts.append(lambda m, p, search=search: search(p) is not None)
    if not parts:
        raise PolicyError(f"{at}: a request match must have a field set")
    return parts[0] if len(parts) == 1 else _all(parts)


def _nested(cond: dict, at: str, build: Callable[[Any, str], Any]) -> list[tuple[str, list]]:
    """``[(key, built items)]`` for a condition's ``all`` and ``any`` lists: request and
    response matches nest the same way (a null item is an error, as in Linkerd)."""
    out = []
    for key in ("all", "any"):
        items = cond.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise PolicyError(f"{at}.{key}: must be a list")
        subs = []
        for i, item in enumerate(items):
            if item is None:
                raise PolicyError(f'{at}.{key}[{i}]: null condition "{key}"')
            subs.append(build(item, f"{at}.{key}[{i}]"))
        out.append((key, subs))
    return out


# Plain loops, not all()/any(): no generator object per request.
def _all(subs: list[Matcher]) -> Matcher:
    def matches(m: str, p: str) -> bool:
        for sub in subs:  # noqa: SIM110
            if not sub(m, p):
                return False
        return True

    return matches


def _any(subs: list[Matcher]) -> Matcher:
    def matches(m: str, p: str) -> bool:
        for sub in subs:  # noqa: SIM110
            if sub(m, p):
                return True
        return False

    return matches


def _failure_statuses(classes: Any, at: str) -> frozenset[int]:
    """The statuses a route counts as failures: its response classes in order (first
    match decides), 5xx for statuses no class matches (the proxy's rule)."""
    if classes is None:
        return SERVER_ERRORS
    if not isinstance(classes, list):
        raise PolicyError(f"{at}: must be a list")
    compiled = []
    for i, rc in enumerate(classes):
        where = f"{at}[{i}]"
        if not isinstance(rc, dict):
            raise PolicyError(f"{where}: must be an object")
        _no_unknown(rc, frozenset({"condition", "isFailure"}), where)
        if rc.get("condition") is None:
            raise PolicyError(f"{where}.condition: a response class needs a condition")
        is_failure = rc.get("isFailure", False)
        if not isinstance(is_failure, bool):
            raise PolicyError(f"{where}.isFailure: must be true or false")
        match = _response_match(rc["condition"], f"{where}.condition")
        if match is not None:  # the proxy drops a class it cannot build (a 0 bound)
            compiled.append((match, is_failure))
    failures = set()
    for status in range(100, 600):
        for match, is_failure in compiled:
            if match(status):
                if is_failure:
                    failures.add(status)
                break
        else:
            if status >= 500:
                failures.add(status)
    return frozenset(failures)


def _response_match(cond: Any, at: str) -> Callable[[int], bool] | None:
    if not isinstance(cond, dict):
        raise PolicyError(f"{at}: must be an object")
    _no_unknown(cond, _RESPONSE_KEYS, at)
    parts: list[Callable[[int], bool]] = []
    for key, subs in _nested(cond, at, _response_match):
        kept = [s for s in subs if s is not None]
        if not kept:
            return None
        parts.append(
            (lambda s, kept=kept: all(k(s) for k in kept))
            if key == "all"
            else (lambda s, kept=kept: any(k(s) for k in kept))
        )
    status = cond.get("status")
    if status is not None:
        if not isinstance(status, dict):
            raise PolicyError(f"{at}.status: must be an object with min and max")
        _no_unknown(status, frozenset({"min", "max"}), f"{at}.status")
        lo, hi = status.get("min", 0), status.get("max", 0)
        for bound, value in (("min", lo), ("max", hi)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise PolicyError(f"{at}.status.{bound}: must be a whole number")
            if value and not 100 <= value <= 599:
                raise PolicyError(f"{at}.status.{bound}: must be between 100 and 599")
        if lo and hi and hi < lo:
            raise PolicyError(f"{at}.status: maximum cannot be smaller than minimum")
        if not lo or not hi:
            return None
        parts.append(lambda s, lo=lo, hi=hi: lo <= s <= hi)
    if cond.get("not") is not None:
        inner = _response_match(cond["not"], f"{at}.not")
        if inner is None:
            return None
        parts.append(lambda s, inner=inner: not inner(s))
    if not parts:
        raise PolicyError(f"{at}: a response match must have a field set")
    return parts[0] if len(parts) == 1 else (lambda s: all(p(s) for p in parts))


def _ranges(statuses: frozenset[int]) -> list[str]:
    """``[500, 501, ..., 599]`` -> ``["500-599"]`` for the admin view."""
    out: list[str] = []
    run: list[int] = []
    for s in sorted(statuses):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return out


# -- annotations ---------------------------------------------------------------------------


def _compile_annotations(
    annotations: dict[str, str], service_ref: str, errors: list[str], notes: list[str]
) -> RoutePolicy | None:
    """The Service-wide policy of Linkerd 2.16's annotations, or ``None`` when none."""

    def value(key: str, parse: Callable[[str], Any]) -> Any:
        raw = annotations.get(key)
        if raw is None:
            return None
        try:
            return parse(raw)
        except (PolicyError, ValueError) as exc:
            errors.append(f"annotation {key}: {raw!r}: {exc}; ignored")
            return None

    timeout = value("timeout.linkerd.io/request", annotation_duration) or None
    limit = value("retry.linkerd.io/limit", _annotation_limit) or None
    try_timeout = value("retry.linkerd.io/timeout", annotation_duration) or None
    statuses = value("retry.linkerd.io/http", retry_conditions)
    for key in sorted(annotations):
        linkerd = key.startswith(("timeout.linkerd.io/", "retry.linkerd.io/"))
        if linkerd and key not in _APPLIED_ANNOTATIONS:
            notes.append(f"annotation {key} is shown, not applied by the gateway")
    retries = limit is not None or try_timeout is not None or statuses is not None
    if timeout is None and not retries:
        return None
    return RoutePolicy(
        name="default",
        source=f"annotations on Service {service_ref}",
        timeout=timeout,
        retry_statuses=(statuses or frozenset()) if retries else frozenset(),
        limit=(limit or 1) if retries else None,
        try_timeout=try_timeout if retries else None,
        backoff=ANNOTATION_BACKOFF if retries else None,
        condition=None,
    )


def _annotation_limit(raw: str) -> int:
    text = raw.strip()
    if not text.isdigit() or int(text) > 65535:
        raise PolicyError("must be a whole number from 0 to 65535")
    return int(text)  # 0: the default (1), as the policy controller reads it


def retry_conditions(raw: str) -> frozenset[int]:
    """``retry.linkerd.io/http``: ``5xx``, ``gateway-error`` (502-504), ``xxx`` or
    ``xxx-yyy``, comma-separated; codes 100-599. Raises PolicyError."""
    statuses: set[int] = set()
    for part in raw.split(","):
        cond = part.strip()
        if cond.lower() == "5xx":
            statuses.update(range(500, 600))
        elif cond.lower() == "gateway-error":
            statuses.update(range(502, 505))
        elif _code(cond) is not None:
            statuses.add(_code(cond))  # type: ignore[arg-type]
        elif "-" in cond and all(_code(c) is not None for c in cond.split("-", 1)):
            lo, hi = (int(c) for c in cond.split("-", 1))
            if lo > hi:
                raise PolicyError(f"invalid retry condition {cond!r}: range runs backwards")
            statuses.update(range(lo, hi + 1))
        else:
            raise PolicyError(f"invalid retry condition {cond!r}")
    return frozenset(statuses)


def _code(text: str) -> int | None:
    text = text.strip()
    if text.isdigit() and 100 <= int(text) < 600:
        return int(text)
    return None


_ANNOTATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def annotation_duration(raw: str) -> float:
    """A Linkerd policy-controller duration: a whole number and ``ms``/``s``/``m``/``h``/
    ``d`` (``"0"`` alone is zero); seconds. Raises PolicyError."""
    text = raw.strip()
    if text.startswith("-"):
        raise PolicyError("a duration cannot be negative")
    m = re.fullmatch(r"(\d+(?:\.\d*)?)([a-z]*)", text)
    if m is None:
        raise PolicyError("not a duration (e.g. 500ms, 2s, 1m)")
    number, unit = m.groups()
    if "." in number:
        raise PolicyError("fractional values are not supported")
    if unit == "" and int(number) == 0:
        return 0.0
    if unit == "":
        raise PolicyError(f"missing unit; did you mean {number}s or {number}ms?")
    if unit not in _ANNOTATION_UNITS:
        raise PolicyError(f"invalid unit {unit!r} (ms, s, m, h or d)")
    return int(number) * _ANNOTATION_UNITS[unit]


# -- Go durations ------------------------------------------------------------------------

_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_PART = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def go_duration(raw: Any) -> float:
    """Go's ``time.ParseDuration`` (what ServiceProfiles are written in), in seconds:
    ``300ms``, ``1.5s``, ``1m30s``, ``-2h``, ``0``. Raises PolicyError."""
    if not isinstance(raw, str):
        raise PolicyError(f"not a duration: {raw!r}")
    text = raw
    sign = 1.0
    if text[:1] in ("-", "+"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise PolicyError(f"invalid duration {raw!r}")
    total = 0.0
    pos = 0
    while pos < len(text):
        m = _GO_PART.match(text, pos)
        whole, frac, unit = m.groups() if m else ("", None, "")
        if not m or (not whole and not frac) or m.end() == pos:
            raise PolicyError(f"invalid duration {raw!r}")
        if not unit:
            raise PolicyError(f"missing unit in duration {raw!r}")
        if unit not in _GO_UNITS:
            raise PolicyError(f"unknown unit {unit!r} in duration {raw!r}")
        total += float(f"{whole or 0}.{frac or 0}") * _GO_UNITS[unit]
        pos = m.end()
    return sign * total


# -- RE2 path regexes ------------------------------------------------------------------------

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is reported by us, not printed to stderr


def compile_path_regex(regex: str):
    """The pattern the Linkerd proxy builds from a ``pathRegex``: trimmed, ``^``/``$``
    added where missing (as text, exactly as the proxy does), compiled by RE2 itself
    (google-re2): the same syntax as the proxy's Rust ``regex`` crate, and matching in
    time linear in the path, so no profile can make a request path backtrack for ever.
    Use ``.search``. Raises PolicyError naming what is wrong."""
    text = regex.strip()
    anchored = ("" if text.startswith("^") else "^") + text + ("" if text.endswith("$") else "$")
    try:
        return re2.compile(anchored, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PolicyError(f"invalid regex {regex!r}: {reason}") from None
