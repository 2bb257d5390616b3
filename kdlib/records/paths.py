"""Where things are, as every record shows them: the project root relative paths resolve against,
the package's own root, and the one helper that makes a path portable (no record names a folder of
the machine that made it)."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the repository: notebooks/, params/, reference_teachers/


def project_root() -> Path:
    """The folder relative paths in params resolve against: ``$KDBOOK_ROOT`` when set
    (tests point it at a temporary folder), else the working directory, or its parent
    when a notebook runs from ``notebooks/``."""
    if os.environ.get("KDBOOK_ROOT"):
        return Path(os.environ["KDBOOK_ROOT"])
    cwd = Path.cwd()
    return cwd.parent if cwd.name == "notebooks" and (cwd.parent / "kdlib").is_dir() else cwd


def resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def _forms(folder: Path) -> list[Path]:
    return list(dict.fromkeys([folder.absolute(), folder.resolve()]))


def display_path(path) -> str:
    """``path`` as records show it: relative to the project root when it lies inside, else
    relative to the working directory when it lies there (a tune file of the repository read
    while the project root is elsewhere), else as given."""
    p = Path(path).expanduser()
    for base in (project_root(), Path.cwd()):
        for root in _forms(base):
            for form in (p.absolute(), p.resolve()):
                if form.is_relative_to(root):
                    return form.relative_to(root).as_posix() or "."
    return str(path)


def portable_text(text) -> str:
    """``text`` (a log line, an error message) with every path under the project root made relative to it."""
    text = str(text)
    for root in _forms(project_root()):
        text = text.replace(f"{root}{os.sep}", "")
    return text


def say(message) -> None:
    """``print(portable_text(message))``, flushed (a piped terminal sees it at once): the
    default ``log`` of the book's steps and of the runner."""
    print(portable_text(message), flush=True)


def locate(path: Path) -> Path:
    """A relative path found from here, else from the project root or the repository
    (a notebook runs in notebooks/; tests move the project root); as given when nowhere."""
    for candidate in (path, project_root() / path, PACKAGE_ROOT / path):
        if candidate.exists():
            return candidate
    return path
