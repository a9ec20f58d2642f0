"""``watcher backup PATH``: a consistent copy of the live database with SQLite's online backup
API, page by page, so the running daemon is never blocked for long. The copy is written next
to the target and renamed into place only after its integrity check passed; it is mode 0600
(the database holds webhook secrets)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .errors import WatcherError


class BackupError(WatcherError):
    code = "backup_error"


def backup(source: Path, target: Path, *, force: bool = False, pages: int = 256) -> int:
    if not source.exists():
        raise BackupError(f"no database at {source}")
    if target.exists() and not force:
        raise BackupError(f"{target} exists; pass --force to overwrite it")
    if target.resolve() == source.resolve():
        raise BackupError("the backup cannot be the database itself")
    tmp = target.with_name(target.name + ".partial")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst, pages=pages)  # copies in steps; restarts itself if the source changes
            dst.execute("PRAGMA journal_mode = DELETE")  # a self-contained single file
            ok = dst.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            dst.close()
            src.close()
        if ok != "ok":
            raise BackupError(f"the copy failed its integrity check: {ok}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target.stat().st_size
