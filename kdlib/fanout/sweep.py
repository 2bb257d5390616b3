"""Sweeps: a grid of book runs fanned out on Dask, each an ordinary run folder.

A sweep file (``params/sweeps/NAME.yaml``) names a ``base`` params file, a ``grid``
(key -> list of values: every combination is a run) and/or ``runs`` (explicit
override mappings, each one more run), and may fix other keys for all runs.
``run_sweep`` validates every expanded run before anything is created, trains each
distinct teacher set once as its own task, runs the book for each run as a task that
depends on its teachers, and then executes ``04_sweep_analysis.ipynb`` into the
sweep folder. The tasks know nothing of the cluster: an embedded ``LocalCluster``
by default, or any scheduler address (``dask scheduler``, dask-jobqueue, ...).
Each worker runs one book run at a time (worker resource ``run=1``) with as many
torch threads as it has Dask threads.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..book import steps as book
from ..train.checkpoint import identity_key
from ..book.params import ParamsError, load_params, read_mapping, read_params, teacher_names, validate
from ..book.runner import RunError, execute, notebooks_dir, now, render_html
from ..records.files import PlainDumper, ended_attempt
from .cluster import RESOURCES, connected, deadline_after, error_line, past, worker_slot  # noqa: F401 (deadline_after: the CLI's)
from ..records.names import run_name
from ..records.paths import display_path, locate, resolve
from ..book import runner
from ..records.extras import require

SWEEP_KEYS = ("base", "grid", "runs")
SET_BY_SWEEP = {"run_dir": "the sweep names each run's folder",
                "threads": "each run gets its worker's thread count; size workers with --workers"}
ANALYSIS = "04_sweep_analysis.ipynb"
STARTED = "kdbook-sweep-run-started"  # Dask event topic: a worker started a run


@dataclass
class Run:
    name: str        # folder name under the sweep folder
    overrides: dict  # keys set on top of the base params file (fixed keys, grid point, explicit run)
    P: dict          # the validated parameters


def expand(sweep_file: str | Path) -> tuple[str, list[Run]]:
    """Read a sweep file and return ``(base params file, runs)``, every run validated.

    Raises ``ParamsError`` naming the sweep file, the run and the key."""
    src = str(sweep_file)
    raw = read_mapping(sweep_file, "sweep file", "params/sweeps/")
    if "base" not in raw:
        raise ParamsError(f"{src}: no 'base' key; name the params file the runs start from, "
                          "e.g. base: params/smoke.yaml")
    base = str(locate(Path(raw["base"])))
    base_raw = read_params(base, "base params file")
    load_params(base)  # the base alone must be valid (its errors name the base file)
    grid, explicit = raw.get("grid") or {}, raw.get("runs") or []
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ParamsError(f"{src}: grid must map each key to a non-empty list of values, e.g. beta: [10, 100]")
    if not isinstance(explicit, list) or not all(isinstance(r, dict) for r in explicit):
        raise ParamsError(f"{src}: runs must be a list of mappings, e.g. - {{methods: [scratch]}}")
    if not grid and not explicit:
        raise ParamsError(f"{src}: give a grid (key: [values]) and/or runs (a list of overrides)")
    fixed = {k: v for k, v in raw.items() if k not in SWEEP_KEYS}
    for key in set(fixed) | set(grid) | {k for r in explicit for k in r}:
        if key in SET_BY_SWEEP:
            raise ParamsError(f"{src}: key {key!r} cannot be set in a sweep ({SET_BY_SWEEP[key]})")
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    runs, seen = [], {}
    for own in points + explicit:
        name = run_name(own)
        if name in seen:
            raise ParamsError(f"{src}: runs {seen[name]} and {own} both get the folder name {name!r}; "
                              "make them differ")
        seen[name] = own
        overrides = {**fixed, **own}
        runs.append(Run(name, overrides, validate({**base_raw, **overrides}, f"{src}, run {name}")))
    return base, runs


def teacher_key(P: dict) -> tuple[str, ...]:
    """The teacher checkpoints run ``P`` needs (``steps.teacher_checkpoint``, from params
    alone, no data loaded): runs with equal keys share one teacher set."""
    return tuple(str(book.teacher_checkpoint(P, n)) for n in teacher_names(P))


def teacher_task(P: dict, folder: str) -> dict:
    """Train (or reuse) one teacher set into ``P["teacher_dir"]``, writing ``teachers.json``
    into ``folder``. Returns a record; a failure is recorded, not raised."""
    address, threads = worker_slot()
    t0 = time.perf_counter()
    Path(folder).mkdir(parents=True, exist_ok=True)
    progress = os.environ.get("KDBOOK_PROGRESS")
    os.environ["KDBOOK_PROGRESS"] = "off"  # no bars on the sweep's console; teachers.json has the curves
    try:
        book.train_teachers(dict(P, run_dir=folder, threads=threads), log=lambda *a: None)
        status, error = "finished", None
    except Exception as err:  # recorded for the runs that need these teachers
        status, error = "failed", error_line(err)
    finally:
        if progress is None:
            os.environ.pop("KDBOOK_PROGRESS")
        else:
            os.environ["KDBOOK_PROGRESS"] = progress
    return {"status": status, "error": error, "worker": address, "seconds": round(time.perf_counter() - t0, 1)}


def run_task(base: str, name: str, overrides: dict, sweep_dir: str, teachers: dict) -> dict:
    """One book run into ``sweep_dir/name`` (``kdlib.book.runner``): started, or resumed when
    its folder holds an unfinished run (Dask retrying it after its worker died), or
    left alone when finished. Returns its record; a failure is recorded, not raised."""
    from distributed import get_worker
    address, threads = worker_slot()
    get_worker().log_event(STARTED, {"sweep": sweep_dir, "run": name, "worker": address})  # -> sweep.json
    t0 = time.perf_counter()
    record = {"worker": address, "error": None}
    if teachers["status"] != "finished":
        return dict(record, status="failed", error=f"teachers: {teachers['error']}", seconds=0.0)
    manifest = Path(sweep_dir) / name / "manifest.json"
    status = json.loads(manifest.read_text()).get("status") if manifest.exists() else None
    quiet = lambda *a: None  # noqa: E731  (the manifest records every step)
    try:
        if status and status != "finished":
            runner.run(resume=str(manifest.parent), overrides=[f"threads={threads}"], log=quiet)
        elif not status:
            runner.run(base, name, [f"{k}={json.dumps(v)}" for k, v in overrides.items()] + [f"threads={threads}"],
                       outputs=sweep_dir, log=quiet)
        record["status"] = "finished"
    except Exception as err:  # one failing run must not stop the others
        record.update(status="failed", error=error_line(err))
    return dict(record, seconds=round(time.perf_counter() - t0, 1))


class Record:
    """``sweep.json``: every run's status, worker, seconds and error, written by the client only."""

    def __init__(self, sweep_dir: Path, header: dict, names: list[str]):
        self.path = sweep_dir / "sweep.json"
        before = json.loads(self.path.read_text()) if self.path.exists() else {}
        old = before.get("runs", {})
        # a resumed sweep keeps when its earlier sessions started and ended
        earlier = before.get("earlier", []) + ([ended_attempt(before)] if "started" in before else [])
        self.data = dict(header, status="running", started=now(), **({"earlier": earlier} if earlier else {}),
                         runs={n: old.get(n) if (old.get(n) or {}).get("status") == "finished" else
                               {"status": "pending", "worker": None, "seconds": None, "error": None} for n in names})
        self.write()

    @staticmethod
    def finished_in(sweep_dir: Path) -> set[str]:
        """The runs ``sweep.json`` in ``sweep_dir`` records as finished (none without one)."""
        path = sweep_dir / "sweep.json"
        runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
        return {n for n, r in runs.items() if (r or {}).get("status") == "finished"}

    def runs(self, status: str) -> list[str]:
        return [n for n, r in self.data["runs"].items() if r["status"] == status]

    def update(self, name: str, **fields) -> None:
        self.data["runs"][name].update(fields)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def _submit(client, base: str, runs: list[Run], sweep_dir: Path) -> dict:
    """Teacher tasks (one per distinct teacher set), then one book-run task per run that
    depends on its teachers' future, prioritised in the sweep file's order. Dask takes the
    priorities as a preference: it hands resource-restricted tasks to workers as they become
    ready, and was seen to start a later run first. Returns ``{run name: future}``."""
    tag = uuid.uuid4().hex[:6]  # keys unique on a shared scheduler
    teachers, futures = {}, {}
    for i, run in enumerate(runs):
        key = teacher_key(run.P)
        if key not in teachers:
            folder = sweep_dir / "_teachers" / identity_key({"checkpoints": key})
            teachers[key] = client.submit(teacher_task, run.P, str(folder), key=f"teachers-{folder.name}-{tag}",
                                          resources=RESOURCES, pure=False, priority=len(runs) + 1)
        futures[run.name] = client.submit(run_task, base, run.name, run.overrides, str(sweep_dir), teachers[key],
                                          key=f"run-{run.name}-{tag}", resources=RESOURCES, pure=False,
                                          priority=len(runs) - i)
    return futures


