"""The committed site, built whole (make site): every internal link and image of every page
resolves on disk and nothing loads from another host (``kdlib.publish.site.check_links``, what
``python -m kdlib site --check`` runs); one page per committed record; the committed sweeps'
pages in Chromium at 1280 px: a verdict with text, the forest plot, tables inside the page, in the
executed 04 and 05 too.
The site's code is tested on a small site in test_site.py; this module checks today's records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT

pytest.importorskip("mkdocs", reason="the site's tools are missing: pip install -e '.[docs]'")
from kdlib.publish import site as site_module  # noqa: E402 (after the skip)
from conftest import chromium  # noqa: E402
from test_site import check_page  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("site")
    return site_module.build(ROOT, tmp / "site", stage_dir=tmp / "src")


def test_every_internal_link_and_image_of_the_committed_site_resolves(site):
    found = site_module.check_links(site)
    assert not found["broken"], found["broken"][:10]
    assert not found["loaded_from_outside"], found["loaded_from_outside"][:10]
    names = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    for folder in site_module.records(ROOT):
        assert f"records/{site_module.record_name(folder, ROOT)}/index.html" in names
    assert "records/fashionmnist/03_fidelity_analysis.html" in names


def test_committed_sweep_and_tuning_pages_in_chromium(site):
    sweeps = [f for f in site_module.records(ROOT) if (f / "sweep.json").is_file()]
    tunings = [f for f in site_module.records(ROOT) if (f / "tune.json").is_file()]
    assert sweeps
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for notebook in sorted(site.glob("records/**/0[45]_*.html")):
            name = notebook.relative_to(site).as_posix()  # 04's and 05's tables fit the page, none scrolls
            page.goto(notebook.as_uri())
            check_page(page, name, notebook_tables=True)
        for tuning in tunings:  # its answer once its test has finished, else how far the tuning has got
            name = f"records/{site_module.record_name(tuning, ROOT)}/index.html"
            page.goto((site / name).as_uri())
            text = page.inner_text(".md-content").lower()
            test_sweep = tuning / "test" / "sweep.json"
            tested = test_sweep.is_file() and json.loads(test_sweep.read_text())["status"] == "finished"
            expected, not_expected = (("each method at its best", "no answer yet") if tested else
                                      ("no answer yet: ", "each method at its best"))
            assert expected in text and not_expected not in text, (name, expected)
            check_page(page, name)
        for sweep in sweeps:
            name = f"records/{site_module.record_name(sweep, ROOT)}/index.html"
            page.goto((site / name).as_uri())
            verdict = page.evaluate("""() => {
                const h = [...document.querySelectorAll('h2')].find(e => e.textContent.startsWith('Verdict'));
                let text = '', e = h.nextElementSibling;
                for (; e && e.tagName !== 'H2'; e = e.nextElementSibling) text += e.innerText + ' ';
                return text;
            }""")
            assert len(verdict.strip()) > 100, (name, "an empty verdict")
            assert page.locator("img[src='sweep_forest.png']").count() == 1, name
            check_page(page, name)
