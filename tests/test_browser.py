"""What a reader sees, where the reader sees it: notebook 03 run live in a real JupyterLab
(Playwright driving Debian's chromium). The executed book's HTML in Chromium is checked beside
the other tests of the smoke book's record, in test_runner.py, with this module's browser."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, chromium_missing

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:
    PlaywrightTimeout = TimeoutError

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(chromium_missing()), reason=str(chromium_missing()))]


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    yield page
    page.close()


# ---------------------------------------------------------------- notebook 03 live in JupyterLab
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer at {url} within {timeout} s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``jupyter lab`` on a free localhost port with a token, serving a temporary copy of
    notebooks/ with ``KDBOOK_ROOT`` there too, so nothing is written into the repository.
    Settings: every cell kept in the page (no windowing) and no news pop-up. Yields the URL, the token and the temporary home;
    the server's log is printed when the module's tests end (shown for a failure)."""
    home = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", home / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    records = os.environ.get("KDBOOK_LAB_RECORDS")  # make test: the root its nbval step ran 01 and 02 into
    if records and (Path(records) / "outputs" / "interactive").is_dir():
        for part in ("checkpoints", "outputs"):  # 03 then reads their teachers and students, as after 01 and 02
            shutil.copytree(Path(records) / part, home / part)
        (home / "outputs" / "interactive" / "results.csv").unlink(missing_ok=True)  # 03 writes it again, here
    settings = home / "settings" / "@jupyterlab"
    (settings / "notebook-extension").mkdir(parents=True)
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), "kdbook-test-token"
    env = dict(os.environ, KDBOOK_ROOT=str(home), KDBOOK_PROGRESS="auto",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    log = (home / "lab.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
                             f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={home}",
                             "--ServerApp.port_retries=0", *(["--allow-root"] if os.geteuid() == 0 else [])],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc)
        yield f"http://127.0.0.1:{port}", token, home
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        print("jupyter lab log (last 3000 characters):\n", (home / "lab.log").read_text()[-3000:])


STARTED = """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
    .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))"""
ALL_RAN = """() => {
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent);
    const failed = [...document.querySelectorAll('.jp-OutputArea-output')].some(o => o.textContent.includes('Traceback'));
    return failed || (prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p)));
}"""  # every code cell has its execution count, or one failed (run-all stops there)


def clear_dialogs(page) -> bool:
    """Close any modal dialog Lab put up while starting, saying which, picking the
    notebook's own "Python 3 (ipykernel)" where it offers a kernel choice. True when no
    dialog is left. (In CI once, Lab's "Select Kernel" dialog came back after every
    accept and blocked every click: the caller then reloads the page, which reconnects
    to the kernel session already started.)"""
    dialogs = page.locator(".jp-Dialog")
    for _ in range(3):
        if not dialogs.count():
            return True
        dialog = dialogs.first
        print("JupyterLab dialog:", " ".join(dialog.inner_text().split())[:200])
        choice = dialog.locator("select")
        if choice.count():
            python = choice.first.locator("option", has_text="Python 3")
            if python.count():
                choice.first.select_option(label=python.first.inner_text().strip())
        dialog.locator(".jp-Dialog-button.jp-mod-accept").first.click()
        try:
            dialog.wait_for(state="detached", timeout=20_000)
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    return not dialogs.count()


def start_session(url: str, token: str, path: str) -> None:
    """Start the notebook's python3 kernel through the server's REST API (``POST
    /api/sessions``), so that Lab, opening the notebook, joins that session instead of
    asking which kernel to start: on a loaded machine its "Select Kernel" dialog came back
    after every accept and blocked the Run menu."""
    body = json.dumps({"path": path, "type": "notebook", "name": Path(path).name, "kernel": {"name": "python3"}})
    request = urllib.request.Request(f"{url}/api/sessions", data=body.encode(), method="POST",
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status in (200, 201), response.status


def open_notebook(page, url: str, token: str, path: str, attempts: int = 3) -> None:
    """Open ``path`` in Lab with its kernel up and no dialog in the way."""
    start_session(url, token, path)
    page.goto(f"{url}/lab/tree/{path}?token={token}")
    settle(page, attempts)


def settle(page, attempts: int = 3) -> None:
    """Wait for the open notebook's cells and idle kernel, then clear Lab's dialogs, reloading
    the page while one stays."""
    for attempt in range(attempts):
        page.locator(".jp-Notebook .jp-Cell").first.wait_for()
        page.get_by_text("Kernel status: Idle").first.wait_for(state="attached")  # the kernel is up
        page.wait_for_timeout(1000)  # a dialog Lab puts up as it settles
        if clear_dialogs(page):
            return
        print(f"a JupyterLab dialog stays open (attempt {attempt + 1}); reloading the page")
        page.reload()
    raise AssertionError("a JupyterLab dialog stays open after reloading: "
                         + " ".join(page.locator(".jp-Dialog").first.inner_text().split())[:200])


def lab_state(page) -> str:
    """What Lab shows when a wait runs out: each code cell's prompt, the kernel's status and
    the end of the last output, so a failure in CI says where the notebook stood."""
    prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputArea-prompt", "ps => ps.map(p => p.textContent.trim())")
    status = page.locator("text=/Kernel status: \\w+/").first
    outputs = page.locator(".jp-OutputArea-output")
    last = outputs.last.inner_text()[-400:] if outputs.count() else ""
    return (f"prompts {prompts}; {(status.inner_text() if status.count() else '') or 'no kernel status shown'}; "
            f"last output: {' '.join(last.split())!r}")


@pytest.mark.serial
def test_explorer_renders_and_redraws_in_jupyterlab(lab, page):
    """Run all of notebook 03 in JupyterLab: the explorer shows a plot (an image, not the
    text ``<Figure size``), and picking another metric redraws it."""
    url, token, home = lab
    page.set_default_timeout(120_000)
    open_notebook(page, url, token, "notebooks/03_fidelity_analysis.ipynb")
    for _ in range(3):  # a click that lands while Lab is still settling can be lost: retry until cells run
        if not clear_dialogs(page):  # a dialog that came back after the notebook opened: reload past it
            print("a JupyterLab dialog stays open before Run All; reloading the page")
            page.reload()
            settle(page)
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
        try:
            page.wait_for_function(STARTED, timeout=60_000)
            break
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    try:
        page.wait_for_function(ALL_RAN, timeout=600_000)  # without 01 and 02's records, 03 trains its own first
    except PlaywrightTimeout:
        raise AssertionError(f"notebook 03 did not finish in JupyterLab within 10 min: {lab_state(page)}") from None
    finally:
        page.screenshot(path=str(home / "lab.png"))  # for a failure's post-mortem
    text = page.inner_text(".jp-Notebook")
    assert "<Figure size" not in text and "Traceback" not in text
    image = page.locator(".jp-Notebook img.widget-image")
    try:  # the cell has finished; its widget may still be "Loading widget..." for a while on a busy machine
        image.first.wait_for(state="attached", timeout=180_000)
    except PlaywrightTimeout:
        page.screenshot(path=str(home / "lab.png"))
    assert image.count() == 1, "the explorer shows its plot as an image"
    assert (home / "outputs" / "interactive" / "results.csv").is_file(), "outputs go to the temporary root"
    image.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    before = image.get_attribute("src")
    page.locator(".widget-dropdown", has_text="metric").locator("select").select_option("test_loss")
    page.wait_for_function("([img, old]) => img.src !== old && img.complete && img.naturalWidth > 0",
                           arg=[image.element_handle(), before])