def _executing(dask_worker) -> list:
    """The keys of the tasks a worker is executing now (``client.run``; the scheduler's
    'processing' also counts those queued on the worker for its 'run' resource)."""
    return [ts.key for ts in dask_worker.state.executing]


def _started(client) -> queue.SimpleQueue:
    """The STARTED events of the runs, from now on (subscribe before submitting)."""
    started = queue.SimpleQueue()
    client.subscribe_topic(STARTED, lambda event: started.put(event[1]))
    return started


def _watch(client, futures: dict, record: Record, sweep_dir: Path, log, deadline: float | None,
           started: queue.SimpleQueue) -> None:
    """Mark runs running (with their worker) as workers start them (``started``: ``_started``,
    subscribed before they were submitted); one line per finished run. Past ``deadline`` the runs
    that no worker is executing are cancelled (they stay pending, for ``--resume``); the running
    ones finish."""
    from distributed import as_completed
    names = {f.key: n for n, f in futures.items()}
    total, done = len(record.data["runs"]), len(record.runs("finished"))
    pending = as_completed(list(futures.values()))
    stopping = False
    while not pending.is_empty():
        while not started.empty():
            event = started.get()
            if event["sweep"] == str(sweep_dir) and \
                    record.data["runs"][event["run"]]["status"] in ("pending", "running"):
                record.update(event["run"], status="running", worker=event["worker"])
        if not stopping and past(deadline):
            stopping = True
            busy = {key for keys in client.run(_executing).values() for key in keys}
            waiting = [f for f in futures.values() if not f.done() and f.key not in busy]
            running = sum(not f.done() for f in futures.values()) - len(waiting)  # before the cancel ends them
            client.cancel(waiting)
            log(f"timeout: {len(waiting)} run(s) not started are left for --resume; waiting for the "
                f"{running} running")
        for future in pending.next_batch(block=False):
            name = names[future.key]
            if future.status == "cancelled":  # never started: pending, for --resume
                continue
            if future.status == "error":  # the engine gave up on it (e.g. its worker died too often)
                result = {"status": "failed", "error": error_line(future.exception()), "seconds": None}
            else:
                result = future.result()
            record.update(name, **result)
            done += 1
            log(f"[{done}/{total}] {name}: {result['status']}"
                + (f" in {result['seconds']:.0f} s" if result.get("seconds") else "")
                + (f" ({result['error']})" if result.get("error") else ""))
        time.sleep(0.5)


