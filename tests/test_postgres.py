"""A tuning on a real database: a throwaway PostgreSQL server (Debian's package, ``initdb`` in a
temporary folder, listening on 127.0.0.1 only, stopped at the end) holds the Optuna storage of the
smoke tuning run with ``--storage postgresql://...``; its trials are in the database, its records in
the tuning folder, and ``--resume`` on the same database adds no trial."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow
BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
needs_server = pytest.mark.skipif(not BIN, reason="no PostgreSQL server here (apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A server of our own on 127.0.0.1: its URL; stopped and its folder removed after the module."""
    pytest.importorskip("psycopg", reason="no PostgreSQL driver: pip install 'kdbook[tune]'")
    bin_dir = BIN[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="kdbook-pg-"))  # in /tmp itself: pytest's own folders are root's only
    data, port = folder / "data", _free_port()
    as_user = []
    if os.geteuid() == 0:  # initdb refuses root: the package's own user runs the server
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as its own user")
        shutil.chown(folder, "postgres")
        folder.chmod(0o755)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_user + [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "kdbook"],
                   check=True, capture_output=True)
    start = as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "log"), "-o",
                       f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}", "start"]
    subprocess.run(start, check=True, capture_output=True)
    subprocess.run(as_user + [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "kdbook", "optuna"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://kdbook@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def _trials(url: str) -> dict[str, int]:
    import optuna
    storage = optuna.storages.RDBStorage(url)
    return {name: len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
            for name in optuna.get_all_study_names(storage)}


@needs_server
def test_a_tuning_on_postgresql_keeps_its_trials_in_the_database_and_resumes_without_a_new_one(postgres, tmp_path):
    tune_file = tmp_path / "pg-tune.yaml"
    spec = yaml.safe_load((ROOT / "params" / "tune" / "smoke-tune.yaml").read_text())
    tune_file.write_text(yaml.safe_dump({**spec, "trials": 2, "seeds": [0]}))
    env = dict(os.environ, KDBOOK_ROOT=str(tmp_path / "project"), KDBOOK_PROGRESS="off",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "kdlib", "tune", str(tune_file), "--outputs", str(tmp_path / "outputs"),
               "--workers", "2", "--storage", postgres]
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    held = _trials(postgres)
    assert held["base/vanilla"] == 2 and held["base/scratch/seeds"] == 1  # the search and the reference's seed
    folder = tmp_path / "outputs" / "pg-tune"
    assert {"trials.csv", "best.yaml", "tune.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "study.journal").exists()  # the database holds the studies, not a journal file
    record = (folder / "tune.json").read_text()
    assert json.loads(record)["storage"] == "postgresql://…" and "127.0.0.1" not in record and "kdbook@" not in record
    again = subprocess.run(command + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert _trials(postgres) == held
