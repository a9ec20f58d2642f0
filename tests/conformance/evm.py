"""The EVM family's conformance harness: a real anvil node (``--prune-history 256``, a
temporary HOME, automine off) with the ERC-20 TestToken compiled from tests/contracts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eth_utils import to_checksum_address

from tests.support.evm import Anvil, Token, calldata

from .harness import ALL_FAILPOINTS, FamilyHarness

GWEI = 10**9
HELD_BASE_FEE = 500 * GWEI  # far above anything quoted before the hold: nothing signed then gets in
TOKEN, TOKEN_DECIMALS = "USDT", 6
PAYER_TOKENS = 10**15  # base units minted to each payer


class EvmHarness(FamilyHarness):
    family = "evm"
    assets = ("ETH", TOKEN)
    failpoints = frozenset(ALL_FAILPOINTS)  # token sweeps top up gas from the hot wallet

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.node: Anvil | None = None
        self.token: Token | None = None
        self.payers: list[str] = []
        self._turn = 0
        self._held: int | None = None  # the base fee before hold_fees(), while fees are held

    # --- the node's life ------------------------------------------------------------------

    def start(self) -> None:
        self.node = Anvil(chain_id=31337)  # --prune-history 256, temp HOME, a free port
        self.node.start()
        self.token = Token.deploy(self.node, TOKEN, TOKEN_DECIMALS)
        accounts = self.node.accounts
        # account 0 deploys, mints and funds; the others pay, one after another (a reorg may
        # drop one payment and keep the next: they must not share a nonce sequence)
        self.payers = accounts[1:]
        for payer in self.payers:
            self.token.mint(payer, PAYER_TOKENS)
        self.node.automine(False)
        self.node.mine(1)

    def stop(self) -> None:
        if self.node is not None:
            self.node.close()  # SIGTERM by PID, then SIGKILL; removes the temp HOME
            self.node = None

    @property
    def anvil(self) -> Anvil:
        assert self.node is not None, "start() first"
        return self.node

    # --- configuration --------------------------------------------------------------------

    def chain_entry(self, **extra: Any) -> dict[str, Any]:
        assert self.token is not None
        entry: dict[str, Any] = {
            "id": self.chain_id, "family": "evm", "rpc_url": self.anvil.url, "chain_id": self.anvil.chain_id,
            "native_symbol": "ETH", "confirmations": 2, "finality_depth": 6, "start_block": self.head(),
            "poll_interval": 0.1,
            "assets": [{"symbol": TOKEN, "contract": self.token.address, "decimals": TOKEN_DECIMALS}],
        }
        entry.update(extra)
        return entry

    def decimals(self, asset: str) -> int:
        return {"ETH": 18, TOKEN: TOKEN_DECIMALS}[asset]

    # --- addresses and money --------------------------------------------------------------

    def fresh_address(self) -> str:
        return to_checksum_address("0x" + os.urandom(20).hex())

    def _send(self, sender: str, to: str, asset: str, amount: int) -> str:
        if asset == "ETH":
            return self.anvil.send(sender, to, amount)
        assert asset == TOKEN and self.token is not None
        return self.anvil.send(sender, self.token.address, 0, calldata("transfer(address,uint256)", to, amount))

    def pay(self, to: str, asset: str, amount: int) -> str:
        payer = self.payers[self._turn % len(self.payers)]
        self._turn += 1
        return self._send(payer, to, asset, amount).lower()

    def fund(self, address: str, asset: str, amount: int) -> None:
        assert self._held is None, "fund() while fees are held"
        if asset == "ETH":
            txid = self.anvil.send(self.anvil.accounts[0], address, amount)
        else:
            assert self.token is not None
            txid = self.token.mint(address, amount)
        self.anvil.mine(1)
        receipt = self.anvil.wait_receipt(txid)
        assert int(receipt["status"], 16) == 1, receipt

    def balance(self, address: str, asset: str) -> int:
        if asset == "ETH":
            return self.anvil.balance(address)
        assert asset == TOKEN and self.token is not None
        return self.token.balance(address)

    # --- blocks -------------------------------------------------------------------------------

    def head(self) -> int:
        return self.anvil.head()

    def mine(self, blocks: int = 1) -> None:
        if self._held is None:
            self.anvil.mine(blocks)
            return
        for _ in range(blocks):
            self.anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(HELD_BASE_FEE))
            self.anvil.mine(1)

    def reorg(self, depth: int, keep: Sequence[str] = ()) -> None:
        raws = [self.anvil.raw_tx(txid) for txid in keep]
        assert all(raws), f"the node does not know every kept transaction: {list(keep)}"
        # the kept transactions go into the first new block, in the order given
        self.anvil.reorg(depth, [(raw, 0) for raw in raws])

    # --- fees ---------------------------------------------------------------------------------

    def hold_fees(self) -> None:
        block = self.anvil.rpc("eth_getBlockByNumber", "latest", False)
        self._held = int(block["baseFeePerGas"], 16)

    def release_fees(self) -> None:
        held, self._held = self._held, None
        if held is not None:  # back to the fee level of before: whatever waits fits in
            self.anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(held))
