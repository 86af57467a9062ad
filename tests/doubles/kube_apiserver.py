"""A kube-apiserver stand-in served over real HTTPS on 127.0.0.1.

Usage::

    with KubeApiServerDouble(tokens={"s3cr3t": "system:serviceaccount:odin:gateway"}) as kube:
        kube.upsert_service("shop", "orders", ports=[{"name": "http", "port": 80}])
        kube.upsert_endpoint_slice("shop", "orders-abc", "orders",
                                   endpoints=[SliceEndpoint("10.0.0.7", zone="a")],
                                   ports=[{"name": "http", "port": 8080}])
        kube.write_kubeconfig(tmp_path / "kubeconfig", "s3cr3t", namespace="shop")

It serves GET list / get / watch of ``discovery.k8s.io/v1`` EndpointSlices, ``v1``
Services and ``linkerd.io/v1alpha2`` ServiceProfiles as kube-apiserver does, over TLS
with a server certificate for ``127.0.0.1`` and ``kubernetes.default.svc`` signed by a
test CA, HTTP/1.1 keep-alive, one thread per connection. Where to look:
``kube_http`` (authentication, RBAC, list/get semantics), ``kube_watch`` (watch
streams), ``kube_store`` (the global resourceVersion, history, 410), ``kube_model``
(object and Status shapes), ``kube_selectors``, ``kube_objects`` (the ``upsert_*`` /
``delete_*`` API) and ``kube_credentials`` (kubeconfig, service-account files).

Failure switches: :meth:`go_down` / :meth:`come_up` (same port; open watches are cut),
:meth:`hang`, :meth:`forbid` (RBAC 403), token :meth:`revoke_token` /
:meth:`rotate_token`, :meth:`compact` (older RVs get 410). Records: :attr:`requests`
(with the token each used), :meth:`watches_open`.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.doubles.kube_credentials import write_kubeconfig, write_service_account_dir
from tests.doubles.kube_http import KubeApi, KubeRequest
from tests.doubles.kube_model import ResourceType, SliceEndpoint
from tests.doubles.kube_objects import KubeObjects, resource_type
from tests.doubles.kube_store import KubeStore
from tests.doubles.pki import CertificateAuthority, IssuedCert

__all__ = ["DEFAULT_USER", "KubeApiServerDouble", "KubeRequest", "SliceEndpoint"]

DEFAULT_USER = "system:serviceaccount:default:odin-gateway"
#: DNS names of the API server's serving certificate (kubeadm's set, minus the node).
API_DNS_NAMES = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
)
_HANDSHAKE_TIMEOUT = 10.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # kube-apiserver (Go's net/http) listens with the kernel's somaxconn backlog;
    # socketserver's default of 5 drops SYNs when many clients connect at once.
    request_queue_size = 4096

    def __init__(self, address: tuple[str, int], double: KubeApiServerDouble) -> None:
        self.double = double
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Connections cut on purpose, or clients refusing our certificate, are normal.
        if not isinstance(sys.exc_info()[1], OSError):
            self.double.api.errors.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        double = self.server.double
        try:
            if not double._track(self.request, add=True, server=self.server):
                raise ConnectionAbortedError("accepted just before go_down()")
            # The handshake runs here, in the connection's thread, not in accept():
            # one slow client must not hold up everyone else's connections.
            self.request.settimeout(_HANDSHAKE_TIMEOUT)
            self.request.do_handshake()
            self.request.settimeout(None)
            super().setup()
        except BaseException:
            double._track(self.request, add=False)
            raise

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.double._track(self.request, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        # Like Go's net/http: a Date header, no "Server: BaseHTTP/...".
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def _serve(self) -> None:
        self.server.double.api.handle(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve


class KubeApiServerDouble(KubeObjects):
    """kube-apiserver on ``https://127.0.0.1:<port>`` backed by an in-memory store.

    ``tokens`` maps bearer token -> user name (an iterable of tokens gives them all
    ``DEFAULT_USER``). ``ca`` signs the serving certificate (a new one by default).
    ``watch_timeout`` ends a watch without ``timeoutSeconds`` (the real server picks
    30-60 min at random); ``bookmark_interval`` is how often a watch that allows
    bookmarks gets one (the cacher's is about a minute; None: only on
    :meth:`send_bookmarks`). ``history_limit`` caps the events kept for resuming
    watches (None: all, until :meth:`compact`).
    """

    def __init__(
        self,
        tokens: Mapping[str, str] | Iterable[str] = (),
        *,
        ca: CertificateAuthority | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        watch_timeout: float = 300.0,
        bookmark_interval: float | None = 60.0,
        history_limit: int | None = None,
        start_rv: int = 1,
    ) -> None:
        if not isinstance(tokens, Mapping):
            tokens = dict.fromkeys(tokens, DEFAULT_USER)
        self.host = host
        self._port = port
        self.ca = ca or CertificateAuthority(trust_domain="cluster.local", common_name="kubernetes")
        self.server_cert: IssuedCert = self.ca.issue(
            dns_names=API_DNS_NAMES, ips=(host,), common_name="kube-apiserver"
        )
        super().__init__(KubeStore(start_rv=start_rv, history_limit=history_limit))
        self.api = KubeApi(
            self.store,
            dict(tokens),
            watch_timeout=watch_timeout,
            bookmark_interval=bookmark_interval,
        )
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._started = self._stopped = False
        self._tmp: Path | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> KubeApiServerDouble:
        """Bind (port 0 picks a free one), start serving; return self."""
        if not self._started:
            self._started = True
            self._bind()
        return self

    def stop(self) -> None:
        """Stop for good: cut every connection, wait (bounded) for their threads."""
        if self._stopped:
            return
        self._stopped = True
        self.go_down()
        deadline = time.monotonic() + 5
        with self._lock:
            threads = list(self._conns.values())
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> KubeApiServerDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        directory = self._scratch()
        cert, key = self.server_cert.write(directory, "apiserver.crt", "apiserver.key")
        ctx.load_cert_chain(cert, key)
        return ctx

    def _bind(self) -> None:
        deadline = time.monotonic() + 5
        while True:
            try:
                server = _Server((self.host, self._port), self)
                break
            except OSError as exc:  # come_up: the old socket may linger a moment
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._port = server.server_address[1]
        server.socket = self._tls_context().wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="kube-apiserver-double",
            daemon=True,
        )
        with self._lock:
            self._server, self._thread = server, thread
        thread.start()

    def _track(self, conn: socket.socket, *, add: bool, server: _Server | None = None) -> bool:
        """Add or remove an open connection. Adding fails once ``server`` stopped
        serving, so a connection accepted during go_down() cannot outlive it."""
        with self._lock:
            if not add:
                self._conns.pop(conn, None)
                return True
            if server is not self._server:
                return False
            self._conns[conn] = threading.current_thread()
            return True

    # -- where clients find it --------------------------------------------------------
    @property
    def port(self) -> int:
        """The TCP port (kept across go_down/come_up)."""
        return self._port

    @property
    def url(self) -> str:
        """``https://127.0.0.1:<port>``."""
        return f"https://{self.host}:{self._port}"

    @property
    def ca_pem(self) -> str:
        """PEM of the CA that signed the serving certificate (a pod's ``ca.crt``)."""
        return self.ca.root_pem

    @property
    def ca_file(self) -> str:
        """Path of a file holding :attr:`ca_pem` (removed by stop())."""
        path = self._scratch() / "ca.crt"
        if not path.exists():
            path.write_text(self.ca_pem)
        return str(path)

    @property
    def is_up(self) -> bool:
        """Whether it is listening (False between go_down() and come_up())."""
        return self._server is not None

    def _scratch(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="kube-apiserver-double-"))
        return self._tmp

    def write_kubeconfig(self, path: str | Path, token: str, namespace: str | None = None) -> Path:
        """Write a kubeconfig for this server and ``token`` (see
        :func:`kube_credentials.write_kubeconfig`); return its path."""
        return write_kubeconfig(path, self.url, self.ca_pem, token, namespace)

    def write_service_account_dir(self, directory: str | Path, token: str, namespace: str) -> Path:
        """Write a pod's service-account files (``token``, ``ca.crt``, ``namespace``);
        call again to rotate the token (files are swapped atomically)."""
        return write_service_account_dir(directory, self.ca_pem, token, namespace)

    def in_cluster_env(self) -> dict[str, str]:
        """``KUBERNETES_SERVICE_HOST``/``PORT`` as the kubelet sets them in a pod."""
        return {"KUBERNETES_SERVICE_HOST": self.host, "KUBERNETES_SERVICE_PORT": str(self._port)}

    # -- failure switches -------------------------------------------------------------
    def go_down(self) -> None:
        """Stop listening (connections are refused) and cut every open connection,
        watch streams included (clients see the stream end mid-way)."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            conns = list(self._conns)
        self.api.cut()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)

    def come_up(self) -> None:
        """Listen again on the same port; objects and history are kept."""
        if self._stopped:
            raise RuntimeError("the kube-apiserver double was stopped")
        if self._server is None:
            self._bind()

    def hang(self, on: bool = True) -> None:
        """Read requests but answer none until ``hang(False)`` (at most ``HANG_LIMIT``
        seconds, then the connection is dropped). Open watches keep streaming."""
        with self.store.cond:
            self.api.hanging = on
            self.store.cond.notify_all()

    def forbid(
        self, resource: str | ResourceType, verbs: Iterable[str] = ("get", "list", "watch")
    ) -> None:
        """Answer 403 Forbidden to ``verbs`` on ``resource`` (plural or kind), as RBAC
        does when the service account lacks the permission."""
        rt = resource_type(resource)
        with self.store.cond:
            self.api.forbidden.update((rt.plural, v) for v in verbs)

    def allow(
        self, resource: str | ResourceType, verbs: Iterable[str] = ("get", "list", "watch")
    ) -> None:
        """Undo :meth:`forbid` for ``verbs``."""
        rt = resource_type(resource)
        with self.store.cond:
            self.api.forbidden.difference_update((rt.plural, v) for v in verbs)

    def uninstall(self, resource: str | ResourceType, installed: bool = False) -> None:
        """Serve ``resource`` as if its CRD were not installed (``installed=True`` undoes
        it): every request for it gets the apiserver's 404 NotFound Status ("the server
        could not find the requested resource"), lists and watches included."""
        rt = resource_type(resource)
        with self.store.cond:
            if installed:
                self.api.uninstalled.discard(rt.plural)
            else:
                self.api.uninstalled.add(rt.plural)

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK now on every open watch that allowed bookmarks."""
        with self.store.cond:
            self.api.bookmark_gen += 1
            self.store.cond.notify_all()

    # -- tokens -----------------------------------------------------------------------
    def add_token(self, token: str, user: str = DEFAULT_USER) -> None:
        """Accept ``token`` from now on, authenticating as ``user``."""
        with self.store.cond:
            self.api.tokens[token] = user

    def revoke_token(self, token: str) -> None:
        """Refuse ``token`` (401) from now on; watches already open keep going, as
        authentication happens once per request."""
        with self.store.cond:
            self.api.tokens.pop(token, None)

    def rotate_token(self, old: str, new: str) -> None:
        """Replace ``old`` with ``new`` (same user): ``old`` gets 401 afterwards."""
        with self.store.cond:
            user = self.api.tokens.pop(old, DEFAULT_USER)
            self.api.tokens[new] = user

    # -- records ----------------------------------------------------------------------
    @property
    def requests(self) -> list[KubeRequest]:
        """A copy of every request received so far, oldest first."""
        with self.store.cond:
            return list(self.api.log)

    @property
    def errors(self) -> list[str]:
        """Unexpected exceptions raised while serving (should stay empty)."""
        return list(self.api.errors)

    def requests_matching(
        self, path_prefix: str = "/", verb: str | None = None
    ) -> list[KubeRequest]:
        """Requests whose path starts with ``path_prefix`` (and verb: get/list/watch)."""
        return [
            r for r in self.requests if r.path.startswith(path_prefix) and verb in (None, r.verb)
        ]

    def watches_open(self) -> int:
        """How many watch streams are being served right now."""
        with self.store.cond:
            return self.api.open_watches

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
    ) -> None:
        """Poll ``predicate`` until true; TimeoutError naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver double: {what} not met within {timeout} s")
            time.sleep(0.02)

    def wait_for_watches(self, n: int = 1, timeout: float = 10.0) -> None:
        """Wait until at least ``n`` watch streams are open."""
        self.wait_for(lambda: self.watches_open() >= n, timeout, f"{n} open watch(es)")

    def wait_for_requests(
        self, path_prefix: str = "/", n: int = 1, timeout: float = 10.0, verb: str | None = None
    ) -> list[KubeRequest]:
        """Wait until ``n`` requests matched ``path_prefix`` (and ``verb``); return them."""
        what = f"{n} {verb or ''} request(s) to {path_prefix!r}"
        self.wait_for(lambda: len(self.requests_matching(path_prefix, verb)) >= n, timeout, what)
        return self.requests_matching(path_prefix, verb)
