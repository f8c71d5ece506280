"""`stablemlp serve --workers N`: N server processes answering on one port, and their supervisor.

Each worker is a whole server (event loop, models, /metrics) in a process of its own, bound to the
same port with SO_REUSEPORT (Linux), so the kernel spreads incoming connections over them; a
connection, and every call on it, stays with one worker. The supervisor never loads a model: it
reserves the port (so port 0 gives every worker the same free port, and a port in use fails before
anything starts), starts the workers, logs `ready` once all of them serve, forwards SIGTERM and
SIGINT, and exits 0 when every worker exited 0. A worker that dies takes the others down (exit 1):
restarting is left to the orchestrator, as for a single process.

Per worker: --inference-workers / N threads (at least one), so the processes' session.run threads
together fit the cores they were sized for; /metrics on metrics_port + index (0: any free port
each, logged; -1: off). ModelStatistics and /metrics count the calls of the worker that answers,
and RepositoryModelLoad/Unload act on that worker only: use repository polling (the default) to
change the models of every worker.
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
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from typing import Any

from .errors import ServingError
from .settings import Settings

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ORPHAN_CHECK_S = 1.0  # how often a worker checks that its supervisor still runs
JOIN_S = 10.0  # for a worker that reported failure to finish exiting


@dataclass(frozen=True)
class WorkerRole:
    """What a server process started by the supervisor does differently (server.serve)."""

    name: str  # "worker 2/4"
    ready: Connection  # the port goes here once serving: the supervisor waits for it
    supervisor_pid: int

    def serving(self, port: int) -> None:
        self.ready.send(port)
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


def worker_settings(settings: Settings, index: int, port: int) -> Settings:
    """One worker's share: the reserved port, its metrics port, its run threads."""
    metrics = settings.metrics_port
    return dataclasses.replace(
        settings,
        workers=1,
        port=port,
        metrics_port=metrics + index if metrics > 0 else metrics,
        inference_workers=max(1, settings.inference_workers // settings.workers),
    )


def _log_setup() -> tuple[int, logging.Formatter | None]:
    """The level and line format `stablemlp` configured, for the workers to use too."""
    root = logging.getLogger()
    return root.level, root.handlers[0].formatter if root.handlers else None


def _worker(settings: Settings, name: str, ready: Connection, log_setup: tuple[int, Any]) -> None:
    """A worker process's entry point (multiprocessing, spawn): configure logging, serve."""
    level, formatter = log_setup
    handler = logging.StreamHandler()
    if formatter is not None:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])
    from .server import serve  # here, not at the top: the supervisor never imports the runtime

    try:
        code = asyncio.run(serve(settings, WorkerRole(name, ready, os.getppid())))
    except (ServingError, OSError, ValueError) as err:  # as `stablemlp serve` reports them
        print(f"stablemlp serve: {name}: cannot start: {err}", file=sys.stderr)
        code = 1
    sys.exit(code)


def run_workers(settings: Settings, address: Callable[[int], str], scheme: str) -> int:
    """Start settings.workers servers on one port; returns the exit code for `stablemlp serve`."""
    count = settings.workers
    hold, port = reserve_port(settings.host, settings.port)
    context = get_context("spawn")  # a fresh interpreter: no gRPC or ONNX Runtime state forked
    workers: list[SpawnProcess] = []
    pipes: list[Connection] = []
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, _: object = None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.exitcode is None and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, stop_all) for signum in STOP_SIGNALS}
    try:
        for index in range(count):
            name = f"worker {index + 1}/{count}"
            receive, send = context.Pipe(duplex=False)
            args = (worker_settings(settings, index, port), name, send, _log_setup())
            worker = context.Process(target=_worker, args=args, name=name, daemon=False)
            worker.start()
            send.close()  # the worker holds the other end: EOF here if it dies
            workers.append(worker)
            pipes.append(receive)
        waiting = dict(zip(pipes, workers, strict=True))
        while waiting and not stopping:  # each worker reports once, or exits
            for ready in wait(list(waiting)):
                assert isinstance(ready, Connection)
                try:
                    ready.recv()
                except EOFError:  # it is exiting before it served: stop the others
                    waiting[ready].join(JOIN_S)  # its own exit code, not our SIGTERM's
                    log.error("%s exited before it served; stopping", waiting[ready].name)
                    stop_all()
                waiting.pop(ready)
        hold.close()  # every worker has bound the port (or we are stopping)
        if not stopping:
            log.info("ready: listening on %s (%s, %d workers)", address(port), scheme, count)
        for _ in range(count):  # bounded: one worker ends per round
            alive = [worker.sentinel for worker in workers if worker.exitcode is None]
            if not alive:
                break
            wait(alive)
            for worker in workers:
                if worker.exitcode not in (None, 0) and not stopping:
                    log.error(
                        "%s exited with %s; stopping the others", worker.name, worker.exitcode
                    )
                    stop_all()
        for worker in workers:
            worker.join()
    finally:
        hold.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [worker.exitcode for worker in workers]
    log.info("stopped: workers exited with %s", codes)
    return 0 if all(code == 0 for code in codes) and len(codes) == count else 1


__all__ = ["WorkerRole", "reserve_port", "run_workers", "worker_settings"]
