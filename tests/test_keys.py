"""BIP44 derivation, watch-only xpubs, and the guard against running with another seed."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from tests.support.daemon import TEST_MNEMONIC, chain_entry, write_config
from tests.support.evm import ANVIL_MNEMONIC
from watcher.config import KeysConfig
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


def _reversion(extended: str, version: str) -> str:
    """The same extended key under another SLIP-132 version (what a wallet exports)."""
    from bip_utils import Base58Decoder, Base58Encoder

    return Base58Encoder.CheckEncode(bytes.fromhex(version) + Base58Decoder.CheckDecode(extended)[4:])


@pytest.mark.parametrize("path,version", [("m/84'/0'/0'", "04b24746"),  # zpub
                                          ("m/84'/1'/0'", "045f1cf6"),  # vpub
                                          ("m/49'/0'/0'", "049d7cb2"),  # ypub
                                          ("m/44'/2'/0'", "019da462"),  # Ltub
                                          ("m/44'/1'/0'", "043587cf")])  # tpub
def test_watch_only_account_keys_by_path_in_any_slip132_version(path, version):
    full = Keyring.from_mnemonic(TEST_MNEMONIC)
    exported = _reversion(full.account_xpub(path), version)
    watch = Keyring.from_config(KeysConfig(accounts={path: exported}))
    assert watch.watch_only and watch.has_account(path) and not watch.has_account(DEPOSITS)
    assert [watch.public_key(path, i, change=c) for i in range(3) for c in (0, 1)] == \
           [full.public_key(path, i, change=c) for i in range(3) for c in (0, 1)]
    with pytest.raises(WatchOnlyError, match="no key for account m/44'/60'/0'"):
        watch.public_key(DEPOSITS, 0)


def test_private_and_unknown_extended_keys_are_refused_by_path_without_echoing_them():
    full = Keyring.from_mnemonic(TEST_MNEMONIC)
    zprv = _reversion(full._root.DerivePath("m/84'/0'/0'").PrivateKey().ToExtended(), "04b2430c")
    with pytest.raises(KeyMaterialError, match=r"keys.accounts.m/84'/0'/0': .*PRIVATE") as e:
        Keyring.from_config(KeysConfig(accounts={"m/84'/0'/0'": zprv}))
    assert zprv not in str(e.value)
    odd = _reversion(full.account_xpub("m/84'/0'/0'"), "deadbeef")
    with pytest.raises(KeyMaterialError, match="unknown version deadbeef"):
        Keyring.from_config(KeysConfig(accounts={"m/84'/0'/0'": odd}))


def test_watch_only_config_by_path_and_the_chain_it_must_cover(tmp_path):
    from watcher.config import load_config
    from watcher.errors import ConfigError
    from watcher.plugins import chain_families, make_plugin_manager

    families = chain_families(make_plugin_manager())
    xpub = Keyring.from_mnemonic(TEST_MNEMONIC).account_xpub(DEPOSITS)
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9")])
    text = cfg.read_text().replace('mnemonic_file = "seed.txt"', f'accounts = {{ "{DEPOSITS}" = "{xpub}" }}')
    cfg.write_text(text)
    d = Daemon.open(cfg, registry=CollectorRegistry())
    try:
        a, _ = d.store.addresses.deposit_address("devnet", "alice")
        assert a.address == EVM.address_from_public_key(Keyring.from_mnemonic(TEST_MNEMONIC).public_key(DEPOSITS, 0))
        assert d.store.hot_wallet("devnet") is None
    finally:
        d.close()
    cfg.write_text(text.replace(DEPOSITS, "m/44'/61'/0'"))  # an account no configured chain derives from
    with pytest.raises(KeyMaterialError, match=r"chain 'devnet' derives its addresses from account m/44'/60'/0'"):
        Daemon.open(cfg, registry=CollectorRegistry())
    cfg.write_text(text.replace(DEPOSITS, "m/44/60/0"))
    with pytest.raises(ConfigError, match=r"keys.accounts.m/44/60/0: .* is not an account path"):
        load_config(cfg, families)
    cfg.write_text(text.replace("[keys]", '[keys]\nmnemonic_file = "seed.txt"'))
    with pytest.raises(ConfigError, match=r"keys\.accounts: set either mnemonic_file or accounts, not both"):
        load_config(cfg, families)


def test_a_database_of_the_previous_schema_upgrades_with_its_wallet_and_derivations(tmp_path):
    """m005/m006 move the EVM columns into the wallet's details and state, and derivations to
    account paths: a database written by the previous release opens, keeps its addresses and
    its hot wallet's nonce, and still refuses another seed."""
    import json
    import sqlite3

    import sqlite_utils

    from watcher.store.schema import migrations

    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9")])
    k = Keyring.from_mnemonic(TEST_MNEMONIC)
    first = EVM.address_from_public_key(k.public_key(DEPOSITS, 0))
    second = EVM.address_from_public_key(k.public_key(DEPOSITS, 1))
    hot = EVM.address_from_public_key(k.public_key(HOT, 0))
    conn = sqlite3.connect(tmp_path / "watcher.db", isolation_level=None)
    migrations.apply(sqlite_utils.Database(conn), stop_before="m005_family_wallets")
    conn.executescript(f"""
        INSERT INTO meta VALUES ('keyring.coin60', '{first}');
        INSERT INTO derivations VALUES (60, 0, 'label', 'alice', 1), (60, 1, 'invoice', 'inv_1', 2);
        INSERT INTO addresses VALUES ('devnet', '{first}', 'deposit', 'alice', NULL, 0, 1);
        INSERT INTO hot_wallets VALUES ('devnet', '{hot}', 7, 3);
        INSERT INTO payouts (id, chain, asset, amount, to_address, idempotency_key, request_hash, status, txid,
            nonce, created_at, updated_at) VALUES ('po_1', 'devnet', 'ETH', '5', '0x000000000000000000000000000000000000beef', 'k', 'h', 'completed',
            '0xaa', 6, 4, 4);
        INSERT INTO chain_txs (chain, purpose, ref_id, sender, nonce, txid, raw, amount, asset, gas_limit, max_fee,
            priority_fee, status, block_number, created_at, updated_at) VALUES ('devnet', 'payout', 'po_1', '{hot}',
            6, '0xaa', '0x02', '5', 'ETH', 21000, '{10**20}', '1000000000', 'mined', 9, 5, 5);
    """)
    conn.close()
    d = Daemon.open(cfg, registry=CollectorRegistry())
    try:
        assert d.store.chaintxs.wallet_state("devnet") == ({"next_nonce": 7}, 1)
        (tx,) = d.store.chaintxs.for_ref("po_1", "payout")
        assert (tx.conflict, tx.to, tx.fee_limit) == (f"{hot}/6", "0x" + "0" * 36 + "beef", 21000 * 10**20)
        assert tx.details == {"nonce": 6, "gas_limit": 21000, "max_fee": 10**20, "priority_fee": 10**9}
        payout = d.views.payout("po_1")
        assert payout["nonce"] == 6 and payout["transactions"][0]["max_fee_per_gas"] == str(10**20)
        assert d.store.addresses.deposit_address("devnet", "alice")[0].address == first
        assert d.store.addresses.deposit_address("devnet", "bob")[0].address != second  # index 1 stays used
        assert d.store.db.get_meta(f"keyring.{DEPOSITS}") == k.public_key(DEPOSITS, 0).hex()
        assert json.loads(d.store.db.get_meta("paused") or "[]") == []
    finally:
        d.close()
    (tmp_path / "seed.txt").write_text(ANVIL_MNEMONIC)
    with pytest.raises(Exception, match="configured keys do not match this database"):
        Daemon.open(cfg, registry=CollectorRegistry())


