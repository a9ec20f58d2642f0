"""The Bitcoin family's conformance harness: a real Litecoin Core regtest node (``litecoind``
with the flags of tests/support/litecoin.py: BIP125 replacement on, MWEB off, txindex) and a
payer wallet inside it. watcher itself never uses a node wallet.

Payments are built from coins the harness picks itself (one confirmed coin each, never the
change of a payment still pending), so that a reorg may drop one payment and keep the next;
a dropped payment is conflicted out of the node's mempool by a spend of its coin back to the
payer, so that it is gone for good, as the contract asks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from bip_utils import SegwitBech32Encoder

from tests.support.litecoin import COIN, Litecoind

from .harness import FamilyHarness

FEE = 20_000  # sats a harness payment pays (200 sat/vB for ~100 vB: far above watcher's fallback)


def _coins(amount: Decimal) -> str:
    return f"{amount:.8f}"


class LitecoinHarness(FamilyHarness):
    family = "bitcoin"
    assets = ("LTC",)
    failpoints = frozenset({"payout.stored", "payout.sent", "payout.mined",
                            "sweep.stored", "sweep.sent", "sweep.mined"})  # no gas top-ups on UTXO chains

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.node: Litecoind | None = None
        self._used: set[tuple[str, int]] = set()  # coins a pending payment of ours spends
        self._paid: dict[str, tuple[str, int, int]] = {}  # our payment txid -> (coin txid, vout, value)
        self._held = False

    # --- the node's life ------------------------------------------------------------------

    def start(self) -> None:
        self.node = Litecoind()
        self.node.start()
        self.node.payer  # noqa: B018 - the payer wallet, 101 blocks
        self.node.mine(60)  # 60 more mature coinbase coins: each payment spends its own

    def stop(self) -> None:
        if self.node is not None:
            self.node.close()  # SIGTERM by PID, then SIGKILL; removes the datadir
            self.node = None

    @property
    def ltc(self) -> Litecoind:
        assert self.node is not None, "start() first"
        return self.node

    # --- configuration --------------------------------------------------------------------

    def chain_entry(self, **extra: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": self.chain_id, "family": "bitcoin", "network": "ltc-regtest", "rpc_url": self.ltc.url,
            "confirmations": 2, "finality_depth": 6, "start_block": self.head(), "poll_interval": 0.1,
            "fee_bump": "rbf",  # the suite's fee-bump test expects a replacement (the node allows BIP125)
        }
        entry.update(extra)
        return entry

    def decimals(self, asset: str) -> int:
        assert asset == "LTC", asset
        return 8

    # --- addresses and money --------------------------------------------------------------

    def fresh_address(self) -> str:
        return str(SegwitBech32Encoder.Encode("rltc", 0, os.urandom(20)))

    def _coin(self) -> tuple[str, int, int]:
        for u in self.ltc.rpc("listunspent", 1, 9_999_999, wallet="payer"):
            key = (u["txid"], u["vout"])
            if key not in self._used and u["spendable"] and u["amount"] >= 1:
                self._used.add(key)
                return u["txid"], u["vout"], int(u["amount"] * COIN)
        raise RuntimeError("the payer has no free confirmed coin left")

    def _spend(self, coin: tuple[str, int, int], outputs: dict[str, int]) -> str:
        txid, vout, value = coin
        change = self.ltc.rpc("getrawchangeaddress", "bech32", wallet="payer")
        rest = value - sum(outputs.values()) - FEE
        assert rest > 100_000, "coin too small"
        raw = self.ltc.rpc("createrawtransaction", [{"txid": txid, "vout": vout, "sequence": 0xFFFFFFFD}],
                           [{a: _coins(Decimal(v) / COIN)} for a, v in outputs.items()]
                           + [{change: _coins(Decimal(rest) / COIN)}])
        signed = self.ltc.rpc("signrawtransactionwithwallet", raw, wallet="payer")
        assert signed["complete"], signed
        return str(self.ltc.rpc("sendrawtransaction", signed["hex"]))

    def pay(self, to: str, asset: str, amount: int) -> str:
        assert asset == "LTC", asset
        coin = self._coin()
        txid = self._spend(coin, {to: amount})
        self._paid[txid] = coin
        return txid

    def fund(self, address: str, asset: str, amount: int) -> None:
        assert asset == "LTC" and not self._held, (asset, self._held)
        txid = self._spend(self._coin(), {address: amount})
        self.ltc.mine(1)
        assert self.ltc.rpc("getrawtransaction", txid, True).get("confirmations", 0) >= 1

    def balance(self, address: str, asset: str) -> int:
        assert asset == "LTC", asset
        found = self.ltc.rpc("scantxoutset", "start", [f"addr({address})"])
        return int(Decimal(found["total_amount"]) * COIN)

    # --- blocks -------------------------------------------------------------------------------

    def head(self) -> int:
        return self.ltc.head()

    def mine(self, blocks: int = 1) -> None:
        if self._held:
            self.ltc.mine_empty(blocks)
        else:
            self.ltc.mine(blocks)

    def reorg(self, depth: int, keep: Sequence[str] = ()) -> None:
        head = self.head()
        dropped = [txid for block in range(head - depth + 1, head + 1)
                   for txid in self.ltc.rpc("getblock", self.ltc.rpc("getblockhash", block))["tx"][1:]]
        self.ltc.invalidate(depth)  # their transactions go back to the mempool
        for txid in dropped:
            if txid in self._paid and txid not in keep:  # gone for good: its coin goes back to the payer
                coin = self._paid.pop(txid)
                back = self.ltc.rpc("getrawchangeaddress", "bech32", wallet="payer")
                raw = self.ltc.rpc("createrawtransaction",
                                   [{"txid": coin[0], "vout": coin[1], "sequence": 0xFFFFFFFD}],
                                   [{back: _coins(Decimal(coin[2] - 5 * FEE) / COIN)}])
                self.ltc.rpc("sendrawtransaction", self.ltc.rpc("signrawtransactionwithwallet", raw,
                                                                wallet="payer")["hex"])
        # the kept transactions in the first new block, then empty blocks up to the old height;
        # to a new address: a block mined within the same second to the same address as the
        # one invalidated would be that very block again ("block not accepted")
        to = self.ltc.rpc("getnewaddress", "", "bech32", wallet="payer")
        self.ltc.rpc("generateblock", to, list(keep))
        for _ in range(depth - 1):
            self.ltc.rpc("generateblock", to, [])
        assert self.head() == head

    # --- fees ---------------------------------------------------------------------------------

    def hold_fees(self) -> None:
        self._held = True

    def release_fees(self) -> None:
        self._held = False
