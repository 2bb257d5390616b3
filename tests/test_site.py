"""The site (make site) where a reader sees it: built from docs/ and the committed records into
a temporary folder, then opened from disk and served, in Debian's chromium driven by Playwright.
Every page's internal links and images resolve; the pages load without console errors, typeset
their maths with the bundled MathJax, keep their tables inside the page and ask no outside host
for anything; a record page shows its run's verdict; the README's relative links resolve."""
from __future__ import annotations

import functools
import http.server
import re
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from conftest import ROOT

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

pytest.importorskip("mkdocs", reason="the site's tools are missing: pip install -e '.[docs]'")
from kdlib import site as site_module  # noqa: E402 (after the skip)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
# Opened in Chromium: every page but the executed notebooks, and the notebooks of the reference
# run and of the regimes sweep (the other notebook pages share their template; their links and
# images are checked on disk).
NOTEBOOK_PAGES = ["records/fashionmnist/", "records/regimes/04_"]
MATH = "document.querySelectorAll('.MathJax, .MathJax_Display').length"
TYPESET = "() => new Promise(done => MathJax.Hub.Queue(() => done(true)))"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("site")
    return site_module.build(ROOT, tmp / "site", stage_dir=tmp / "src")


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("href", "src"):
            if attrs.get(key) and tag in ("a", "img", "link", "script"):
                self.refs.append(attrs[key])


def _local(ref: str) -> bool:
    parts = urlsplit(ref)
    return not parts.scheme and not parts.netloc and bool(parts.path)


def pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if p.name != "404.html")


def opened(site: Path) -> list[Path]:
    return [p for p in pages(site) if "jupyter-wrapper" not in p.read_text()
            or any(s in p.relative_to(site).as_posix() for s in NOTEBOOK_PAGES)]


def test_every_internal_link_and_image_resolves(site):
    broken, outside = [], []
    for page in pages(site):
        parser = _Refs()
        parser.feed(page.read_text())
        for ref in parser.refs:
            if ref.startswith(("http://", "https://", "//")):
                outside.append((page.name, ref))
            elif _local(ref):
                target = page.parent / unquote(urlsplit(ref).path)
                anchor = urlsplit(ref).fragment
                if not target.exists() or (anchor and target.suffix == ".html"
                                           and f'id="{anchor}"' not in target.read_text()):
                    broken.append((str(page.relative_to(site)), ref))
    assert not broken, broken[:10]
    # links to other hosts are allowed (a reader may follow them); nothing is loaded from one
    assert not [r for r in outside if r[1].endswith((".js", ".css", ".woff", ".woff2", ".png", ".svg"))], outside


