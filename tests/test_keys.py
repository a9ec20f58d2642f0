"""BIP44 derivation, watch-only xpubs, and the guard against running with another seed."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from tests.support.daemon import TEST_MNEMONIC, chain_entry, write_config
from tests.support.evm import ANVIL_MNEMONIC
from watcher.daemon import Daemon
from watcher.errors import KeyMaterialError, WatchOnlyError
from watcher.keys import Keyring, new_mnemonic
from watcher_evm.family import EVM_KEYS, EvmOptions, EvmSpec

EVM = EvmSpec(EvmOptions())
DEPOSITS, HOT = EVM_KEYS.deposit_path, EVM_KEYS.hot_path


def addr(keyring: Keyring, i: int) -> str:
    return EVM.display_address(EVM.address_from_public_key(keyring.public_key(DEPOSITS, i)))


def test_bip44_path_matches_standard_wallets():
    # anvil/hardhat derive their dev accounts from this mnemonic at m/44'/60'/0'/0/i
    k = Keyring.from_mnemonic(ANVIL_MNEMONIC)
    assert addr(k, 0) == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    assert addr(k, 1) == "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    assert addr(k, 9) == "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
    # and the private key is the well-known one of account 0
    assert k.private_key(DEPOSITS, 0).hex() == "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def test_watch_only_xpub_derives_the_same_addresses():
    full = Keyring.from_mnemonic(TEST_MNEMONIC)
    xpub = full.account_xpub(DEPOSITS)
    assert xpub.startswith("xpub")
    watch = Keyring.from_xpub(xpub)
    assert watch.watch_only and not full.watch_only
    assert [addr(watch, i) for i in range(5)] == [addr(full, i) for i in range(5)]
    with pytest.raises(WatchOnlyError):
        watch.private_key(DEPOSITS, 0)
    with pytest.raises(WatchOnlyError):
        watch.public_key(HOT, 0)  # the hot wallet is not derivable from the deposit xpub


def test_bad_key_material_is_refused_without_echoing_it():
    with pytest.raises(KeyMaterialError) as e:
        Keyring.from_mnemonic("legal winner thank year wave sausage worth useful legal winner thank thank")
    assert "winner" not in str(e.value)
    xprv = Keyring.from_mnemonic(TEST_MNEMONIC)._root.DerivePath("m/44'/60'/0'").PrivateKey().ToExtended()
    with pytest.raises(KeyMaterialError, match="PRIVATE"):
        Keyring.from_xpub(xprv)
    root_xpub = Keyring.from_mnemonic(TEST_MNEMONIC)._root.PublicKey().ToExtended()
    with pytest.raises(KeyMaterialError, match="depth 3"):
        Keyring.from_xpub(root_xpub)
    with pytest.raises(KeyMaterialError, match="not a valid extended public key"):
        Keyring.from_xpub("xpub-nonsense")
    assert "watch-only" in repr(Keyring.from_xpub(Keyring.from_mnemonic(TEST_MNEMONIC).account_xpub(DEPOSITS)))


def test_new_mnemonic_is_valid_and_random():
    a, b = new_mnemonic(), new_mnemonic(12)
    assert len(a.split()) == 24 and len(b.split()) == 12 and a != new_mnemonic()
    Keyring.from_mnemonic(a)


def test_same_label_same_address_and_derivation_state_persists(tmp_path):
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9"), chain_entry("other", "http://127.0.0.1:9")])
    d = Daemon.open(cfg, registry=CollectorRegistry())
    try:
        a1, created1 = d.store.addresses.deposit_address("devnet", "alice")
        b1, _ = d.store.addresses.deposit_address("devnet", "bob")
        a2, created2 = d.store.addresses.deposit_address("devnet", "alice")
        a_other, _ = d.store.addresses.deposit_address("other", "alice")
        assert created1 and not created2 and a1 == a2
        assert a1.address != b1.address and (a1.derivation_index, b1.derivation_index) == (0, 1)
        assert a_other.address == a1.address  # the label's index is shared by every EVM chain
    finally:
        d.close()
    d = Daemon.open(cfg, registry=CollectorRegistry())
    try:
        c, _ = d.store.addresses.deposit_address("devnet", "carol")
        assert c.derivation_index == 2  # indexes are never reused after a restart
        assert d.store.addresses.deposit_address("devnet", "alice")[0].address == a1.address
        k = Keyring.from_mnemonic(TEST_MNEMONIC)
        assert c.address == EVM.address_from_public_key(k.public_key(DEPOSITS, 2))
    finally:
        d.close()


def test_database_refuses_another_seed(tmp_path):
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9")])
    Daemon.open(cfg, registry=CollectorRegistry()).close()
    (tmp_path / "seed.txt").write_text(ANVIL_MNEMONIC)
    with pytest.raises(Exception, match="configured keys do not match this database"):
        Daemon.open(cfg, registry=CollectorRegistry())
