"""``watcher backup PATH``: a consistent copy of the live database with SQLite's online backup
API, in one step: one read transaction sees one snapshot, and in WAL mode the running daemon
goes on committing meanwhile (a copy in several steps is restarted from its first page by
SQLite whenever another connection writes between two steps, and the daemon commits at every
block: a large database was never copied). The copy is written next to the target and
renamed into place only after its integrity check passed; it is mode 0600 (the database holds
webhook secrets).

``watcher restore BACKUP``: the way back. A daemon killed (kill -9, power loss) leaves its
-wal beside the database, and SQLite replays a -wal onto whatever file is then found at that
path: a copy put there by hand takes the dead daemon's later pages. Restore moves the
database and everything beside it aside, and puts in place an integrity-checked copy of the
backup alone."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import WatcherError


class BackupError(WatcherError):
    code = "backup_error"


def backup(source: Path, target: Path, *, force: bool = False) -> int:
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
            src.backup(dst, pages=-1)  # every page in one step, from one snapshot
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


# --- restore ---------------------------------------------------------------------------------

class RestoreError(WatcherError):
    code = "restore_error"


#: What SQLite may keep beside a database: WAL, its index, a rollback journal. Left beside a
#: restored copy, SQLite would replay them onto it.
SIDECARS = ("-wal", "-shm", "-journal")
_HEADER = b"SQLite format 3\x00"
# SQLite's file locks (POSIX byte-range locks, https://sqlite.org/lockingv3.html and
# os_unix.c): a connection to a WAL database holds a read lock on this range of the file for as
# long as it is open, idle or not
_SHARED_FIRST, _SHARED_SIZE = 0x40000002, 510


def in_use(path: Path) -> bool:
    """Whether a process has the database open (the daemon, a ``watcher`` command, an
    ``sqlite3`` shell). ``BEGIN IMMEDIATE`` would not tell: an idle daemon holds the write lock
    only while it commits, but every connection to a WAL database holds SQLite's shared lock
    on the file while it is open, so an exclusive lock on that range is refused. Ask from a
    process without a connection to the database: POSIX locks belong to a process, which is
    never refused its own (and closing this descriptor would drop that connection's locks)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise RestoreError(f"cannot open {path}: {e.strerror}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _SHARED_SIZE, _SHARED_FIRST)
    except OSError:
        return True
    finally:
        os.close(fd)  # and with it the lock
    return False


def _check_backup(copy: Path, shown: Path) -> None:
    """The copy about to be put in place is a watcher database this version can run: an SQLite
    file, intact, with watcher's schema migrations and none this version does not know. Read
    as it is (``immutable``: no -wal is looked for, nothing is written)."""
    import sqlite_utils

    from .store.schema import migrations

    with open(copy, "rb") as f:
        if f.read(len(_HEADER)) != _HEADER:
            raise RestoreError(f"{shown} is not an SQLite database")
    try:
        conn = sqlite3.connect(f"{copy.resolve().as_uri()}?immutable=1", uri=True)
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if ok != "ok":
                raise RestoreError(f"{shown} failed its integrity check: {ok}")
            applied = {m.name for m in migrations.applied(sqlite_utils.Database(conn))}
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise RestoreError(f"{shown} failed its integrity check: {e}") from None
    if not applied:
        raise RestoreError(f"{shown} is not a watcher database (it holds no watcher schema)")
    unknown = applied - {m.name for m in migrations.pending(sqlite_utils.Database(memory=True))}
    if unknown:
        raise RestoreError(f"{shown} was written by a newer watcher (schema {', '.join(sorted(unknown))}); "
                           "restore it with that version")


def _move_aside(target: Path) -> list[Path]:
    """Rename the database and whatever SQLite left beside it to ``<name>.before-restore-<UTC
    time>`` (the -wal keeps its suffix, so the set opens as it was); returns the new names."""
    present = [p for p in (target, *(target.with_name(target.name + s) for s in SIDECARS)) if p.exists()]
    if not present:
        return []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base, n = target.with_name(f"{target.name}.before-restore-{stamp}"), 1
    while any(base.with_name(base.name + s).exists() for s in ("", *SIDECARS)):
        base, n = target.with_name(f"{target.name}.before-restore-{stamp}-{n}"), n + 1
    moved = []
    for p in present:
        new = base.with_name(base.name + p.name[len(target.name):])
        try:
            os.rename(p, new)
        except OSError as e:
            raise RestoreError(f"cannot move {p} aside to {new}: {e.strerror}") from None
        moved.append(new)
    return moved


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What the database being replaced knows that its backup may not, and must not be lost or
# undone by a restore (see :func:`_carry_over`):
#: every address ever handed out (append-only): lost, its index would be handed out again
#: (two labels or invoices, one deposit address) and its deposits not watched
APPEND_ONLY = ("derivations", "addresses")
#: credentials as they are now: a key revoked since the backup must stay revoked, an endpoint
#: deleted (its secret erased), moved or rotated stays so, and keys made since keep working
LATEST = ("api_keys", "webhooks")
#: the kill switch as it is now: a pause made since the backup (an incident) stays on
META_KEYS = ("paused",)


@dataclass
class Restored:
    aside: list[Path]  # the previous database and what was beside it, renamed
    carried: dict[str, int]  # rows taken over from it, by table ("paused": 1 if the pause state was)
    skipped: int  # addresses of it that clash with the backup's (a label given another address)


def _carry_over(current: Path, copy: Path) -> tuple[dict[str, int], int]:
    """Take into ``copy`` (the backup about to be put in place) what the database it
    replaces holds that must survive a restore: :data:`APPEND_ONLY` rows it lacks,
    :data:`LATEST` rows as they are now, :data:`META_KEYS`. The current database is only
    read (through a copy if it cannot be read where it is, e.g. a crashed daemon's -wal that
    needs recovering); its columns are matched by name, so a backup of an older schema takes
    what it has columns for."""
    with tempfile.TemporaryDirectory(prefix="watcher-restore-") as scratch:
        source = _readable(current, Path(scratch))
        conn = sqlite3.connect(copy.resolve().as_uri(), uri=True, isolation_level=None)
        try:
            conn.execute("ATTACH DATABASE ? AS cur", (f"{source.resolve().as_uri()}?mode=ro",))
            carried: dict[str, int] = {}
            conn.execute("BEGIN IMMEDIATE")
            for table in (*APPEND_ONLY, *LATEST):
                cols = _shared_columns(conn, table)
                if not cols:
                    continue
                names = ", ".join(f'"{c}"' for c in cols)
                verb = "INSERT OR IGNORE" if table in APPEND_ONLY else "INSERT OR REPLACE"
                before = conn.total_changes
                conn.execute(f"{verb} INTO main.{table} ({names}) SELECT {names} FROM cur.{table}")
                carried[table] = conn.total_changes - before
            skipped = conn.execute("SELECT COUNT(*) FROM cur.addresses c WHERE NOT EXISTS (SELECT 1 FROM"
                                   " main.addresses m WHERE m.chain = c.chain AND m.address = c.address)"
                                   ).fetchone()[0] if "addresses" in carried else 0
            for key in META_KEYS:
                row = conn.execute("SELECT value FROM cur.meta WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    conn.execute("INSERT INTO main.meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                                 " SET value = excluded.value", (key, row[0]))
                    carried[key] = 1
            conn.execute("COMMIT")
            conn.execute("DETACH DATABASE cur")
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise RestoreError(f"cannot take over the addresses, keys and endpoints of {current}: {e}; restore "
                               "with --no-carry to put the backup alone in place (addresses handed out since "
                               "it would be handed out again)") from None
        finally:
            conn.close()
    if ok != "ok":
        raise RestoreError(f"the restored copy failed its integrity check: {ok}")
    return carried, skipped


def _readable(current: Path, scratch: Path) -> Path:
    """``current`` if SQLite can read it where it is, read-only; else a copy of it and what is
    beside it (a -wal to recover) in ``scratch``, opened once so that SQLite recovers it."""
    try:
        with contextlib.closing(sqlite3.connect(f"{current.resolve().as_uri()}?mode=ro", uri=True)) as c:
            c.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            c.execute("SELECT COUNT(*) FROM derivations").fetchone()
        return current
    except sqlite3.DatabaseError:
        pass
    copy = scratch / current.name
    for suffix in ("", *SIDECARS):
        side = current.with_name(current.name + suffix)
        if side.exists():
            shutil.copy2(side, copy.with_name(copy.name + suffix))
    with contextlib.closing(sqlite3.connect(copy)) as c:
        c.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    return copy


def _shared_columns(conn: sqlite3.Connection, table: str) -> list[str]:
    main = [r[1] for r in conn.execute(f"PRAGMA main.table_info({table})")]
    cur = {r[1] for r in conn.execute(f"PRAGMA cur.table_info({table})")}
    return [c for c in main if c in cur]


def restore(backup_file: Path, target: Path, *, carry: bool = True) -> Restored:
    """``watcher restore BACKUP``: put a copy of ``backup_file`` at ``target`` (storage.path),
    with nothing of the previous database beside it. Refused while a process has the database
    open, or if the backup is not an intact watcher database. What the previous database
    knows that a restore must not lose or undo (every address handed out, keys and endpoints
    as they are now, the kill switch) is taken into the copy first (``carry``, see
    :func:`_carry_over`). The previous database and its -wal/-shm are renamed aside, never
    deleted. The backup file itself is left as it is."""
    if not backup_file.is_file():
        raise RestoreError(f"no file at {backup_file}")
    if target.exists() and backup_file.resolve() == target.resolve():
        raise RestoreError("the backup is the database itself")
    wal = backup_file.with_name(backup_file.name + "-wal")
    if wal.exists() and wal.stat().st_size:  # part of its content is there, not in the file
        raise RestoreError(f"{backup_file} has a -wal beside it: restore a file written by watcher backup")
    if in_use(target):
        raise RestoreError(f"{target} is in use (is the daemon running?); stop it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".restoring")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, open(backup_file, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        _check_backup(tmp, backup_file)  # what is put in place, not what may change meanwhile
        if in_use(target):
            raise RestoreError(f"{target} is in use (is the daemon running?); stop it first")
        carried, skipped = _carry_over(target, tmp) if carry and target.exists() else ({}, 0)
        aside = _move_aside(target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Restored(aside=aside, carried=carried, skipped=skipped)
