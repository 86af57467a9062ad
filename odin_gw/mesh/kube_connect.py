"""How Kubernetes discovery reaches the API server: configuration, token, transport, errors.

Built on lightkube (see the README for why). Its ``KubeConfig`` loads the configuration:
in a pod, the service account (``KUBERNETES_SERVICE_HOST``/``PORT`` and the mounted
``token``, ``ca.crt`` and ``namespace``; the directory may be moved with
``ODIN_K8S_SERVICE_ACCOUNT_DIR``); outside, a kubeconfig file (``serviceMesh.kubeconfig``,
else ``KUBECONFIG``). Its ``AsyncClient`` makes every call. Two pieces are ours:

* The service-account token. lightkube's in-cluster auth reads the token file once and
  again only after a 401. Bound tokens are rotated by the kubelet (about hourly, at 80 % of
  their lifetime, the old one still valid for a while) and client-go re-reads the file
  about every minute; :class:`ServiceAccountToken` stats the file on every request and
  re-reads it when it changed (the kubelet swaps a symlink: inode and mtime change), and
  once more on a 401. The token is never logged, nor put in an error or ``describe()``.
* The transport (lightkube's public ``transport`` parameter): one connection per watch, so
  no pool limit (httpx's default of 100 would stall the 101st watch); no environment
  proxies (the token never goes through a proxy the environment names); TLS verified as
  the configuration says (lightkube's own ``verify_cluster``).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx2 as httpx
import msgspec
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig, SingleConfig
from lightkube.config.client_adapter import verify_cluster
from lightkube.config.models import User

from ..config.model import MeshConfig
from ..errors import MeshError

log = logging.getLogger("odin_gw.mesh.kubernetes")
# httpx logs every request at INFO, each watch reopening too; our own lines say what
# matters. Only when nobody configured that logger.
_httpx_log = logging.getLogger("httpx2")
if _httpx_log.level == logging.NOTSET:
    _httpx_log.setLevel(logging.WARNING)

#: Where a pod's service account is mounted (``ODIN_K8S_SERVICE_ACCOUNT_DIR`` overrides).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_ACCOUNT_ENV = "ODIN_K8S_SERVICE_ACCOUNT_DIR"
#: Seconds one list or get may take (connect, each read, the pool).
CALL_TIMEOUT = 10.0

NO_CONFIG = (
    "no Kubernetes API configuration: set serviceMesh.kubeconfig or the KUBECONFIG "
    "environment variable to a kubeconfig file, or run the gateway in a pod (where "
    "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT and the service-account token are set)"
)


class ServiceAccountToken:
    """A bearer token kept in a file, re-read when the file changes (see module docstring).

    Thread-safe: the watch loop and a discovery pass share one. ``repr`` shows the path
    only.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._header: str | None = None
        self._problem: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ServiceAccountToken({self.path!r})"

    def header(self) -> str:
        """``Bearer <token>``; the file is re-read when it changed since the last call.

        Raises ``MeshError`` when the file cannot be read and no token was ever read (a
        token read before is kept while the file is unreadable, e.g. mid-rotation).
        """
        try:
            st = os.stat(self.path)
            stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError as exc:
            return self._keep(exc)
        if stamp != self._stamp:
            self._read(stamp)
        if self._header is None:
            raise MeshError(f"service-account token {self.path} is empty")
        return self._header

    def reread(self) -> bool:
        """Read the file again whatever its stamp (after a 401); True if the token changed."""
        before = self._header
        with self._lock:
            self._stamp = None
        try:
            self.header()
        except MeshError:
            return False
        return self._header != before

    def _read(self, stamp: tuple[int, int, int, int]) -> None:
        with self._lock:
            try:
                with open(self.path, encoding="utf-8") as fh:
                    token = fh.read().strip()
            except (OSError, UnicodeDecodeError) as exc:
                self._keep(exc)
                return
            if self._header is not None and token and f"Bearer {token}" != self._header:
                log.info("service-account token %s changed: using the new token", self.path)
            if self._problem is not None:
                log.info("service-account token %s readable again", self.path)
                self._problem = None
            self._stamp = stamp
            self._header = f"Bearer {token}" if token else None

    def _keep(self, exc: Exception) -> str:
        problem = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or 'unreadable'}"
        if self._header is None:
            raise MeshError(f"cannot read the service-account token {self.path} ({problem})")
        if problem != self._problem:
            log.warning(
                "service-account token %s cannot be read (%s); keeping the last token read",
                self.path,
                problem,
            )
            self._problem = problem
        return self._header


