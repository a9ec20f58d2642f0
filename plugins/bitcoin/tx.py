"""Building and signing Bitcoin-family transactions that spend P2WPKH coins (the deposit and
hot-wallet outputs), and the sizes, fees and dust limits that go with them.

:func:`build` gives an :class:`UnsignedTx` (version 2, every input signalling BIP125
replaceability unless ``rbf=False``); :func:`sign` returns the serialized SegWit transaction,
each input signed with SIGHASH_ALL over its BIP143 digest. The serialization and the digest
come from embit; the signatures from coincurve (libsecp256k1: RFC6979 nonces, DER, low S).
Private keys are never stored here: :func:`sign` takes one 32-byte secret a coin, in input
order, and checks that each one is the key the coin's script pays.

Money is integer satoshis throughout; fee rates are integer satoshis per 1,000 vB, as in the
family's options (``fee_rate_min`` and so on).

Sizes (in weight units, WU, and virtual bytes, vB = WU / 4 rounded up for a whole tx):

- a P2WPKH input is 41 bytes outside the witness (outpoint 36, empty scriptSig 1, sequence 4,
  so 164 WU) and at most 108 bytes of witness (item count 1, signature length 1, DER signature
  with its sighash byte 72, key length 1, compressed key 33), 272 WU or exactly 68 vB. A DER
  signature is 73 bytes with the sighash byte only when S is high, which policy refuses
  (``SCRIPT_VERIFY_LOW_S``) and coincurve never makes; 72 is the low-S maximum, and half of
  all signatures are a byte shorter (a 32-byte R).
- an output is 8 bytes of value, the script's compact-size length and the script.
- a transaction adds version 4, locktime 4, the input and output counts (compact sizes), and
  the SegWit marker and flag (2 WU, half a vB).

So :func:`tx_vsize` never underestimates what :func:`sign` makes, and overestimates by at
most a quarter of a vB an input, plus the final rounding, unless a signature is unusually short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import coincurve
from embit.hashes import hash160
from embit.script import Script, Witness
from embit.transaction import SIGHASH, Transaction, TransactionInput, TransactionOutput

from .networks import Network
from .rawblock import txid as _raw_txid

__all__ = [
    "MAX_SCRIPT_SIZE",
    "P2WPKH_INPUT_VSIZE",
    "P2WPKH_INPUT_WEIGHT",
    "Coin",
    "Output",
    "UnsignedTx",
    "build",
    "default_dust_relay_fee",
    "dust_threshold",
    "fee_for",
    "input_vsize",
    "output_vsize",
    "sighash",
    "sign",
    "sign_input",
    "tx_vsize",
    "txid",
]

SEQUENCE_RBF = 0xFFFFFFFD  # BIP125: replaceable; nLockTime enforced
SEQUENCE_FINAL_RBF_OFF = 0xFFFFFFFE  # not replaceable; nLockTime still enforced
MAX_SCRIPT_SIZE = 10_000  # consensus; a longer output script is unspendable
MAX_SATS = 84_000_000 * 10**8  # Litecoin's MAX_MONEY (Bitcoin's is a quarter of it)
WITNESS_SCALE_FACTOR = 4

#: Outside the witness: outpoint (32 + 4), empty scriptSig (1), sequence (4).
P2WPKH_INPUT_BASE = 32 + 4 + 1 + 4
#: Witness: item count, signature length, DER signature (low S) + sighash byte, key length, key.
P2WPKH_WITNESS_MAX = 1 + 1 + 72 + 1 + 33
P2WPKH_INPUT_WEIGHT = P2WPKH_INPUT_BASE * WITNESS_SCALE_FACTOR + P2WPKH_WITNESS_MAX  # 272 WU
P2WPKH_INPUT_VSIZE = -(-P2WPKH_INPUT_WEIGHT // WITNESS_SCALE_FACTOR)  # 68 vB
#: Version (4) and locktime (4); the counts are added by :func:`tx_vsize`.
TX_BASE_OVERHEAD = 4 + 4
SEGWIT_MARKER_FLAG_WEIGHT = 2  # witness data: counted once, not four times

#: Default ``-dustrelayfee`` of each coin's node, sat per 1,000 vB: Bitcoin Core 3,000,
#: Litecoin Core 30,000 (0.0003 LTC/kB).
DUST_RELAY_FEE = {"BTC": 3_000, "LTC": 30_000}

_HEX = frozenset("0123456789abcdef")


def _is_p2wpkh(script: bytes) -> bool:
    return len(script) == 22 and script[0] == 0x00 and script[1] == 20


def _compact_size_len(n: int) -> int:
    return 1 if n < 0xFD else 3 if n <= 0xFFFF else 5 if n <= 0xFFFFFFFF else 9


def _check_sats(value: object, what: str) -> int:
    # bool is an int; a float is never money
    if type(value) is not int or not 0 <= value <= MAX_SATS:
        raise ValueError(f"{what} must be a whole number of satoshis between 0 and {MAX_SATS}")
    return value


@dataclass(frozen=True)
class Coin:
    """An unspent output to spend: the outpoint, its value and script (only P2WPKH can be
    signed here), and ``key_path``, an opaque label the caller uses to find the coin's key
    (a derivation path, say). The key itself is never part of a coin."""

    txid: str  # hex, as the node writes it (byte-reversed)
    vout: int
    value: int  # satoshis
    script: bytes  # scriptPubKey
    key_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.txid, str) or len(self.txid) != 64 or not set(self.txid) <= _HEX:
            raise ValueError("a coin's txid must be 64 lowercase hex digits")
        if type(self.vout) is not int or not 0 <= self.vout <= 0xFFFFFFFF:
            raise ValueError("a coin's vout must be an output index (0 to 2**32 - 1)")
        _check_sats(self.value, "a coin's value")
        if not isinstance(self.script, bytes):
            raise ValueError("a coin's script must be bytes")


@dataclass(frozen=True)
class Output:
    """An output to create: its scriptPubKey (``address.to_script``) and value."""

    script: bytes
    value: int  # satoshis

    def __post_init__(self) -> None:
        if not isinstance(self.script, bytes) or len(self.script) > MAX_SCRIPT_SIZE:
            raise ValueError(f"an output script must be bytes, at most {MAX_SCRIPT_SIZE} long")
        _check_sats(self.value, "an output's value")


@dataclass(frozen=True)
class UnsignedTx:
    """A transaction ready to sign: what it spends, what it pays and the fields of its
    serialization. Use :func:`build`; the fields are open for test vectors."""

    coins: tuple[Coin, ...]
    outputs: tuple[Output, ...]
    version: int = 2
    locktime: int = 0
    sequences: tuple[int, ...] = field(default=())  # one a coin

    def __post_init__(self) -> None:
        if not self.coins:
            raise ValueError("a transaction spends at least one coin")
        if not self.outputs:
            raise ValueError("a transaction has at least one output")
        if len({(c.txid, c.vout) for c in self.coins}) != len(self.coins):
            raise ValueError("a coin is spent twice")
        if len(self.sequences) != len(self.coins):
            raise ValueError("one sequence number a coin")
        for n in (self.version, self.locktime, *self.sequences):
            if type(n) is not int or not 0 <= n <= 0xFFFFFFFF:
                raise ValueError("version, locktime and sequences are 32-bit unsigned numbers")
        if self.fee < 0:
            raise ValueError(f"the outputs pay {-self.fee} satoshis more than the coins hold")

    @property
    def fee(self) -> int:
        """What the coins hold and the outputs do not pay (satoshis)."""
        return sum(c.value for c in self.coins) - sum(o.value for o in self.outputs)

    @property
    def vsize(self) -> int:
        """:func:`tx_vsize` of this transaction once signed (never less than the real one)."""
        return tx_vsize(len(self.coins), [o.script for o in self.outputs])

    def serialize(self) -> bytes:
        """The serialization without witnesses (what the txid is the hash of)."""
        return bytes(self._embit().serialize())

    @property
    def txid(self) -> str:
        """The txid the signed transaction will have (SegWit: signatures are not part of it)."""
        return txid(self.serialize())

    def _embit(self) -> Transaction:
        return Transaction(
            version=self.version,
            vin=[TransactionInput(bytes.fromhex(c.txid), c.vout, sequence=s)
                 for c, s in zip(self.coins, self.sequences, strict=True)],
            vout=[TransactionOutput(o.value, Script(o.script)) for o in self.outputs],
            locktime=self.locktime,
        )


def build(coins: Sequence[Coin], outputs: Sequence[Output], *, locktime: int = 0,
          rbf: bool = True) -> UnsignedTx:
    """An unsigned version-2 transaction spending ``coins`` in order to ``outputs`` in order.
    Every input's sequence is 0xFFFFFFFD (BIP125 replaceable) with ``rbf``, else 0xFFFFFFFE;
    both keep ``locktime`` enforced. The fee is what the coins hold beyond the outputs; a
    negative fee raises :class:`ValueError`. Dust is not checked (see
    :func:`dust_threshold`)."""
    sequence = SEQUENCE_RBF if rbf else SEQUENCE_FINAL_RBF_OFF
    return UnsignedTx(coins=tuple(coins), outputs=tuple(outputs), version=2, locktime=locktime,
                      sequences=(sequence,) * len(coins))


def sighash(unsigned: UnsignedTx, index: int) -> bytes:
    """The BIP143 SIGHASH_ALL digest input ``index`` (a P2WPKH coin) signs."""
    coin = unsigned.coins[index]
    if not _is_p2wpkh(coin.script):
        raise ValueError(f"input {index} is not P2WPKH: only P2WPKH coins are signed here")
    # BIP143: a P2WPKH input's scriptCode is the P2PKH script of the same key hash
    script_code = Script(b"\x76\xa9\x14" + coin.script[2:] + b"\x88\xac")
    return bytes(unsigned._embit().sighash_segwit(index, script_code, coin.value, SIGHASH.ALL))


def sign_input(unsigned: UnsignedTx, index: int, secret: bytes) -> list[bytes]:
    """The witness of input ``index``: [DER signature + SIGHASH_ALL byte, compressed public
    key]. Raises :class:`ValueError` if ``secret`` is not the key the coin's script pays."""
    if not isinstance(secret, bytes) or len(secret) != 32:
        raise ValueError(f"the secret of input {index} is not 32 bytes")
    coin = unsigned.coins[index]
    if not _is_p2wpkh(coin.script):
        raise ValueError(f"input {index} is not P2WPKH: only P2WPKH coins are signed here")
    try:
        key = coincurve.PrivateKey(secret)
    except ValueError:
        raise ValueError(f"the secret of input {index} is not a valid private key") from None
    public_key = key.public_key.format(compressed=True)
    if hash160(public_key) != coin.script[2:]:
        raise ValueError(f"the secret of input {index} is not the key its coin "
                         f"({coin.txid}:{coin.vout}) pays")
    signature = key.sign(sighash(unsigned, index), hasher=None)
    return [signature + bytes([SIGHASH.ALL]), public_key]


