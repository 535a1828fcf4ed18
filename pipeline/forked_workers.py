"""Local multi_processing workers forked from the build's process instead of started afresh.

Beam's local runner starts each `--direct_running_mode=multi_processing` worker as a new
interpreter (`python -m apache_beam.runners.worker.sdk_worker_main`), which imports Beam, pyarrow,
Pillow and our stages all over again: 1.9 s of CPU per worker on the 2-core machine, 1.4 s of it
Beam alone, while the driver process already holds every one of those modules. On Linux the build
forks its workers instead, once the graph's modules are imported and before the runner starts
any gRPC server or thread (a fork then copies a single-threaded process with no network state).
Each forked child waits on a pipe until the runner asks for a worker, then runs the same
`sdk_worker_main.main` a fresh worker runs, with the same environment variables, and talks to
the runner over gRPC exactly as a fresh worker does.

Everything else is unchanged: the job graph, the options the workers see, the runner's steps and
its splitting of work. Where forking is not possible (not Linux, threads already running or
another of fork_blockers(), the pool used up or a child gone, `MG_GEO_FORK_WORKERS=0`), a worker
starts as a fresh interpreter, as in plain Beam.
Only our own runner (no `--runner` flag, `--direct_running_mode=multi_processing`) is affected;
Dataflow, Flink and Spark start their workers themselves.

Every worker this runner starts, forked or fresh, is watched: when one dies (the kernel's
out-of-memory killer, a crash in native code), Beam's local runner would wait forever for the
bundle it held; here the bundle and the job fail with the worker's exit status instead.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import sys
import threading
import uuid

import grpc
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions
from apache_beam.portability.api import beam_fn_api_pb2_grpc, endpoints_pb2
from apache_beam.runners.portability.fn_api_runner.worker_handlers import (SubprocessSdkWorkerHandler,
                                                                            WorkerHandler)
from apache_beam.runners.portability.local_job_service import BeamFnLoggingServicer
from apache_beam.transforms import environments
from apache_beam.utils import thread_pool_executor
from google.protobuf import json_format, text_format

from pipeline.balanced_runner import BalancedFnApiRunner
from pipeline.forking import fork_child, may_fork

log = logging.getLogger(__name__)

FORKED_PYTHON_URN = "beam:env:mg_geo_forked_python:v1"
_POOLS: dict[str, "ForkedWorkers"] = {}  # pool id -> pool, for the runner's worker handlers
IN_FORKED_WORKER = False  # True in a child once the runner has given it work


class _Child:
    """One forked process waiting on its pipe for a worker's environment."""

    def __init__(self, pid: int, write_fd: int):
        self.pid = pid
        self.write_fd = write_fd

    def start(self, env: dict[str, str]) -> None:
        """Hand the child its environment (OSError, BrokenPipeError: the child is gone)."""
        data = json.dumps(env).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]
        self.close()

    def close(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def wait(self) -> int:
        """The child's exit status (waits for it); a negative number is the signal that ended it."""
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


class ForkedWorkers:
    """Children forked now, each becoming one SDK worker when the runner starts a worker.

    Use as a context manager around the pipeline's run: on exit the unused children are told to
    leave and every child is reaped."""

    def __init__(self, count: int):
        self.id = uuid.uuid4().hex
        self._free: list[_Child] = []
        self._lock = threading.Lock()
        self.started = 0  # children that became workers
        for _ in range(count):
            self._free.append(self._fork())
        _POOLS[self.id] = self

    def _fork(self) -> _Child:
        read_fd, write_fd = os.pipe()

        def child() -> int:
            # Its collector leaves the inherited heap alone (freeze only relinks lists): walking
            # it would write to every object's header and copy the parent's pages for nothing.
            gc.freeze()
            os.close(write_fd)
            for sibling in self._free:  # a sibling's pipe held open here would never reach EOF
                os.close(sibling.write_fd)
            return _child_main(read_fd)

        pid = fork_child(child)
        os.close(read_fd)
        return _Child(pid, write_fd)

    def parent_fds(self) -> list[int]:
        """This process's ends of the unused children's pipes: a process forked later must close
        them, or a child would never see the EOF that tells it to leave."""
        with self._lock:
            return [child.write_fd for child in self._free]

    def take(self) -> _Child | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def __enter__(self) -> "ForkedWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        _POOLS.pop(self.id, None)
        with self._lock:
            unused, self._free = self._free, []
        for child in unused:
            child.close()  # EOF: the child exits without running anything
            child.wait()


def _child_main(read_fd: int) -> int:
    """A forked child: wait for a worker's environment, run the SDK harness; the exit status."""
    global IN_FORKED_WORKER
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    if not chunks:  # the build ended without needing this worker
        return 0
    os.environ.update(json.loads(b"".join(chunks)))
    IN_FORKED_WORKER = True
    run_harness()
    return 0


def run_harness() -> None:
    """sdk_worker_main.main, logging as a fresh worker does: the handlers inherited from the build's
    process are dropped, and the harness sends its records to the runner's logging service (which
    our handler starts), where the build's process logs them as Beam's own workers' lines."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)  # a fresh interpreter's; the harness sets its own level
    from apache_beam.runners.worker import sdk_worker_main
    sdk_worker_main.main([])


def worker_environment(handler: SubprocessSdkWorkerHandler, logging_url: str) -> dict[str, str]:
    """The variables Beam's SubprocessSdkWorker gives a fresh worker."""
    env = {
        "LOGGING_API_SERVICE_DESCRIPTOR": text_format.MessageToString(
            endpoints_pb2.ApiServiceDescriptor(url=logging_url)),
        "CONTROL_API_SERVICE_DESCRIPTOR": text_format.MessageToString(
            endpoints_pb2.ApiServiceDescriptor(url=handler.control_address)),
        "PIPELINE_OPTIONS": json_format.MessageToJson(handler.provision_info.provision_info.pipeline_options),
    }
    if handler.worker_id:
        env["WORKER_ID"] = handler.worker_id
    return env


@environments.Environment.register_urn(FORKED_PYTHON_URN, bytes)
class ForkedPythonEnvironment(environments.Environment):
    """Workers from a ForkedWorkers pool; a fresh `command` when the pool has none left."""

    def __init__(self, pool_id: str, command: str, capabilities=(), artifacts=(), resource_hints=None):
        super().__init__(capabilities, artifacts, resource_hints)
        self.pool_id = pool_id
        self.command = command

    def __eq__(self, other):
        return super().__eq__(other) and (self.pool_id, self.command) == (other.pool_id, other.command)

    def __hash__(self):
        return hash((super().__hash__(), self.pool_id, self.command))

    def to_runner_api_parameter(self, context):
        return FORKED_PYTHON_URN, json.dumps({"pool": self.pool_id, "command": self.command}).encode()

    @staticmethod
    def from_runner_api_parameter(payload, capabilities, artifacts, resource_hints, context):
        spec = json.loads(payload)
        return ForkedPythonEnvironment(spec["pool"], spec["command"], capabilities, artifacts, resource_hints)


@WorkerHandler.register_environment(FORKED_PYTHON_URN, bytes)
class ForkedSdkWorkerHandler(SubprocessSdkWorkerHandler):
    def __init__(self, payload: bytes, state, provision_info, grpc_server):
        spec = json.loads(payload)
        super().__init__(spec["command"].encode(), state, provision_info, grpc_server)
        self._pool_id = spec["pool"]

    def start_worker(self) -> None:
        pool = _POOLS.get(self._pool_id)
        child = pool.take() if pool else None
        if child is None:
            self._start_fresh_worker()
            return
        log_server, log_url = _logging_service()
        try:
            child.start(worker_environment(self, log_url))
        except OSError as exc:  # the child is gone (killed, out of memory): start one afresh
            log_server.stop(0)
            log.warning("forked worker %d is gone (%s, exit status %s); starting a fresh one",
                        child.pid, exc, child.wait())
            self._start_fresh_worker()
            return
        pool.started += 1
        self.worker_thread = threading.Thread(name="run_forked_worker", target=_await_worker,
                                              args=(child, log_server, self))
        self.worker_thread.start()

    def _start_fresh_worker(self) -> None:
        """A fresh interpreter, started as Beam's SubprocessSdkWorkerHandler starts one, and
        watched as a forked worker is (Beam's thread only raises into the void when it dies)."""
        from apache_beam.runners.portability import local_job_service

        self.worker = local_job_service.SubprocessSdkWorker(
            self._worker_command_line, self.control_address, self.provision_info, self.worker_id)

        def run_and_watch():
            try:
                self.worker.run()
            except RuntimeError as exc:  # "Worker subprocess exited with return code N"
                code = re.search(r"return code (-?\d+)", str(exc))
                self.worker_lost("a fresh worker", int(code.group(1)) if code else 1)

        self.worker_thread = threading.Thread(name="run_worker", target=run_and_watch)
        self.worker_thread.start()

    def worker_lost(self, which: "int | str", code: int) -> None:
        """The worker process ended badly while the runner may still wait for it. Beam's local
        runner would wait forever for the bundle it was running (or the next one it is given):
        every pending instruction fails, and so does any wait for the worker's data, with why."""
        if code > 128:  # a shell's way of saying a signal ended the command
            code = 128 - code
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        hint = " (killed: out of memory?)" if code == -9 else ""
        who = f"process {which}" if isinstance(which, int) else f"process ({which})"
        lost = RuntimeError(f"Beam worker {who} died with {how}{hint} while the job ran; "
                            f"the build stops (its log above says what the worker was doing)")
        log.error("%s", lost)
        self.control_conn.abort(lost)
        # The bundle's wait for output polls the data channel's error (Beam's _GrpcDataChannel).
        self.data_conn._exception = lost


def _logging_service():
    """(server, url): a worker's log records, logged here as Beam's SubprocessSdkWorker does."""
    server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                         options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)])
    beam_fn_api_pb2_grpc.add_BeamFnLoggingServicer_to_server(BeamFnLoggingServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _await_worker(child: _Child, log_server, handler: ForkedSdkWorkerHandler) -> None:
    try:
        code = child.wait()
    finally:
        log_server.stop(0)
    if code:
        handler.worker_lost(child.pid, code)


class ForkingFnApiRunner(BalancedFnApiRunner):
    """FnApiRunner that gives its multi_processing workers a ForkedWorkers pool.

    FnApiRunner.run_pipeline sets `_default_environment` to a SubprocessSDKEnvironment running
    `sys.executable -m ...sdk_worker_main` when the options ask for multi_processing; the
    property below swaps exactly that environment for the pool's (same command as fallback), so
    the options, and what the workers are told, stay Beam's own."""

    def __init__(self, pool: ForkedWorkers):
        self._pool = pool
        super().__init__()

    @property
    def _default_environment(self):
        return self._mg_geo_environment

    @_default_environment.setter
    def _default_environment(self, environment):
        if isinstance(environment, environments.SubprocessSDKEnvironment) \
                and environment.command_string == fresh_worker_command():
            environment = ForkedPythonEnvironment(self._pool.id, environment.command_string,
                                                  capabilities=environment.capabilities(),
                                                  artifacts=environment.artifacts(),
                                                  resource_hints=environment.resource_hints())
        self._mg_geo_environment = environment


def fresh_worker_command() -> str:
    """The command FnApiRunner gives multi_processing workers (Beam 2.x, fn_runner.py)."""
    return f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main"


def pool_size(options: PipelineOptions, runner_given: bool, workers_use_torch: bool = False) -> int:
    """How many workers to fork for these options; 0 where forking does not apply."""
    direct = options.view_as(DirectOptions)
    if runner_given or direct.direct_running_mode != "multi_processing":
        return 0
    if not may_fork("workers", workers_use_torch):
        return 0
    return direct.direct_num_workers or os.cpu_count() or 1
