"""Records name paths relative to the project root: ``kdlib.records.paths``, the one helper that makes
a path portable, and the one that strips the root from messages."""
from kdlib.records import paths


def test_display_path_relative_inside_the_project_only(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBOOK_ROOT", str(tmp_path / "proj"))
    (tmp_path / "proj" / "outputs").mkdir(parents=True)
    assert paths.display_path(tmp_path / "proj" / "outputs" / "run1") == "outputs/run1"
    assert paths.display_path(paths.resolve("checkpoints/teachers/x.pt")) == "checkpoints/teachers/x.pt"
    assert paths.display_path(tmp_path / "proj") == "."
    assert paths.display_path(tmp_path / "elsewhere" / "t.pt") == str(tmp_path / "elsewhere" / "t.pt")


def test_display_path_sees_through_symlinks(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("KDBOOK_ROOT", str(tmp_path / "link"))
    assert paths.display_path(tmp_path / "real" / "outputs") == "outputs"


def test_portable_strips_the_root_from_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDBOOK_ROOT", str(tmp_path))
    paths.say(f"reusing finished checkpoint {tmp_path}/checkpoints/a.pt and {tmp_path}x/b.pt")
    assert capsys.readouterr().out == f"reusing finished checkpoint checkpoints/a.pt and {tmp_path}x/b.pt\n"


def test_a_path_outside_the_project_but_under_the_working_directory_is_shown_from_there(tmp_path, monkeypatch):
    """A tune file of the repository read while the project root is a temporary folder (the tests,
    KDBOOK_ROOT) is recorded as params/..., not as this machine's absolute path."""
    monkeypatch.setenv("KDBOOK_ROOT", str(tmp_path / "proj"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params").mkdir()
    assert paths.display_path(tmp_path / "params" / "t.yaml") == "params/t.yaml"
