"""kill -9 in the middle of a catch-up, restart: the same transfers and events as a run that
was never interrupted (idempotent crediting, atomic batches)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.support.daemon import DaemonProcess, chain_entry, write_config
from tests.support.evm import Anvil, Token
from watcher.daemon import Daemon

LABELS = [f"user{i}" for i in range(12)]


def build_history(anvil: Anvil, token: Token, addresses: list[str]) -> int:
    """~1,200 blocks with deposits (native and token) to our addresses sprinkled through."""
    payer, other = anvil.accounts[1], anvil.accounts[2]
    token.mint(payer, 10**15)
    anvil.automine(False)
    n = 0
    for round_ in range(40):
        for i, addr in enumerate(addresses):
            if (round_ + i) % 4 == 0:
                anvil.send(payer, addr, 10**15 + round_ * 1000 + i)
                n += 1
            if (round_ + i) % 5 == 0:
                token.transfer(payer, addr, 1_000_000 + round_ * 10 + i)
                n += 1
        anvil.send(payer, other, 12345)  # noise to an address we don't watch
        anvil.mine(1)
        anvil.mine(29)
    anvil.automine(True)
    return n


def scanned(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            row = c.execute("SELECT scanned_number FROM chains WHERE id = 'devnet'").fetchone()
            return -1 if row is None else row[0]
    except sqlite3.Error:
        return -1


def snapshot(db: Path) -> tuple[list[tuple], list[tuple]]:
    with sqlite3.connect(db) as c:
        transfers = sorted(c.execute(
            "SELECT chain, txid, idx, kind, asset, address, sender, amount, block_number, block_hash, status"
            " FROM transfers").fetchall())
        events = c.execute(
            "SELECT e.type, t.txid, t.idx, json_extract(e.data, '$.status'), json_extract(e.data, '$.block_number'),"
            " json_extract(e.data, '$.base_units') FROM events e JOIN transfers t ON t.id = e.subject ORDER BY e.seq"
        ).fetchall()
    return transfers, events


def make_dir(tmp: Path, name: str, anvil: Anvil, token: Token) -> Path:
    cfg = write_config(tmp / name, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)],
                                                batch_size=7, confirmations=3)])
    # same seed, same order: the same addresses in both databases (in this process: a `watcher
    # address new` a label took ~1 s of interpreter start-up, 24 of them half the test's time)
    daemon = Daemon.open(cfg, registry=CollectorRegistry())
    try:
        for label in LABELS:
            daemon.store.addresses.deposit_address("devnet", label)
    finally:
        daemon.close()
    return cfg


def wait_scanned(db: Path, target: int, proc: DaemonProcess, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while scanned(db) < target:
        assert proc.alive(), proc.log()[-3000:]
        assert time.monotonic() < deadline, f"scan stuck at {scanned(db)} < {target}"
        time.sleep(0.01)


@pytest.mark.slow
def test_kill9_mid_catchup_gives_same_result_as_clean_run(tmp_path: Path, anvil: Anvil, token: Token):
    clean_cfg = make_dir(tmp_path, "clean", anvil, token)
    crash_cfg = make_dir(tmp_path, "crash", anvil, token)
    with sqlite3.connect(clean_cfg.parent / "watcher.db") as c:
        addresses = [r[0] for r in c.execute("SELECT address FROM addresses ORDER BY derivation_index")]
    deposits = build_history(anvil, token, addresses)
    head = anvil.head()
    assert head > 1000 and deposits > 100

    clean = DaemonProcess(clean_cfg).start()
    try:
        wait_scanned(clean_cfg.parent / "watcher.db", head, clean)
    finally:
        clean.stop()

    db = crash_cfg.parent / "watcher.db"
    kills = 0
    for target in (150, 420, 700, 960):
        proc = DaemonProcess(crash_cfg).start()
        try:
            wait_scanned(db, target, proc)
            proc.kill()
            kills += 1
        finally:
            proc.stop()
        assert scanned(db) < head, "the catch-up finished before the kill; make the history longer"
    proc = DaemonProcess(crash_cfg).start()
    try:
        wait_scanned(db, head, proc)
    finally:
        proc.stop()
    assert kills == 4

    clean_t, clean_e = snapshot(clean_cfg.parent / "watcher.db")
    crash_t, crash_e = snapshot(db)
    assert len(clean_t) == deposits
    assert all(t[-1] == "confirmed" for t in clean_t)
    assert crash_t == clean_t
    assert crash_e == clean_e
    assert [e[0] for e in crash_e].count("transfer.confirmed") == deposits
