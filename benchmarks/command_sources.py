"""Who sends each Redis command of a no-op trial: the daemon on its default storage, 2 workers,
RandomSampler, as in `benchmarks.daemon_storage --breakdown`, with every command counted by the
process that sent it (broker, its sampler child, the worker pool, a worker process, this
benchmark polling the study's status) and by command and key.

    uv run python -m benchmarks.command_sources [--trials 300] [--top 60]

It runs on a redis-server of its own on a TCP port, because MONITOR names a client by its address
alone and every unix-socket client has the same one; the local port of each connection is matched
to its process with psutil, polled through the run (the pools keep their connections, so a poll
every few ms sees them all). MONITOR slows the server, so trials/s here mean nothing; the counts
do. Keys are shown with the study prefix as `<p>` and numbers and ids as `#`.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import psutil

from benchmarks.daemon_storage import _Broker, _daemon_study
from benchmarks.run import OurWorkers
from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.embedded import server_executable

__all__ = ["command_sources", "command_sources_lines"]

_ID = re.compile(r"[0-9a-f]{8,}|[0-9a-f]{8}-[0-9a-f-]{27}|\d+")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Ports:
    """The local port of every TCP connection to the server, by the kind of process holding it."""

    def __init__(self, server_port: int, roots: dict[str, int]) -> None:
        self.server_port, self.roots = server_port, roots
        self.kinds: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _processes(self) -> list[tuple[str, psutil.Process]]:
        found = []
        for kind, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            found.append((kind, root))
            if kind != "benchmark":  # the broker and the pool are this process's children
                found += [(f"{kind} child", child) for child in children]
        return found

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(0.005)

    def scan(self) -> None:
        for kind, process in self._processes():
            try:
                connections = process.net_connections(kind="tcp")
            except psutil.Error:
                continue
            for c in connections:
                if c.raddr and c.raddr.port == self.server_port:
                    self.kinds[str(c.laddr.port)] = kind

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _label(command: str, prefix: str) -> tuple[str, str]:
    """(COMMAND, its first key) of a MONITOR line; EVALSHA is named by its first key."""
    words = [w.strip('"') for w in command.split(" ")]
    name = words[0].upper()
    args = words[1:]
    if name in ("EVALSHA", "EVAL") and len(args) >= 3 and args[1] != "0":
        target = args[2]
    elif name in ("XREADGROUP", "XREAD") and "STREAMS" in (a.upper() for a in args):
        target = args[[a.upper() for a in args].index("STREAMS") + 1]
    else:
        target = args[0] if args else ""
    return name, _ID.sub("#", target.replace(prefix, "<p>"))[:70]


def command_sources(n_trials: int, batch: int = 1) -> dict[str, Any]:
    """Commands per trial by process kind, and by (kind, command, key)."""
    port = _free_port()
    state = tempfile.mkdtemp(prefix="orq-bench-sources-", dir="/tmp")
    server = subprocess.Popen(
        [server_executable(), "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=state,
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        while True:
            try:
                connect(url).ping()
                break
            except Exception:
                time.sleep(0.05)
        lines = _monitored_study(url, n_trials, batch)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(state, ignore_errors=True)
    return lines


def _monitored_study(url: str, n_trials: int, batch: int) -> dict[str, Any]:
    workers = OurWorkers(url, 2)
    try:
        broker = _Broker(url, workers.queue, None)
        try:
            ports = _Ports(
                int(url.rsplit(":", 1)[1].split("/")[0]),
                {
                    "broker": broker.process.pid,
                    "pool": workers.process.pid,
                    "benchmark": os.getpid(),
                },
            )
            seen: list[dict[str, Any]] = []
            stopping = threading.Event()
            monitor = threading.Thread(target=_monitor, args=(url, seen, stopping), daemon=True)
            monitor.start()
            while not seen:  # MONITOR is on once the first command shows
                connect(url).ping()
                time.sleep(0.01)
            start = len(seen)
            figures = _daemon_study(broker, n_trials, batch=batch)
            end = len(seen)
            ports.scan()
            ports.stop()
            stopping.set()
            connect(url).ping()
            monitor.join(timeout=10)
        finally:
            broker.stop()
    finally:
        workers.stop()
    by_kind: collections.Counter[str] = collections.Counter()
    by_site: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for line in seen[start:end]:
        if line["client_type"] == "lua":
            kind = "(inside scripts)"
        else:
            kind = ports.kinds.get(line["client_port"], "unattributed")
        name, target = _label(line["command"], workers.queue)
        if kind != "(inside scripts)":
            by_kind[kind] += 1
        by_site[(kind, name, target)] += 1
    return {
        **figures,
        "n_trials": n_trials,
        "commands_per_trial": sum(by_kind.values()) / n_trials,
        "by_process": {k: n / n_trials for k, n in by_kind.most_common()},
        "by_site": [(k, c, t, n / n_trials) for (k, c, t), n in by_site.most_common()],
        "lines": [
            (
                ports.kinds.get(line["client_port"], line["client_type"]),
                line["client_port"],
                line["command"][:160],
            )
            for line in seen[start:end]
        ],
    }


def _monitor(url: str, seen: list[dict[str, Any]], stopping: threading.Event) -> None:
    with connect(url).monitor() as m:  # type: ignore[no-untyped-call]
        for line in m.listen():
            seen.append(line)
            if stopping.is_set():
                return


def command_sources_lines(d: dict[str, Any], top: int) -> list[str]:
    """The counts as tables: per process kind, then the `top` (kind, command, key) rows."""
    lines = [
        f"Redis commands per trial, {d['n_trials']} no-op trials (MONITOR): "
        f"{d['commands_per_trial']:.1f}",
        "",
        "| process | commands/trial |",
        "|---|---|",
        *(f"| {kind} | {n:.2f} |" for kind, n in d["by_process"].items()),
        "",
        "| process | command | key | per trial |",
        "|---|---|---|---|",
    ]
    for kind, name, target, n in d["by_site"][:top]:
        if n >= 0.05:
            lines.append(f"| {kind} | {name} | `{target}` | {n:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--top", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="the study's --batch N")
    parser.add_argument("--dump", type=Path, help="write every command, in order, to this file")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sources = command_sources(args.trials, args.batch)
    print("\n".join(command_sources_lines(sources, args.top)))
    if args.dump is not None:
        args.dump.write_text("".join(f"{k:14} {port:6} {c}\n" for k, port, c in sources["lines"]))


if __name__ == "__main__":
    main()
