"""The networks the Bitcoin family serves: Bitcoin and Litecoin, main, test and regtest.

What differs between them is constants: address prefixes and the bech32 human-readable part,
the SLIP-44 coin type of the key scheme (0 BTC, 2 LTC, 1 every test network, so BTC and LTC
test networks share their keys), the symbol, the BIP21 scheme and the name the node gives its
chain (``getblockchaininfo.chain``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Network:
    name: str  # what config's `network` says
    symbol: str  # the native coin's default symbol
    hrp: str  # bech32 human-readable part of native SegWit addresses
    p2pkh: int  # base58check version byte of P2PKH addresses
    p2sh: tuple[int, ...]  # of P2SH addresses (the first is what this network writes)
    coin_type: int  # SLIP-44
    uri_scheme: str  # BIP21
    node_chain: str  # getblockchaininfo.chain
    decimals: int = 8


NETWORKS: dict[str, Network] = {n.name: n for n in (
    Network("btc", "BTC", "bc", 0x00, (0x05,), 0, "bitcoin", "main"),
    Network("btc-testnet", "BTC", "tb", 0x6F, (0xC4,), 1, "bitcoin", "test"),
    Network("btc-regtest", "BTC", "bcrt", 0x6F, (0xC4,), 1, "bitcoin", "regtest"),
    # Litecoin writes P2SH with 0x32 ("M...") and still reads the older 0x05 ("3...")
    Network("ltc", "LTC", "ltc", 0x30, (0x32, 0x05), 2, "litecoin", "main"),
    Network("ltc-testnet", "LTC", "tltc", 0x6F, (0x3A, 0xC4), 1, "litecoin", "test"),
    Network("ltc-regtest", "LTC", "rltc", 0x6F, (0x3A, 0xC4), 1, "litecoin", "regtest"),
)}
