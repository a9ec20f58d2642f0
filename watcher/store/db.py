"""The SQLite file: one connection, one writer, explicit transactions, WAL.

All writes go through :meth:`Database.transaction` (``BEGIN IMMEDIATE`` ... ``COMMIT``). A
transaction never spans an ``await``: the daemon's tasks share this connection, and Trio
only switches tasks at awaits, so a transaction is never interleaved with another task's
statements, and a cancelled task can never leave one half-written. Work that must happen
only if the transaction commits (metrics, waking the webhook dispatcher) is registered with
:meth:`Database.after_commit`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from ..errors import WatcherError
from .schema import migrations

log = logging.getLogger(__name__)


class StorageError(WatcherError):
    """The database could not be opened or written."""

    code = "storage_error"


def storage_trouble(e: BaseException) -> str | None:
    """What an SQLite error says about the *file*: ``locked`` (another process holds the
    write lock past the busy timeout), ``full`` (disk or size limit), ``io`` (read-only,
    I/O error, cannot open), or None for errors that are bugs (bad SQL, constraint
    violations). The first three are conditions an operator fixes while the daemon waits."""
    if not isinstance(e, sqlite3.DatabaseError) or isinstance(e, sqlite3.IntegrityError):
        return None
    name = getattr(e, "sqlite_errorname", "") or ""
    text = str(e).lower()
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return "locked"
    if name.startswith("SQLITE_FULL") or "full" in text:
        return "full"
    if name.startswith(("SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")) or "disk i/o" in text:
        return "io"
    return None


def _private_files(path: Path) -> None:
    """The database holds key hashes, sealed secrets and every payment: it is created 0600
    whatever the umask (SQLite gives its -wal and -shm files the main file's mode), and an
    existing file and its -wal/-shm readable by others are made 0600."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise StorageError(f"storage.path: cannot create {str(path)!r}: {e.strerror}") from None
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode & 0o077:
                p.chmod(mode & 0o700)
                log.warning("%s was readable by others (mode %o); made it %o", p, mode, mode & 0o700)
        except FileNotFoundError:
            continue
        except OSError as e:  # another user's file: say so, never fail the start for it
            log.warning("cannot restrict the mode of %s: %s", p, e.strerror)


class Database:
    #: Set while the last write failed for a storage reason (see :func:`storage_trouble`);
    #: cleared by the next commit. /readyz reports it.
    trouble: str | None = None

    def __init__(self, path: Path | str, *, synchronous: str = "full"):
        self.path = Path(path) if str(path) != ":memory:" else path
        if isinstance(self.path, Path):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"storage.path: cannot create {str(self.path.parent)!r}: {e.strerror}") from None
        if isinstance(self.path, Path):
            _private_files(self.path)
        try:
            self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StorageError(f"storage.path: cannot open {str(path)!r}: {e}") from None
        self.conn.row_factory = sqlite3.Row
        c = self.conn
        c.execute("PRAGMA busy_timeout = 10000")
        mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and str(path) != ":memory:":
            log.warning("SQLite refused WAL mode (got %s); concurrent readers will block writes", mode)
        c.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        c.execute("PRAGMA foreign_keys = ON")
        self._in_tx = False
        self.tx_serial = 0  # which transaction this is (a cache valid for one transaction keys on it)
        self._after: list[Callable[[], None]] = []
        self._before: list[Callable[[], None]] = []  # before_commit
        self._counts: dict[Any, float] = {}  # metric children to increment at commit (count_after_commit)

    def set_busy_timeout(self, ms: int) -> None:
        """How long a statement waits for another process's lock. The daemon keeps this
        short: SQLite waits by blocking the thread, which would freeze every Trio task; the
        daemon's tasks instead back off and retry on ``database is locked``."""
        self.conn.execute(f"PRAGMA busy_timeout = {int(ms)}")

    def migrate(self) -> list[str]:
        """Apply pending schema migrations, each atomically; returns their names."""
        db = sqlite_utils.Database(self.conn)
        pending = [m.name for m in migrations.pending(db)]
        migrations.apply(db)
        return pending

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA optimize")
        self.conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``with db.transaction() as conn:`` — everything inside commits together or not at
        all. Nested use joins the outer transaction."""
        if self._in_tx:
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        self.tx_serial += 1
        try:
            yield self.conn
            while self._before:  # (one may add another)
                self._before.pop(0)()
        except BaseException:
            self._in_tx = False
            self._after.clear()
            self._before.clear()
            self._counts.clear()
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self._in_tx = False
            self._after.clear()
            self._counts.clear()
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        self._in_tx = False
        self.trouble = None
        counts, self._counts = self._counts, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        callbacks, self._after = self._after, []
        for fn in callbacks:
            fn()

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def before_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at the end of the current transaction, inside it, just before it
        commits (an error it raises rolls the transaction back)."""
        assert self._in_tx, "before_commit outside a transaction"
        self._before.append(fn)

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the current transaction has committed (dropped on rollback)."""
        if not self._in_tx:
            fn()
        else:
            self._after.append(fn)

    def count_after_commit(self, counter: Any, amount: float = 1) -> None:
        """Add ``amount`` to ``counter`` (a metric's child) once the current transaction has
        committed (nothing on rollback). What a transaction counts is added up and each
        counter incremented once: a catch-up counts hundreds of transfers and events a
        transaction, and an increment takes the metric's lock."""
        if not self._in_tx:
            counter.inc(amount)
        else:
            self._counts[counter] = self._counts.get(counter, 0) + amount

    def query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, params).fetchone()

    def scalar(self, sql: str, params: Any = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def get_meta(self, key: str) -> str | None:
        return self.scalar("SELECT value FROM meta WHERE key = ?", (key,))

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
