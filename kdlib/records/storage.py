"""Optuna's storage of a tuning, opened the same way by the driver, its workers and the readers:
a journal file (one machine) or a database URL; and the names of its studies."""
from __future__ import annotations

SEARCH, SEEDS = "search", "seeds"
_STORAGES: dict = {}


def open_storage(url: str):
    """One storage object per process and URL: an RDB URL as Optuna takes it, or a
    ``JournalStorage`` on a file (file locks keep concurrent processes consistent)."""
    if url not in _STORAGES:
        import optuna
        if "://" in url:
            _STORAGES[url] = optuna.storages.RDBStorage(url)
        else:
            from optuna.storages.journal import JournalFileBackend
            _STORAGES[url] = optuna.storages.JournalStorage(JournalFileBackend(url))
    return _STORAGES[url]


def study_name(setting: str, method: str, kind: str = SEARCH) -> str:
    """'SETTING/METHOD' for a search, 'SETTING/METHOD/seeds' for its runs at fixed values."""
    return f"{setting}/{method}" + ("" if kind == SEARCH else f"/{SEEDS}")
