"""What every record shares: the machine's name and the generated blocks of a README or page.

The lowest floor of the records: the runner (manifests), the benchmark and the reports
import from here, and this module imports nothing of kdlib.
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import yaml


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` (named for this process), then rename
    it over ``path``: a reader (a notebook, a test, a commit) sees the old file or the new
    one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def update_readme(readme: str | Path, block: str, name: str = "results") -> None:
    readme = Path(readme)
    text = readme.read_text()
    # the two marker lines, with anything (or nothing yet) between them
    pattern = re.compile(rf"(<!-- {re.escape(name)}:start -->\n)(?:.*?\n)?(<!-- {re.escape(name)}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no <!-- {name}:start --> ... <!-- {name}:end --> block to replace; add the "
                         "two marker lines where the table should go")
    readme.write_text(pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text))


class PlainDumper(yaml.SafeDumper):
    """Writes repeated values in full (no &anchors), for a reader."""

    def ignore_aliases(self, data):
        return True



def ended_attempt(record: dict) -> dict:
    """An earlier attempt as a resumed record keeps it: started, ended, status; an attempt still
    'running' when the next one starts was killed, and is kept as 'interrupted' (ended unknown)."""
    attempt = {k: record.get(k) for k in ("started", "ended", "status")}
    if attempt["status"] == "running":
        attempt["status"] = "interrupted"
    return attempt
