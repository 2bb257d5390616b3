"""Every ``python -m kdlib ...`` line of the README's and the docs' code blocks works as written on a
fresh clone: run, sweep and tune lines check out under ``--dry-run`` (files, keys, values, and no
committed record in the way), the readers' commands exist. Placeholders (NAME, X) stand for the
repository's smallest example of their kind."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT
from kdlib.__main__ import READERS, main

EXAMPLE = {"params/sweeps/NAME.yaml": "params/sweeps/smoke-beta.yaml", "params/tune/NAME.yaml":
           "params/tune/smoke-tune.yaml", "params/X.yaml": "params/smoke.yaml", "params/NAME.yaml": "params/smoke.yaml"}


OWN = "own.yaml"  # docs/own-models.md's params file, in a folder with the user's images, modules and checkpoint


def documented() -> list[tuple[str, int, str, list[str]]]:
    """(file, block number, the line, its arguments) for every kdlib command in a fenced code block."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"(?ms)^```[^\n]*\n(.*?)^```", path.read_text())):
            for line in block.splitlines():
                line = line.strip().lstrip("!")
                if line.startswith("python -m kdlib "):
                    command = shlex.split(line, comments=True)
                    found.append((path.relative_to(ROOT).as_posix(), i, line, command[3:]))
    return found


COMMANDS = documented()


def test_the_docs_give_commands_of_every_kind():
    kinds = {args[0] for _, _, _, args in COMMANDS}
    assert {"run", "sweep", "tune"} <= kinds and len(COMMANDS) >= 15


@pytest.mark.parametrize("where, block, line, args", COMMANDS, ids=[f"{w}:{line[16:60]}" for w, _, line, _ in COMMANDS])
def test_each_documented_command_checks_out_as_written(where, block, line, args, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("KDBOOK_ROOT", raising=False)
    args = [EXAMPLE.get(a, a) for a in args]
    if "--outputs" in args:  # a folder elsewhere (Google Drive in Colab): here, a temporary one
        args[args.index("--outputs") + 1] = str(tmp_path)
    if args[0] in READERS:
        with pytest.raises(SystemExit) as stop:
            main([args[0], "--help"])
        assert stop.value.code == 0
        return
    resumed = args[args.index("--resume") + 1] if args[0] == "run" and "--resume" in args else None
    if resumed and not (ROOT / resumed).exists():
        # the line that resumes a run an earlier line of its block starts: that line names its folder
        earlier = [a for w, b, _, a in COMMANDS if (w, b) == (where, block) and "--name" in a]
        assert any(Path(resumed).name == a[a.index("--name") + 1] for a in earlier), line
        return
    if OWN in args:  # the user's own folder of docs/own-models.md: made as that page describes it
        from test_own_models import make_project
        monkeypatch.chdir(make_project(tmp_path / "mine"))
        monkeypatch.setenv("KDBOOK_ROOT", str(tmp_path / "mine"))
    code = main(args + ["--dry-run"])
    out = capsys.readouterr()
    assert code == 0, f"{where}: {line}\n{out.err}"
    assert out.out.startswith(("would ", "outputs/")), out.out


def test_a_dry_run_refuses_a_folder_in_the_way_in_one_line_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    (tmp_path / "try1").mkdir()
    (tmp_path / "try1" / "manifest.json").write_text('{"status": "finished"}')
    assert main(["run", "params/smoke.yaml", "--name", "try1", "--outputs", str(tmp_path), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "try1 already holds a finished run; pick another --name" in err
    assert main(["run", "params/smoke.yaml", "--name", "try2", "--outputs", str(tmp_path), "--dry-run"]) == 0
    assert main(["sweep", "params/sweeps/smoke-beta.yaml", "--outputs", str(tmp_path), "--dry-run"]) == 0
    assert main(["tune", "params/tune/smoke-tune.yaml", "--outputs", str(tmp_path), "--dry-run"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["try1"]  # nothing created
    assert main(["run", "params/smoke.yaml", "-p", "beta=-1", "--outputs", str(tmp_path), "--dry-run"]) == 2
    assert "beta" in capsys.readouterr().err
