"""The JSON-RPC transport against a real node: batching, and retries that always end."""

from __future__ import annotations

import time

import pytest
import trio

from tests.support.evm import Anvil
from watcher.errors import NodeError, RpcError
from watcher.jsonrpc import JsonRpc, RetryPolicy
from watcher.metrics import Metrics


async def test_batches_split_and_keep_order(anvil: Anvil):
    anvil.mine(30)
    m = Metrics()
    rpc = JsonRpc(anvil.url, chain="t", metrics=m, max_batch=7, concurrency=3)
    try:
        blocks = await rpc.batch([("eth_getBlockByNumber", (hex(n), False)) for n in range(31)])
        assert [int(b["number"], 16) for b in blocks] == list(range(31))
        assert m.registry.get_sample_value("watcher_rpc_requests_total",
                                           {"chain": "t", "method": "eth_getBlockByNumber"}) == 31
    finally:
        await rpc.aclose()


async def test_retryable_rpc_errors_are_retried_a_bounded_number_of_times(anvil: Anvil):
    """A transaction the node refuses (underpriced) answers with the same retryable error
    every time: the call must give up after the policy's attempts, not loop forever."""
    from eth_account import Account
    from eth_utils import to_checksum_address

    key = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"  # anvil account 0
    tx = {"chainId": 31337, "nonce": 0, "gas": 21000, "to": to_checksum_address(anvil.accounts[3]), "value": 1,
          "type": 2, "maxFeePerGas": 1, "maxPriorityFeePerGas": 1}
    raw = "0x" + bytes(Account.sign_transaction(tx, key).raw_transaction).hex()
    m = Metrics()
    rpc = JsonRpc(anvil.url, chain="t", metrics=m, retry=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02))
    try:
        with trio.fail_after(10):
            with pytest.raises(RpcError) as exc:
                await rpc.call("eth_sendRawTransaction", raw)
        assert exc.value.retryable and "base fee" in exc.value.message
        sent = m.registry.get_sample_value("watcher_rpc_requests_total",
                                           {"chain": "t", "method": "eth_sendRawTransaction"})
        assert sent == 3
    finally:
        await rpc.aclose()


async def test_unreachable_node_fails_fast_after_retries():
    rpc = JsonRpc("http://127.0.0.1:9", chain="t", metrics=Metrics(), timeout=1,
                  retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02))
    t0 = time.monotonic()
    try:
        with pytest.raises(NodeError, match="cannot reach node"):
            await rpc.call("eth_blockNumber")
    finally:
        await rpc.aclose()
    assert time.monotonic() - t0 < 5


async def test_a_failing_chunk_of_a_split_batch_raises_the_plain_node_error():
    # chunks are sent concurrently; the callers catch NodeError (back off, retry), so the
    # failure must not arrive wrapped in the nursery's ExceptionGroup
    rpc = JsonRpc("http://127.0.0.1:9", chain="t", metrics=Metrics(), timeout=1, max_batch=2,
                  retry=RetryPolicy(attempts=1))
    try:
        with pytest.raises(NodeError, match="cannot reach node"):
            await rpc.batch([("eth_blockNumber", ())] * 5)
    finally:
        await rpc.aclose()


async def test_retry_after_seconds_or_http_date_capped_at_a_minute(anvil: Anvil):
    """A node's 429 with ``Retry-After`` (seconds or an HTTP date, RFC 9110) is honoured, at
    most 60 s: the same parser as the webhook dispatcher's, with the JSON-RPC client's cap."""
    from email.utils import formatdate

    from tests.support.faultproxy import fault_proxy

    async with fault_proxy(anvil.url) as proxy:
        rpc = JsonRpc(proxy.url, chain="t", metrics=Metrics(), retry=RetryPolicy(attempts=1))
        try:
            waits = []
            for value in ("7", formatdate(time.time() + 30, usegmt=True), "3600", "soon"):
                proxy.retry_after = value
                proxy.inject("http_429")
                with trio.fail_after(10), pytest.raises(NodeError, match="HTTP 429") as exc:
                    await rpc.call("eth_blockNumber")
                waits.append(exc.value.retry_after)
        finally:
            await rpc.aclose()
    assert waits[0] == 7 and 28 < waits[1] <= 30 and waits[2] == 60 and waits[3] is None
