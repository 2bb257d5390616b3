"""The README's results table, generated from a finished run folder (never typed in).

``python -m kdlib.report outputs/fashionmnist [--readme README.md]`` prints the
markdown, and with ``--readme`` replaces the block between the ``results:start``
and ``results:end`` markers.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from .stats import verdict

SEED_EXPECTED = {  # the seed kit's README, "Expected results on Fashion-MNIST"
    "teacher_cnn1": "~92.5", "teacher_cnn2": "~93.3", "teacher_resnet": "~92.0",
    "camkd": "~91.5-91.8", "vanilla": "~91.2-91.5", "scratch": "(not given)",
}
LABELS = {"teacher_cnn1": "Teacher CNN1", "teacher_cnn2": "Teacher CNN2", "teacher_resnet": "Teacher ResNet",
          "teacher_vgg": "Teacher VGG", "teacher_densenet": "Teacher DenseNet",
          "camkd": "Student (CAMKD)", "vanilla": "Student (vanilla)", "scratch": "Student (scratch, no teachers)"}


def _acc(values: pd.Series) -> str:
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f} (n={len(values)})"


def results_markdown(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    results = pd.read_csv(run_dir / "results.csv")
    comparison = pd.read_csv(run_dir / "comparison.csv")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    lines = ["| Model | Params | Seed kit's expected test acc % | Measured test acc % |", "|---|---|---|---|"]
    for (_role, name), group in results.groupby(["role", "name"], sort=False):
        params = f"{group['params'].iloc[0] / 1e6:.2f}M" if group["params"].iloc[0] > 1e6 \
            else f"{group['params'].iloc[0] / 1e3:.0f}K"
        lines.append(f"| {LABELS.get(name, name)} | {params} | {SEED_EXPECTED.get(name, '')} | {_acc(group['test_acc'])} |")
    lines.append("")
    lines += [f"- {verdict(row)}" for _, row in comparison.iterrows()]
    git = manifest.get("git", {})
    dev = manifest.get("device", {})
    lines += ["", f"Run `{run_dir.name}`: status {manifest['status']}, commit `{str(git.get('commit'))[:10]}`"
              f"{' (uncommitted changes)' if git.get('dirty') else ''}, {dev.get('device')} "
              f"({dev.get('processor')}, {dev.get('threads')} threads), book wall time "
              f"{manifest.get('seconds', float('nan')) / 60:.1f} min. Teachers' means have no spread: one "
              f"teacher set (teacher_seed), students one run per seed against it."]
    return "\n".join(lines)


def update_readme(readme: str | Path, block: str) -> None:
    readme = Path(readme)
    text = readme.read_text()
    pattern = re.compile(r"(<!-- results:start -->\n).*?(\n<!-- results:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no <!-- results:start --> ... <!-- results:end --> block to replace")
    readme.write_text(pattern.sub(lambda m: m.group(1) + block + m.group(2), text))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdlib.report", description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--readme", help="README file whose results block to replace")
    args = parser.parse_args(argv)
    block = results_markdown(args.run_dir)
    print(block)
    if args.readme:
        update_readme(args.readme, block)


if __name__ == "__main__":
    main()
