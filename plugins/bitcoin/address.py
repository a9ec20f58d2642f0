"""Bitcoin-family addresses and the output scripts they stand for.

Every standard type is read: P2PKH and P2SH (base58check), P2WPKH and P2WSH (bech32, BIP173)
and P2TR (bech32m, BIP350); bip-utils checks the checksums and which encoding each witness
version must use. Deposit addresses are P2WPKH. The canonical form the store keeps is the
address as the node writes it: lowercase for bech32, base58 as it is (it is case-sensitive).
Scanning matches outputs by script, so an address is also its ``scriptPubKey``.
"""

from __future__ import annotations

import functools

from bip_utils import (
    Base58Decoder,
    Base58Encoder,
    Hash160,
    SegwitBech32Decoder,
    SegwitBech32Encoder,
)

from watcher.errors import InvalidAddress

from .networks import Network

OP_DUP, OP_HASH160, OP_EQUAL, OP_EQUALVERIFY, OP_CHECKSIG = 0x76, 0xA9, 0x87, 0x88, 0xAC


def p2wpkh(network: Network, public_key: bytes) -> str:
    """The native SegWit address of a 33-byte compressed public key (BIP84 deposits)."""
    return str(SegwitBech32Encoder.Encode(network.hrp, 0, Hash160.QuickDigest(public_key)))


def to_script(network: Network, text: str) -> bytes:
    """The ``scriptPubKey`` an address of ``network`` pays; raises :class:`InvalidAddress`."""
    if not isinstance(text, str) or not 0 < len(text) <= 100 or not text.isascii() or not text.isalnum():
        raise InvalidAddress("not an address")
    if text[:len(network.hrp) + 1].lower() == network.hrp + "1":
        if text != text.lower() and text != text.upper():
            raise InvalidAddress("a bech32 address is all lowercase or all uppercase, never mixed")
        try:
            version, program = SegwitBech32Decoder.Decode(network.hrp, text.lower())
        except Exception:
            raise InvalidAddress(f"not a valid {network.name} SegWit address (bad checksum or encoding)") from None
        if (version, len(program)) not in ((0, 20), (0, 32), (1, 32)):
            raise InvalidAddress(f"witness version {version} with a {len(program)}-byte program is not a standard "
                                 "output (P2WPKH, P2WSH or P2TR)")
        return bytes([0x50 + version if version else 0, len(program)]) + bytes(program)
    try:
        raw = Base58Decoder.CheckDecode(text)
    except Exception:
        raise InvalidAddress(f"not a {network.name} address (bech32 with \"{network.hrp}1\", or base58)") from None
    if len(raw) != 21:
        raise InvalidAddress(f"not a {network.name} address")
    version, payload = raw[0], raw[1:]
    if version == network.p2pkh:
        return bytes([OP_DUP, OP_HASH160, 20]) + payload + bytes([OP_EQUALVERIFY, OP_CHECKSIG])
    if version in network.p2sh:
        return bytes([OP_HASH160, 20]) + payload + bytes([OP_EQUAL])
    raise InvalidAddress(f"an address of another network (version byte {version:#04x}), not {network.name}")


@functools.lru_cache(maxsize=4096)
def from_script(network: Network, script: bytes) -> str | None:
    """The canonical address of a standard output script, or None (OP_RETURN, bare
    multisig, non-standard scripts). Cached: every payment found in a block is named by its
    script, mostly the same deposit addresses again, and bip_utils' bech32 takes ~40 µs."""
    n = len(script)
    if (n == 22 and script[0] == 0 and script[1] == 20) or (n == 34 and script[0] == 0 and script[1] == 32):
        return str(SegwitBech32Encoder.Encode(network.hrp, 0, script[2:]))
    if n == 34 and script[0] == 0x51 and script[1] == 32:
        return str(SegwitBech32Encoder.Encode(network.hrp, 1, script[2:]))
    if n == 25 and script[:3] == bytes([OP_DUP, OP_HASH160, 20]) and script[23:] == bytes([OP_EQUALVERIFY, OP_CHECKSIG]):
        return str(Base58Encoder.CheckEncode(bytes([network.p2pkh]) + script[3:23]))
    if n == 23 and script[:2] == bytes([OP_HASH160, 20]) and script[22] == OP_EQUAL:
        return str(Base58Encoder.CheckEncode(bytes([network.p2sh[0]]) + script[2:22]))
    return None


def canonical(network: Network, text: str) -> str:
    """The form the store keeps (what ``from_script`` gives for the same output)."""
    address = from_script(network, to_script(network, text))
    assert address is not None
    return address
