"""The site (make site) where a reader sees it, built from docs/ and a few small records made up
for the test (``conftest.write_run``, ``write_sweep``: a run, and a sweep over teacher quality with
its forest plot), then opened from disk and served, in Debian's chromium driven by Playwright.
Every page's internal links and images resolve; the pages load without console errors, typeset
their maths with the bundled MathJax, keep their tables inside the page and ask no outside host
for anything; a record page shows its run's verdict, a sweep page its verdict in words, its
forest plot and its runs named in words; the 404 page's links resolve from disk and served; the
notebooks' images are files, not base64 in the page; the README's relative links resolve.
The committed site, built whole, is checked in test_site_links.py."""
from __future__ import annotations

import functools
import http.server
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from conftest import ROOT, png, tiny_notebook, write_run, write_sweep, write_tuning

pytest.importorskip("mkdocs", reason="the site's tools are missing: pip install -e '.[docs]'")
from kdlib.publish import site as site_module  # noqa: E402 (after the skip)

MATH = "document.querySelectorAll('.MathJax, .MathJax_Display').length"
TYPESET = "() => new Promise(done => MathJax.Hub.Queue(() => done(true)))"
SWAP = {"teacher_resnet": [[0, 6], [2, 4]]}
SEEDS = {0: 80.0, 1: 82.0, 2: 81.0}


