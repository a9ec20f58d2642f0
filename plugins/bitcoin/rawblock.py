"""Reading serialized blocks and transactions (``getblock <hash> 0``, ``getrawtransaction``).

The node's raw block is a fifth of its verbose JSON and costs it a tenth of the CPU to
produce, so the scanner reads raw blocks in two passes:

1. :func:`candidate_scripts` finds every byte sequence shaped like a standard output script
   with its length prefix (P2PKH, P2SH, P2WPKH, P2WSH, P2TR), at every offset (overlapping
   finds included, so no real output is ever skipped). It may also find look-alikes inside
   signatures or other data; that is harmless, they are only candidates.
2. Only a block holding a candidate that is a watched script is parsed in full by
   :func:`outputs_to`, which walks the transactions and reports the outputs paying those
   scripts with their txid, output index and exact value.

What this parser does not know (a Litecoin MWEB transaction, flag 0x08) raises
:class:`Unsupported`; the client then reads that block as verbose JSON instead.

Both passes' loops run in C (``_rawscan.c``, built by ``setup.py`` where a C compiler is
present: ~26 µs a block instead of ~91 for the candidates, ~21 instead of ~256 for the walk);
without it they run here, in Python, with the same results (the tests compare the two on real
blocks and damaged ones).
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import ModuleType

# (prefix: the script's length byte and its first opcodes, length of the script after the
# length byte)
_SHAPES = (
    (b"\x16\x00\x14", 22),  # P2WPKH: OP_0 <20>
    (b"\x22\x00\x20", 34),  # P2WSH: OP_0 <32>
    (b"\x22\x51\x20", 34),  # P2TR: OP_1 <32>
    (b"\x17\xa9\x14", 23),  # P2SH: OP_HASH160 <20> OP_EQUAL
    (b"\x19\x76\xa9\x14", 25),  # P2PKH: OP_DUP OP_HASH160 <20> OP_EQUALVERIFY OP_CHECKSIG
)


_rawscan: ModuleType | None
try:
    from . import _rawscan  # type: ignore[attr-defined, no-redef]
except ImportError:  # not built (no C compiler): the same loops in Python below
    _rawscan = None


# hex text as bytes (the node's answer holds each block as hex; ``ValueError`` if it is not
# hex): in C where built, ~13 µs a block of 120 transactions against binascii's ~36
unhex: Callable[[memoryview], bytes] = binascii.unhexlify if _rawscan is None else _rawscan.unhex


def native() -> bool:
    """Whether the scan's loops run in C (see the module's doc)."""
    return _rawscan is not None


class Unsupported(ValueError):
    """A serialization this parser does not read (the caller falls back to verbose JSON)."""


def dsha256(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def block_hash(header: bytes) -> str:
    """The block hash of an 80-byte header, as the node writes it (hex, byte-reversed)."""
    return dsha256(header)[::-1].hex()


@dataclass(frozen=True, slots=True)
class Header:
    hash: str
    parent_hash: str
    timestamp: int


def header(block: bytes) -> Header:
    if len(block) < 81:
        raise ValueError(f"a block of {len(block)} bytes is shorter than its header")
    head = block[:80]
    return Header(hash=block_hash(head), parent_hash=head[4:36][::-1].hex(),
                  timestamp=int.from_bytes(head[68:72], "little"))


# one pattern a shape: it consumes the length byte and captures the script in a lookahead,
# so findall gives every occurrence (no prefix can overlap itself) in one C loop. Keyed by the
# bytes every script of the shape starts with (the start of its match key)
FINDERS = {prefix[1:]: re.compile(re.escape(prefix[:1]) + b"(?=(" + re.escape(prefix[1:])
                                  + b"[\\x00-\\xff]{%d}))" % (length + 1 - len(prefix)))
           for prefix, length in _SHAPES}
_PREFIXES = {prefix[1:]: (prefix, length) for prefix, length in _SHAPES}  # the same, for the C finder


def candidate_scripts(data: bytes, shapes: Iterable[bytes] = FINDERS,
                      within: AbstractSet[bytes] | None = None) -> set[bytes]:
    """Every standard output script of ``shapes`` (keys of :data:`FINDERS`; all of them by
    default) that may appear in ``data`` (a superset); only those in ``within``, if given (the
    watched set: each is tested as it is found). Each shape is a pass over the block: a scan
    looks only for the shapes of the scripts it watches. The scripts stay bytes, the form of a
    match key: a block's ~240 candidates cost ~0.05 ms more as hex."""
    found: set[bytes] = set()
    if _rawscan is not None:
        limit = () if within is None else (within if isinstance(within, set) else set(within),)
        for shape in shapes:
            _rawscan.scripts(data, *_PREFIXES[shape], found, *limit)
        return found
    for shape in shapes:
        found.update(FINDERS[shape].findall(data))
    return found if within is None else found & within  # each script once: a block pays many to the same few


@dataclass(frozen=True, slots=True)
class Output:
    txid: str
    vout: int
    value: int  # satoshis
    script: bytes
    coinbase: bool


def _varint(b: bytes, p: int) -> tuple[int, int]:
    n = b[p]
    if n < 0xFD:
        return n, p + 1
    size = 2 if n == 0xFD else 4 if n == 0xFE else 8
    if p + 1 + size > len(b):
        raise ValueError("truncated compact size")
    return int.from_bytes(b[p + 1:p + 1 + size], "little"), p + 1 + size


