"""Runs the book: 01, 02, 03 executed by papermill into ``outputs/NAME/``.

Each run folder gets the executed notebooks, their HTML, ``params.yaml`` (resolved)
and ``manifest.json`` (status, git commit, versions, device, timings, teacher
checkpoint hashes). A finished run is never overwritten; an unfinished one can be
resumed (finished notebooks are skipped; training resumes from its checkpoints).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from ..records.paths import PACKAGE_ROOT, display_path, portable_text as portable, say
from ..records.extras import require
from .params import ParamsError, load_params, parse_override, read_params, validate
from .steps import check_models
from ..records.files import cpu_name
from ..train.loop import pick_device

NOTEBOOKS = ["01_train_teachers.ipynb", "02_distill_students.ipynb", "03_fidelity_analysis.ipynb"]


class RunError(RuntimeError):
    """A run that cannot start or did not finish; the message says why and what to do."""


def notebooks_dir() -> Path:
    for base in (Path.cwd(), PACKAGE_ROOT):
        if (base / "notebooks" / NOTEBOOKS[0]).is_file():
            return base / "notebooks"
    raise RunError("notebooks/ not found: run from the repository root")


def _no_iri_grammar() -> None:
    """Called before papermill, nbformat or nbconvert is imported. jsonschema (which nbformat
    imports) builds an Earley parser for RFC 3987 IRIs at import when the optional rfc3987-syntax
    is installed (JupyterLab's jupyter-events asks for it): 1.4 s at the start of every run and
    sweep worker, for a format no notebook schema uses. This process then does without it
    (jsonschema skips that format check, as it does where the package is not installed)."""
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)


def declared_parameters(notebook: Path) -> set[str]:
    """Names a notebook declares in its ``parameters`` cell (papermill.inspect_notebook)."""
    _no_iri_grammar()
    import papermill
    return set(papermill.inspect_notebook(str(notebook)))


def check_declared(params_given: dict, source: str, nb_dir: Path) -> dict[str, set[str]]:
    """Refuse any given key that no notebook declares; return each notebook's keys."""
    declared = {nb: declared_parameters(nb_dir / nb) for nb in NOTEBOOKS}
    everything = set().union(*declared.values())
    for key in params_given:
        if key not in everything:
            raise ParamsError(f"{source}: key {key!r} is declared by no notebook "
                              f"({', '.join(NOTEBOOKS)}); remove it")
    return declared


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=PACKAGE_ROOT, capture_output=True, text=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except OSError:
        return {"commit": None, "dirty": None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("kdbook", "torch", "torchvision", "numpy", "pandas", "papermill", "nbconvert"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_info(P: dict) -> dict:
    import torch
    dev = pick_device(P["device"])
    info = {"device": str(dev), "threads": P["threads"] or len(os.sched_getaffinity(0)),
            "machine": platform.machine(), "processor": cpu_name()}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info



def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(run_dir: Path, manifest: dict) -> None:
    tmp = run_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(run_dir / "manifest.json")


def _teacher_hashes(run_dir: Path) -> list[dict]:
    path = run_dir / "teachers.json"
    if not path.exists():
        return []
    return [{"name": t["name"], "checkpoint": t["checkpoint"], "sha256": t["sha256"]}
            for t in json.loads(path.read_text())["teachers"]]


def _failed_cell(output: Path) -> str:
    """'cell N (In [k])' of the first cell that raised, read from the executed notebook."""
    _no_iri_grammar()
    import nbformat
    try:
        nb = nbformat.read(output, as_version=4)
    except Exception:
        return "unknown cell"
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"cell {i + 1} (In [{cell.get('execution_count')}]): {out.get('ename')}: {out.get('evalue')}"
    return "unknown cell"


@functools.lru_cache(maxsize=1)
def _html_exporter():
    """One exporter per process: a new one parses and compiles its Jinja templates again."""
    _no_iri_grammar()
    from nbconvert import HTMLExporter
    return HTMLExporter(template_name="kdbook", extra_template_basedirs=[str(PACKAGE_ROOT / "kdlib" / "publish" / "templates")])


def render_html(notebook: Path) -> Path:
    """JupyterLab's HTML, with the set-up cells' code (parameters, Colab) folded: see
    ``kdlib/templates/kdbook``."""
    _no_iri_grammar()
    import nbformat
    body, _ = _html_exporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    html = notebook.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


class _Echo:
    """Where papermill copies the kernel's printed text as it arrives: each complete
    line goes to ``log`` behind the notebook's name, so a batch run's terminal shows
    the notebook's progress lines while they happen (the notebook keeps its own copy)."""

    def __init__(self, notebook: str, log):
        self.prefix, self.log, self.pending = Path(notebook).stem, log, ""

    def write(self, text: str) -> None:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1]  # a carriage-return bar: its last state
            if line.strip():
                self.log(f"{self.prefix} | {line}")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.write("\n")


def _portable(notebook: Path, source: str) -> None:
    """Papermill records the input and output paths as given; keep them relative."""
    _no_iri_grammar()
    import nbformat
    nb = nbformat.read(notebook, as_version=4)
    nb.metadata.papermill.update(input_path=source, output_path=display_path(notebook))
    nbformat.write(nb, notebook)


# The kernel process writes its own log to the runner's stderr: at its default level that is a
# warning per notebook (ipykernel 7: "Kernel is running over TCP without encryption", the
# loopback transport papermill uses), and on a loaded machine an ERROR line when the kernel is
# interrupted while papermill shuts it down after the last cell ("KeyboardInterrupt caught in
# kernel"). Only its critical lines reach the terminal: what went wrong in a run is the runner's
# to say (the failing notebook and cell, a kernel that died), and the cells' own output and
# errors are recorded in the executed notebook and the manifest.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL"]


def execute(nb_dir: Path, name: str, run_dir: Path, params: dict, declared: set[str], log=say) -> None:
    _no_iri_grammar()
    import papermill
    env_before = os.environ.get("KDBOOK_PROGRESS")
    os.environ["KDBOOK_PROGRESS"] = "text"  # no widget state in executed notebooks
    echo = _Echo(name, log)
    try:
        papermill.execute_notebook(str(nb_dir / name), str(run_dir / name),
                                   parameters={k: v for k, v in params.items() if k in declared},
                                   kernel_name="python3", cwd=str(Path.cwd()), progress_bar=False,
                                   stdout_file=echo, stderr_file=echo, extra_arguments=KERNEL_ARGUMENTS)
    finally:
        echo.close()
        if env_before is None:
            os.environ.pop("KDBOOK_PROGRESS", None)
        else:
            os.environ["KDBOOK_PROGRESS"] = env_before
        if (run_dir / name).exists():
            _portable(run_dir / name, f"{nb_dir.name}/{name}")


def prepare_run(params_file: str | None, name: str | None, overrides: list[str], resume: str | None,
                outputs: Path) -> tuple[Path, dict, dict, str]:
    """Validate everything and create (or reopen) the run folder before anything runs."""
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "params.yaml").is_file():
            raise RunError(f"--resume {resume}: no params.yaml there; is it a run folder?")
        given = yaml.safe_load((run_dir / "params.yaml").read_text())
        source = str(run_dir / "params.yaml") + (" with -p " + " ".join(overrides) if overrides else "")
        manifest = json.loads((run_dir / "manifest.json").read_text())
        if manifest.get("status") == "finished":
            raise RunError(f"{run_dir} already finished; nothing to resume")
        given.update(dict(parse_override(t) for t in overrides))  # e.g. a lower lr after a NaN
        given = validate(given, source)
        given["run_dir"] = display_path(run_dir)  # where the folder is now, even if it was moved
        if overrides:
            (run_dir / "params.yaml").write_text(yaml.safe_dump(given, sort_keys=False))
            manifest.setdefault("resume_overrides", []).append(overrides)
        return run_dir, given, manifest, source
    if not params_file:
        raise RunError("give a params file (params/NAME.yaml) or --resume outputs/NAME")
    P = load_params(params_file)
    raw = read_params(params_file)
    source = params_file + (" with -p " + " ".join(overrides) if overrides else "")
    for text in overrides:
        key, value = parse_override(text)
        raw[key] = value
    P = validate(dict(raw), source)
    name = name or Path(params_file).stem
    run_dir = outputs / name
    if (run_dir / "manifest.json").exists():
        status = json.loads((run_dir / "manifest.json").read_text()).get("status")
        hint = (f"pick another --name, or delete {run_dir}" if status == "finished"
                else f"resume it with: python -m kdlib run --resume {run_dir} (or pick another --name)")
        raise RunError(f"{run_dir} already holds a {status} run; {hint}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        P["run_dir"] = display_path(run_dir.resolve())  # relative to the project root when inside it
        (run_dir / "params.yaml").write_text(yaml.safe_dump(P, sort_keys=False))
    except OSError as err:
        raise RunError(f"cannot write the run folder {run_dir}: {err.strerror}; "
                       f"free space or fix permissions, or choose --outputs elsewhere") from None
    manifest = {"name": name, "params_file": params_file, "overrides": overrides, "status": "created",
                "created": now(), "notebooks": {}}
    return run_dir, P, manifest, source


def check_run(params_file: str | None = None, name: str | None = None, overrides: list[str] | None = None,
              resume: str | None = None, outputs: str | Path = "outputs") -> str:
    """Every check ``run`` makes before it creates anything (the params file and its overrides, the
    notebooks' parameters, a folder in the way, a run to resume), and nothing else: no folder
    written, no notebook executed. Returns what would run, in one line (``kdlib run --dry-run``)."""
    overrides = overrides or []
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "params.yaml").is_file():
            raise RunError(f"--resume {resume}: no params.yaml there; is it a run folder?")
        status = json.loads((run_dir / "manifest.json").read_text()).get("status")
        if status == "finished":
            raise RunError(f"{run_dir} already finished; nothing to resume")
        given = yaml.safe_load((run_dir / "params.yaml").read_text())
        given.update(dict(parse_override(t) for t in overrides))
        validate(given, str(run_dir / "params.yaml"))
        return f"would resume {display_path(run_dir)} (a {status} run)"
    if not params_file:
        raise RunError("give a params file (params/NAME.yaml) or --resume outputs/NAME")
    load_params(params_file)
    raw = read_params(params_file)
    raw.update(dict(parse_override(t) for t in overrides))
    source = params_file + (" with -p " + " ".join(overrides) if overrides else "")
    P = validate(dict(raw), source)
    check_models(P, source)
    check_declared(raw, source, notebooks_dir())
    run_dir = Path(outputs) / (name or Path(params_file).stem)
    if (run_dir / "manifest.json").exists():
        status = json.loads((run_dir / "manifest.json").read_text()).get("status")
        hint = (f"pick another --name, or delete {run_dir}" if status == "finished"
                else f"resume it with: python -m kdlib run --resume {run_dir} (or pick another --name)")
        raise RunError(f"{run_dir} already holds a {status} run; {hint}")
    return (f"would run the book into {display_path(run_dir)}: {', '.join(P['methods'])} on seeds "
            f"{', '.join(map(str, P['seeds']))}, {P['dataset']}")


def run(params_file: str | None = None, name: str | None = None, overrides: list[str] | None = None,
        resume: str | None = None, outputs: str | Path = "outputs", log=say) -> Path:
    """Run the book; return the run folder. Raises ``ParamsError`` or ``RunError``, or
    ``MissingExtra`` (before anything is created) without the ``batch`` extra."""
    require("batch", "kdlib run")
    overrides = overrides or []
    nb_dir = notebooks_dir()
    if params_file and not resume:  # every check before anything is created
        load_params(params_file)
        raw = read_params(params_file)
        raw.update(dict(parse_override(t) for t in overrides))
        source = params_file + (" with -p " + " ".join(overrides) if overrides else "")
        check_models(validate(dict(raw), source), source)  # own models: each built and run on one batch
        check_declared(raw, source, nb_dir)
    run_dir, P, manifest, source = prepare_run(params_file, name, overrides, resume, Path(outputs))
    declared = check_declared({}, source, nb_dir)
    manifest.update({"status": "running", "git": git_commit(), "versions": versions(),
                     "device": device_info(P), "dataset": P["dataset"], "resumed": bool(resume)})
    attempt = {"start": now(), "git": manifest["git"], "resumed": bool(resume)}
    manifest.setdefault("attempts", []).append(attempt)  # one per start or resume, kept across resumes
    write_manifest(run_dir, manifest)
    t_run = time.perf_counter()
    for nb in NOTEBOOKS:
        entry = manifest["notebooks"].get(nb, {})
        if entry.get("status") == "finished":
            log(f"{nb}: finished earlier, skipped")
            continue
        entry.update({"status": "running", "start": now()})
        manifest["notebooks"][nb] = entry
        write_manifest(run_dir, manifest)
        log(f"{nb}: running")
        t0 = time.perf_counter()
        try:
            execute(nb_dir, nb, run_dir, P, declared[nb], log)
        except Exception as err:
            where = _failed_cell(run_dir / nb)
            entry.update({"status": "failed", "end": now(), "seconds": time.perf_counter() - t0,
                          "error": portable(f"{type(err).__name__}: {where}")})
            manifest.update({"status": "failed", "ended": now()})
            attempt.update({"end": now(), "seconds": round(time.perf_counter() - t_run, 1), "status": "failed"})
            write_manifest(run_dir, manifest)
            if (run_dir / nb).exists():
                render_html(run_dir / nb)
            raise RunError(f"{nb} failed at {where}; the partial notebook is {run_dir / nb}; "
                           f"fix the cause, then: python -m kdlib run --resume {run_dir} [-p key=value]") from None
        entry.update({"status": "finished", "end": now(), "seconds": round(time.perf_counter() - t0, 1)})
        render_html(run_dir / nb)
        manifest["teacher_checkpoints"] = _teacher_hashes(run_dir)
        write_manifest(run_dir, manifest)
        log(f"{nb}: finished in {entry['seconds']:.0f} s")
    manifest.update({"status": "finished", "ended": now(),
                     "seconds": round(time.perf_counter() - t_run, 1)})
    attempt.update({"end": now(), "seconds": manifest["seconds"], "status": "finished"})
    write_manifest(run_dir, manifest)
    return run_dir
