"""Command line: ``python -m kdlib run params/X.yaml [--name NAME] [-p key=value ...]``,
``python -m kdlib run --resume outputs/NAME``,
``python -m kdlib sweep params/sweeps/X.yaml [--workers N] [--scheduler ADDRESS] [--resume] [--timeout T]``,
``python -m kdlib tune params/tune/X.yaml [--workers N] [--scheduler ADDRESS] [--storage URL] [--resume]
[--timeout T]``,
``python -m kdlib ship-teachers params/X.yaml``, and the readers' commands, each with its own
options: ``python -m kdlib report RECORD ...`` (a record's markdown), ``python -m kdlib blocks
[--check]`` (every generated block), ``python -m kdlib site`` (the site), ``python -m kdlib bench``."""
from __future__ import annotations

import argparse
import re
import sys

from .train.checkpoint import CheckpointError
from .train.data import DataNotFoundError
from .records.extras import MissingExtra, require
from .book.params import ParamsError

EXTRA_OF = {"run": "batch", "sweep": "sweep", "tune": "tune"}  # what each command needs beyond the core
DRY_RUN = "check everything (files, keys, values, the folder) and say what would run; run nothing"
STOPPED = 3  # the exit status of a sweep or tuning stopped by its --timeout (continue it with --resume)
TIMEOUT_HELP = ("start no {} after this long (seconds, or 90m, 2h, 1h30m); the running ones finish, "
                f"then it stops with exit status {STOPPED}, to be continued with --resume")


