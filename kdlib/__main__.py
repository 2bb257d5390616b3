"""Command line: ``python -m kdlib run params/X.yaml [--name NAME] [-p key=value ...]``
or ``python -m kdlib run --resume outputs/NAME``."""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .data import DataNotFoundError
from .params import ParamsError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the three notebooks into outputs/NAME")
    run.add_argument("params", nargs="?", help="params YAML file, e.g. params/fashionmnist.yaml")
    run.add_argument("--name", help="run folder name under outputs/ (default: the params file's stem)")
    run.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one parameter (YAML value), repeatable; with --resume too")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--outputs", default="outputs", help="parent folder of run folders")
    args = parser.parse_args(argv)
    from .runner import RunError, run as run_book
    try:
        run_dir = run_book(args.params, args.name, args.overrides, args.resume, args.outputs)
    except (ParamsError, RunError, CheckpointError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParamsError) else 1
    print(f"run finished: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