def sign(unsigned: UnsignedTx, secrets: Sequence[bytes]) -> bytes:
    """The signed transaction, serialized with its witnesses (what ``sendrawtransaction``
    takes). ``secrets``: the 32-byte private key of each coin, in input order. Raises
    :class:`ValueError` (before anything is signed) if a coin is not P2WPKH or a secret is
    not the key its coin pays."""
    if len(secrets) != len(unsigned.coins):
        raise ValueError(f"{len(secrets)} secrets for {len(unsigned.coins)} inputs")
    witnesses = [sign_input(unsigned, i, s) for i, s in enumerate(secrets)]
    tx = unsigned._embit()
    for vin, items in zip(tx.vin, witnesses, strict=True):
        vin.witness = Witness(items)
    return bytes(tx.serialize())


def txid(raw: bytes) -> str:
    """The txid of a serialized transaction (hex, as the node writes it)."""
    return _raw_txid(raw)


# --- sizes and fees -------------------------------------------------------------------------

def input_vsize(script: bytes) -> int:
    """The most an input spending ``script`` adds to a signed transaction's vsize: 68 vB for
    P2WPKH (272 WU exactly; see the module's docstring). Only P2WPKH is signed here."""
    if not _is_p2wpkh(script):
        raise ValueError("only P2WPKH inputs are sized (and signed) here")
    return P2WPKH_INPUT_VSIZE


