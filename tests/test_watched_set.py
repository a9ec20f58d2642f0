"""The watched set the scan asks (``Addresses.watched``): from memory up to ``[storage]
watched_in_memory`` addresses a chain, from the index above that, and the same answer either
way, whoever added the addresses (this process, a rolled-back transaction, another process)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.support.daemon import chain_entry, write_config
from watcher.core import Core
from watcher_bitcoin.address import to_script
from watcher_bitcoin.networks import NETWORKS

LTC = NETWORKS["ltc-regtest"]
CHAINS = [chain_entry("devnet", "http://127.0.0.1:9"),
          {"id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": "http://127.0.0.1:9"}]
STRANGER = "0x" + "ab" * 20


def _open(tmp_path: Path, limit: int | None = None) -> Core:
    extra = {} if limit is None else {"storage": {"watched_in_memory": limit}}
    return Core.open(write_config(tmp_path, CHAINS, extra=extra), registry=CollectorRegistry())


def _key(chain: str, address: str) -> str | bytes:
    return to_script(LTC, address) if chain == "ltc" else address


@pytest.mark.parametrize("limit", [None, 0, 2], ids=["memory", "index", "over-the-limit"])
def test_the_watched_set_is_the_same_from_memory_and_from_the_index(tmp_path, limit):
    core = _open(tmp_path, limit)
    try:
        addresses = core.store.addresses
        for chain in ("devnet", "ltc"):
            alice = addresses.deposit_address(chain, "alice")[0].address
            stranger: str | bytes = STRANGER if chain == "devnet" else bytes.fromhex("0014" + "00" * 20)
            assert addresses.watched(chain, [_key(chain, alice), stranger]) == {_key(chain, alice)}
            # added after the first lookup (which loaded the set, where it is kept): found at once
            bob = addresses.deposit_address(chain, "bob")[0].address
            ext = addresses.watch_external(chain, "0x" + "cd" * 20 if chain == "devnet"
                                           else "mipcBbFg9gMiCh81Kj8tqqdgoZub1ZJRfn", None)[0].address
            with core.store.db.transaction():
                inv = addresses.derived_for(chain, "invoice", "inv_1", kind="invoice").address
            keys = {_key(chain, a) for a in (alice, bob, ext, inv)}
            assert addresses.watched(chain, [*keys, stranger]) == keys
            assert addresses.watched(chain, []) == set()
        in_memory = {c: addresses._in_memory(c) for c in ("devnet", "ltc")}
        if limit is None:  # both chains' sets in memory (on ltc, its hot wallet's address too)
            assert {c: len(keys or ()) for c, keys in in_memory.items()} == {"devnet": 4, "ltc": 5}
        else:  # nothing in memory: none at all, or more addresses than the limit
            assert in_memory == {"devnet": None, "ltc": None}
    finally:
        core.close()


def test_an_insert_rolled_back_is_never_watched(tmp_path):
    core = _open(tmp_path)
    try:
        addresses = core.store.addresses
        assert addresses.watched("devnet", [STRANGER]) == set()  # the set is in memory now
        with pytest.raises(RuntimeError), core.store.db.transaction():
            gone = addresses.derived_for("devnet", "invoice", "inv_1", kind="invoice").address
            assert addresses.watched("devnet", [gone]) == set()  # not until it commits
            raise RuntimeError("the invoice's other writes failed")
        assert addresses.get("devnet", gone) is None
        assert addresses.watched("devnet", [gone]) == set()
    finally:
        core.close()


def test_addresses_another_process_adds_are_watched_at_the_next_lookup(tmp_path):
    """A ``watcher`` command run beside the daemon writes through its own connection: the
    daemon's set in memory is dropped and loaded again (``PRAGMA data_version`` changed)."""
    core = _open(tmp_path)
    other = sqlite3.connect(core.config.storage.path)
    try:
        assert core.store.addresses.watched("devnet", [STRANGER]) == set()
        with other:
            other.execute("INSERT INTO addresses (chain, address, kind, created_at) VALUES ('devnet', ?, 'external', 0)",
                          (STRANGER,))
        assert core.store.addresses.watched("devnet", [STRANGER]) == {STRANGER}
    finally:
        other.close()
        core.close()
