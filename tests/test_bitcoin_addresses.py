"""The Bitcoin family's addresses and keys against published vectors: BIP173/BIP350 segwit
addresses (the reference implementation's own list), BIP84's derivation vectors, base58
P2PKH/P2SH, and every network's prefixes."""

from __future__ import annotations

import pytest
from bip_utils import Base58Encoder, Hash160

from watcher.config import ConfigTable
from watcher.errors import ConfigError, InvalidAddress
from watcher.keys import Keyring
from watcher_bitcoin import NETWORKS, BitcoinFamily
from watcher_bitcoin.address import from_script, to_script

MNEMONIC = "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about"

# BIP350's test vectors (sipa/bech32 ref/python/tests.py): address -> scriptPubKey
VALID = [
    ("BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4", "0014751e76e8199196d454941c45d1b3a323f1433bd6"),
    ("tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7",
     "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262"),
    ("tb1qqqqqp399et2xygdj5xreqhjjvcmzhxw4aywxecjdzew6hylgvsesrxh6hy",
     "0020000000c4a5cad46221b2a187905e5266362b99d5e91c6ce24d165dab93e86433"),
    ("tb1pqqqqp399et2xygdj5xreqhjjvcmzhxw4aywxecjdzew6hylgvsesf3hn0c",
     "5120000000c4a5cad46221b2a187905e5266362b99d5e91c6ce24d165dab93e86433"),
    ("bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
     "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"),
]
# valid encodings of outputs no wallet treats as standard (future witness versions, odd lengths)
VALID_NOT_STANDARD = [
    "bc1pw508d6qejxtdg4y5r3zarvary0c5xw7kw508d6qejxtdg4y5r3zarvary0c5xw7kt5nd6y",
    "BC1SW50QGDZ25J",
    "bc1zw508d6qejxtdg4y5r3zarvaryvaxxpcs",
]
INVALID = [
    "tc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq5zuyut",
    "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqh2y7hd",
    "tb1z0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqglt7rf",
    "BC1S0XLXVLHEMJA6C4DQV22UAPCTQUPFHLXM9H8Z3K2E72Q4K9HCZ7VQ54WELL",
    "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kemeawh",
    "tb1q0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq24jc47",
    "bc1p38j9r5y49hruaue7wxjce0updqjuyyx0kh56v8s25huc6995vvpql3jow4",
    "BC130XLXVLHEMJA6C4DQV22UAPCTQUPFHLXM9H8Z3K2E72Q4K9HCZ7VQ7ZWS8R",
    "bc1pw5dgrnzv",
    "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7v8n0nx0muaewav253zgeav",
    "BC1QR508D6QEJXTDG4Y5R3ZARVARYV98GJ9P",
    "tb1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq47Zagq",
    "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7v07qwwzcrf",
    "tb1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vpggkg4j",
    "bc1gmk9yu",
]


def net_of(address: str):
    return NETWORKS["btc-testnet" if address.lower().startswith("tb1") else "btc"]


@pytest.mark.parametrize("address,script", VALID)
def test_bip350_valid_addresses_are_their_scripts_and_back(address, script):
    net = net_of(address)
    assert to_script(net, address).hex() == script
    assert from_script(net, bytes.fromhex(script)) == address.lower()


@pytest.mark.parametrize("address", VALID_NOT_STANDARD)
def test_valid_but_non_standard_segwit_outputs_are_refused(address):
    with pytest.raises(InvalidAddress, match="not a standard output"):
        to_script(net_of(address), address)


@pytest.mark.parametrize("address", INVALID)
def test_bip350_invalid_addresses_are_refused_on_both_networks(address):
    for net in (NETWORKS["btc"], NETWORKS["btc-testnet"]):
        with pytest.raises(InvalidAddress):
            to_script(net, address)


def test_base58_p2pkh_and_p2sh_on_every_network():
    # the genesis block's coinbase pays 1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa
    genesis = "76a91462e907b15cbf27d5425399ebf6f0fb50ebb88f1888ac"
    assert to_script(NETWORKS["btc"], "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa").hex() == genesis
    assert from_script(NETWORKS["btc"], bytes.fromhex(genesis)) == "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa"
    h = Hash160.QuickDigest(b"\x02" + bytes(32))
    for net in NETWORKS.values():
        p2pkh = Base58Encoder.CheckEncode(bytes([net.p2pkh]) + h)
        assert to_script(net, p2pkh).hex() == "76a914" + h.hex() + "88ac"
        for version in net.p2sh:  # Litecoin still reads the older P2SH prefix; it writes its own
            p2sh = Base58Encoder.CheckEncode(bytes([version]) + h)
            assert to_script(net, p2sh).hex() == "a914" + h.hex() + "87"
            assert from_script(net, to_script(net, p2sh)) == Base58Encoder.CheckEncode(bytes([net.p2sh[0]]) + h)
    with pytest.raises(InvalidAddress, match="another network"):
        to_script(NETWORKS["btc"], Base58Encoder.CheckEncode(bytes([NETWORKS["ltc"].p2pkh]) + h))
    with pytest.raises(InvalidAddress, match="not a ltc address"):
        to_script(NETWORKS["ltc"], "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4")
    with pytest.raises(InvalidAddress, match="mixed"):
        to_script(NETWORKS["btc"], "bc1qW508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4")
    assert from_script(NETWORKS["btc"], bytes.fromhex("6a0401020304")) is None  # OP_RETURN


