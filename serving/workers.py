"""`stablemlp serve --workers N`: N server processes answering on one port, and their supervisor.

Each worker is a whole server (event loop, models, /metrics) in a process of its own, bound to the
same port with SO_REUSEPORT (Linux), so the kernel spreads incoming connections over them; a
connection, and every call on it, stays with one worker. The supervisor never loads a model: it
reserves the port (so port 0 gives every worker the same free port, and a port in use fails before
anything starts), starts the workers, logs `ready` once all of them serve, forwards SIGTERM, SIGINT
and SIGHUP, and exits 0 when every worker exited 0. A worker that dies once serving is noticed at
once (the supervisor waits on every worker's sentinel, never on one worker), logged, and restarted
after a back-off (0.5 s, doubling to 8 s); more than --worker-restarts deaths within
RESTART_WINDOW_S take the whole server down (exit 1) for the orchestrator to restart. A worker
that cannot start at all stops the others at once (exit 1): a bad model or port does not heal by
retrying.

Per worker: --inference-workers / N threads (at least one), so the processes' session.run threads
together fit the cores they were sized for; the REST port shared like the gRPC one; a private
/metrics on metrics_port + 1 + index (0: any free port each; -1: off), all of them merged by the
supervisor on metrics_port itself with a `worker` label (worker_metrics.py), where the manifests
scrape. ModelStatistics and each worker's /metrics count the calls of the worker that answers,
and RepositoryModelLoad/Unload act on that worker only: use --model-control-mode poll (the default,
none, keeps the models found at start) to change the models of every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from typing import Any

from .errors import ServingError
from .observe.call_log import LibraryLines
from .observe.telemetry import serve_metrics
from .observe.worker_metrics import WorkerMetrics
from .settings import Settings

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
ORPHAN_CHECK_S = 1.0  # how often a worker checks that its supervisor still runs
JOIN_S = 10.0  # for a worker told to stop (or that reported failure) to finish exiting
START_S = 120.0  # for a restarted worker to load its models and serve
RESTART_WINDOW_S = 60.0  # deaths in it beyond settings.worker_restarts take the server down
BACKOFF_S = (0.5, 8.0)  # first wait before a restart, and the most it doubles to
Serve = Callable[[Settings, "WorkerRole"], Coroutine[Any, Any, int]]
RunLoop = Callable[[Coroutine[Any, Any, int], str], int]


@dataclass(frozen=True)
class WorkerRole:
    """What a server process started by the supervisor does differently (server.serve)."""

    name: str  # "worker 2/4"
    ready: Connection  # the ports go here once serving: the supervisor waits for them
    supervisor_pid: int

    def serving(self, port: int, metrics_port: int | None) -> None:
        self.ready.send((port, metrics_port))
        self.ready.close()

    async def watch_supervisor(self, stopping: asyncio.Event) -> None:
        """Stop serving if the supervisor is gone (killed with SIGKILL: no SIGTERM came)."""
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):  # a builtin alias from 3.11 on
                await asyncio.wait_for(stopping.wait(), ORPHAN_CHECK_S)
            if os.getppid() != self.supervisor_pid and not stopping.is_set():
                log.warning("%s: the supervisor (pid %d) is gone; stopping", self.name,
                            self.supervisor_pid)  # fmt: skip
                stopping.set()


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Check that (host, port) is free, then hold it for the workers: a socket bound with
    SO_REUSEPORT that never listens, so it takes no connections but keeps the port from being
    handed out again (port 0) until they have bound it too."""
    family, kind, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind) as probe:  # no SO_REUSEPORT: fails if anyone listens there
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        port = probe.getsockname()[1]
    hold = socket.socket(family, kind)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    hold.bind((address[0], port, *address[2:]))
    return hold, port