def analyse(sweep_dir: Path, log=print) -> Path:
    """Execute 04_sweep_analysis into the sweep folder and render its HTML."""
    nb_dir = notebooks_dir()
    execute(nb_dir, ANALYSIS, sweep_dir, {"sweep_dir": display_path(sweep_dir)}, {"sweep_dir"})
    html = render_html(sweep_dir / ANALYSIS)
    log(f"analysis: {display_path(html)}")
    return sweep_dir / ANALYSIS


def ensure(sweep_dir: str | Path, sweep_file: str | Path) -> Path:
    """The sweep folder ``sweep_dir`` (relative: under the project root), running ``sweep_file``
    into it first when it holds no sweep yet (no 04 inside: the caller is the analysis).
    What notebook 04 does when opened on a sweep that has not run."""
    folder = resolve(str(sweep_dir))
    if not (folder / "sweep.json").exists():
        run_sweep(sweep_file, outputs=folder.parent, name=folder.name, analysis=False)
    return folder


def _opened(sweep_file: str | Path, resume: bool, outputs: str | Path, name: str | None):
    """The sweep file found and expanded (every run validated) and its folder, refused in one line
    when it holds a sweep and this is no resume: ``(sweep file, base params file, runs, sweep folder)``."""
    sweep_file = locate(Path(sweep_file))
    base, runs = expand(sweep_file)
    sweep_dir = Path(outputs) / (name or sweep_file.stem)
    if (sweep_dir / "sweep.json").exists() and not resume:
        raise RunError(f"{sweep_dir} already holds a sweep; continue it with: python -m kdlib sweep {sweep_file} "
                       f"--resume (finished runs are skipped), pick another --name, or delete {sweep_dir}")
    return sweep_file, base, runs, sweep_dir


