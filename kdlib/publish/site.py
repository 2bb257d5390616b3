"""The site: the pages of ``docs/``, the parameters table from ``SCHEMA``, and one page per
committed run or sweep with its executed notebooks rendered from their stored outputs
(never executed), built offline with MkDocs (Material theme, mkdocs-jupyter) into ``site/``.

``python -m kdlib site`` (``make site``) builds it all; ``--only fashionmnist`` builds the
pages and the records named; ``--check`` then checks every internal link and image on disk.
The pages are staged in ``build/site-src/`` (``docs/`` copied, generated pages added), MathJax
is bundled from the ``jupyter-server-mathjax`` package, and the notebooks' own CDN script tags
are removed, so the site works opened from disk and served, and asks no outside host for
anything. A sweep's runs are named in words and grouped by setting (``sweep_results.run_titles``).
A notebook's images and stylesheets are written once as files its pages link (``Files``), not
base64 in every page.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pandas as pd
import yaml

from ..analysis.cells import NBSP, markdown_table
from .blocks import answers_markdown, record_dir, run_answer, sweep_answers
from ..records.files import update_readme
from ..records.paths import PACKAGE_ROOT
from ..analysis.sweep_results import run_titles
from ..book.params import SCHEMA
from ..analysis.stats import headline
from ..analysis.sweep_results import run_markdown as setting_markdown
from ..analysis.sweep_results import column_order
from ..analysis.teacher_quality import parts as quality_parts
from ..analysis.sweep_results import KEYS, load
from ..analysis import tune_results as ta
from ..records.extras import MissingExtra, require

ROOT = PACKAGE_ROOT
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
    """The committed run, sweep and tuning folders directly under ``outputs/`` (a sweep's runs
    are its children, a tuning's test sweep is its child ``test/``), in name order, then the
    superseded tunings that were tested (``outputs/superseded/NAME`` with a ``test/``: the answer reads
    them until the studies that replace them have finished); ``only`` keeps the names given."""
    files = tracked(root)
    found = []
    superseded = root / "outputs" / "superseded"
    candidates = sorted(p for p in (root / "outputs").iterdir() if p.is_dir() and p != superseded)
    candidates += sorted(p for p in superseded.iterdir() if (p / "test" / "sweep.json").is_file()) \
        if superseded.is_dir() else []
    for folder in candidates:
        marker = next((folder / m for m in ("sweep.json", "manifest.json", "tune.json") if (folder / m).is_file()), None)
        if marker and (files is None or marker in files) and (not only or folder.name in only):
            found.append(folder)
    return found


def record_name(folder: Path, root: Path) -> str:
    """A record as the site names it: its folder under ``outputs/`` ('regimes', 'superseded/seed-student-…')."""
    return folder.relative_to(root / "outputs").as_posix()


def sweep_runs(sweep: Path) -> list[Path]:
    names = [r["name"] for r in yaml.safe_load((sweep / "sweep.yaml").read_text())["runs"]]
    return [sweep / n for n in names if (sweep / n / "manifest.json").is_file()]


# ---------------------------------------------------------------- generated markdown
def parameters_markdown() -> str:
    """The schema as a table: key, default, what is allowed, which models it determines, meaning."""
    rows = []
    for key, spec in SCHEMA.items():
        allowed = ", ".join(f"`{c}`" for c in spec.choices) if spec.choices else spec.kind.__name__ \
            if isinstance(spec.kind, type) else " or ".join(k.__name__ for k in spec.kind)
        if spec.min is not None:
            allowed += f", {'>' if spec.exclusive_min else '≥'} {spec.min:g}"
        default = json.dumps(spec.default) if isinstance(spec.default, (list, bool)) else repr(spec.default) \
            if isinstance(spec.default, str) else spec.default
        rows.append([f"`{key}`", f"`{default}`", allowed, " and ".join(spec.identity) or "—", spec.help])
    table = markdown_table(["key", "default", "allowed", "determines", "meaning"], rows)
    return f'<div class="kdbook-params" markdown>\n\n{table}\n\n</div>'  # its keys never break


def _params(path: Path) -> dict:
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
        lines += ["", markdown_table(["key", f"`{base.name}`", "this run"], diff) if diff
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
    return markdown_table(["", ""], rows)


def verdict_markdown(run: Path) -> str:
    """The run's answer: the best student and the paired verdicts (its comparison.csv)."""
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


def _sweep_name(sweep: Path, root: Path) -> str:
    """A sweep by its folder under ``outputs/``: 'teacher-quality', or 'small-student/test' for a tuning's test."""
    return sweep.relative_to(root / "outputs").as_posix() if sweep.is_relative_to(root / "outputs") else sweep.name


def run_title(run: Path, sweep: Path | None = None, titles: dict | None = None) -> str:
    """A run in words: a sweep's run as its setting, methods and seeds ('swapped resnet ·
    vanilla, scratch · seed 0', ``sweep_results.run_titles``); any other run by its folder."""
    if sweep is None:
        return run.name
    setting, rest = (titles if titles is not None else run_titles(sweep)).get(run.name, (run.name, ""))
    return f"{setting} · {rest}" if rest else setting


def run_markdown(run: Path, root: Path, sweep: Path | None = None, titles: dict | None = None) -> str:
    folder = run.relative_to(root).as_posix() if run.is_relative_to(root) else run.name
    base = None
    if sweep is not None:
        base = root / yaml.safe_load((sweep / "sweep.yaml").read_text())["base"]
    title = run_title(run, sweep, titles)
    parts = [f"---\ntitle: {json.dumps(title, ensure_ascii=False)}\n---", "", f"# {title}", ""]
    if sweep is not None:
        parts += [f"One run of the sweep [`{_sweep_name(sweep, root)}`](../index.md); its folder: `{folder}/`.", ""]
    else:
        parts += [f"Its folder: `{folder}/`.", ""]
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


def sweep_verdict(sweep: Path) -> list[str]:
    """A sweep's answer as markdown lines: its answers table and verdicts
    (``blocks.sweep_answers``), else its setting table with stars (``sweep_results.run_markdown``).
    (A sweep over teacher quality has its generated reading instead: ``teacher_quality.parts``.)"""
    rows = sweep_answers(sweep) if (sweep / "sweep_summary.csv").is_file() else []
    if rows:
        return [answers_markdown(rows, lambda f: f.name + "/index.md", sweep.parent.parent), "",
                *[f"- {r['question']}: {verdict}" for r in rows for verdict in r["verdicts"]]]
    return [setting_markdown(sweep)]


def by_setting(sweep: Path, titles: dict) -> dict[str, list[Path]]:
    """The sweep's runs (``sweep_runs``) grouped by their setting in words, the settings in the
    order of the sweep's forest plot and tables: the shipped teachers first, then a degraded
    teacher, then the small student (``sweep_results.column_order``), else the sweep file's order."""
    groups: dict[str, list[Path]] = {}
    for run in sweep_runs(sweep):
        groups.setdefault(titles.get(run.name, (run.name, ""))[0], []).append(run)
    first = {name: yaml.safe_load((runs[0] / "params.yaml").read_text()) if (runs[0] / "params.yaml").is_file()
             else {} for name, runs in groups.items()}
    return dict(sorted(groups.items(), key=lambda item: column_order(first[item[0]])))


def sweep_markdown(sweep: Path, root: Path) -> str:
    record = json.loads((sweep / "sweep.json").read_text())
    runs, titles = sweep_runs(sweep), run_titles(sweep)
    parts = [f"# {_sweep_name(sweep, root)} (sweep)", "",
             f"Its folder: `{sweep.relative_to(root).as_posix()}/`. Sweep file `{record.get('sweep')}` on base "
             f"`{record.get('base')}`; {len(runs)} runs, status {record.get('status')}, "
             f"{record.get('cluster', '')}.", ""]
    if record.get("sweep") and (root / record["sweep"]).is_file():
        parts += _folded(f"What it asked ({record['sweep']})", root / record["sweep"])
    finished = any((run / "predictions.npz").is_file() for run in runs)
    quality = quality_parts(sweep) if finished and set(KEYS) & set(load(sweep).keys) else None
    verdict = quality["reading"] if quality else sweep_verdict(sweep) if finished else ["No run has finished yet."]
    parts += ["## Verdict", "", *verdict, ""]
    if (sweep / "sweep_forest.png").is_file():
        parts += ["Each method's paired difference in accuracy against the student trained alone (and against "
                  "label smoothing where it ran), per setting, with its 95% CI over seeds; a filled dot where "
                  "paired t p < 0.05:", "", "![the sweep's forest plot](sweep_forest.png)", ""]
    if quality:
        parts += ["## The tables", "", *quality["status"], "", *quality["legend"], "", *quality["tables"], "",
                  *quality["notes"], ""]
    parts += ["## The sweep's notebook", ""] + [f"- [{nb.stem}]({nb.name})" for nb in _notebooks(sweep)] + [""]
    figures = [f for f in ("sweep_accuracy.png", "sweep_fidelity.png") if (sweep / f).is_file()]
    parts += [f"![{f}]({f})" for f in figures] + [""]
    table = []
    for setting, members in by_setting(sweep, titles).items():
        for run in members:
            info = record.get("runs", {}).get(run.name, {})
            seconds = info.get("seconds")
            words = titles.get(run.name, (run.name, run.name))[1] or run.name
            table.append([setting if run == members[0] else "", f"[{words}]({run.name}/index.md)",
                          info.get("status", "—"), f"{seconds / 60:.0f}{NBSP}min" if seconds else "—"])
    parts += ["## The runs", "", "Grouped by setting; each run's page gives its folder.", "",
              markdown_table(["setting", "run", "status", "time"], table), "", f"Files: {_files(sweep)}.", ""]
    return "\n".join(parts)


TUNE_FIGURES = ("tune_history", "tune_temperature", "tune_alpha")


def tune_markdown(folder: Path, root: Path) -> str:
    """A tuning's page (``kdlib tune``): its answer first (each method at its best, from the test
    sweep, with the reading), the forest plot, the chosen values, the search's counts and
    figures (as 05 drew them), then its notebook and a link to the test runs."""
    record = json.loads((folder / "tune.json").read_text())
    res = ta.load(folder)
    parts = [f"# {folder.name} (tuning)", "",
             f"Its folder: `{folder.relative_to(root).as_posix()}/`. Tune file `{record.get('tune')}` on base "
             f"`{record.get('base')}`; status {record.get('status')}, {record.get('cluster', '')}; every method "
             f"searched with {res.spec['trials']} trials on the validation split, then tested over seeds "
             f"{', '.join(map(str, res.spec.get('test_seeds', res.spec['seeds'])))}. {ta.timing_line(res)}", ""]
    if (folder / "tune.yaml").is_file():
        parts += _folded("What it asked (tune.yaml)", folder / "tune.yaml")
    parts += ["## Verdict", "", ta.block([folder], own_page=True), ""]
    if (folder / "tune_forest.png").is_file():
        parts += ["Each method at its chosen values: its paired difference in test accuracy against the student "
                  "trained alone and against label smoothing, with its 95% CI over seeds:", "",
                  "![the tuned comparison's forest plot](tune_forest.png)", ""]
    chosen = ta.chosen(res)
    if not chosen.empty:
        parts += ["## The chosen values", "", markdown_table(list(chosen.columns), chosen.values.tolist()), ""]
    counts = ta.counts(res)
    if not counts.empty:
        parts += ["## The search", "", "Trials per study (pruned: stopped by the median pruner; failed: asked again); "
                  "validation accuracy by trial, and against each knob, as notebook 05 drew them.", "",
                  markdown_table(list(counts.columns), counts.values.tolist()), ""]
        parts += [f"![{f.stem}]({f.name})" for prefix in TUNE_FIGURES for f in sorted(folder.glob(f"{prefix}*.png"))]
        parts.append("")
    parts += ["## Its notebook and the test runs", ""] + [f"- [{nb.stem}]({nb.name})" for nb in _notebooks(folder)]
    if (folder / "test" / "sweep.json").is_file():
        parts.append("- [the test sweep](test/index.md): every run at the chosen values, with its executed notebooks")
    elif not _notebooks(folder):
        parts.append("None yet: the test sweep starts when the search and the re-scoring are done, and 05 is "
                     "run when the test has finished.")
    parts += ["", f"Files: {_files(folder)}.", ""]
    return "\n".join(parts)


def index_markdown(found: list[Path], root: Path) -> str:
    rows = []
    for folder in found:
        if (folder / "sweep.json").is_file():
            s = json.loads((folder / "sweep.json").read_text())
            rows.append([f"[`{record_name(folder, root)}`]({record_name(folder, root)}/index.md)", "sweep", s.get("status", "—"),
                         _when(s.get("started")), f"{len(sweep_runs(folder))} runs"])
        elif (folder / "tune.json").is_file():
            t = json.loads((folder / "tune.json").read_text())
            rows.append([f"[`{record_name(folder, root)}`]({record_name(folder, root)}/index.md)", "tuning", t.get("status", "—"),
                         _when(t.get("started")), "each method at its best"])
        else:
            m = json.loads((folder / "manifest.json").read_text())
            best = run_answer(folder)["best student %"] if (folder / "results.csv").is_file() else "—"
            rows.append([f"[`{record_name(folder, root)}`]({record_name(folder, root)}/index.md)", "run", m.get("status", "—"),
                         _when(m.get("created")), f"best: {best}"])
    return "\n".join(["# Records", "",
                      "One page per committed run, sweep or tuning in `outputs/`, generated from its folder when the site "
                      "is built: what it asked, its verdict, its manifest, and its executed notebooks rendered "
                      "from their stored outputs.", "",
                      markdown_table(["record", "kind", "status", "started", "answer"], rows), ""])


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
        rel = record_dir(folder, root).rstrip("/")
        _copy_record(folder, stage_dir / rel)
        if (folder / "sweep.json").is_file():
            nav.append({folder.name: _stage_sweep(folder, rel, stage_dir, root, f"{folder.name} (sweep)")})
        elif (folder / "tune.json").is_file():
            (stage_dir / rel / "index.md").write_text(tune_markdown(folder, root))
            children = [{f"{folder.name} (tuning)": f"{rel}/index.md"}, *_nb_nav(folder, rel)]
            if (folder / "test" / "sweep.json").is_file():
                _copy_record(folder / "test", stage_dir / rel / "test")
                children.append({"the test runs": _stage_sweep(folder / "test", f"{rel}/test", stage_dir, root,
                                                               "the test sweep")})
            nav.append({record_name(folder, root): children})
        else:
            (stage_dir / rel / "index.md").write_text(run_markdown(folder, root))
            nav.append({folder.name: [{folder.name: f"{rel}/index.md"}, *_nb_nav(folder, rel)]})
    mathjax = Path(__import__("jupyter_server_mathjax").__file__).parent / "static"
    shutil.copytree(mathjax, stage_dir / "assets" / "mathjax",
                    ignore=shutil.ignore_patterns("localization"))
    return nav


def _stage_sweep(folder: Path, rel: str, stage_dir: Path, root: Path, title: str) -> list:
    """A sweep's page and its runs' pages staged under ``rel``; returns its part of the nav:
    the sweep's page and notebook, then its runs grouped by setting, named in words."""
    (stage_dir / rel / "index.md").write_text(sweep_markdown(folder, root))
    children = [{title: f"{rel}/index.md"}, *_nb_nav(folder, rel)]
    titles = run_titles(folder)
    for setting, members in by_setting(folder, titles).items():
        group = []
        for run in members:
            run_rel = f"{rel}/{run.name}"
            _copy_record(run, stage_dir / run_rel)
            (stage_dir / run_rel / "index.md").write_text(run_markdown(run, root, folder, titles))
            words = titles.get(run.name, ("", run.name))[1] or run.name
            group.append({words: [{words: f"{run_rel}/index.md"}, *_nb_nav(run, run_rel)]})
        children.append({setting: group})
    return children


# nbconvert's MathJax loader (a CDN URL) and its inline config, in every rendered notebook
CDN_SCRIPT = re.compile(r'<script[^>]*src="https?://[^"]*"[^>]*>\s*</script>\s*', re.S)
MATHJAX_CONFIG = re.compile(r'<!-- MathJax configuration -->\s*<script type="text/x-mathjax-config">.*?</script>\s*', re.S)


DATA_IMAGE = re.compile(r'src="data:image/(png|jpeg|gif);base64,([^"]+)"')
STYLE = re.compile(r"<style[^>]*>(.*?)</style>", re.S)
BIG_STYLE = 2000  # characters: a notebook page's stylesheets (some 600 kB, the same on every page)
ROOT_LINK = re.compile(r'((?:href|src)=")/(?!/)')


def strip_outside_hosts(text: str) -> str:
    """A page without the script tags that load from another host (the notebooks' MathJax,
    whose configuration goes too: the site bundles its own)."""
    return MATHJAX_CONFIG.sub("", CDN_SCRIPT.sub("", text))


class Files:
    """Content written once into the site and linked from every page that holds it: a
    notebook's images (base64 in the page as nbconvert writes it) and its stylesheets.
    An image the site already holds as a file (a record's figure, copied beside its
    page) is linked where it is; any other goes into ``assets/nb/``, named by its hash."""

    def __init__(self, site: Path):
        self.site, self.known = site, {}
        for png in sorted(site.rglob("*.png")):
            self.known.setdefault(hashlib.sha256(png.read_bytes()).hexdigest(), []).append(png)

    def link(self, page: Path, data: bytes, suffix: str) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self.known:
            target = self.site / "assets" / "nb" / f"{digest[:20]}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            self.known[digest] = [target]
        here = [t for t in self.known[digest] if t.parent == page.parent]  # the record's own copy first
        return quote(os.path.relpath((here or self.known[digest])[0], page.parent).replace(os.sep, "/"))

    def lighten(self, page: Path, text: str) -> str:
        def image(m):
            return f'src="{self.link(page, base64.b64decode(m.group(2)), "." + m.group(1).replace("jpeg", "jpg"))}"'

        def style(m):
            if len(m.group(1)) < BIG_STYLE:
                return m.group(0)
            return f'<link rel="stylesheet" href="{self.link(page, m.group(1).encode(), ".css")}">'

        return STYLE.sub(style, DATA_IMAGE.sub(image, text))


def local_404(text: str) -> str:
    """The 404 page with links relative to the site's root, where it lies (opened from disk
    they resolve), and, when served, a ``<base href="/">`` first, so that they resolve
    from whichever missing address the server answers with it (the site at a host's root)."""
    base = "<script>if (location.protocol !== 'file:') document.write('<base href=\"/\">')</script>"
    return ROOT_LINK.sub(r"\1", text).replace("<head>", "<head>\n" + base, 1)


def finish(site: Path) -> dict:
    """Every page of the built site, once over: no script from another host, each notebook
    image and stylesheet a file of its own, the 404 page's links local. Returns counts."""
    files, changed = Files(site), 0
    for page in site.rglob("*.html"):
        text = page.read_text()
        new = files.lighten(page, strip_outside_hosts(text))
        if page.parent == site and page.name == "404.html":
            new = local_404(new)
        if new != text:
            page.write_text(new)
            changed += 1
    return {"pages changed": changed, "files": len(files.known)}


class _Refs(HTMLParser):
    """The href and src of a page's links, images, stylesheets and scripts."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("href", "src"):
            if attrs.get(key) and tag in ("a", "img", "link", "script"):
                self.refs.append(attrs[key])


def check_links(site: Path) -> dict[str, list[tuple[str, str]]]:
    """Every page's internal links and images, checked on disk: ``broken`` (page, link) where
    the file, or the anchor in the page linked, is missing; ``loaded_from_outside`` (page,
    address) where a page would load a script, stylesheet, font or image from another host
    (a link a reader may follow to another host is fine). The 404 page is checked too."""
    broken, outside, anchors = [], [], {}
    for page in sorted(site.rglob("*.html")):
        parser = _Refs()
        parser.feed(page.read_text())
        for ref in parser.refs:
            parts = urlsplit(ref)
            if parts.scheme in ("http", "https") or ref.startswith("//"):
                if parts.path.endswith((".js", ".css", ".woff", ".woff2", ".png", ".svg")):
                    outside.append((str(page.relative_to(site)), ref))
                continue
            if parts.scheme or parts.netloc or not parts.path:
                continue
            target = page.parent / unquote(parts.path)
            if target.suffix == ".html" and parts.fragment and target.is_file() and target not in anchors:
                anchors[target] = target.read_text()
            if not target.exists() or (parts.fragment and target.suffix == ".html"
                                       and f'id="{parts.fragment}"' not in anchors[target]):
                broken.append((str(page.relative_to(site)), ref))
    return {"broken": broken, "loaded_from_outside": outside}


@contextlib.contextmanager
def shared_templates():
    """While it lasts, every nbconvert exporter's Jinja environment shares compiled templates.

    mkdocs-jupyter makes two exporters per notebook page, and each new environment parses and
    compiles its templates again: about half of a site build's time. Jinja's bytecode cache,
    kept here in memory (one per kind of environment; a template whose source changed is compiled
    anew), compiles each template once per build."""
    from jinja2 import BytecodeCache
    from nbconvert.exporters.templateexporter import TemplateExporter

    class Memory(BytecodeCache):
        def __init__(self):
            self.store = {}

        def load_bytecode(self, bucket):
            if bucket.key in self.store:
                bucket.bytecode_from_string(self.store[bucket.key])

        def dump_bytecode(self, bucket):
            self.store[bucket.key] = bucket.bytecode_to_string()

    caches = {}
    create = TemplateExporter._create_environment

    def cached(self):
        environment = create(self)
        kind = (environment.is_async, tuple(sorted(environment.extensions)), environment.autoescape)
        environment.bytecode_cache = caches.setdefault(kind, Memory())
        return environment

    TemplateExporter._create_environment = cached
    try:
        yield
    finally:
        TemplateExporter._create_environment = create


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
    with shared_templates():
        mkdocs_build(load_config(str(config_file)))
    finish(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdlib site", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="the site's folder (default: site/)")
    parser.add_argument("--only", nargs="+", metavar="RECORD", help="build only these records (folder names in outputs/)")
    parser.add_argument("--check", action="store_true",
                        help="then check every internal link and image on disk; exit 1 naming the broken ones")
    args = parser.parse_args(argv)
    try:
        require("docs", "make site")
    except MissingExtra as err:
        raise SystemExit(f"error: {err}") from None
    start = time.perf_counter()
    out = build(ROOT, Path(args.out) if args.out else None, args.only)
    pages = sum(1 for _ in out.rglob("*.html"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"site: {pages} pages, {size / 1e6:.0f} MB in {out} ({time.perf_counter() - start:.0f} s); "
          f"open {out / 'index.html'}")
    if args.check:
        found = check_links(out)
        for page, ref in found["broken"][:20]:
            print(f"broken: {page} -> {ref}")
        for page, ref in found["loaded_from_outside"][:20]:
            print(f"loads from another host: {page} -> {ref}")
        if found["broken"] or found["loaded_from_outside"]:
            raise SystemExit(1)
        print("every internal link and image resolves; nothing loads from another host")


if __name__ == "__main__":
    main()
