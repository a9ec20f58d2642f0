"""A benchmark chain on anvil: N blocks of ~20 transactions each (native and ERC-20 transfers
mixed, a few percent of them to watched addresses), built fresh for each run (anvil's state
dumps of such a chain run to gigabytes; building takes well under a minute)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import httpx

from tests.support.evm import Anvil, Token
from watcher.keys import Keyring
from watcher_evm.family import EVM_KEYS, EvmOptions, EvmSpec
from watcher_evm.send import transfer_calldata

BENCH_MNEMONIC = "legal winner thank year wave sausage worth useful legal winner thank yellow"


@dataclass
class BenchChain:
    anvil: Anvil
    token: str
    watched: list[str]  # canonical addresses that receive part of the traffic
    blocks: int
    txs: int
    hits: int  # transfers to watched addresses
    built_in_s: float = 0.0


def watched_addresses(n: int) -> list[str]:
    k = Keyring.from_mnemonic(BENCH_MNEMONIC)
    fam = EvmSpec(EvmOptions())
    return [fam.address_from_public_key(k.public_key(EVM_KEYS.deposit_path, i)) for i in range(n)]


def build(blocks: int = 2000, per_block: int = 20, hit_rate: float = 0.03, seed: int = 7) -> BenchChain:
    node = Anvil()
    node.start()
    t0 = time.monotonic()
    token = Token.deploy(node, "USDT", 6)
    senders = node.accounts
    for s in senders:
        node.wait_receipt(token.mint(s, 10**15))
    watched = watched_addresses(10)
    rng = random.Random(seed)
    node.automine(False)
    http = httpx.Client(timeout=60, trust_env=False)
    txs = hits = 0
    start_head = node.head()
    for b in range(blocks):
        batch = []
        for i in range(per_block):
            sender = senders[(b + i) % len(senders)]
            hit = rng.random() < hit_rate
            to = rng.choice(watched) if hit else "0x" + rng.randbytes(20).hex()
            hits += hit
            if i % 5 < 3:  # 60 % native, 40 % token
                tx = {"from": sender, "to": to, "value": hex(rng.randrange(1, 10**17)), "gas": hex(21000)}
            else:
                tx = {"from": sender, "to": token.address, "gas": hex(60000),
                      "data": transfer_calldata(to, rng.randrange(1, 10**9))}
            batch.append({"jsonrpc": "2.0", "id": i, "method": "eth_sendTransaction", "params": [tx]})
        resp = http.post(node.url, json=batch).json()
        errors = [r["error"] for r in resp if "error" in r]
        assert not errors, errors[:2]
        txs += per_block
        node.mine(1)
    node.automine(True)
    chain = BenchChain(node, token.address, watched, node.head() - start_head, txs, hits)
    chain.built_in_s = round(time.monotonic() - t0, 1)
    return chain
