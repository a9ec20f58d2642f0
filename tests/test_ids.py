"""Object ids: the time part sorts, the random part is 80 bits in Crockford base32."""

from __future__ import annotations

import os

from watcher import ids


def test_an_id_is_the_time_then_80_random_bits_in_crockford_base32(monkeypatch):
    monkeypatch.setattr(os, "urandom", lambda n: bytes(range(1, n + 1)))
    made = ids.new_id("tr", now_ms=1_700_000_000_123)
    prefix, body = made.split("_")
    assert prefix == "tr" and len(body) == 26
    assert body[:10] == ids._b32(1_700_000_000_123, 10)
    # the same 80 bits, digit by digit (the slow, obvious way)
    assert body[10:] == ids._b32(int.from_bytes(bytes(range(1, 11)), "big"), 16)
    monkeypatch.setattr(os, "urandom", lambda n: b"\xff" * n)
    assert ids.new_id("tr", now_ms=1)[13:] == "Z" * 16
    for ms in (0, 1, 1023, 1024, 2**47, 2**48 - 1):  # the time part, pair by pair, at its edges
        assert ids.new_id("tr", now_ms=ms)[3:13] == ids._b32(ms, 10)


def test_ids_made_together_are_each_their_time_then_their_own_ten_random_bytes(monkeypatch):
    monkeypatch.setattr(os, "urandom", lambda n: bytes(i % 256 for i in range(n)))
    times = [5, 5, 1_700_000_000_123, 2**48 - 1]
    made = ids.new_ids("evt", times)
    assert [m[:4] for m in made] == ["evt_"] * 4
    assert [m[4:14] for m in made] == [ids._b32(ms, 10) for ms in times]
    assert [m[14:] for m in made] == [ids._b32(int.from_bytes(bytes(range(10 * i, 10 * i + 10)), "big"), 16)
                                      for i in range(4)]
    monkeypatch.undo()
    assert len(set(ids.new_ids("evt", [7] * 1000))) == 1000


def test_the_random_part_is_every_bit_of_its_bytes():
    for data in [bytes(10), b"\xff" * 10, *(os.urandom(10) for _ in range(2000))]:
        assert ids._digits80(data) == ids._b32(int.from_bytes(data, "big"), 16)


def test_ids_sort_by_time_and_do_not_repeat():
    made = [ids.new_id("evt", now_ms=ms) for ms in (5, 5, 6, 1_000, 2**47)]
    assert sorted(made[2:]) == made[2:] and made[0] < made[2]
    assert len({ids.new_id("evt", now_ms=7) for _ in range(1000)}) == 1000


def test_event_data_is_stored_as_json_dumps_writes_it():
    """orjson writes the common case; the text must be exactly json.dumps's (compact, keys
    sorted, ASCII), non-ASCII labels, control characters and huge integers included."""
    import json

    from watcher.store.events import data_text

    cases = [
        {"b": 1, "a": [None, True, False, -3], "c": {"z": "x", "y": ""}},
        {"label": "café ☕ 𝄞", "order_id": "Ω-1"},
        {"memo": "tab\tnew\nline\r\x00\x01\x1f\x7f quote\" back\\ slash/ <>&"},
        {"amount": 2**64 + 1, "neg": -(2**70)},
        {1: "int keys", 10: "sorted as text"},
        {"nested": [{"k": [1, [2, [3, {"deep": "\u2028"}]]]}], "empty": {}, "list": []},
    ]
    for data in cases:
        assert data_text(data) == json.dumps(data, separators=(",", ":"), sort_keys=True), data


def test_event_data_json_cannot_write_is_refused_as_json_refuses_it():
    import datetime

    import pytest

    from watcher.store.events import data_text

    with pytest.raises(TypeError):
        data_text({"at": datetime.datetime(2026, 11, 27)})
