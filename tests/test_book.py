"""Records name paths relative to the project root: ``book.display_path`` and ``book.portable``."""
from kdlib import book


def test_display_path_relative_inside_the_project_only(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBOOK_ROOT", str(tmp_path / "proj"))
    (tmp_path / "proj" / "outputs").mkdir(parents=True)
    assert book.display_path(tmp_path / "proj" / "outputs" / "run1") == "outputs/run1"
    assert book.display_path(book.resolve("checkpoints/teachers/x.pt")) == "checkpoints/teachers/x.pt"
    assert book.display_path(tmp_path / "proj") == "."
    assert book.display_path(tmp_path / "elsewhere" / "t.pt") == str(tmp_path / "elsewhere" / "t.pt")


def test_display_path_sees_through_symlinks(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("KDBOOK_ROOT", str(tmp_path / "link"))
    assert book.display_path(tmp_path / "real" / "outputs") == "outputs"


def test_portable_strips_the_root_from_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDBOOK_ROOT", str(tmp_path))
    book.say(f"reusing finished checkpoint {tmp_path}/checkpoints/a.pt and {tmp_path}x/b.pt")
    assert capsys.readouterr().out == f"reusing finished checkpoint checkpoints/a.pt and {tmp_path}x/b.pt\n"
