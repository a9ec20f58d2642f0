"""The outbox. A state change and the event that reports it are written in the same
transaction; the webhook dispatcher and plugin sinks read them from here afterwards."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from ..ids import new_id, new_ids

if TYPE_CHECKING:
    from . import Store


def data_text(data: dict[str, Any]) -> str:
    """How an event's data is stored: compact JSON, keys sorted, ASCII (what
    ``json.dumps(data, separators=(",", ":"), sort_keys=True)`` gives). orjson writes the
    same text several times faster for the common case; anything it would write otherwise
    (non-ASCII text and DEL, which it does not escape; an integer beyond 64 bits, which it
    refuses) goes through ``json``."""
    try:
        text = orjson.dumps(data, option=_ORJSON_AS_JSON)
    except TypeError:  # json says what it cannot write, or writes it
        return json.dumps(data, separators=(",", ":"), sort_keys=True)
    if text.isascii() and b"\x7f" not in text:
        return text.decode()
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


# keys sorted; what json cannot write (a dataclass, a datetime) is refused by orjson too
_ORJSON_AS_JSON = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


@dataclass(frozen=True)
class Event:
    seq: int
    id: str
    type: str
    created_at: int  # ms
    chain: str | None
    subject: str | None
    # the data as stored (:func:`data_text`): a sink that forwards events splices it into its
    # message instead of parsing and rendering it again; ``data`` parses it when first asked
    data_json: str = field(repr=False)

    @functools.cached_property
    def data(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.data_json)
        return parsed

    @classmethod
    def from_row(cls, row: Any) -> Event:
        return cls(seq=row["seq"], id=row["id"], type=row["type"], created_at=row["created_at"],
                   chain=row["chain"], subject=row["subject"], data_json=row["data"])


class Outbox:
    def __init__(self, store: Store):
        self.store = store
        self._listeners: list[Callable[[Event], None]] = []
        # queue(): (type, created_at, chain, subject, data), in the transaction of serial _queued_in
        self._queued: list[tuple[str, int, str | None, str | None, dict[str, Any]]] = []
        self._queued_in = -1

    def on_commit(self, fn: Callable[[Event], None]) -> None:
        """Call ``fn(event)`` for every event once its transaction has committed."""
        self._listeners.append(fn)

    def emit(self, type: str, data: dict[str, Any], *, chain: str | None = None, subject: str | None = None,
             webhooks_only: str | None = None) -> Event:
        """Write an event and its webhook deliveries; must be called inside the transaction
        of the change it reports. ``webhooks_only`` sends it to that endpoint only (tests)."""
        db = self.store.db
        assert db.in_transaction, "events are written in the transaction of the change they report"
        if self._queued:
            self.flush()  # those queued before it come before it
        now = self.store.clock.now_ms()
        event_id = new_id("evt", now_ms=now)
        body = data_text(data)
        cur = db.conn.execute(
            "INSERT INTO events (id, type, created_at, chain, subject, data) VALUES (?, ?, ?, ?, ?, ?)",
            (event_id, type, now, chain, subject, body),
        )
        assert cur.lastrowid is not None
        event = Event(seq=cur.lastrowid, id=event_id, type=type, created_at=now, chain=chain,
                      subject=subject, data_json=body)
        event.__dict__["data"] = data  # already parsed: the caller's own dict
        self.store.webhooks.fan_out(event, only=webhooks_only)
        metrics = self.store.metrics
        db.count_after_commit(metrics.child(metrics.events, type))
        for fn in self._listeners:
            db.after_commit(functools.partial(fn, event))
        return event

    def queue(self, type: str, data: dict[str, Any], *, chain: str | None = None, subject: str | None = None) -> None:
        """:meth:`emit`, written with the others queued in the transaction: at its end, or
        before the next event emitted (the outbox's order is the order of the calls). A scan
        catching up reports hundreds of transfers a transaction; written in one statement,
        an event took ~20 µs less CPU than one by one. Only inside a transaction; nothing in
        it may read the outbox in between (``flush`` first), and ``data`` is not to change
        after this call (it is written then)."""
        db = self.store.db
        assert db.in_transaction, "events are written in the transaction of the change they report"
        if self._queued_in != db.tx_serial:  # the first of this transaction (a rolled back one's are gone)
            self._queued, self._queued_in = [], db.tx_serial
            db.before_commit(self.flush)
        self._queued.append((type, self.store.clock.now_ms(), chain, subject, data))

    def flush(self) -> None:
        """Write the events :meth:`queue` holds (see there)."""
        db = self.store.db
        queued, self._queued = self._queued, []
        if not queued or not db.in_transaction or self._queued_in != db.tx_serial:
            return  # (a rolled back transaction's are dropped)
        ids = new_ids("evt", [q[1] for q in queued])
        rows = [(event_id, type, now, chain, subject, data_text(data))
                for event_id, (type, now, chain, subject, data) in zip(ids, queued, strict=True)]
        db.conn.executemany("INSERT INTO events (id, type, created_at, chain, subject, data) VALUES (?, ?, ?, ?, ?, ?)",
                            rows)
        # one statement run once a row: each takes the next seq, so they run up to the last
        # insert's (checked against the first's id: a mismatch would misnumber them all)
        first = db.scalar("SELECT last_insert_rowid()") - len(queued) + 1
        if db.scalar("SELECT id FROM events WHERE seq = ?", (first,)) != ids[0]:
            raise RuntimeError("the events just written are not numbered one after the other")
        fan_out, metrics = self.store.webhooks.fan_out, self.store.metrics
        for seq, ((event_id, type, now, chain, subject, body), (*_, data)) in enumerate(zip(rows, queued, strict=True),
                                                                                   first):
            event = Event(seq=seq, id=event_id, type=type, created_at=now, chain=chain, subject=subject, data_json=body)
            event.__dict__["data"] = data  # already parsed: the caller's own dict
            fan_out(event)
            db.count_after_commit(metrics.child(metrics.events, type))
            for fn in self._listeners:
                db.after_commit(functools.partial(fn, event))

    def list(self, *, after_seq: int = 0, limit: int = 100, types: tuple[str, ...] = (),
             subject: str | None = None) -> list[Event]:
        sql = "SELECT * FROM events WHERE seq > ?"
        params: list[Any] = [after_seq]
        if types:
            sql += f" AND type IN ({','.join('?' * len(types))})"
            params += list(types)
        if subject is not None:
            sql += " AND subject = ?"
            params.append(subject)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        return [Event.from_row(r) for r in self.store.db.query(sql, params)]

    def type_of(self, event_id: str) -> str | None:
        return self.store.db.scalar("SELECT type FROM events WHERE id = ?", (event_id,))

    # --- the durable cursors of plugin sinks (watcher_event implementations) ------------------

    def sink_cursor(self, name: str) -> int:
        """How far the plugin ``name`` has processed the outbox; a plugin seen for the first
        time starts at the end (it is not replayed the history)."""
        seq = self.store.db.scalar("SELECT last_seq FROM sink_cursors WHERE name = ?", (name,))
        if seq is None:
            seq = self.last_seq()
            with self.store.db.transaction() as conn:
                conn.execute("INSERT OR IGNORE INTO sink_cursors (name, last_seq, updated_at) VALUES (?, ?, ?)",
                             (name, seq, self.store.clock.now_ms()))
        return int(seq)

    def init_sink(self, name: str, seq: int = 0) -> bool:
        """Start plugin ``name``'s cursor at ``seq`` (0: the whole outbox) if it has none yet;
        True if this created it."""
        with self.store.db.transaction() as conn:
            cur = conn.execute("INSERT OR IGNORE INTO sink_cursors (name, last_seq, updated_at) VALUES (?, ?, ?)",
                               (name, seq, self.store.clock.now_ms()))
            return cur.rowcount == 1

    def advance_sink(self, name: str, seq: int) -> None:
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE sink_cursors SET last_seq = ?, updated_at = ? WHERE name = ?",
                         (seq, self.store.clock.now_ms(), name))

    def last_seq(self) -> int:
        return self.store.db.scalar("SELECT COALESCE(MAX(seq), 0) FROM events") or 0
