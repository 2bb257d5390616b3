"""The Dask cluster every sweep and tuning runs on: an embedded ``LocalCluster`` sized to this machine
or an existing scheduler's workers, each running one book run or trial at a time (the 'run'
resource); which worker a task runs on and with how many threads; the deadline of a ``--timeout``."""
from __future__ import annotations

import contextlib
import os
import time

from ..book.runner import RunError

RESOURCES = {"run": 1}  # one book run (or trial) per worker at a time


def worker_slot() -> tuple[str, int]:
    """(address, threads) of the Dask worker running the calling task; ("local", torch's
    threads) when called outside one (a test, a notebook)."""
    from distributed import get_worker
    try:
        worker = get_worker()
    except ValueError:
        import torch
        return "local", torch.get_num_threads()
    return worker.address, worker.state.nthreads


def error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def default_workers(cores: int, runs: int) -> int:
    """CPU workers for ``runs`` runs on ``cores`` cores: one single-threaded worker per core
    (measured faster than one multi-threaded worker for this model size; see docs/sweeps.md), never
    more workers than runs."""
    return max(1, min(cores, runs))


def embedded_cluster(workers: int | None, runs: int, dashboard: str = ":8787"):
    """A ``LocalCluster`` of process workers sized to this machine: with CUDA one worker per
    GPU (dask-cuda's ``LocalCUDACluster`` when installed), else workers x threads = cores."""
    from distributed import LocalCluster
    import torch
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = torch.cuda.device_count()
    if gpus and not workers:
        try:
            from dask_cuda import LocalCUDACluster
            return LocalCUDACluster(threads_per_worker=max(1, cores // gpus), resources=RESOURCES,
                                    dashboard_address=dashboard)
        except ImportError:
            if gpus > 1:
                return _per_gpu_cluster(gpus, max(1, cores // gpus), dashboard)
            workers = 1
    workers = workers or default_workers(cores, runs)
    return LocalCluster(n_workers=workers, threads_per_worker=max(1, cores // workers), processes=True,
                        resources=RESOURCES, dashboard_address=dashboard)


def _per_gpu_cluster(gpus: int, threads: int, dashboard: str):
    """What LocalCUDACluster does, without dask-cuda: one worker per GPU, each seeing only its own."""
    from distributed import Nanny, Scheduler, SpecCluster
    workers = {i: {"cls": Nanny, "options": {"nthreads": threads, "resources": RESOURCES,
                                             "env": {"CUDA_VISIBLE_DEVICES": str(i)}}} for i in range(gpus)}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": dashboard}})


def deadline_after(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` deadline ``timeout`` seconds from now (None: no timeout)."""
    return None if timeout is None else time.monotonic() + timeout


def past(deadline: float | None) -> bool:
    """Whether the ``time.monotonic()`` deadline of a ``--timeout`` has passed (None: never)."""
    return deadline is not None and time.monotonic() >= deadline


@contextlib.contextmanager
def connected(workers: int | None, scheduler: str | None, jobs: int, dashboard: str = ":8787"):
    """A Dask client: on the scheduler at ``scheduler``, whose workers must declare the 'run'
    resource, or on an embedded cluster sized for ``jobs`` (``embedded_cluster``), closed after."""
    from distributed import Client
    cluster = None if scheduler else embedded_cluster(workers, jobs, dashboard)
    try:
        with Client(scheduler or cluster) as client:
            info = client.scheduler_info()["workers"].values()
            if scheduler and info and not any(w.get("resources", {}).get("run") for w in info):
                raise RunError(f"the workers at {scheduler} declare no 'run' resource; start each with "
                               f"dask worker {scheduler} --nthreads THREADS --resources run=1")
            yield client
    finally:
        if cluster is not None:
            cluster.close()
