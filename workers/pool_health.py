"""The pool's liveness, served over HTTP for an orchestrator's probe.

`optuna-rq workers --health-port P` serves one path from a background thread of the pool's
parent process:

    /healthz  200 `ok` while the pool's supervising loop (the one that renews leases and writes
              the pool's heartbeat) completed a turn within the stall limit; 503 with the reason
              once it has not. A restart is what helps then.

The loop turns at least once a second whatever happens (it waits on its children with a
timeout), and a Redis outage does not stop it: only a loop stuck in a call fails the probe, so
the probe never restarts a pool that is merely waiting for Redis. The HTTP thread only reads the
time the loop wrote, and a frozen process (SIGSTOP) answers nothing, which a probe counts as a
failure too. The children keep their own Prometheus ports (`--metrics-port`).
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from optuna_rq.errors import ConfigError

__all__ = ["DEFAULT_POOL_STALL_LIMIT_S", "PoolLiveness", "serve_liveness"]

log = logging.getLogger("optuna_rq.pool")

DEFAULT_POOL_STALL_LIMIT_S = 60.0
"""How long the pool's loop may go without a turn before the pool counts as stuck. A turn
waits at most a second; the rest is its Redis calls and importing what it serves at start."""


class PoolLiveness:
    """When the pool's loop last turned. Written by the loop, read by the HTTP thread: one float
    assignment, so no lock is needed."""

    def __init__(self, stall_limit_s: float = DEFAULT_POOL_STALL_LIMIT_S) -> None:
        if stall_limit_s <= 0:
            raise ConfigError(f"--stall-limit {stall_limit_s!r}: must be more than 0 seconds")
        self.stall_limit_s = stall_limit_s
        self._beat = time.monotonic()  # a pool starting up has a stall limit to get going

    def beat(self) -> None:
        """The loop completed a turn."""
        self._beat = time.monotonic()

    def problem(self) -> str | None:
        """None if alive, else why not."""
        idle_s = time.monotonic() - self._beat
        if idle_s > self.stall_limit_s:
            return (
                f"the pool's loop has not completed a turn for {idle_s:.0f}s "
                f"(stall limit {self.stall_limit_s:g}s)"
            )
        return None


def serve_liveness(port: int, liveness: PoolLiveness) -> ThreadingHTTPServer:
    """Serve /healthz on `port` (all interfaces) from a daemon thread. OSError if the port is
    taken."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            if self.path.split("?", 1)[0] != "/healthz":
                self._reply(404, "not found: try /healthz")
                return
            problem = liveness.problem()
            self._reply(200 if problem is None else 503, problem or "ok")

        def _reply(self, status: int, text: str) -> None:
            body = f"{text}\n".encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # A probe that gave up (its timeout, while the pool was frozen): nothing to say.
                log.debug("a health probe left before its answer: %s", exc)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("%s " + format, self.address_string(), *args)  # a line per probe: debug

    server = ThreadingHTTPServer(("", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pool-health", daemon=True).start()
    return server
