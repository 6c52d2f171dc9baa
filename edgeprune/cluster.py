"""Where recovery work runs: in this process (the default) or as Ray tasks on a cluster (``--cluster``).

An executor takes one function and a list of argument tuples, runs ``fn(shared, *args)`` for each and yields
``(index, metrics, payload)`` as they finish; ``fn`` returns ``(metrics, payload)``: small numbers the driver
needs at once, and something large (a state dict) that it may never need. ``share`` puts the inputs every
task reads (dense model, data, teacher logits) where the tasks find them, once per run.

- `InProcess`: calls ``fn`` in order; ``share`` returns the object itself. Nothing on this path imports Ray,
  so a run without ``--cluster`` costs what it did before.
- `RayExecutor`: ``share`` is one ``ray.put`` (every task gets the reference, not a copy of the data);
  each call is a Ray task with two returns, so a payload stays in the object store until `fetch` asks for
  it (a survivor's weights go from one rung's task to the next without passing through the driver). A task
  asks for a fraction of a GPU when the cluster has one (``gpu_fraction``, 4 recoveries per GPU by
  default), else ``cpus`` CPUs; ``max_retries`` re-runs the tasks of a worker or node that died elsewhere.

Cluster specs (`check_cluster_spec` validates one without connecting): ``ray://HOST:PORT`` (Ray Client),
``HOST:PORT`` (a head's GCS), ``auto`` (``RAY_ADDRESS``), ``local:N`` (start a one-node Ray here with N CPUs).

A head unreachable at the start is a one-line error before Ray is asked (`_probe`). A head lost in the
middle of a run is one too: left to itself, Ray's core worker ends the *driver process* (exit status 1, no
Python exception, no ``finally``) once the GCS has not answered for ``gcs_rpc_server_reconnect_timeout_s``
(60 s), so the driver raises that timeout for itself (`RECONNECT_ENV`, before ``ray.init``), waits on its
tasks in ``HEAD_POLL_S`` steps and, when none finished in a step, probes the head's port; a head that stays
unreachable for ``HEAD_LOST_S`` is a `ClusterError` naming the address (measured on a local 2-node cluster:
the GCS and the head's raylet SIGKILLed, the error ~22 s later).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any

from .errors import EdgepruneError

INSTALL_HINT = "pip install 'edgeprune[ray]'"
CONNECT_TIMEOUT_S = 3.0  # a head that does not accept a TCP connection in this time is unreachable
MAX_RETRIES = 3  # Ray re-runs a task whose worker or node died up to this many times
GPU_FRACTION = 0.25  # four recoveries share one GPU
# Ray replaces 127.0.0.1 by the machine's own address; another loopback address it keeps, so a local cluster
# (local:N, LocalRayCluster) listens on loopback only and nothing outside this machine can join it.
LOCAL_NODE_IP = "127.0.0.2"
RAY_CLI = (sys.executable, "-m", "ray.scripts.scripts")  # the `ray` command of this interpreter, PATH or not
HEAD_POLL_S = 2.0  # a run that waits this long for a result checks that the head is still there
HEAD_LOST_S = 20.0  # a head unreachable this long is gone (a restarting GCS with fault tolerance takes seconds)
# Ray's driver exits on its own once the GCS has been away this long; read once per process, before the
# first ray.init, so RayExecutor sets it (unless the user did) and reports a lost head itself, sooner
RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
RECONNECT_S = "86400"


class ClusterError(EdgepruneError):
    """The cluster cannot be reached or a task on it failed for good."""


# -- specs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value: ``kind`` is ``client`` (ray://), ``address`` (HOST:PORT), ``auto`` or
    ``local``; ``address`` is HOST:PORT where there is one, ``cpus`` the CPU count of ``local:N``."""

    text: str
    kind: str
    address: str | None = None
    cpus: int | None = None


_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})")


def _host_port(text: str, spec: str) -> str:
    m = _HOST_PORT.fullmatch(text)
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise ClusterError(f"bad --cluster '{spec}': give ray://HOST:PORT, HOST:PORT, auto or local:N (e.g. local:4)")
    return text