def check_sweep(sweep_file: str | Path, resume: bool = False, outputs: str | Path = "outputs",
                name: str | None = None) -> str:
    """Every check ``run_sweep`` makes before it creates anything (the sweep file, every run's params,
    a sweep folder in the way), and nothing else. Returns what would run, in one line."""
    sweep_file, base, runs, sweep_dir = _opened(sweep_file, resume, outputs, name)
    done = Record.finished_in(sweep_dir) if resume else set()
    left = [r for r in runs if r.name not in done]
    return (f"would {'resume' if resume and done else 'run'} {display_path(sweep_dir)}: {len(left)} of {len(runs)} "
            f"runs from {display_path(Path(base))}")


def run_sweep(sweep_file: str | Path, workers: int | None = None, scheduler: str | None = None,
              resume: bool = False, outputs: str | Path = "outputs", name: str | None = None,
              dashboard: str = ":8787", analysis: bool = True, log=print, deadline: float | None = None) -> dict:
    """Run every run of a sweep file into ``outputs/NAME/`` and return ``sweep.json``'s content.

    Raises ``ParamsError`` (a bad sweep) or ``RunError`` (a sweep folder in the way) before
    anything is created; a failing run is recorded in ``sweep.json`` and the others go on.
    ``analysis`` executes 04_sweep_analysis into the sweep folder at the end. Past
    ``deadline`` (``time.monotonic()``, from ``--timeout``) no run starts: the sweep ends
    'stopped' once the running ones finish, and ``--resume`` goes on."""
    require("sweep", "a sweep")  # before anything is created: one line naming the extra, not an ImportError
    sweep_file, base, runs, sweep_dir = _opened(sweep_file, resume, outputs, name)
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot write the sweep folder {sweep_dir}: {err.strerror}; "
                       "choose --outputs elsewhere") from None
    (sweep_dir / "sweep.yaml").write_text(yaml.dump(
        {"sweep": display_path(sweep_file), "base": display_path(Path(base)),
         "runs": [{"name": r.name, "overrides": r.overrides} for r in runs]}, Dumper=PlainDumper, sort_keys=False))
    record = Record(sweep_dir, {"sweep": display_path(sweep_file), "base": display_path(Path(base)),
                                "cluster": "given scheduler" if scheduler else "embedded LocalCluster"},
                    [r.name for r in runs])
    todo = [r for r in runs if r.name not in record.runs("finished")]
    if len(todo) < len(runs):
        log(f"{len(runs) - len(todo)} run(s) finished earlier, skipped")
    if todo and not past(deadline):
        _run_on_cluster(base, todo, sweep_dir, record, workers, scheduler, dashboard, log, deadline)
    failed = record.runs("failed")
    left = record.runs("pending") + record.runs("running")
    record.data.update(status="stopped" if left else "failed" if failed else "finished", ended=now())
    record.write()
    if left:
        log(f"stopped by the timeout: {len(runs) - len(left)} of {len(runs)} runs ended; continue with --resume")
    elif analysis and len(failed) < len(runs):
        analyse(sweep_dir, log)
    return record.data


def _run_on_cluster(base, runs, sweep_dir, record, workers, scheduler, dashboard, log, deadline=None) -> None:
    with connected(workers, scheduler, len(runs), dashboard) as client:
        info = client.scheduler_info()["workers"].values()
        log(f"dashboard: {client.dashboard_link}; {len(info)} workers x "
            f"{', '.join(sorted({str(w['nthreads']) for w in info})) or '?'} threads; {len(runs)} runs")
        record.data["cluster"] += f", {len(info)} workers"
        started = _started(client)  # before the runs start: none is missed
        _watch(client, _submit(client, base, runs, sweep_dir), record, sweep_dir, log, deadline, started)


def summary(data: dict) -> str:
    """The closing lines: counts, and each failed run with its error line."""
    runs = data["runs"]
    failed = {n: r for n, r in runs.items() if r["status"] == "failed"}
    finished = sum(r["status"] == "finished" for r in runs.values())
    lines = [f"sweep {data['status']}: {finished} of {len(runs)} runs finished"
             + ("; continue with --resume" if data["status"] == "stopped" else "")]
    lines += [f"  failed: {n}: {r['error']}" for n, r in failed.items()]
    return "\n".join(lines)