def _acc(**shift) -> dict:
    return {m: {s: a + d for s, a in SEEDS.items()} for m, d in shift.items()}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project root of its own: docs/ and mkdocs.yml as committed, and in outputs/ three small
    records: the run ``fashionmnist``, the sweep ``teacher-quality`` (two settings, a
    method's variant in runs of its own, one run per seed for one setting) and the tuning
    ``small-student`` (its test sweep inside), named as the committed ones are, so that the
    pages' links to them resolve."""
    root = tmp_path_factory.mktemp("small-project")
    shutil.copytree(ROOT / "docs", root / "docs")
    shutil.copy(ROOT / "mkdocs.yml", root / "mkdocs.yml")
    out = root / "outputs"
    write_run(out / "fashionmnist", {"methods": ["camkd", "vanilla", "scratch"], "seeds": [0, 1, 2]},
              _acc(camkd=-0.5, vanilla=0.2, scratch=0.0), notebooks=True)
    runs = [({"methods": ["camkd", "vanilla", "label_smoothing", "scratch"], "seeds": [0, 1, 2]},
             _acc(camkd=-1.0, vanilla=-0.4, label_smoothing=0.3, scratch=0.0)),
            ({"methods": ["camkd"], "beta": 0.0, "seeds": [0, 1, 2]}, _acc(camkd=-0.2))]
    runs += [({"teacher_class_swap": SWAP, "methods": ["camkd", "vanilla", "label_smoothing", "scratch"], "seeds": [s]},
              {m: {s: a[s]} for m, a in _acc(camkd=-2.0, vanilla=-1.5, label_smoothing=0.3, scratch=0.0).items()})
             for s in SEEDS]
    write_sweep(out / "teacher-quality", runs, notebooks=True, sweep_file="params/sweeps/teacher-quality.yaml")
    write_tuning(out / "small-student", _acc(vanilla=0.6, label_smoothing=0.3, scratch=0.0),
                 {"vanilla": {"temperature": 1.5, "alpha": 0.8}, "label_smoothing": {"label_smoothing": 0.2}})
    from kdlib.publish import blocks
    from kdlib.records.files import update_readme
    for file, name, make in blocks.blocks(root):  # the tuned answer as these records give it (its figures too)
        if name == "best" and file.startswith("docs/"):
            update_readme(root / file, make(), name)
    return root


@pytest.fixture(scope="module")
def site(project, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("site")
    return site_module.build(project, tmp / "site", stage_dir=tmp / "src")


def _local(ref: str) -> bool:
    parts = urlsplit(ref)
    return not parts.scheme and not parts.netloc and bool(parts.path)


def pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def test_every_internal_link_and_image_resolves(site):
    """Links from docs/ into records this small site does not hold are left to the committed
    site's check; every other link resolves, and nothing loads from another host."""
    found = site_module.check_links(site)
    built = {p.name for p in (site / "records").iterdir() if p.is_dir()}
    broken = [(page, ref) for page, ref in found["broken"] if not (
        not page.startswith("records/") and urlsplit(ref).path.startswith("records/")
        and unquote(urlsplit(ref).path).split("/")[1] not in built)]
    assert not broken, broken[:10]
    assert not found["loaded_from_outside"], found["loaded_from_outside"]
    assert len(found["broken"]) > len(broken), "the docs link committed records this site lacks: the filter is needed"


def test_site_has_the_pages_and_one_record_page_per_record(site, project):
    names = {p.relative_to(site).as_posix() for p in pages(site)}
    assert {"index.html", "getting-started.html", "book.html", "parameters.html", "methods.html", "results.html",
            "speed.html", "sweeps.html", "records/index.html", "404.html"} <= names
    for folder in site_module.records(project):
        assert f"records/{folder.name}/index.html" in names
    sweep = project / "outputs" / "teacher-quality"
    for run in site_module.sweep_runs(sweep):
        assert f"records/teacher-quality/{run.name}/index.html" in names  # folder names unchanged
    assert "records/fashionmnist/02_distill_students.html" in names  # notebooks rendered as pages
    from kdlib.book.params import SCHEMA
    text = (site / "parameters.html").read_text()
    assert all(f"<code>{key}</code>" in text for key in SCHEMA)  # the table comes from the schema


def test_notebook_images_are_files_written_once(site):
    """No page carries a notebook's image as base64: a figure the record holds is linked
    where it lies, any other is written once into assets/nb/ (so are the notebooks' stylesheets)."""
    assert not [p for p in pages(site) if 'src="data:image' in p.read_text()]
    notebook = (site / "records" / "fashionmnist" / "02_distill_students.html").read_text()
    assert 'src="comparison_camkd_vs_vanilla.png"' in notebook
    assert re.search(r'src="\.\./\.\./assets/nb/[0-9a-f]{20}\.png"', notebook)
    assert re.search(r'<link rel="stylesheet" href="\.\./\.\./assets/nb/[0-9a-f]{20}\.css">', notebook)
    teacher_images = [re.findall(r'src="([^"]*assets/nb/[^"]*)"', (site / "records" / "teacher-quality" / run /
                                                                 "01_train_teachers.html").read_text())
                      for run in ("methods=camkd+vanilla+label_smoothing+scratch,seeds=0+1+2",
                                  "methods=camkd,beta=0,seeds=0+1+2")]
    assert teacher_images[0] == teacher_images[1] and len(teacher_images[0]) == 1  # one file for every run
    linked = [src for p in pages(site) for src in re.findall(r'src="[^"]*assets/nb/([^"]*\.png)"', p.read_text())]
    assert sorted(set(linked)) == sorted(f.name for f in (site / "assets" / "nb").glob("*.png"))
    assert len(linked) > len(set(linked))  # written once, linked from several pages


class _Handler(http.server.SimpleHTTPRequestHandler):
    """A static host as GitHub Pages is one: a missing address is answered with the site's 404.html."""

    def log_message(self, *args):
        pass

    def send_error(self, code, message=None, explain=None):
        page = Path(self.directory) / "404.html"
        if code != 404 or not page.is_file():
            return super().send_error(code, message, explain)
        body = page.read_bytes()
        self.send_response(404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(folder: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})  # the laptop's width, the nav in its drawer
    yield page
    page.close()


PAGE_INFO = """(boxedToo) => {
    const content = document.querySelector('.md-content__inner').getBoundingClientRect();
    const boxed = t => t.closest('.jp-OutputArea-output');  // a notebook's output scrolls in its box
    const width = t => Math.max(t.getBoundingClientRect().width, t.scrollWidth);
    return {
        images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
        pageWidth: document.documentElement.scrollWidth, viewport: document.documentElement.clientWidth,
        wide: [...document.querySelectorAll('.md-content table')].filter(t => (boxedToo || !boxed(t)) &&
              width(t) > content.width + 1).map(t => t.rows[0].innerText)};
}"""


def check_page(page, name: str, notebook_tables: bool = False) -> None:
    """Its images load, it does not scroll sideways, no table is wider than its page; with
    ``notebook_tables``, not even one in a notebook's output (which would scroll in its box)."""
    info = page.evaluate(PAGE_INFO, notebook_tables)
    assert not info["images"], (name, info["images"])
    assert info["pageWidth"] <= info["viewport"], (name, "the page scrolls sideways")
    assert not info["wide"], (name, "a table wider than its page", info["wide"])


@pytest.mark.parametrize("mode", ["file", "http"])
def test_pages_in_chromium(site, browser, mode):
    """Every page, opened from disk and served."""
    server = _serve(site) if mode == "http" else None
    base = f"http://127.0.0.1:{server.server_address[1]}/" if server else site.as_uri() + "/"
    problems, requests, typeset = [], [], {}
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: problems.append((page.url, m.text)) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append((page.url, str(e))))
        for target in pages(site):
            name = target.relative_to(site).as_posix()
            page.goto(base + name)
            page.wait_for_function(TYPESET, timeout=30_000)
            typeset[name] = page.evaluate(f"() => {MATH}")
            check_page(page, name)
        page.close()
    finally:
        if server:
            server.shutdown()
    assert not problems, problems[:5]
    allowed = ("file://", "data:", "blob:", "about:blank", "http://127.0.0.1:")
    assert not [u for u in requests if not u.startswith(allowed)], "requests to another host"
    assert typeset["methods.html"] >= 20, "the methods page's maths is not typeset"
    assert typeset["records/fashionmnist/02_distill_students.html"] > 0, "a notebook's maths is not typeset"


RESOLVES = """async () => {
    const urls = [...document.querySelectorAll('a[href], link[href], script[src], img[src]')]
        .map(e => e.href || e.src).filter(u => u.startsWith(location.origin) || u.startsWith('file:'))
        .map(u => u.split('#')[0]);
    const dead = [];
    for (const u of [...new Set(urls)]) {
        try { const r = await fetch(u); if (!r.ok) dead.push(u); } catch (e) { dead.push(u); }
    }
    return {count: urls.length, dead, styled: getComputedStyle(document.querySelector('.md-header')).position};
}"""


@pytest.mark.parametrize("mode", ["file", "http"])
def test_the_404_page_links_resolve(site, browser, mode):
    """Opened from disk its links are relative to the site's root, where it lies; served, it
    answers any missing address (here two folders deep) and its links still resolve."""
    server = _serve(site) if mode == "http" else None
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        if server:
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/records/nowhere/missing.html")
        else:
            text = (site / "404.html").read_text()
            assert not re.search(r'(href|src)="/(?!/)', text.split("</script>", 1)[1]), "a link from the disk's root"
            page.goto((site / "404.html").as_uri())
        assert "404" in page.inner_text(".md-content")
        if mode == "file":  # file:// pages may not fetch(): check the targets on disk
            urls = page.evaluate("() => [...document.querySelectorAll('a[href], link[href], script[src]')]"
                                 ".map(e => e.href || e.src).filter(u => u.startsWith('file:'))")
            dead = [u for u in urls if not Path(unquote(urlsplit(u).path)).exists()]
            assert len(urls) > 10 and not dead, dead[:5]
        else:
            found = page.evaluate(RESOLVES)
            assert found["count"] > 10 and not found["dead"], found["dead"][:5]
        assert page.evaluate("getComputedStyle(document.querySelector('.md-header')).position") == "sticky"
        page.close()
    finally:
        if server:
            server.shutdown()


def test_sweep_page_answers_in_words(site, page):
    """Under Verdict, the generated reading; then the forest plot; in the navigation and the
    run table, runs named by their setting, methods and seeds in words, grouped by setting."""
    page.goto((site / "records" / "teacher-quality" / "index.html").as_uri())
    verdict = page.evaluate("""() => {
        const h = [...document.querySelectorAll('h2')].find(e => e.textContent.startsWith('Verdict'));
        let text = '', e = h.nextElementSibling;
        for (; e && e.tagName !== 'H2'; e = e.nextElementSibling) text += e.innerText + ' ';
        return text;
    }""")
    assert "A method with teachers against the student alone: of" in verdict and len(verdict) > 200, verdict
    forest = page.locator("img[src='sweep_forest.png']")
    assert forest.count() == 1 and forest.evaluate("i => i.complete && i.naturalWidth > 0")
    check_page(page, "records/teacher-quality/index.html")
    table = page.inner_text("table:below(h2:has-text('The runs'))")
    assert "swapped resnet" in table and "CAMKD (beta 0) · seeds 0, 1, 2" in table and "=" not in table
    run = next(p for p in (site / "records" / "teacher-quality").iterdir() if p.name.startswith("teacher_class_swap"))
    page.goto((run / "index.html").as_uri())
    title = page.inner_text("h1")
    assert re.fullmatch(r"swapped resnet · CAMKD, vanilla, label smoothing, scratch · seed \d", title.strip("¶ \n"))
    assert f"outputs/teacher-quality/{run.name}/" in page.inner_text(".md-content")  # the page gives its folder
    nav = page.evaluate("() => [...document.querySelectorAll('.md-nav--primary .md-ellipsis')]"
                        ".map(e => e.textContent.trim())")
    assert {"shipped", "swapped resnet", "CAMKD, vanilla, label smoothing, scratch · seed 1"} <= set(nav), nav
    assert not [n for n in nav if "=" in n], "a run named by its folder in the navigation"
    assert "=" not in page.title() and page.title().startswith(title.strip("¶ \n"))


def test_tuning_page_answers_then_links_its_test_runs(site, page):
    """A tuning's page: under Verdict, each method at its chosen values with its paired
    differences and the reading; the forest plot; the chosen values; its 05; the test sweep's
    page and its runs' pages, named in words in the navigation."""
    page.goto((site / "records" / "small-student" / "index.html").as_uri())
    text = page.inner_text(".md-content")
    verdict = text.split("Verdict", 1)[1].split("The chosen values", 1)[0]
    assert "small student" in verdict and "vanilla T 1.5, alpha 0.8" in verdict and "vanilla − scratch" in verdict
    assert "The answer, each method at its best (tuned on held-out training images)" in verdict
    assert "small-student, small student (student width 0.25): 3 trials per tuned method" in verdict  # its column
    forest = page.locator("img[src='tune_forest.png']")
    assert forest.count() == 1 and forest.evaluate("i => i.complete && i.naturalWidth > 0")
    check_page(page, "records/small-student/index.html")
    page.locator("a", has_text="the test sweep").first.click()
    assert page.url.endswith("records/small-student/test/index.html")
    assert "small-student/test (sweep)" in page.inner_text("h1")
    nav = page.evaluate("() => [...document.querySelectorAll('.md-nav--primary .md-ellipsis')]"
                        ".map(e => e.textContent.trim())")
    assert {"small-student", "05 tune", "the test runs", "small student"} <= set(nav), nav
    assert not [n for n in nav if "=" in n], "a run named by its folder in the navigation"
    assert (site / "records" / "small-student" / "05_tune.html").is_file()


def test_results_page_draws_each_finished_studys_forest_and_the_readme_does_not(project):
    from kdlib.publish import blocks
    made = {(file, name): make for file, name, make in blocks.blocks(project)}
    results, readme = made[("docs/results.md", "best")](), made[("README.md", "best")]()
    assert "small student: each method at its chosen values" in results
    assert "](records/small-student/tune_forest.png)" in results  # the study's page folder on the site
    assert "tune_forest.png" not in readme and "small student" in readme
    assert "`small-student-swapped` (not started)" in results  # no forest for a study without a test


def test_record_page_shows_its_verdict(site):
    text = (site / "records" / "fashionmnist" / "index.html").read_text()
    assert "Highest mean test accuracy: vanilla" in re.sub("<[^>]+>", "", text)
    assert "CAMKD vs vanilla:" in text and "0123456789" in text  # its verdict and its commit
    assert 'href="02_distill_students.html"' in text


def test_readme_relative_links_resolve_and_answers_are_generated():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [unquote(link.split("#")[0]) for link in links if _local(link)]
    assert local and not [link for link in local if not (ROOT / link).exists()]
    assert len(readme.splitlines()) <= 200
    from kdlib.publish import blocks
    from kdlib.records.files import update_readme  # noqa: F401 (the block mechanism the README uses)
    rows = blocks.answers(ROOT)
    table = blocks.answers_markdown(rows, lambda f: f.relative_to(ROOT).as_posix() + "/", ROOT)
    assert f"<!-- answers:start -->\n{table}\n<!-- answers:end -->" in readme, "make blocks: the README's answers are stale"


def test_sweep_table_names_a_setting_in_one_column():
    """04's per-setting table of a sweep whose settings vary several keys: one `setting`
    column named as the run folders are, and each number and its interval on one line."""
    from kdlib.analysis import sweep_results as sweep_analysis
    res = sweep_analysis.load(ROOT / "outputs" / "regimes")
    assert len(res.keys) > 1
    wide = sweep_analysis.wide_table(sweep_analysis.setting_table(res), res.keys)
    assert wide.index.name == "setting" and "labelled_subset=1000" in wide.index
    assert "augment=crop, teacher_augment=none, student_epochs=24" in wide.index
    cell = wide.loc["labelled_subset=1000", "CAMKD accuracy %"]
    assert " " not in cell and sweep_analysis.NBSP in cell


def test_every_generated_block_is_current():
    """The README's and the site's generated tables are what kdlib.publish.blocks makes from the
    committed records today (make blocks regenerates them)."""
    from kdlib.publish import blocks
    blocks.main(["--check"])  # exits naming each stale block


def test_shared_templates_compile_once_and_render_the_same(tmp_path, monkeypatch):
    """Inside ``shared_templates`` a second exporter compiles no template again and writes the
    same HTML as an exporter outside it; leaving it restores nbconvert as it was."""
    import jinja2
    from nbconvert import HTMLExporter
    from nbconvert.exporters.templateexporter import TemplateExporter
    notebook = tiny_notebook(tmp_path / "n.ipynb", "A title", [png(0)])
    plain = HTMLExporter().from_filename(str(notebook))[0]
    compiled = []
    compile_ = jinja2.Environment.compile
    monkeypatch.setattr(jinja2.Environment, "compile", lambda self, *a, **k: compiled.append(1) or compile_(self, *a, **k))
    original = TemplateExporter._create_environment
    with site_module.shared_templates():
        first = HTMLExporter().from_filename(str(notebook))[0]
        n = len(compiled)
        second = HTMLExporter().from_filename(str(notebook))[0]
    assert n > 0 and len(compiled) == n  # the second exporter compiled nothing
    assert first == second == plain
    assert TemplateExporter._create_environment is original


def test_a_tuning_page_while_it_searches_says_so(tmp_path):
    """Before its test: the page says there is no answer yet and why its notebook and test runs are
    missing, and its search table names the setting in words (no best.yaml yet to name it)."""
    import json
    folder = write_tuning(tmp_path / "outputs" / "searching", _acc(vanilla=0.6, scratch=0.0), {"vanilla": {}})
    for name in ("best.yaml", "05_tune.ipynb", "tune_forest.png"):
        (folder / name).unlink()
    shutil.rmtree(folder / "test")
    record = json.loads((folder / "tune.json").read_text())
    (folder / "tune.json").write_text(json.dumps({**record, "status": "running", "test": None, "ended": None}))
    text = site_module.tune_markdown(folder, tmp_path)
    assert "No answer yet: `searching` (searching" in text, text
    assert "None yet: the test sweep starts when the search and the re-scoring are done" in text
    assert "| small student | vanilla | 2 | 1 | 0 |" in text, text  # complete, pruned, failed
    assert "05_tune" not in text and "test/index.md" not in text