class _ApiTransport(httpx.AsyncHTTPTransport):
    """httpx transport to the API server: no pool limit, no env proxies, and (in a pod)
    the service-account token set on every request from :class:`ServiceAccountToken`."""

    def __init__(self, verify: ssl.SSLContext | bool, token: ServiceAccountToken | None) -> None:
        super().__init__(
            verify=verify,
            trust_env=False,
            # Every watch holds a connection for as long as it runs.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )
        self._token = token

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._token is None:
            return await super().handle_async_request(request)
        request.headers["Authorization"] = self._token.header()
        response = await super().handle_async_request(request)
        if response.status_code == 401 and self._token.reread():
            # Rotated between our stat and the server's check: try once with the new one
            # (a GET without a body can be sent again).
            await response.aclose()
            request.headers["Authorization"] = self._token.header()
            response = await super().handle_async_request(request)
        return response


@dataclass
class KubeConnection:
    """Where the API server is and how to authenticate; makes lightkube clients.

    ``mode`` is ``in-cluster`` or ``kubeconfig``; ``origin`` the service-account
    directory or the kubeconfig path (and which setting named it).
    """

    mode: str
    config: SingleConfig = field(repr=False)  # a kubeconfig user may hold a token
    origin: str = ""
    token: ServiceAccountToken | None = None
    _ssl: ssl.SSLContext | bool | None = field(default=None, repr=False)

    @property
    def server(self) -> str:
        """The API server URL."""
        return self.config.cluster.server

    def client(self) -> AsyncClient:
        """A new lightkube ``AsyncClient`` (one per event loop: httpx pools are bound to
        the loop that made them). Close it with ``await client.close()``."""
        transport = _ApiTransport(self._tls(), self.token)
        return AsyncClient(
            config=self.config,
            timeout=httpx.Timeout(CALL_TIMEOUT),
            trust_env=False,
            transport=transport,
        )

    def check(self) -> None:
        """Load what every client needs (TLS settings, the token) once: ``MeshError``
        saying what is wrong, before any call is made."""
        self._tls()
        if self.token is not None:
            self.token.header()

    def _tls(self) -> ssl.SSLContext | bool:
        if self._ssl is None:
            cfg = self.config
            try:
                self._ssl = verify_cluster(cfg.cluster, cfg.user or User(), cfg.abs_file, False)
            except (OSError, ssl.SSLError, ValueError, ConfigError) as exc:
                raise MeshError(
                    f"cannot load the TLS settings for the Kubernetes API at {self.server} "
                    f"(from {self.origin}): {exc}"
                ) from None
        return self._ssl

    def describe(self) -> dict:
        """For ``/admin/mesh``: server, mode and where the settings came from (no token)."""
        out = {"apiServer": self.server, "mode": self.mode, "from": self.origin}
        if self.token is not None:
            out["tokenFile"] = self.token.path
        return out

    def explain(self, exc: BaseException, verb: str, resource: str, namespace: str) -> str:
        """A clear message for a failed call: what was asked, of which server, and what
        to do (credentials, RBAC, reachability, TLS)."""
        asked = f"{verb} {resource} in namespace {namespace}"
        code = status_code(exc)
        if code == 401:
            if self.mode == "in-cluster":
                return "Kubernetes API refused the service-account token (401 Unauthorized)"
            return (
                f"Kubernetes API at {self.server} refused the credentials of {self.origin} "
                "(401 Unauthorized)"
            )
        if code == 403:
            return (
                f"Kubernetes API forbids the gateway to {asked} (403 Forbidden: "
                f"{_server_message(exc)}): RBAC must allow get, list and watch on {resource} "
                f"in namespace {namespace}"
            )
        if code == 404 and resource.endswith("linkerd.io"):
            return (
                f"Kubernetes API at {self.server} does not serve {resource} (404): is "
                "Linkerd (its ServiceProfile CRD, linkerd.io/v1alpha2) installed?"
            )
        if code is not None:
            return f"Kubernetes API answered {code} to {asked}: {_server_message(exc)}"
        if isinstance(exc, MeshError):
            return exc.message
        if isinstance(exc, httpx.TimeoutException):
            return f"Kubernetes API at {self.server} did not answer in time ({asked})"
        if isinstance(exc, httpx.ConnectError):
            cause = _short(exc)
            if "SSL" in cause or "certificate" in cause.lower():
                return (
                    f"TLS to the Kubernetes API at {self.server} failed ({cause}); the CA "
                    f"comes from {self.origin}"
                )
            return f"cannot connect to the Kubernetes API at {self.server}: {cause}"
        if isinstance(exc, httpx.HTTPError):
            return (
                f"connection to the Kubernetes API at {self.server} failed ({asked}): {_short(exc)}"
            )
        if isinstance(exc, msgspec.MsgspecError):
            bad = _short(exc)
            return f"Kubernetes API at {self.server} sent malformed {resource} ({asked}): {bad}"
        return f"{asked} at {self.server} failed: {type(exc).__name__}: {_short(exc)}"


def connect(mesh: MeshConfig) -> KubeConnection:
    """The API connection the configuration asks for.

    Order: ``serviceMesh.kubeconfig`` (explicit), then in-cluster when
    ``KUBERNETES_SERVICE_HOST`` is set (a pod), then ``KUBECONFIG`` (its first file).
    ``~/.kube/config`` is never used by default: a gateway should not follow a person's
    current context by accident. Reads ``os.environ`` (as lightkube's loader does).
    Raises ``MeshError`` saying what is missing.
    """
    env = os.environ
    if mesh.kubeconfig:
        return _kubeconfig(mesh.kubeconfig, "serviceMesh.kubeconfig")
    if env.get("KUBERNETES_SERVICE_HOST"):
        return _in_cluster(env)
    if env.get("KUBECONFIG"):
        first = next((p for p in env["KUBECONFIG"].split(os.pathsep) if p), "")
        return _kubeconfig(first, "KUBECONFIG")
    raise MeshError(NO_CONFIG)


def _in_cluster(env: Mapping[str, str]) -> KubeConnection:
    sa_dir = env.get(SERVICE_ACCOUNT_ENV) or SERVICE_ACCOUNT_DIR
    if not env.get("KUBERNETES_SERVICE_PORT"):
        raise MeshError(
            "KUBERNETES_SERVICE_HOST is set but KUBERNETES_SERVICE_PORT is not: cannot "
            "build the in-cluster API address"
        )
    missing = [f for f in ("token", "ca.crt", "namespace") if not os.path.isfile(f"{sa_dir}/{f}")]
    if missing:
        raise MeshError(
            f"running in a pod (KUBERNETES_SERVICE_HOST is set) but the service account "
            f"directory {sa_dir} has no {', '.join(missing)} (is automountServiceAccountToken "
            f"false? {SERVICE_ACCOUNT_ENV} moves the directory)"
        )
    try:
        config = KubeConfig.from_service_account(service_account=sa_dir).get()
    except (ConfigError, OSError, KeyError) as exc:
        raise MeshError(f"cannot load the in-cluster configuration from {sa_dir}: {exc}") from None
    # The token lightkube read is dropped: ours re-reads the file as it rotates.
    config = config._replace(user=User())
    token = ServiceAccountToken(f"{sa_dir}/token")
    return KubeConnection("in-cluster", config, f"service account {sa_dir}", token)


def _kubeconfig(path: str, setting: str) -> KubeConnection:
    try:
        config = KubeConfig.from_file(path).get()
    except ConfigError as exc:
        raise MeshError(f"{setting} {path}: {exc}") from None
    except (OSError, ValueError, KeyError, TypeError, msgspec.MsgspecError) as exc:
        kind = type(exc).__name__
        raise MeshError(f"{setting} {path} is not a usable kubeconfig ({kind}: {exc})") from None
    if config is None:
        raise MeshError(f"{setting} {path}: no current context")
    if config.user is None:
        config = config._replace(user=User())  # lightkube's client wants one, even empty
    return KubeConnection("kubeconfig", config, f"{setting} {path}")


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of a failed call or watch: an HTTP error answer, or a watch's ERROR
    event (lightkube raises it as an ``ApiError`` carrying only the Status)."""
    if isinstance(exc, ApiError) and exc.status is not None and exc.status.code:
        return int(exc.status.code)
    if isinstance(exc, httpx.HTTPStatusError) and exc.response is not None:
        return exc.response.status_code
    return None


def _server_message(exc: BaseException) -> str:
    if isinstance(exc, ApiError) and exc.status is not None and exc.status.message:
        return _short(exc.status.message)
    if isinstance(exc, httpx.HTTPStatusError) and exc.response is not None:
        return exc.response.reason_phrase or "no message"
    return _short(exc)


def _short(exc: object, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."
