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


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint made with other settings (its identity differs)."""


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


def load_checkpoint(path: str | Path, identity: dict | None = None, map_location="cpu") -> dict:
    """Load a checkpoint (plain tensors and containers only: ``weights_only=True``, so a
    pickled object is refused, never run) and check that its ``identity`` equals
    ``identity``, naming every key that differs."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path} is unreadable or not plain weights ({type(err).__name__}: "
                              f"{first}); delete it to retrain from scratch") from None
    if not isinstance(state, dict) or "identity" not in state or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a kdbook checkpoint of this version (no identity/model); "
                              f"delete it to retrain, or point to the right file")
    if identity is not None:
        diff = identity_diff(state["identity"], identity)
        if diff:
            raise CheckpointMismatch(f"checkpoint {path} was made with other settings ({diff}); "
                                  f"delete it to retrain with these settings, or use a different output folder")
    return state


def identity_diff(found: dict, expected: dict) -> str:
    """'key: file has A, expected B; ...' for every key whose value differs ('' if none)."""
    show = lambda d, k: repr(d[k]) if k in d else "nothing"
    return "; ".join(f"{k}: file has {show(found, k)}, expected {show(expected, k)}"
                     for k in sorted(set(found) | set(expected))
                     if k not in found or k not in expected or found[k] != expected[k])


def identity_key(identity: dict) -> str:
    """Short stable hash of an identity (names teacher checkpoint files)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def export_finished(src: str | Path, dst: str | Path) -> Path:
    """Copy a finished checkpoint to ``dst`` with what reuse needs (identity, weights,
    history) and without optimizer or RNG state: how reference teachers are shipped."""
    state = load_checkpoint(src)
    if not state["finished"]:
        raise CheckpointError(f"checkpoint {src} is not finished (epoch {state['epoch']}); finish its run first")
    atomic_save({k: state[k] for k in ("identity", "model", "extra", "history", "epoch", "finished")}, dst)
    return Path(dst)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