def test_a_passphrase_is_used_exactly_and_one_with_spaces_at_an_end_is_refused(tmp_path):
    """BIP39 uses the passphrase exactly as given: ``"pass "`` and ``"pass"`` are two seeds,
    two sets of addresses. The file's text was stripped, so a passphrase with a space at an
    end gave addresses another wallet given the same words and passphrase does not find.
    One final line break is not part of it; spaces at either end are refused, with why
    (watcher used to leave them out: which one the addresses were made with, only the
    operator knows)."""
    words = tmp_path / "seed.txt"
    words.write_text(TEST_MNEMONIC + "\n")
    words.chmod(0o600)
    phrase = tmp_path / "passphrase.txt"
    path = "m/84'/0'/0'"
    for text in ("pass\n", "pass\r\n", "pass"):
        phrase.write_text(text, newline="")
        got = Keyring.from_config(KeysConfig(mnemonic_file=words, passphrase_file=phrase))
        assert got.public_key(path, 0) == Keyring.from_mnemonic(TEST_MNEMONIC, "pass").public_key(path, 0), text
    assert Keyring.from_mnemonic(TEST_MNEMONIC, "pass ").public_key(path, 0) != \
        Keyring.from_mnemonic(TEST_MNEMONIC, "pass").public_key(path, 0)
    for text in ("pass \n", " pass", "pass\n\n"):
        phrase.write_text(text, newline="")
        with pytest.raises(KeyMaterialError, match="spaces or line breaks at its start or end"):
            Keyring.from_config(KeysConfig(mnemonic_file=words, passphrase_file=phrase))

