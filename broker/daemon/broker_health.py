"""The broker's health, as its dispatch loop reports it, and the HTTP port that serves it.

`optuna-rq broker --metrics-port P` serves, from one background thread:

    /metrics  Prometheus metrics (prometheus_client's own exposition)
    /healthz  liveness: the loop completed a turn within the stall limit (or is riding out a
              Redis outage, which it beats through); a restart is what helps when it fails
    /readyz   readiness: the broker holds the prefix's lock, its Redis answers and the loop is
              turning; fails before the broker serves, while it stands by (`--standby`: /healthz
              passes meanwhile), during an outage and once it stopped

Both health paths answer 200 `ok` or 503 with a one-line reason. The HTTP thread only reads
what the loop wrote: a stuck loop cannot hide behind a live thread (as it would if /metrics
were the probe), and a probe never waits on Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from optuna_rq.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["DEFAULT_STALL_LIMIT_S", "BrokerHealth", "serve_http"]

log = logging.getLogger("optuna_rq.daemon.broker_health")

DEFAULT_STALL_LIMIT_S = 60.0
"""How long one turn of the loop may take before the broker counts as stuck. A turn is
normally under a second (it blocks at most `poll_s` on the result stream); the slow ones open a
study's storage or ask many trials at once."""


class BrokerHealth:
    """What the loop last reported. Written by the loop's thread, read by the HTTP thread: each
    field is one reference or float assignment, so no lock is needed."""

    def __init__(self, stall_limit_s: float = DEFAULT_STALL_LIMIT_S) -> None:
        if stall_limit_s <= 0:
            raise ConfigError(f"--stall-limit {stall_limit_s!r}: must be more than 0 seconds")
        self.stall_limit_s = stall_limit_s
        self._beat = time.monotonic()  # a broker starting up has a stall limit to get going
        self._serving = False
        self._not_ready: str | None = "the broker has not started serving yet"
        self._outage: str | None = None

    # written by the loop

    def beat(self) -> None:
        """The loop completed a turn (or one more wait for Redis)."""
        self._beat = time.monotonic()

    def serving(self) -> None:
        """The broker holds the lock and is about to turn the loop."""
        self._serving, self._not_ready = True, None
        self.beat()

    def outage(self, error: BaseException) -> None:
        """Redis stopped answering: not ready until `recovered`."""
        self._outage = f"Redis is unreachable: {_one_line(error)}"

    def recovered(self) -> None:
        self._outage = None
        self.beat()

    def standing_by(self, holder: str) -> None:
        """The broker waits for the lock `holder` holds (`--standby`): alive, not ready, so that
        an orchestrator neither restarts it nor routes to it."""
        self._serving, self._not_ready = False, f"standing by: the active broker is {holder}"
        self.beat()

    def stopped(self, why: str) -> None:
        """The broker no longer serves (stopping, lost its lock, failed): never ready again."""
        self._serving, self._not_ready = False, why

    # read by the probes

    @property
    def is_serving(self) -> bool:
        return self._serving

    def liveness(self) -> str | None:
        """None if alive, else why not."""
        idle_s = time.monotonic() - self._beat
        if idle_s > self.stall_limit_s:
            return (
                f"the dispatch loop has not completed a turn for {idle_s:.0f}s "
                f"(stall limit {self.stall_limit_s:g}s)"
            )
        return None

    def readiness(self) -> str | None:
        """None if ready, else why not."""
        if not self._serving:
            return self._not_ready or "the broker is not serving"
        return self._outage or self.liveness()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def serve_http(port: int, registry: CollectorRegistry, health: BrokerHealth) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on `port` (all interfaces) from a daemon thread."""
    # Here, not at the top: every `optuna-rq` command imports this module's default.
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                problem = health.liveness() if path == "/healthz" else health.readiness()
                text = "ok" if problem is None else problem
                self._reply(200 if problem is None else 503, f"{text}\n".encode(), "text/plain")
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            # Probes come every few seconds: not worth a line each on the broker's log.
            log.debug("%s " + format, self.address_string(), *args)

    server = ThreadingHTTPServer(("", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="broker-http", daemon=True).start()
    return server