def worker_settings(
    settings: Settings, index: int, port: int, http_port: int | None = None
) -> Settings:
    """One worker's share: the reserved ports, its private metrics port, its run threads."""
    metrics = settings.metrics_port
    return dataclasses.replace(
        settings,
        workers=1,
        port=port,
        http_port=settings.http_port if http_port is None else http_port,
        metrics_port=metrics + 1 + index if metrics > 0 else metrics,
        inference_workers=max(1, settings.inference_workers // settings.workers),
    )


def _log_setup() -> tuple[int, logging.Formatter | None]:
    """The level and line format `stablemlp` configured, for the workers to use too."""
    root = logging.getLogger()
    return root.level, root.handlers[0].formatter if root.handlers else None


def _worker(
    serve: Serve,
    run: RunLoop,
    settings: Settings,
    name: str,
    ready: Connection,
    log_setup: tuple[int, Any],
) -> None:
    """A worker process's entry point (multiprocessing, spawn): configure logging, serve."""
    level, formatter = log_setup
    handler = logging.StreamHandler()
    if formatter is not None:
        handler.setFormatter(formatter)
    handler.addFilter(LibraryLines())  # as the supervisor's (cli.configure_logging)
    logging.basicConfig(level=level, handlers=[handler])
    try:
        code = run(serve(settings, WorkerRole(name, ready, os.getppid())), settings.event_loop)
    except (ServingError, OSError, ValueError) as err:  # as `stablemlp serve` reports them
        print(f"stablemlp serve: {name}: cannot start: {err}", file=sys.stderr)
        code = 1
    sys.exit(code)


class _Pool:
    """The worker processes, each started in its slot; the supervisor's bookkeeping."""

    def __init__(
        self, settings: Settings, serve: Serve, run: RunLoop, port: int, http_port: int
    ) -> None:
        self._settings, self._serve, self._run = settings, serve, run
        self._port, self._http_port = port, http_port
        self._context = get_context("spawn")  # a fresh interpreter: no gRPC or ORT state forked
        self.count, self.restarts = settings.workers, settings.worker_restarts
        self.workers: list[SpawnProcess | None] = [None] * self.count
        self.metrics_ports: list[int | None] = [None] * self.count  # each worker's own
        self.stopping = False
        self._signalled: set[int] = set()  # pids already told to stop

    def name(self, index: int) -> str:
        return f"worker {index + 1}/{self.count}"

    def start(self, index: int) -> Connection:
        """Start slot `index`; its pipe reports the port once serving, or EOF if it dies."""
        receive, send = self._context.Pipe(duplex=False)
        share = worker_settings(self._settings, index, self._port, self._http_port)
        args = (self._serve, self._run, share, self.name(index), send, _log_setup())
        worker = self._context.Process(target=_worker, args=args, name=self.name(index))
        worker.start()
        send.close()  # the worker holds the other end
        self.workers[index] = worker
        return receive

    def stop_all(self, signum: int = signal.SIGTERM, _: object = None) -> None:
        """SIGTERM each live worker, once: a second one could reach a worker that is already past
        its own graceful stop and kill it (exit -15)."""
        self.stopping = True
        for worker in self.workers:
            if worker is None or worker.pid is None or worker.pid in self._signalled:
                continue
            if worker.exitcode is None:
                self._signalled.add(worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def wait_serving(self, pipes: dict[Connection, int], deadline: float) -> bool:
        """Wait until every slot in `pipes` serves; False (all stopped) if one dies first."""
        while pipes and not self.stopping:
            left = deadline - time.monotonic()
            for ready in wait(list(pipes), timeout=max(0.0, left)):
                assert isinstance(ready, Connection)
                index = pipes.pop(ready)
                try:
                    _, self.metrics_ports[index] = ready.recv()
                except EOFError:  # it is exiting before it served: stop the others
                    worker = self.workers[index]
                    assert worker is not None
                    worker.join(JOIN_S)  # its own exit code, not our SIGTERM's
                    log.error("%s exited before it served; stopping", self.name(index))
                    self.stop_all()
                    return False
            if left <= 0 and pipes:
                log.error("%s did not serve within %.0f s; stopping",
                          self.name(next(iter(pipes.values()))), START_S)  # fmt: skip
                self.stop_all()
                return False
        return not self.stopping

    def metrics_sources(self) -> list[tuple[str, str]]:
        """(worker label, /metrics URL) of each worker serving metrics now."""
        host = self._settings.host
        local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, host)
        local = f"[{local}]" if ":" in local and not local.startswith("[") else local
        return [
            (str(i + 1), f"http://{local}:{port}/metrics")
            for i, port in enumerate(self.metrics_ports)
            if port
        ]

    def join_all(self) -> list[int | None]:
        for worker in self.workers:
            if worker is not None:
                worker.join(JOIN_S)
                if worker.exitcode is None:  # deaf to SIGTERM past the grace: no orphans
                    worker.kill()
                    worker.join(JOIN_S)
        return [w.exitcode if w is not None else None for w in self.workers]


def _supervise(pool: _Pool) -> bool:
    """Watch every worker at once until stopped; restart the ones that die. False if it gave up."""
    deaths: deque[float] = deque()
    while not pool.stopping:
        wait([w.sentinel for w in pool.workers if w is not None])  # any one of them
        for index, worker in enumerate(pool.workers):
            if pool.stopping or worker is None or worker.exitcode is None:
                continue
            log.error("%s (pid %s) exited with %s", pool.name(index), worker.pid, worker.exitcode)
            now = time.monotonic()
            deaths.append(now)
            while deaths and now - deaths[0] > RESTART_WINDOW_S:
                deaths.popleft()
            if len(deaths) > pool.restarts:
                log.error("%d worker deaths within %.0f s: stopping the server", len(deaths),
                          RESTART_WINDOW_S)  # fmt: skip
                pool.stop_all()
                return False
            backoff = min(BACKOFF_S[0] * 2 ** (len(deaths) - 1), BACKOFF_S[1])
            log.warning("%s: restarting in %.1f s", pool.name(index), backoff)
            time.sleep(backoff)  # a signal meanwhile sets `stopping`: checked right after
            if pool.stopping:
                break
            pipe = pool.start(index)
            if not pool.wait_serving({pipe: index}, time.monotonic() + START_S):
                return False
            log.info("%s: restarted", pool.name(index))
    return True


def run_workers(
    settings: Settings, serve: Serve, run: RunLoop, address: Callable[[int], str], scheme: str
) -> int:
    """Start settings.workers servers on one port, each running `serve` on the loop `run` makes
    (server.serve and server.run_loop, passed in so this module never imports the server);
    returns the exit code for `stablemlp serve`."""
    grpc_hold, port = reserve_port(settings.host, settings.port)
    http_hold, http_port = (
        reserve_port(settings.host, settings.http_port) if settings.http_port >= 0 else (None, -1)
    )
    holds = [h for h in (grpc_hold, http_hold) if h is not None]
    pool = _Pool(settings, serve, run, port, http_port)
    previous = {signum: signal.signal(signum, pool.stop_all) for signum in STOP_SIGNALS}
    healthy, stops = False, []
    try:
        if settings.metrics_port >= 0:
            metrics, stop_metrics = serve_metrics(
                settings.host, settings.metrics_port, WorkerMetrics(pool.metrics_sources)
            )
            stops.append(stop_metrics)
            log.info("metrics: http://%s/metrics (every worker's, labelled worker)",
                     address(metrics))  # fmt: skip
        pipes = {pool.start(index): index for index in range(pool.count)}
        started = pool.wait_serving(pipes, time.monotonic() + START_S)
        for hold in holds:  # every worker has bound the ports (or we are stopping)
            hold.close()
        if started:
            log.info("ready: listening on %s (%s, %d workers)", address(port), scheme, pool.count)
            healthy = _supervise(pool)
    finally:
        for hold in holds:
            hold.close()
        for stop in stops:
            stop()
        pool.stop_all()
        codes = pool.join_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("stopped: workers exited with %s", codes)
    return 0 if healthy and all(code == 0 for code in codes) else 1


__all__ = ["RESTART_WINDOW_S", "WorkerRole", "reserve_port", "run_workers", "worker_settings"]