def output_vsize(script: bytes) -> int:
    """The vsize of an output paying ``script``: value 8, the script's length, the script."""
    return 8 + _compact_size_len(len(script)) + len(script)


def tx_vsize(n_inputs: int, output_scripts: Sequence[bytes]) -> int:
    """The vsize of a transaction :func:`sign` makes from ``n_inputs`` P2WPKH coins paying
    ``output_scripts``: never less than the real one, at most a quarter of a vB an input more
    (rounded up once, as the node rounds the weight)."""
    if n_inputs < 1 or not output_scripts:
        raise ValueError("a transaction has at least one input and one output")
    base = (TX_BASE_OVERHEAD + _compact_size_len(n_inputs) + _compact_size_len(len(output_scripts))
            + n_inputs * P2WPKH_INPUT_BASE + sum(output_vsize(s) for s in output_scripts))
    weight = (base * WITNESS_SCALE_FACTOR + SEGWIT_MARKER_FLAG_WEIGHT
              + n_inputs * P2WPKH_WITNESS_MAX)
    return -(-weight // WITNESS_SCALE_FACTOR)


def fee_for(vsize: int, sat_per_kvb: int) -> int:
    """The fee of ``vsize`` vB at ``sat_per_kvb`` satoshis per 1,000 vB, rounded up (so the
    transaction's rate is never below the one asked for)."""
    if type(vsize) is not int or type(sat_per_kvb) is not int or vsize < 0 or sat_per_kvb < 0:
        raise ValueError("vsize and the fee rate are non-negative whole numbers")
    return -(-vsize * sat_per_kvb // 1000)


def default_dust_relay_fee(network: Network) -> int:
    """The default ``-dustrelayfee`` of ``network``'s node, sat per 1,000 vB."""
    return DUST_RELAY_FEE[network.symbol]


def _is_witness_program(script: bytes) -> bool:
    # CScript::IsWitnessProgram: OP_0 or OP_1..OP_16, then one push of 2 to 40 bytes
    return (4 <= len(script) <= 42 and (script[0] == 0 or 0x51 <= script[0] <= 0x60)
            and script[1] + 2 == len(script))


def dust_threshold(script: bytes, dust_relay_fee: int) -> int:
    """The smallest value of an output paying ``script`` that a node with ``-dustrelayfee``
    ``dust_relay_fee`` (sat per 1,000 vB; :func:`default_dust_relay_fee` gives the default) relays:
    Bitcoin Core's ``GetDustThreshold`` (policy/policy.cpp), the same in Litecoin Core. It is
    the fee of the output plus the input that would spend it: 32 + 4 + 1 + 107 // 4 + 4 = 67
    bytes for a witness program, 148 for any other script. An unspendable output (OP_RETURN,
    or a script longer than 10,000 bytes) is never dust (0).

    Core before 23.0 rounds the fee down, later versions up; this rounds up, so a value at the
    threshold is relayed by both (at the defaults, 3,000 and 30,000, the fee is exact)."""
    if script[:1] == b"\x6a" or len(script) > MAX_SCRIPT_SIZE:
        return 0
    size = output_vsize(script) + (32 + 4 + 1 + 107 // WITNESS_SCALE_FACTOR + 4
                                   if _is_witness_program(script) else 32 + 4 + 1 + 107 + 4)
    return fee_for(size, dust_relay_fee)