def check_cluster_spec(spec: str) -> ClusterSpec:
    """Parse and validate a ``--cluster`` value without connecting (and without importing Ray)."""
    text = spec.strip()
    if text == "auto":
        address = os.environ.get("RAY_ADDRESS", "").strip()
        if not address:
            raise ClusterError("--cluster auto reads the head's address from RAY_ADDRESS, which is not set")
        inner = check_cluster_spec(address)
        if inner.kind in ("auto", "local"):
            raise ClusterError(f"RAY_ADDRESS='{address}' must be ray://HOST:PORT or HOST:PORT")
        return ClusterSpec(text, inner.kind, inner.address)
    if text.startswith("local:"):
        n = text[len("local:") :]
        if not n.isdigit() or not 1 <= int(n) <= 4096:
            raise ClusterError(f"bad --cluster '{spec}': local:N needs a CPU count N >= 1, e.g. local:4")
        return ClusterSpec(text, "local", cpus=int(n))
    if text.startswith("ray://"):
        return ClusterSpec(text, "client", _host_port(text[len("ray://") :], spec))
    return ClusterSpec(text, "address", _host_port(text, spec))


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--cluster needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _probe(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, naming the address, when nothing accepts a connection there (Ray itself would wait
    about a minute and then print a multi-line error)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ClusterError(
            f"cannot reach the Ray head at {address} ({why}); is `ray start --head` running there?"
        ) from None


# -- executors ---------------------------------------------------------------------------------------------

Task = Callable[..., tuple[Any, Any]]  # fn(shared, *args) -> (metrics, payload)


class InProcess:
    """Runs every task here, one after another. ``tasks_run`` counts the calls (a resumed run makes none)."""

    name = "in-process"
    uses_gpu = False

    def __init__(self) -> None:
        self.tasks_run = 0

    def describe(self) -> str:
        return self.name

    def share(self, obj: Any) -> Any:
        return obj

    def run(
        self, fn: Task, shared: Any, calls: Sequence[tuple], labels: Sequence[str], cpus: int = 1
    ) -> Iterator[tuple[int, Any, Any]]:
        for i, args in enumerate(calls):
            self.tasks_run += 1
            try:
                metrics, payload = fn(shared, *args)
            except Exception as exc:  # noqa: BLE001 - named for the candidate, one line
                raise task_error(labels[i], exc) from None
            yield i, metrics, payload

    def fetch(self, payload: Any) -> Any:
        return payload

    def close(self) -> None: ...


class RayExecutor:
    """Ray tasks on the cluster named by a ``--cluster`` spec (connects on construction)."""

    uses_gpu: bool

    def __init__(
        self,
        spec: str,
        gpu_fraction: float = GPU_FRACTION,
        max_retries: int = MAX_RETRIES,
        head_lost_s: float = HEAD_LOST_S,
    ):
        self.spec = check_cluster_spec(spec)
        ray = _import_ray()
        self.ray, self.gpu_fraction, self.max_retries, self.head_lost_s = ray, gpu_fraction, max_retries, head_lost_s
        self.tasks_run = 0
        self.name = f"Ray ({self.spec.text})"
        os.environ.setdefault(RECONNECT_ENV, RECONNECT_S)
        t0 = time.perf_counter()
        quiet = dict(log_to_driver=False, logging_level="ERROR", configure_logging=True)
        if self.spec.kind == "local":
            ray.init(num_cpus=self.spec.cpus, include_dashboard=False, _node_ip_address=LOCAL_NODE_IP, **quiet)
        else:
            _probe(self.spec.address)
            target = f"ray://{self.spec.address}" if self.spec.kind == "client" else self.spec.address
            try:
                ray.init(address=target, **quiet)
            except Exception as exc:  # noqa: BLE001 - Ray's connection errors are several types, all one line here
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ClusterError(f"cannot connect to the Ray head at {self.spec.address}: {first}") from None
        self.connect_s = time.perf_counter() - t0
        # the port that says whether the head is still there: the GCS (local:N's own, or HOST:PORT), or the
        # Ray Client server on the head (ray://)
        self.head = self.spec.address or ray.get_runtime_context().gcs_address
        self._head_lost_since: float | None = None
        resources = ray.cluster_resources()
        self.gpus, self.cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
        self.uses_gpu = self.gpus > 0
        self._remote = ray.remote(num_returns=2)(_call)
        self._ray_errors = (ray.exceptions.RayTaskError, ray.exceptions.RayError)

    def describe(self) -> str:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        gpu = f", {self.gpus:g} GPU(s), {self.gpu_fraction:g} GPU per task" if self.uses_gpu else ""
        return f"{self.name}: {len(nodes)} node(s), {self.cpus:g} CPU(s){gpu}"

    def share(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def run(
        self, fn: Task, shared: Any, calls: Sequence[tuple], labels: Sequence[str], cpus: int = 1
    ) -> Iterator[tuple[int, Any, Any]]:
        largest = max((n["Resources"].get("CPU", 0.0) for n in self.ray.nodes() if n.get("Alive")), default=0.0)
        if not self.uses_gpu and cpus > largest:
            raise ClusterError(
                f"a recovery asks for {cpus} CPU(s) (its torch threads) but the largest node of "
                f"{self.spec.text} has {largest:g}"
            )
        opts = dict(max_retries=self.max_retries, retry_exceptions=False)
        if self.uses_gpu:
            opts.update(num_gpus=self.gpu_fraction, num_cpus=1)
        else:
            opts.update(num_cpus=cpus)
        remote = self._remote.options(**opts)
        pending: dict[Any, tuple[int, Any]] = {}
        for i, args in enumerate(calls):
            metrics_ref, payload_ref = remote.remote(fn, shared, *args)
            pending[metrics_ref] = (i, payload_ref)
            self.tasks_run += 1
        while pending:
            done = self._watch(lambda: self.ray.wait(list(pending), num_returns=1, timeout=HEAD_POLL_S)[0], pending)
            if not done:
                continue
            i, payload_ref = pending.pop(done[0])
            try:
                metrics = self._get(done[0], pending)
            except self._ray_errors as exc:
                for ref in pending:  # the run stops here: what is queued would only burn cluster time
                    self.ray.cancel(ref, force=True)
                raise task_error(labels[i], _cause(exc)) from None
            yield i, metrics, payload_ref

    def fetch(self, payload: Any) -> Any:
        return self._get(payload, ())

    def _get(self, ref: Any, pending: Sized) -> Any:
        """``ray.get`` in ``HEAD_POLL_S`` steps, the head checked between them."""
        while True:
            try:
                return self._watch(lambda: self.ray.get(ref, timeout=HEAD_POLL_S), pending)
            except self.ray.exceptions.GetTimeoutError:
                continue

    def _watch(self, step: Callable[[], Any], pending: Sized) -> Any:
        """One waiting step; when it comes back empty-handed (or Ray itself fails, not a task), the head is
        checked: one unreachable for ``head_lost_s`` is a `ClusterError`."""
        try:
            out = step()
        except self.ray.exceptions.GetTimeoutError:
            self._check_head(len(pending))
            raise
        except Exception:  # noqa: BLE001 - a failed task or Ray's own failure: a lost head when it is one
            self._check_head(len(pending), at_once=True)
            raise
        if not out:
            self._check_head(len(pending))
        return out

    def _check_head(self, unfinished: int, at_once: bool = False) -> None:
        try:
            _probe(self.head, timeout=min(CONNECT_TIMEOUT_S, HEAD_POLL_S))
        except ClusterError as exc:
            now = time.monotonic()
            self._head_lost_since = self._head_lost_since or now
            if at_once or now - self._head_lost_since >= self.head_lost_s:
                why = str(exc).split("(", 1)[-1].split(")", 1)[0]
                raise ClusterError(
                    f"lost the Ray head at {self.head} during the run ({why} for "
                    f"{now - self._head_lost_since:.0f} s); {unfinished} recovery task(s) unfinished"
                ) from None
        else:
            self._head_lost_since = None

    def close(self) -> None:
        self.ray.shutdown()


def _call(fn: Task, shared: Any, *args: Any) -> tuple[Any, Any]:
    """The Ray task body: Ray resolves ``shared`` (an object reference) before the call."""
    return fn(shared, *args)


def _cause(exc: BaseException) -> BaseException:
    """The exception raised inside a task (Ray wraps it in a RayTaskError)."""
    return getattr(exc, "cause", None) or exc


def is_out_of_memory(exc: BaseException) -> bool:
    """A task that ran out of memory: Ray's memory monitor killed it, torch could not allocate (CPU or CUDA)."""
    names = {type(e).__name__ for e in (exc, _cause(exc))}
    if names & {"OutOfMemoryError", "MemoryError"}:
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def task_error(label: str, exc: BaseException) -> ClusterError:
    """One line naming the candidate whose recovery failed, and why."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if is_out_of_memory(exc):
        return ClusterError(
            f"recovery of candidate {label} ran out of memory ({first or type(exc).__name__}); "
            "lower --batch-size or give each task more memory"
        )
    if isinstance(exc, EdgepruneError):
        return ClusterError(f"recovery of candidate {label}: {first}")
    kind = type(exc).__name__
    if kind in ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "ObjectLostError"):
        return ClusterError(f"recovery of candidate {label} failed: its worker died {MAX_RETRIES + 1} times ({kind})")
    return ClusterError(f"recovery of candidate {label} failed: {kind}: {first}")


Executor = InProcess | RayExecutor


def executor_for(spec: str | None) -> Executor:
    """`InProcess` for no spec, else a connected `RayExecutor`."""
    return InProcess() if not spec else RayExecutor(spec)


# -- a local multi-node cluster (tests, benchmarks) --------------------------------------------------------


class LocalRayCluster:
    """A real Ray cluster on this machine, on loopback: ``ray start --head`` plus ``nodes - 1`` nodes joining
    it, each with ``cpus`` CPUs; ``raylet_pids[i]`` is node i's raylet (kill it to fail a node), ``gcs_pid``
    the head's GCS (kill it and the head's raylet to lose the head). Stopped
    with ``ray stop --force`` (which stops every Ray on the machine: for a test or benchmark machine).

    Token authentication is off for it (``RAY_AUTH_MODE=disabled`` in this process while it runs, so the
    nodes and the driver agree): Ray 2.5x turns it on when it finds ``~/.ray/auth_token``, which a local
    ``ray.init()`` writes, and a node would then be refused by a head that started without it. Nothing
    outside this machine can reach it anyway (loopback)."""

    def __init__(self, port: int, nodes: int = 2, cpus: int = 1, object_store_mb: int = 300):
        self.port, self.nodes, self.cpus, self.object_store_mb = port, nodes, cpus, object_store_mb
        self.address = f"{LOCAL_NODE_IP}:{port}"
        self.raylet_pids: list[int] = []
        self.gcs_pid: int | None = None
        self.start_s: list[float] = []
        self._auth_before: str | None = None

    def _ray(self, *args: str) -> None:
        common = ["--node-ip-address", LOCAL_NODE_IP, "--num-cpus", str(self.cpus), "--disable-usage-stats"]
        common += ["--object-store-memory", str(self.object_store_mb * 1024 * 1024)]
        before = set(_pids("raylet")), set(_pids("gcs_server"))
        t0 = time.perf_counter()
        subprocess.run([*RAY_CLI, "start", *args, *common], check=True, capture_output=True, timeout=180)
        self.start_s.append(time.perf_counter() - t0)
        new = sorted(set(_pids("raylet")) - before[0])
        if len(new) != 1:
            raise RuntimeError(f"expected one new raylet after `ray start {' '.join(args)}`, found {new}")
        self.raylet_pids.append(new[0])
        if "--head" in args:
            gcs = sorted(set(_pids("gcs_server")) - before[1])
            self.gcs_pid = gcs[0] if len(gcs) == 1 else None

    def __enter__(self) -> LocalRayCluster:
        self._auth_before = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        try:
            self._ray("--head", "--port", str(self.port), "--include-dashboard=false")
            for _ in range(self.nodes - 1):
                self._ray("--address", self.address)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        subprocess.run([*RAY_CLI, "stop", "--force"], capture_output=True, timeout=120)
        if self._auth_before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = self._auth_before


def _pids(name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