def duration(text: str) -> float:
    """'5400', '90m', '2h', '1h30m', '45s' -> seconds (argparse's type for --timeout)."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: give seconds, or e.g. 90m, 2h, 1h30m")
    h, m, sec = (float(g) if g else 0.0 for g in match.groups())
    return 3600 * h + 60 * m + sec


# the readers' and the benchmark's commands: module and what it does; each parses its own options
READERS = {"report": ("kdlib.publish.pages", "a run's, sweep's or tuning's tables as markdown, into a README block"),
           "blocks": ("kdlib.publish.blocks", "regenerate every generated block of the README and docs "
                                              "(--check: say which are stale)"),
           "site": ("kdlib.publish.site", "build the site into site/"),
           "bench": ("kdlib.bench.command", "time the training's parts and write docs/speed.md's table")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in READERS:  # its own parser, its own --help
        import importlib
        module = importlib.import_module(READERS[argv[0]][0])
        return module.main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="python -m kdlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the three notebooks into outputs/NAME")
    run.add_argument("params", nargs="?", help="params YAML file, e.g. params/fashionmnist.yaml")
    run.add_argument("--name", help="run folder name under outputs/ (default: the params file's stem)")
    run.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one parameter (YAML value), repeatable; with --resume too")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--outputs", default="outputs", help="parent folder of run folders")
    run.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    ship = sub.add_parser("ship-teachers", help="copy a params file's trained teachers into reference_teachers/")
    ship.add_argument("params", help="params YAML file whose teachers are trained, e.g. params/fashionmnist.yaml")
    sweep = sub.add_parser("sweep", help="run a grid of book runs on Dask into outputs/NAME/RUN")
    sweep.add_argument("sweep_file", help="sweep YAML file, e.g. params/sweeps/fashionmnist-tune-beta.yaml")
    sweep.add_argument("--workers", type=int, help="workers of the embedded cluster (default: sized to the machine)")
    sweep.add_argument("--scheduler", metavar="ADDRESS", help="submit to an existing Dask scheduler, e.g. tcp://host:8786")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep: finished runs are skipped")
    sweep.add_argument("--outputs", default="outputs", help="parent folder of sweep folders")
    sweep.add_argument("--name", help="sweep folder name under outputs/ (default: the sweep file's stem)")
    sweep.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    sweep.add_argument("--timeout", type=duration, metavar="T", help=TIMEOUT_HELP.format("run"))
    tune = sub.add_parser("tune", help="tune each method on a validation split (Optuna on Dask), then test "
                                       "the chosen values over seeds into outputs/NAME")
    tune.add_argument("tune_file", help="tune YAML file, e.g. params/tune/small-student.yaml")
    tune.add_argument("--workers", type=int, help="workers of the embedded cluster (default: sized to the machine)")
    tune.add_argument("--scheduler", metavar="ADDRESS", help="submit to an existing Dask scheduler, e.g. tcp://host:8786")
    tune.add_argument("--storage", metavar="URL", help="Optuna storage every worker can reach, e.g. "
                      "postgresql://host/db (default: a journal file in outputs/NAME, one machine)")
    tune.add_argument("--resume", action="store_true", help="continue: finished trials and runs are kept")
    tune.add_argument("--outputs", default="outputs", help="parent folder of tuning folders")
    tune.add_argument("--name", help="tuning folder name under outputs/ (default: the tune file's stem)")
    tune.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    tune.add_argument("--timeout", type=duration, metavar="T", help=TIMEOUT_HELP.format("trial or test run"))
    for name, (_, what) in READERS.items():
        sub.add_parser(name, help=what + f" (python -m kdlib {name} --help)", add_help=False)
    args = parser.parse_args(argv)
    if args.command in EXTRA_OF:
        try:
            require(EXTRA_OF[args.command], f"kdlib {args.command}")
        except MissingExtra as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "tune":
        return _tune(args)
    if args.command == "ship-teachers":
        return _ship(args.params)
    from .book.runner import RunError, check_run, run as run_book
    try:
        if args.dry_run:
            print(check_run(args.params, args.name, args.overrides, args.resume, args.outputs))
            return 0
        run_dir = run_book(args.params, args.name, args.overrides, args.resume, args.outputs)
    except (ParamsError, RunError, CheckpointError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParamsError) else 1
    print(f"run finished: {run_dir}")
    return 0


def _ship(params_file: str) -> int:
    from .book.steps import ship_teachers
    from .book.params import load_params
    try:
        ship_teachers(load_params(params_file))
    except (ParamsError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParamsError) else 1
    except FileNotFoundError as err:
        print(f"error: {err.filename} not found: train the teachers first (python -m kdlib run {params_file})",
              file=sys.stderr)
        return 1
    return 0


def _sweep(args) -> int:
    from .book.runner import RunError
    from .fanout.sweep import deadline_after, run_sweep, summary
    if args.workers is not None and (args.workers < 1 or args.scheduler):
        print("error: --workers takes a positive number, and sizes the embedded cluster only (not --scheduler)",
              file=sys.stderr)
        return 2
    try:
        if args.dry_run:
            from .fanout.sweep import check_sweep
            print(check_sweep(args.sweep_file, args.resume, args.outputs, args.name))
            return 0
        data = run_sweep(args.sweep_file, args.workers, args.scheduler, args.resume, args.outputs, name=args.name,
                         deadline=deadline_after(args.timeout))
    except (ParamsError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParamsError) else 1
    print(summary(data), file=sys.stderr if data["status"] == "failed" else sys.stdout)
    return {"finished": 0, "stopped": STOPPED}.get(data["status"], 1)


def _tune(args) -> int:
    from .book.runner import RunError
    from .fanout.tune import run_tune
    if args.workers is not None and (args.workers < 1 or args.scheduler):
        print("error: --workers takes a positive number, and sizes the embedded cluster only (not --scheduler)",
              file=sys.stderr)
        return 2
    try:
        if args.dry_run:
            from .fanout.tune import check_tune
            print(check_tune(args.tune_file, args.storage, args.resume, args.outputs, args.name))
            return 0
        data = run_tune(args.tune_file, args.workers, args.scheduler, args.storage, args.resume, args.outputs,
                        name=args.name, timeout=args.timeout)
    except (ParamsError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParamsError) else 1
    return {"finished": 0, "stopped": STOPPED}.get(data["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