def spec(network: str, **keys):
    return BitcoinFamily().configure(ConfigTable({"network": network, **keys}, "chains[0]"))


def test_bip84_deposit_addresses_match_the_bip_and_other_wallets():
    k = Keyring.from_mnemonic(MNEMONIC)
    btc = spec("btc")
    assert btc.keys.deposit_path == "m/84'/0'/0'" and btc.keys.hot_path == "m/84'/0'/1'" and btc.keys.change
    path = btc.keys.deposit_path
    # BIP84's own vectors (the mnemonic above, account 0)
    assert k.account_xpub(path).startswith("xpub")  # the same key as BIP84's zpub6rFR7y4Q2Aij...
    assert btc.address_from_public_key(k.public_key(path, 0)) == "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"
    assert btc.address_from_public_key(k.public_key(path, 1)) == "bc1qnjg0jd8228aq7egyzacy8cys3knf9xvrerkf9g"
    assert btc.address_from_public_key(k.public_key(path, 0, change=1)) == "bc1q8c6fshw2dlwun7ekn9qwf37cu2rn755upcp6el"
    # watch-only from BIP84's zpub gives the same addresses
    zpub = "zpub6rFR7y4Q2AijBEqTUquhVz398htDFrtymD9xYYfG1m4wAcvPhXNfE3EfH1r1ADqtfSdVCToUG868RvUUkgDKf31mGDtKsAYz2oz2AGutZYs"
    watch = Keyring.from_xpub(zpub, account=path)
    assert btc.address_from_public_key(watch.public_key(path, 0)) == "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"
    ltc = spec("ltc")  # coin type 2; the address bip-utils' own Bip84 gives for the same seed
    assert ltc.address_from_public_key(k.public_key(ltc.keys.deposit_path, 0)) == "ltc1qjmxnz78nmc8nq77wuxh25n2es7rzm5c2rkk4wh"
    # the test networks share coin type 1: one key, each network's encoding
    rltc, tb = spec("ltc-regtest"), spec("btc-testnet")
    assert rltc.keys.deposit_path == tb.keys.deposit_path == "m/84'/1'/0'"
    pub = k.public_key("m/84'/1'/0'", 0)
    assert rltc.address_from_public_key(pub).startswith("rltc1q") and tb.address_from_public_key(pub).startswith("tb1q")


def test_family_options_defaults_and_mistakes():
    btc, ltc = spec("btc"), spec("ltc-regtest")
    assert (btc.native_symbol, btc.native_decimals, btc.options.fee_bump) == ("BTC", 8, "rbf")
    assert (ltc.native_symbol, ltc.options.fee_bump, ltc.options.mempool, ltc.options.rpc_concurrency) == (
        "LTC", "cpfp", True, 8)
    s = spec("ltc", fee_rate_min=1.5, fee_rate_max="80", fee_bump="rbf", sweep={"max_inputs": 50}, mempool=False,
             rpc_concurrency=3)
    assert (s.options.fee_rate_min, s.options.fee_rate_max, s.options.fee_bump, s.options.max_inputs,
            s.options.mempool, s.options.rpc_concurrency) == (1_500, 80_000, "rbf", 50, False, 3)
    for keys, message in [({"network": "doge"}, "must be one of"),
                          ({"network": "btc", "assets": [{"symbol": "X"}]}, "no tokens"),
                          ({"network": "btc", "fee_rate_min": "0.0001"}, "at most 3 decimals"),
                          ({"network": "btc", "fee_rate_min": 5, "fee_rate_max": 2}, "at least fee_rate_min"),
                          ({"network": "btc", "fee_bump": "both"}, "must be one of"),
                          ({"network": "btc", "rpc_concurrency": 0}, "must be between 1 and 64")]:
        with pytest.raises(ConfigError, match=message):
            BitcoinFamily().configure(ConfigTable(keys, "chains[0]"))


def test_bip21_payment_uris_and_txids():
    from watcher.config import AssetConfig

    btc, ltc = spec("btc"), spec("ltc")
    coin = AssetConfig("BTC", 8)
    assert btc.payment_uri(None, "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu", coin, 150_000_000, {}) == \
        "bitcoin:bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu?amount=1.5"
    assert ltc.payment_uri(None, "ltc1qjmxnz78nmc8nq77wuxh25n2es7rzm5c2rkk4wh", AssetConfig("LTC", 8), 1, {}) == \
        "litecoin:ltc1qjmxnz78nmc8nq77wuxh25n2es7rzm5c2rkk4wh?amount=0.00000001"
    assert btc.validate_txid("AB" * 32) == "ab" * 32
    with pytest.raises(Exception, match="64 hex"):
        btc.validate_txid("0x" + "ab" * 31)
