"""Building and signing Bitcoin-family transactions (watcher_bitcoin.tx): BIP143's published
P2WPKH example, round trips through our own raw-transaction reader and embit's, the vsize
estimate against the real size, and a real Litecoin Core regtest node accepting, relaying and
confirming what we sign, refusing a wrong key before broadcast and judging dust exactly as
:func:`dust_threshold` does."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import coincurve
import pytest
from embit.script import Witness
from embit.transaction import Transaction

from tests.support.litecoin import COIN, Litecoind
from watcher_bitcoin import rawblock
from watcher_bitcoin.address import p2wpkh, to_script
from watcher_bitcoin.networks import NETWORKS
from watcher_bitcoin.tx import (
    P2WPKH_INPUT_VSIZE,
    Coin,
    Output,
    UnsignedTx,
    build,
    default_dust_relay_fee,
    dust_threshold,
    fee_for,
    input_vsize,
    output_vsize,
    sighash,
    sign,
    sign_input,
    tx_vsize,
    txid,
)

LTC = NETWORKS["ltc-regtest"]


def secret_of(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def public_key(secret: bytes) -> bytes:
    return coincurve.PrivateKey(secret).public_key.format(compressed=True)


def p2wpkh_script(secret: bytes) -> bytes:
    return to_script(LTC, p2wpkh(LTC, public_key(secret)))


def p2tr_script(label: str) -> bytes:
    """A P2TR output script (OP_1 <32-byte x-only key>); nobody needs to spend it."""
    return b"\x51\x20" + public_key(secret_of(label))[1:]


def sizes(raw: bytes) -> tuple[int, int]:
    """(actual vsize, base size) of a serialized SegWit transaction, measured by embit."""
    tx = Transaction.parse(raw)
    for vin in tx.vin:
        vin.witness = Witness([])
    base = len(tx.serialize())
    return -(-(3 * base + len(raw)) // 4), base


# --- BIP143 -------------------------------------------------------------------------------

# bips/bip-0143.mediawiki, "Native P2WPKH": input 0 is a P2PK coin, input 1 the P2WPKH coin
BIP143_UNSIGNED = (
    "0100000002fff7f7881a8099afa6940d42d1e7f6362bec38171ea3edf433541db4e4ad969f0000000000eeffffff"
    "ef51e1b804cc89d182d279655c3aa89e815b1b309fe287d9b2b55d57b90ec68a0100000000ffffffff02202cb206"
    "000000001976a9148280b37df378db99f66f85c95a783a76ac7a6d5988ac9093510d000000001976a9143bde42db"
    "ee7e4dbe6a21b2d50ce2f0167faa815988ac11000000")
BIP143_SIGHASH = "c37af31116d1b27caf68aae9e3ac82f1477929014d5b917657d0eb49478cb670"
BIP143_SECRET = "619c335025c7f4012e556c2a58b2506e30b8511b53ade95ea316fd8c3286feb9"
BIP143_PUBKEY = "025476c2e83188368da1ff3e292e7acafcdb3566bb0ad253f62fc70f07aeee6357"
BIP143_SIGNATURE = (
    "304402203609e17b84f6a7d30c80bfa610b5b4542f32a8a0d5447a12fb1366d7f01cc44a0220573a954c451833"
    "1561406f90300e8f3358f51928d43c212a8caed02de67eebee01")


def bip143_unsigned() -> UnsignedTx:
    def display(internal: str) -> str:  # the tx holds prevout hashes in internal byte order
        return bytes.fromhex(internal)[::-1].hex()

    p2pk = bytes.fromhex("2103c9f4836b9a4f77fc0d81f7bcb01b7f1b35916864b9476c241ce9fc198bd25432ac")
    return UnsignedTx(
        coins=(
            Coin(display("fff7f7881a8099afa6940d42d1e7f6362bec38171ea3edf433541db4e4ad969f"), 0,
                 625_000_000, p2pk),
            Coin(display("ef51e1b804cc89d182d279655c3aa89e815b1b309fe287d9b2b55d57b90ec68a"), 1,
                 600_000_000, bytes.fromhex("00141d0f172a0ecb48aee1be1f2687d2963ae33f71a1")),
        ),
        outputs=(
            Output(bytes.fromhex("76a9148280b37df378db99f66f85c95a783a76ac7a6d5988ac"), 112_340_000),
            Output(bytes.fromhex("76a9143bde42dbee7e4dbe6a21b2d50ce2f0167faa815988ac"), 223_450_000),
        ),
        version=1, locktime=17, sequences=(0xFFFFFFEE, 0xFFFFFFFF))


def test_bip143_native_p2wpkh_sighash_and_signature():
    unsigned = bip143_unsigned()
    assert unsigned.serialize().hex() == BIP143_UNSIGNED
    assert sighash(unsigned, 1).hex() == BIP143_SIGHASH
    signature, key = sign_input(unsigned, 1, bytes.fromhex(BIP143_SECRET))
    assert signature.hex() == BIP143_SIGNATURE  # RFC6979, low S, SIGHASH_ALL appended
    assert key.hex() == BIP143_PUBKEY
    with pytest.raises(ValueError, match="not P2WPKH"):
        sighash(unsigned, 0)  # the P2PK coin is not ours to sign
    with pytest.raises(ValueError, match="not the key"):
        sign_input(unsigned, 1, bytes.fromhex("bbc27228ddcb9209d7fd6f36b02f7dfa6252af40bb2f1cbc7a557da8027ff866"))


# --- offline: round trips, sizes, fees, dust -----------------------------------------------

@pytest.mark.parametrize("n_inputs", [1, 2, 3, 4, 5])
def test_round_trip_and_vsize_estimate(n_inputs: int):
    secrets = [secret_of(f"round trip {n_inputs} {i}") for i in range(n_inputs)]
    coins = [Coin(hashlib.sha256(s).hexdigest(), i, 1_000_000 + i, p2wpkh_script(s), key_path=f"m/{i}")
             for i, s in enumerate(secrets)]
    outputs = [Output(p2tr_script("to"), 700_000), Output(bytes.fromhex("a914" + "11" * 20 + "87"), 5_000),
               Output(bytes.fromhex("76a914" + "22" * 20 + "88ac"), 6_000), Output(coins[0].script, 12_345)]
    unsigned = build(coins, outputs, locktime=1234)
    raw = sign(unsigned, secrets)

    assert raw[4:6] == b"\x00\x01"  # SegWit marker and flag
    parsed = rawblock.tx_outputs(raw)
    assert [(o.vout, o.script, o.value) for o in parsed] == [(i, o.script, o.value) for i, o in enumerate(outputs)]
    embit_tx = Transaction.parse(raw)
    assert txid(raw) == rawblock.txid(raw) == embit_tx.txid().hex() == unsigned.txid == parsed[0].txid
    assert embit_tx.version == 2 and embit_tx.locktime == 1234
    assert [v.sequence for v in embit_tx.vin] == [0xFFFFFFFD] * n_inputs
    for i, (vin, s) in enumerate(zip(embit_tx.vin, secrets, strict=True)):
        signature, key = vin.witness.items
        assert key == public_key(s) and signature[-1] == 1
        assert coincurve.PublicKey(key).verify(signature[:-1], sighash(unsigned, i), hasher=None)

    actual, _ = sizes(raw)
    estimate = tx_vsize(n_inputs, [o.script for o in outputs])
    assert estimate == unsigned.vsize
    assert actual <= estimate <= actual + n_inputs, (actual, estimate)
    assert unsigned.fee == sum(c.value for c in coins) - sum(o.value for o in outputs)


def test_size_arithmetic():
    p2wpkh_out = p2wpkh_script(secret_of("a"))
    assert input_vsize(p2wpkh_out) == P2WPKH_INPUT_VSIZE == 68  # (41 * 4 + 108) / 4
    assert output_vsize(p2wpkh_out) == 31 and output_vsize(p2tr_script("b")) == 43
    assert output_vsize(b"\x6a" + b"\x00" * 300) == 8 + 3 + 301  # a 3-byte compact size
    # the textbook 1-in 2-out P2WPKH transaction: 10.5 + 68 + 2 * 31 = 140.5 -> 141 vB
    assert tx_vsize(1, [p2wpkh_out, p2wpkh_out]) == 141
    assert fee_for(141, 1_000) == 141 and fee_for(141, 1_500) == 212 and fee_for(141, 1) == 1
    assert fee_for(0, 5_000) == 0
    with pytest.raises(ValueError):
        input_vsize(p2tr_script("c"))
    with pytest.raises(ValueError):
        fee_for(141, 1.5)  # type: ignore[arg-type]  # never a float


def test_dust_thresholds_are_bitcoin_cores():
    """The well-known values at Bitcoin Core's default 3,000 sat/kvB, and Litecoin's 10x."""
    scripts = {
        "p2wpkh": p2wpkh_script(secret_of("d")),
        "p2tr": p2tr_script("e"),
        "p2wsh": b"\x00\x20" + b"\x33" * 32,
        "p2sh": bytes.fromhex("a914" + "44" * 20 + "87"),
        "p2pkh": bytes.fromhex("76a914" + "55" * 20 + "88ac"),
    }
    btc = {"p2wpkh": 294, "p2tr": 330, "p2wsh": 330, "p2sh": 540, "p2pkh": 546}
    assert {k: dust_threshold(s, default_dust_relay_fee(NETWORKS["btc"])) for k, s in scripts.items()} == btc
    assert {k: dust_threshold(s, default_dust_relay_fee(LTC)) for k, s in scripts.items()} == {
        k: 10 * v for k, v in btc.items()}
    assert dust_threshold(b"\x6a\x04test", 3_000) == 0  # OP_RETURN is never dust
    assert dust_threshold(scripts["p2wpkh"], 1) == 1  # rounded up, never down to zero


def test_build_checks_what_it_is_given():
    s = secret_of("build")
    coin = Coin("ab" * 32, 0, 10_000, p2wpkh_script(s))
    assert build([coin], [Output(coin.script, 9_000)], rbf=False).sequences == (0xFFFFFFFE,)
    with pytest.raises(ValueError, match="more than the coins hold"):
        build([coin], [Output(coin.script, 10_001)])
    with pytest.raises(ValueError, match="spent twice"):
        build([coin, coin], [Output(coin.script, 1)])
    with pytest.raises(ValueError, match="satoshis"):
        Output(coin.script, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="satoshis"):
        Coin("ab" * 32, 0, True, coin.script)
    with pytest.raises(ValueError, match="txid"):
        Coin("AB" * 32, 0, 1, coin.script)
    with pytest.raises(ValueError, match="secrets for"):
        sign(build([coin], [Output(coin.script, 9_000)]), [])


# --- a real Litecoin Core node ---------------------------------------------------------------

@dataclass
class Funded:
    node: Litecoind
    secrets: dict[str, bytes]
    coins: dict[str, Coin]  # "a1", "a2" pay key "a"; "b1" pays key "b"


@pytest.fixture(scope="module")
def funded() -> Iterator[Funded]:
    """One node for the module: three confirmed coins paying two keys of ours."""
    with Litecoind() as node:
        node.payer  # noqa: B018  # creates and funds the payer wallet
        secrets = {"a": secret_of("node key a"), "b": secret_of("node key b")}
        plan = {"a1": ("a", 100_000_000), "a2": ("a", 50_000_000), "b1": ("b", 30_000_000)}
        sent = {name: node.send(p2wpkh(LTC, public_key(secrets[k])), sats) for name, (k, sats) in plan.items()}
        node.mine(1)
        coins = {}
        for name, (k, sats) in plan.items():
            raw = bytes.fromhex(node.rpc("getrawtransaction", sent[name]))
            (out,) = [o for o in rawblock.tx_outputs(raw) if o.script == p2wpkh_script(secrets[k])]
            assert out.value == sats
            coins[name] = Coin(out.txid, out.vout, out.value, out.script, key_path=k)
        yield Funded(node, secrets, coins)


def test_node_accepts_relays_and_confirms_what_we_sign(funded: Funded):
    node, coins, secrets = funded.node, funded.coins, funded.secrets
    to_p2sh = to_script(LTC, node.rpc("getnewaddress", "", "p2sh-segwit", wallet="payer"))
    to_p2tr = p2tr_script("node p2tr")
    change = coins["a1"].script
    spent = [coins["a1"], coins["b1"]]  # two keys
    vsize = tx_vsize(2, [to_p2sh, to_p2tr, change])
    fee = fee_for(vsize, 10_000)  # 10 sat/vB
    outputs = [Output(to_p2sh, 25_000_000), Output(to_p2tr, 1_000_000),
               Output(change, sum(c.value for c in spent) - 26_000_000 - fee)]
    unsigned = build(spent, outputs)
    assert unsigned.fee == fee and unsigned.vsize == vsize
    raw = sign(unsigned, [secrets[c.key_path] for c in spent])

    (verdict,) = node.rpc("testmempoolaccept", [raw.hex()])
    assert verdict["allowed"], verdict
    assert verdict["txid"] == unsigned.txid == txid(raw)
    assert verdict["fees"]["base"] * COIN == fee
    assert node.rpc("sendrawtransaction", raw.hex()) == unsigned.txid
    assert unsigned.txid in node.rpc("getrawmempool")
    (block,) = node.mine(1)

    seen = node.rpc("getrawtransaction", unsigned.txid, True)
    assert seen["blockhash"] == block and seen["confirmations"] == 1
    assert seen["hex"] == raw.hex()
    actual, _ = sizes(raw)
    assert seen["vsize"] == actual <= vsize <= actual + 2, (seen["vsize"], vsize)
    assert [(v["n"], bytes.fromhex(v["scriptPubKey"]["hex"]), v["value"]) for v in seen["vout"]] == [
        (i, o.script, Decimal(o.value) / COIN) for i, o in enumerate(outputs)]
    # the node's UTXO set now holds our outputs, and no longer the coins
    assert node.rpc("gettxout", unsigned.txid, 1)["scriptPubKey"]["hex"] == to_p2tr.hex()
    assert node.rpc("gettxout", coins["a1"].txid, coins["a1"].vout) is None


def test_wrong_secret_is_refused_before_broadcast(funded: Funded):
    coin = funded.coins["a2"]
    unsigned = build([coin], [Output(coin.script, coin.value - 10_000)])
    with pytest.raises(ValueError, match="not the key its coin"):
        sign(unsigned, [funded.secrets["b"]])
    with pytest.raises(ValueError, match="not a valid private key"):
        sign(unsigned, [b"\x00" * 32])
    # and the right one is accepted (nothing was broadcast: the coin is still unspent)
    (verdict,) = funded.node.rpc("testmempoolaccept", [sign(unsigned, [funded.secrets["a"]]).hex()])
    assert verdict["allowed"], verdict


@pytest.mark.parametrize("kind", ["p2wpkh", "p2tr", "p2wsh", "p2sh", "p2pkh"])
def test_dust_threshold_agrees_with_the_node(funded: Funded, kind: str):
    """An output one satoshi under :func:`dust_threshold` is refused as "dust"; one at it is
    accepted (testmempoolaccept only: the coin stays unspent for the next case)."""
    node, coin = funded.node, funded.coins["a2"]
    script = {
        "p2wpkh": p2wpkh_script(secret_of("dust")),
        "p2tr": p2tr_script("dust"),
        "p2wsh": b"\x00\x20" + hashlib.sha256(b"dust").digest(),
        "p2sh": to_script(LTC, node.rpc("getnewaddress", "", "p2sh-segwit", wallet="payer")),
        "p2pkh": to_script(LTC, node.rpc("getnewaddress", "", "legacy", wallet="payer")),
    }[kind]
    threshold = dust_threshold(script, default_dust_relay_fee(LTC))
    fee = fee_for(tx_vsize(1, [script, coin.script]), 10_000)
    for value, allowed in ((threshold - 1, False), (threshold, True)):
        unsigned = build([coin], [Output(script, value), Output(coin.script, coin.value - value - fee)])
        (verdict,) = node.rpc("testmempoolaccept", [sign(unsigned, [funded.secrets["a"]]).hex()])
        assert verdict["allowed"] is allowed, (value, verdict)
        if not allowed:
            assert verdict["reject-reason"] == "dust"
        else:
            assert verdict["vsize"] <= unsigned.vsize
