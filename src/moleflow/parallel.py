"""Work spread over Ray: experts of products learned after the shared flow is frozen, and independent trials.

    spec = Parallel(workers=4)                          # local Ray with 4 CPUs; Parallel(4, address="ray://head:10001")
    with ray_session(spec) as ray:
        results = ray.get([remote_fn.options(**spec.resources()).remote(...) for ...])

Why this is exact: after the first step the shared flow is frozen (spec §4) and every later expert trains only
its own parameters, from generators seeded by its task id (model.py, trainer.py, learning.py). So an expert
learned in another process from the same shared weights, configuration and images is bit-identical to the one
learned serially (tested), given the same number of torch threads: a Ray task gets `cpus_per_task` CPUs
(`--cpus-per-expert`) and sets torch's threads to that number, so compare with `--threads` equal to it.

Ray is an optional extra (`pip install 'moleflow[ray]'`); without it `import_ray` says how to install it.
A cluster is given by its address (`ray://HOST:10001` or `HOST:6379`); every node needs the same moleflow,
torch and backbone weights file (the workers check the backbone's SHA-256 against the driver's).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import MoleflowError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'moleflow[ray]' (or pip install ray)"


@dataclass(frozen=True)
class Parallel:
    """How to spread work over Ray: at most `workers` tasks (experts or trials) at once, each asking for
    `cpus_per_task` CPUs and `gpus_per_task` GPUs; `address`: an existing cluster (default: start a local Ray
    with `workers` x `cpus_per_task` CPUs, shut down afterwards)."""

    workers: int
    address: str | None = None
    cpus_per_task: int = 1
    gpus_per_task: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise MoleflowError(f"--parallel {self.workers}: give at least 1 worker")
        if self.cpus_per_task < 1:
            raise MoleflowError(f"{self.cpus_per_task} CPUs per Ray task: give at least 1")
        if self.gpus_per_task < 0:
            raise MoleflowError(f"{self.gpus_per_task} GPUs per Ray task: cannot be negative")

    def resources(self) -> dict[str, Any]:
        """Ray task options: one CPU (and GPU) request per expert or trial."""
        return {"num_cpus": self.cpus_per_task, "num_gpus": self.gpus_per_task, "max_retries": 0}

    @property
    def device(self) -> str:
        """The device a worker trains on."""
        return "cuda" if self.gpus_per_task > 0 else "cpu"


def import_ray():
    """The `ray` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MoleflowError(f"parallel learning needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_session(spec: Parallel) -> Iterator[Any]:
    """Ray, connected: to `spec.address`, or to a local instance started here (and shut down on exit).
    An already initialised Ray (e.g. in a notebook) is used as it is and left running."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
        try:
            if spec.address:
                ray.init(address=spec.address, **kwargs)
            else:
                ray.init(num_cpus=spec.workers * spec.cpus_per_task,
                         num_gpus=int(spec.workers * spec.gpus_per_task + 0.999) if spec.gpus_per_task else 0,
                         **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ...
            where = f"the Ray cluster at {spec.address}" if spec.address else "a local Ray"
            raise MoleflowError(f"cannot start or reach {where}: {exc}") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def run_remote(ray, function, calls: list[tuple], spec: Parallel, labels: list[str]) -> list[Any]:
    """`function(*args)` for each `args` in `calls` as Ray tasks, at most `spec.workers` at once; results in
    order. A failed call raises a MoleflowError naming its label (the others are cancelled)."""
    remote = ray.remote(function).options(**spec.resources())
    pending: dict[Any, int] = {}
    results: list[Any] = [None] * len(calls)
    queue = list(range(len(calls)))
    try:
        while queue or pending:
            while queue and len(pending) < spec.workers:
                i = queue.pop(0)
                pending[remote.remote(*calls[i])] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - RayTaskError wraps the worker's exception
                cause = getattr(exc, "cause", None) or exc
                raise MoleflowError(f"{labels[i]}: {cause}") from None
            log.info("%s: done on Ray (%d of %d)", labels[i], len(calls) - len(queue) - len(pending), len(calls))
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return results
