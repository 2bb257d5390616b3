"""Checkpoints that carry their own metadata, written atomically, refused when wrong."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, or for other settings."""


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, expected_meta: dict | None = None, map_location="cpu") -> dict:
    """Load a checkpoint and check that its ``meta`` matches ``expected_meta`` key by key."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                              f"delete it to retrain from scratch") from None
    if not isinstance(state, dict) or "meta" not in state or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a kdbook checkpoint (no meta/model); delete it or "
                              f"point to the right file")
    if expected_meta:
        diff = {k: (state["meta"].get(k), v) for k, v in expected_meta.items() if state["meta"].get(k) != v}
        if diff:
            shown = "; ".join(f"{k}: file has {a!r}, expected {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {path} does not match this run ({shown}); "
                                  f"delete it or use a different output folder")
    return state


def meta_key(meta: dict) -> str:
    """Short stable hash of a metadata dict (names checkpoint files)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
