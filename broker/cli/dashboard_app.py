"""optuna-dashboard's web app on a study storage, served read-only unless asked otherwise.

optuna-dashboard has no read-only switch. Its app (a Bottle WSGI app) reads through GET routes
and writes through POST, PUT and DELETE ones: a study created, renamed or deleted, a trial
ended by hand, notes, user attributes, artifacts, preferences. `read_only` answers every request
that is not a GET or a HEAD with 403 before the app sees it, so nothing a browser sends changes a
storage the broker writes. The storage itself is opened by the caller, as a reader that creates
nothing (`storage.storage_access.open_storage_to_read`).

optuna-dashboard is an extra (`optuna-rq[dashboard]`): it is imported here only, and
`require_dashboard` says how to install it where it is missing.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from optuna_rq.errors import ConfigError, OptunaRQError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from optuna.storages import BaseStorage

__all__ = [
    "INSTALL_LINE",
    "READ_METHODS",
    "DashboardMissingError",
    "bind",
    "dashboard_app",
    "read_only",
    "require_dashboard",
    "serve",
]

log = logging.getLogger("optuna_rq.cli.dashboard_app")

INSTALL_LINE = "pip install 'optuna-rq[dashboard]'"
READ_METHODS = frozenset({"GET", "HEAD"})
"""What a read-only dashboard serves: optuna-dashboard's reads are all GETs."""

_REFUSAL = (
    "this dashboard is read-only: the broker is the one writer of its studies' storage "
    "(`optuna-rq dashboard --allow-writes` lets the page write: notes, tells, renames, deletes)"
)


class DashboardMissingError(OptunaRQError):
    """optuna-dashboard does not import here (the extra is not installed)."""


def require_dashboard() -> None:
    """DashboardMissingError naming the install line unless optuna-dashboard imports."""
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError as exc:
        raise DashboardMissingError(
            f"optuna-dashboard is not installed here ({exc}): install the extra, "
            f"{INSTALL_LINE} (or `uv pip install 'optuna-rq[dashboard]'`)"
        ) from exc


def dashboard_app(storage: BaseStorage, *, allow_writes: bool) -> WSGIApplication:
    """optuna-dashboard's app on `storage`; read-only (`read_only`) unless `allow_writes`."""
    require_dashboard()
    from optuna_dashboard import wsgi

    app: WSGIApplication = wsgi(storage)
    return app if allow_writes else read_only(app)


def read_only(app: WSGIApplication) -> WSGIApplication:
    """`app`, answering a request of any method but GET and HEAD with 403 and the reason, as
    optuna-dashboard's own errors are (JSON `{"reason": ...}`, which its page shows)."""

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "")).upper()
        if method in READ_METHODS:
            return app(environ, start_response)
        log.info("refused %s %s: read-only", method, environ.get("PATH_INFO", ""))
        body = json.dumps({"reason": _REFUSAL}).encode()
        start_response(
            "403 Forbidden",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return guarded


class _Server(ThreadingMixIn, WSGIServer):
    """wsgiref's server, a thread per request (the page polls while a chart loads), as
    optuna-dashboard's own command serves it."""

    daemon_threads = True  # a request in flight does not hold the process at its stop


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Requests are logged at DEBUG, not one stderr line each (the page polls every second)."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def bind(app: WSGIApplication, host: str, port: int) -> WSGIServer:
    """A server for `app` listening on `host`:`port` (0: a free port, see `server_port`);
    ConfigError naming them and the fix if it cannot listen there (the port is taken, the host
    is not an address of this machine)."""
    server_class = _IPv6Server if ":" in host else _Server
    try:
        return make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fix = "the port is taken: choose another with --port (0 picks a free one)"
        elif exc.errno == errno.EACCES:
            fix = "a port below 1024 needs privileges: choose another with --port"
        else:
            fix = "give an address of this machine with --host (default 127.0.0.1)"
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); {fix}"
        ) from exc


def serve(server: WSGIServer, stop: threading.Event) -> None:
    """Serve until `stop` is set (from a signal handler: `server.shutdown` would wait on the
    very loop the handler interrupts), then close the socket."""

    def stop_when_told() -> None:
        stop.wait()
        server.shutdown()

    watcher = threading.Thread(target=stop_when_told, name="dashboard-stop", daemon=True)
    watcher.start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