def test_site_has_the_pages_and_one_record_page_per_committed_run(site):
    names = {p.relative_to(site).as_posix() for p in pages(site)}
    assert {"index.html", "getting-started.html", "book.html", "parameters.html", "methods.html", "results.html",
            "speed.html", "sweeps.html", "records/index.html"} <= names
    for folder in site_module.records(ROOT):
        assert f"records/{folder.name}/index.html" in names
    assert "records/fashionmnist/03_fidelity_analysis.html" in names  # notebooks rendered as pages
    from kdlib.params import SCHEMA
    text = (site / "parameters.html").read_text()
    assert all(f"<code>{key}</code>" in text for key in SCHEMA)  # the table comes from the schema


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium")
@pytest.mark.skipif(sync_playwright is None, reason="Playwright missing: pip install -e '.[test]'")
@pytest.mark.parametrize("mode", ["file", "http"])
def test_pages_in_chromium(site, mode):
    """Opened from disk: every page but most notebooks; served: a few of each kind."""
    server = _serve(site) if mode == "http" else None
    base = f"http://127.0.0.1:{server.server_address[1]}/" if server else site.as_uri() + "/"
    targets = opened(site) if mode == "file" else [site / p for p in (
        "index.html", "methods.html", "results.html", "records/fashionmnist/index.html",
        "records/fashionmnist/03_fidelity_analysis.html", "records/regimes/04_sweep_analysis.html")]
    problems, requests, typeset = [], [], {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: problems.append((page.url, m.text)) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append((page.url, str(e))))
            for target in targets:
                page.goto(base + target.relative_to(site).as_posix())
                page.wait_for_function(TYPESET, timeout=30_000)
                typeset[target.relative_to(site).as_posix()] = page.evaluate(f"() => {MATH}")
                info = page.evaluate("""() => {
                    const content = document.querySelector('.md-content__inner').getBoundingClientRect();
                    const boxed = t => t.closest('.jp-OutputArea-output');  // a notebook's output scrolls in its box
                    return {
                        images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
                        pageWidth: document.documentElement.scrollWidth, viewport: document.documentElement.clientWidth,
                        wide: [...document.querySelectorAll('.md-content table')].filter(t => !boxed(t) &&
                              t.getBoundingClientRect().width > content.width + 1).map(t => t.rows[0].innerText)};
                }""")
                name = target.relative_to(site).as_posix()
                assert not info["images"], (name, info["images"])
                assert info["pageWidth"] <= info["viewport"], (name, "the page scrolls sideways")
                assert not info["wide"], (name, "a table wider than its page", info["wide"])
            browser.close()
    finally:
        if server:
            server.shutdown()
    assert not problems, problems[:5]
    allowed = ("file://", "data:", "blob:", "about:blank", f"http://127.0.0.1:")
    assert not [u for u in requests if not u.startswith(allowed)], "requests to another host"
    assert typeset["methods.html"] >= 20, "the methods page's maths is not typeset"
    assert typeset["records/regimes/04_sweep_analysis.html"] > 0, "a notebook's maths is not typeset"


def test_record_page_shows_its_verdict(site):
    from kdlib.blocks import run_answer
    text = (site / "records" / "fashionmnist" / "index.html").read_text()
    best = run_answer(ROOT / "outputs" / "fashionmnist")["best student %"].split()[0]
    assert "Highest mean test accuracy:" in text and f"Highest mean test accuracy: {best}" in re.sub("<[^>]+>", "", text)
    assert "CAMKD vs vanilla:" in text and "a80bfa1237" in text  # its verdict and its commit
    assert 'href="03_fidelity_analysis.html"' in text
    sweep = (site / "records" / "regimes" / "index.html").read_text()
    assert "vanilla vs scratch:" in sweep and "sweep_accuracy.png" in sweep


def test_readme_relative_links_resolve_and_answers_are_generated():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [unquote(link.split("#")[0]) for link in links if _local(link)]
    assert local and not [link for link in local if not (ROOT / link).exists()]
    assert len(readme.splitlines()) <= 200
    from kdlib import blocks
    from kdlib.records import update_readme  # noqa: F401 (the block mechanism the README uses)
    rows = blocks.answers(ROOT)
    table = blocks.answers_markdown(rows, lambda f: f.relative_to(ROOT).as_posix() + "/", ROOT)
    assert f"<!-- answers:start -->\n{table}\n<!-- answers:end -->" in readme, "make blocks: the README's answers are stale"


def test_sweep_table_names_a_setting_in_one_column():
    """04's per-setting table of a sweep whose settings vary several keys: one `setting`
    column named as the run folders are, and each number and its interval on one line."""
    from kdlib import sweep_analysis
    res = sweep_analysis.load(ROOT / "outputs" / "regimes")
    assert len(res.keys) > 1
    wide = sweep_analysis.wide_table(sweep_analysis.setting_table(res), res.keys)
    assert wide.index.name == "setting" and "labelled_subset=1000" in wide.index
    assert "augment=crop, teacher_augment=none, student_epochs=24" in wide.index
    cell = wide.loc["labelled_subset=1000", "CAMKD accuracy %"]
    assert " " not in cell and sweep_analysis.NBSP in cell


def test_every_generated_block_is_current():
    """The README's and the site's generated tables are what kdlib.blocks makes from the
    committed records today (make blocks regenerates them)."""
    from kdlib import blocks
    blocks.main(["--check"])  # exits naming each stale block
