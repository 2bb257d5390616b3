"""The site: the pages of ``docs/``, the parameters table from ``SCHEMA``, and one page per
committed run or sweep with its executed notebooks rendered from their stored outputs
(never executed), built offline with MkDocs (Material theme, mkdocs-jupyter) into ``site/``.

``python -m kdlib.site`` (``make site``) builds it all; ``--only fashionmnist`` builds the
pages and the records named (what the tests build). The pages are staged in
``build/site-src/`` (``docs/`` copied, generated pages added), MathJax is bundled from the
``jupyter-server-mathjax`` package, and the notebooks' own CDN script tags are removed, so
the site works opened from disk and served, and asks no outside host for anything.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import yaml

from .blocks import NBSP, answers_markdown, record_page, run_answer, sweep_answers
from .records import update_readme

ROOT = Path(__file__).resolve().parent.parent
STAGE = Path("build/site-src")
COPIED = (".png", ".csv", ".json", ".yaml")  # a record's small files, linked from its page
NOT_SETTING = {"run_dir", "threads"}


# ---------------------------------------------------------------- which records
def tracked(root: Path) -> set[Path] | None:
    """The files of ``outputs/`` that git tracks (None when this is no git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "outputs"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {root / p for p in out.decode().split("\0") if p}


def records(root: Path, only: list[str] | None = None) -> list[Path]:
    """The committed run and sweep folders directly under ``outputs/`` (a sweep's runs are
    its children), in name order; ``only`` keeps the names given."""
    files = tracked(root)
    found = []
    for folder in sorted(p for p in (root / "outputs").iterdir() if p.is_dir()):
        marker = next((folder / m for m in ("sweep.json", "manifest.json") if (folder / m).is_file()), None)
        if marker and (files is None or marker in files) and (not only or folder.name in only):
            found.append(folder)
    return found


def sweep_runs(sweep: Path) -> list[Path]:
    names = [r["name"] for r in yaml.safe_load((sweep / "sweep.yaml").read_text())["runs"]]
    return [sweep / n for n in names if (sweep / n / "manifest.json").is_file()]


# ---------------------------------------------------------------- generated markdown
def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def parameters_markdown() -> str:
    """The schema as a table: key, default, what is allowed, which models it determines, meaning."""
    from .params import SCHEMA
    rows = []
    for key, spec in SCHEMA.items():
        allowed = ", ".join(f"`{c}`" for c in spec.choices) if spec.choices else spec.kind.__name__ \
            if isinstance(spec.kind, type) else " or ".join(k.__name__ for k in spec.kind)
        if spec.min is not None:
            allowed += f", {'>' if spec.exclusive_min else '≥'} {spec.min:g}"
        default = json.dumps(spec.default) if isinstance(spec.default, (list, bool)) else repr(spec.default) \
            if isinstance(spec.default, str) else spec.default
        rows.append([f"`{key}`", f"`{default}`", allowed, " and ".join(spec.identity) or "—", spec.help])
    table = _table(["key", "default", "allowed", "determines", "meaning"], rows)
    return f'<div class="kdbook-params" markdown>\n\n{table}\n\n</div>'  # its keys never break


def _params(path: Path) -> dict:
    from .params import SCHEMA
    return {**{k: s.default for k, s in SCHEMA.items()}, **(yaml.safe_load(path.read_text()) or {})}


def _fmt(v) -> str:
    return f"`{json.dumps(v) if isinstance(v, (list, bool)) else v}`"


def asked_markdown(run: Path, root: Path, base: Path | None = None) -> str:
    """What the run asked: its params file and overrides, and every key that differs from its base."""
    manifest = json.loads((run / "manifest.json").read_text())
    base = base or root / manifest.get("params_file", "params/fashionmnist.yaml")
    overrides = [o for o in manifest.get("overrides", []) if o.split("=")[0] not in NOT_SETTING]
    lines = [f"Params file `{base.relative_to(root)}`" + (", with " + ", ".join(f"`{o}`" for o in overrides)
                                                          if overrides else ", as it stands") + "."]
    if base.is_file() and (run / "params.yaml").is_file():
        mine, theirs = _params(run / "params.yaml"), _params(base)
        diff = [[f"`{k}`", _fmt(theirs.get(k)), _fmt(mine.get(k))] for k in mine
                if k not in NOT_SETTING and mine.get(k) != theirs.get(k)]
        lines += ["", _table(["key", f"`{base.name}`", "this run"], diff) if diff
                  else f"No key differs from `{base.name}`."]
    return "\n".join(lines)


def _when(stamp: str | None) -> str:
    return stamp.replace("T", " ").split("+")[0][:16] + " UTC" if stamp else "—"


def manifest_markdown(run: Path) -> str:
    """Status, commit, machine and time, from the run's manifest."""
    m = json.loads((run / "manifest.json").read_text())
    git, dev = m.get("git", {}), m.get("device", {})
    rows = [["status", m.get("status", "—")],
            ["commit", f"`{str(git.get('commit'))[:10]}`" + (" (uncommitted changes)" if git.get("dirty") else "")],
            ["machine", f"{dev.get('device', '—')}, {dev.get('processor', '—')}, {dev.get('threads', '—')} threads"],
            ["started", _when(m.get("created"))], ["ended", _when(m.get("ended"))],
            ["wall time", f"{m['seconds'] / 60:.1f} min" + (" (its last, resumed attempt)" if m.get("resumed") else "")
             if "seconds" in m else "—"]]
    rows += [[f"`{nb}`", f"{v.get('status')}, {v.get('seconds', float('nan')) / 60:.1f} min"]
             for nb, v in m.get("notebooks", {}).items()]
    if m.get("records_rewritten"):
        rows.append(["records rewritten", f"{m['records_rewritten'].get('date')}: {m['records_rewritten'].get('what')}"])
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    if versions:
        rows.append(["versions", versions])
    return _table(["", ""], rows)


def verdict_markdown(run: Path) -> str:
    """The run's answer: the best student and the paired verdicts (its comparison.csv)."""
    from .stats import headline
    if not (run / "results.csv").is_file():
        return "No results recorded."
    results = pd.read_csv(run / "results.csv")
    try:
        comparison = pd.read_csv(run / "comparison.csv")
    except (pd.errors.EmptyDataError, FileNotFoundError):
        comparison = pd.DataFrame()
    return headline(results, comparison)


def _folded(title: str, path: Path, lang: str = "yaml") -> list[str]:
    """A file's text in a block the reader opens with one click."""
    body = "\n".join("    " + line for line in [f"```{lang}", *path.read_text().rstrip().splitlines(), "```"])
    return [f'??? note "{title}"', "", body, ""]


def _files(run: Path) -> str:
    files = sorted(p for p in run.iterdir() if p.is_file() and p.suffix in COPIED)
    return ", ".join(f"[`{p.name}`]({p.name})" for p in files)


def _notebooks(run: Path) -> list[Path]:
    return sorted(run.glob("*.ipynb"))


def run_markdown(run: Path, root: Path, sweep: Path | None = None) -> str:
    title = f"`{run.name}`" if sweep is None else f"`{sweep.name}` / `{run.name}`"
    base = None
    if sweep is not None:
        base = root / yaml.safe_load((sweep / "sweep.yaml").read_text())["base"]
    parts = [f"# {title}", ""]
    if sweep is not None:
        parts += [f"One run of the sweep [`{sweep.name}`](../index.md).", ""]
    parts += ["## Verdict", "", verdict_markdown(run), "", "## What it asked", "",
              asked_markdown(run, root, base), ""]
    if (run / "params.yaml").is_file():
        parts += _folded("Every parameter (params.yaml)", run / "params.yaml")
    nbs = _notebooks(run)
    if nbs:
        parts += ["## Executed notebooks", "", "Rendered from their stored outputs:", ""]
        parts += [f"- [{nb.stem}]({nb.name})" for nb in nbs]
        parts.append("")
    else:
        parts += ["Its machine-readable record only (JSON, CSV, params and manifest) is committed; "
                  "its notebooks are not.", ""]
    figure = next((f for f in ("comparison_camkd_vs_vanilla.png", "teachers.png") if (run / f).is_file()), None)
    if figure:
        parts += [f"![{figure}]({figure})", ""]
    parts += ["## Record", "", manifest_markdown(run), "", f"Files: {_files(run)}.", ""]
    return "\n".join(parts)


def sweep_markdown(sweep: Path, root: Path) -> str:
    record = json.loads((sweep / "sweep.json").read_text())
    runs = sweep_runs(sweep)
    rows = sweep_answers(sweep) if (sweep / "sweep_summary.csv").is_file() else []
    parts = [f"# `{sweep.name}` (sweep)", "",
             f"Sweep file `{record.get('sweep')}` on base `{record.get('base')}`; {len(runs)} runs, status "
             f"{record.get('status')}, {record.get('cluster', '')}.", ""]
    if record.get("sweep") and (root / record["sweep"]).is_file():
        parts += _folded(f"What it asked ({record['sweep']})", root / record["sweep"])
    parts += ["## Verdict", ""]
    if rows:
        parts += [answers_markdown(rows, lambda f: f.name + "/index.md", root), ""]
        parts += [f"- {r['question']}: {verdict}" for r in rows for verdict in r["verdicts"]] + [""]
    parts += ["## The sweep's notebook", ""] + [f"- [{nb.stem}]({nb.name})" for nb in _notebooks(sweep)] + [""]
    figures = [f for f in ("sweep_accuracy.png", "sweep_fidelity.png") if (sweep / f).is_file()]
    parts += [f"![{f}]({f})" for f in figures] + [""]
    table = []
    for run in runs:
        info = record.get("runs", {}).get(run.name, {})
        seconds = info.get("seconds")
        table.append([f"[`{run.name}`]({run.name}/index.md)", info.get("status", "—"),
                      f"{seconds / 60:.0f}{NBSP}min" if seconds else "—"])
    parts += ["## The runs", "", _table(["run", "status", "time"], table), "",
              f"Files: {_files(sweep)}.", ""]
    return "\n".join(parts)


def index_markdown(found: list[Path], root: Path) -> str:
    rows = []
    for folder in found:
        if (folder / "sweep.json").is_file():
            s = json.loads((folder / "sweep.json").read_text())
            rows.append([f"[`{folder.name}`]({folder.name}/index.md)", "sweep", s.get("status", "—"),
                         _when(s.get("started")), f"{len(sweep_runs(folder))} runs"])
        else:
            m = json.loads((folder / "manifest.json").read_text())
            best = run_answer(folder)["best student %"] if (folder / "results.csv").is_file() else "—"
            rows.append([f"[`{folder.name}`]({folder.name}/index.md)", "run", m.get("status", "—"),
                         _when(m.get("created")), f"best: {best}"])
    return "\n".join(["# Records", "",
                      "One page per committed run or sweep in `outputs/`, generated from its folder when the site "
                      "is built: what it asked, its verdict, its manifest, and its executed notebooks rendered "
                      "from their stored outputs.", "",
                      _table(["record", "kind", "status", "started", "answer"], rows), ""])


# ---------------------------------------------------------------- staging and building
def _copy_record(folder: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if p.is_file() and (p.suffix in COPIED or p.suffix == ".ipynb"):
            shutil.copy2(p, dest / p.name)


def _nb_nav(folder: Path, rel: str) -> list:
    return [{nb.stem.replace("_", " "): f"{rel}/{nb.name}"} for nb in _notebooks(folder)]


def stage(root: Path, stage_dir: Path, only: list[str] | None = None) -> list:
    """Write the site's sources into ``stage_dir``; return the Records part of the nav."""
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    shutil.copytree(root / "docs", stage_dir)
    update_readme(stage_dir / "parameters.md", parameters_markdown(), "parameters")
    found = records(root, only)
    nav = [{"All records": "records/index.md"}]
    (stage_dir / "records").mkdir(exist_ok=True)
    (stage_dir / "records" / "index.md").write_text(index_markdown(found, root))
    for folder in found:
        rel = record_page(folder, root).rsplit("/", 1)[0]
        _copy_record(folder, stage_dir / rel)
        if (folder / "sweep.json").is_file():
            (stage_dir / rel / "index.md").write_text(sweep_markdown(folder, root))
            children = [{f"{folder.name} (sweep)": f"{rel}/index.md"}, *_nb_nav(folder, rel)]
            for run in sweep_runs(folder):
                run_rel = f"{rel}/{run.name}"
                _copy_record(run, stage_dir / run_rel)
                (stage_dir / run_rel / "index.md").write_text(run_markdown(run, root, sweep=folder))
                children.append({run.name: [{run.name: f"{run_rel}/index.md"}, *_nb_nav(run, run_rel)]})
            nav.append({folder.name: children})
        else:
            (stage_dir / rel / "index.md").write_text(run_markdown(folder, root))
            nav.append({folder.name: [{folder.name: f"{rel}/index.md"}, *_nb_nav(folder, rel)]})
    mathjax = Path(__import__("jupyter_server_mathjax").__file__).parent / "static"
    shutil.copytree(mathjax, stage_dir / "assets" / "mathjax",
                    ignore=shutil.ignore_patterns("localization"))
    return nav


# nbconvert's MathJax loader (a CDN URL) and its inline config, in every rendered notebook
CDN_SCRIPT = re.compile(r'<script[^>]*src="https?://[^"]*"[^>]*>\s*</script>\s*', re.S)
MATHJAX_CONFIG = re.compile(r'<!-- MathJax configuration -->\s*<script type="text/x-mathjax-config">.*?</script>\s*', re.S)


def strip_outside_hosts(site: Path) -> int:
    """Remove script tags that load from another host (the notebooks' MathJax, whose
    configuration goes too: the site bundles its own). Returns how many pages changed."""
    changed = 0
    for page in site.rglob("*.html"):
        text = page.read_text()
        new = MATHJAX_CONFIG.sub("", CDN_SCRIPT.sub("", text))
        if new != text:
            page.write_text(new)
            changed += 1
    return changed


def build(root: Path = ROOT, out: Path | None = None, only: list[str] | None = None,
          stage_dir: Path | None = None) -> Path:
    """Stage the sources (in ``stage_dir``, default ``build/site-src``), build the site into
    ``out`` (default ``site/``) and remove what would load from another host."""
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config

    out = out or root / "site"
    stage_dir = stage_dir or root / STAGE
    nav_records = stage(root, stage_dir, only)
    config = yaml.safe_load((root / "mkdocs.yml").read_text())
    nav = list(config["nav"])
    if (stage_dir / "methods-baselines.md").is_file():  # the further baselines' page, when it is there
        at = next(i for i, entry in enumerate(nav) if "methods.md" in entry.values()) + 1
        nav.insert(at, {"More baselines": "methods-baselines.md"})
    config["nav"] = [*nav, {"Records": nav_records}]
    config_file = stage_dir.parent / "mkdocs.yml"
    config_file.write_text(yaml.safe_dump({**config, "docs_dir": str(stage_dir.resolve()),
                                           "site_dir": str(out.resolve())}, sort_keys=False, allow_unicode=True))
    mkdocs_build(load_config(str(config_file)))
    strip_outside_hosts(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdlib.site", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="the site's folder (default: site/)")
    parser.add_argument("--only", nargs="+", metavar="RECORD", help="build only these records (folder names in outputs/)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = build(ROOT, Path(args.out) if args.out else None, args.only)
    pages = sum(1 for _ in out.rglob("*.html"))
    print(f"site: {pages} pages in {out} ({time.perf_counter() - start:.0f} s); open {out / 'index.html'}")


if __name__ == "__main__":
    main()