def _tx(b: bytes, p: int, at: set[int] | None, coinbase: bool, out: list[Output]) -> int:
    """Read one transaction at ``p``; append to ``out`` its outputs whose script starts at
    one of the places ``at`` (every output if None); return where the next one starts.
    Compact sizes below 0xFD (nearly all) are read in line: this is the scan's hottest loop,
    and a call per field cost as much as the rest of the walk."""
    start = p
    p += 4
    segwit = b[p] == 0
    if segwit:
        if b[p + 1] != 1:
            raise Unsupported(f"transaction flag {b[p + 1]:#x}")
        p += 2
    body = p
    n_in = b[p]
    p += 1
    if n_in >= 0xFD:
        n_in, p = _varint(b, p - 1)
    if n_in == 0:
        raise ValueError("a transaction without inputs")
    for _ in range(n_in):
        p += 36
        n = b[p]
        p += 1
        if n >= 0xFD:
            n, p = _varint(b, p - 1)
        p += n + 4
    n_out = b[p]
    p += 1
    if n_out >= 0xFD:
        n_out, p = _varint(b, p - 1)
    hits: list[tuple[int, int, bytes]] = []
    for i in range(n_out):
        value_at = p
        p += 8
        n = b[p]
        p += 1
        if n >= 0xFD:
            n, p = _varint(b, p - 1)
            # the byte before a long script is its length's last byte: fd 00 16 ends like a
            # P2WPKH script's length, so a 0x16xx-byte script starting with a watched one
            # would match where it starts. Watched scripts are short: never one of these.
            if at is None:
                hits.append((i, int.from_bytes(b[value_at:value_at + 8], "little"), b[p:p + n]))
        elif at is None or p in at:
            hits.append((i, int.from_bytes(b[value_at:value_at + 8], "little"), b[p:p + n]))
        p += n
    body_end = p
    if segwit:
        for _ in range(n_in):
            items = b[p]
            p += 1
            if items >= 0xFD:
                items, p = _varint(b, p - 1)
            for _ in range(items):
                n = b[p]
                p += 1
                if n >= 0xFD:
                    n, p = _varint(b, p - 1)
                p += n
    p += 4
    if p > len(b):
        raise ValueError("truncated transaction")
    if hits:
        txid = dsha256(b[start:start + 4] + b[body:body_end] + b[p - 4:p])[::-1].hex()
        out.extend(Output(txid=txid, vout=i, value=value, script=script, coinbase=coinbase)
                   for i, value, script in hits)
    return p


def outputs_to(block: bytes, scripts: set[bytes]) -> list[Output]:
    """Every output of a serialized block paying one of ``scripts``, in block order.

    The bytes of each script (with its length prefix) are found first; the walk then only
    skips through the transactions, takes an output whose script starts at one of those
    places, and stops after the transaction holding the last one."""
    at: set[int] = set()  # where a wanted script starts, every occurrence (outputs or not)
    for s in scripts:
        needle = bytes([len(s)]) + s
        i = block.find(needle)
        while i >= 0:
            at.add(i + 1)
            i = block.find(needle, i + 1)
    out: list[Output] = []
    if not at:
        return out
    if _rawscan is not None:
        return _native_outputs(block, at)
    last = max(at)
    try:
        n_tx, p = _varint(block, 80)
        for t in range(n_tx):
            if p >= last:
                break
            p = _tx(block, p, at, t == 0, out)
    except IndexError as e:
        raise ValueError("truncated block") from e
    return out


def _native_outputs(block: bytes, at: set[int]) -> list[Output]:
    assert _rawscan is not None
    hits = _rawscan.walk(block, list(at))
    if isinstance(hits, int):
        raise Unsupported(f"transaction flag {hits:#x}")
    out: list[Output] = []
    txids: dict[int, str] = {}  # by where the transaction starts: one hash for its every hit
    for t, vout, value, script, length, start, body, body_end, end in hits:
        txid = txids.get(start)
        if txid is None:
            txid = txids[start] = dsha256(block[start:start + 4] + block[body:body_end] + block[end - 4:end])[::-1].hex()
        out.append(Output(txid=txid, vout=vout, value=value, script=block[script:script + length], coinbase=t == 0))
    return out


_NULL_PREVOUT = b"\x00" * 32 + b"\xff" * 4


def tx_outputs(raw: bytes) -> list[Output]:
    """Every output of one serialized transaction."""
    out: list[Output] = []
    body = 6 if raw[4:5] == b"\x00" else 4  # after the segwit marker and flag
    coinbase = raw[body:body + 1] == b"\x01" and raw[body + 1:body + 37] == _NULL_PREVOUT
    try:
        end = _tx(raw, 0, None, coinbase, out)
    except IndexError as e:
        raise ValueError("truncated transaction") from e
    if end != len(raw):
        raise ValueError("bytes after the transaction")
    return out


def txid(raw: bytes) -> str:
    """The txid of one serialized transaction."""
    out: list[Output] = []
    # every output is wanted only to have the txid computed; an output-less tx is invalid
    _tx(raw, 0, None, False, out)
    if not out:
        raise ValueError("a transaction without outputs")
    return out[0].txid
