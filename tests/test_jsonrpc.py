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


@pytest.mark.parametrize("unhex", ["binascii", "bitcoin"])
def test_hex_results_are_read_in_the_layouts_bitcoin_core_writes_and_nothing_else(unhex):
    """``batch_hex`` reads Bitcoin Core's answers without a JSON parser: the 1.0 replies it
    writes and the 2.0 ones of v28 and later, batches and single calls. Any other layout, an
    error, or a result that is not hex gives None: the answer is then parsed as JSON, so the
    shortcut can never read an answer differently from the parser. The same with the Bitcoin
    family's own hex decoder (C where built) as with binascii's."""
    import binascii

    import orjson

    from watcher.jsonrpc import _hex_results
    from watcher_bitcoin import rawblock

    decode = binascii.unhexlify if unhex == "binascii" else rawblock.unhex

    def read(body: bytes) -> object:
        got = _hex_results(body, decode)
        if got is not None:  # the same as parsing the JSON, with the hex as bytes
            parsed = orjson.loads(body)
            for item in parsed if isinstance(parsed, list) else [parsed]:
                item["result"] = bytes.fromhex(item["result"])
                item.setdefault("error", None)
                item.pop("jsonrpc", None)
            assert got == parsed
        return got

    one = b'{"result":"00ff10","error":null,"id":7}'
    two = b'{"jsonrpc":"2.0","result":"abcd","id":8}'
    assert read(b"[" + one + b"," + two + b"]\n") == [{"id": 7, "result": b"\x00\xff\x10", "error": None},
                                                      {"id": 8, "result": b"\xab\xcd", "error": None}]
    assert read(one + b"\n") == {"id": 7, "result": b"\x00\xff\x10", "error": None}
    assert read(b'[{"result":"","error":null,"id":1}]') == [{"id": 1, "result": b"", "error": None}]
    for other in [
        b'[{"result":null,"error":{"code":-5,"message":"Block not found"},"id":1}]',  # an error
        b'[' + one + b',{"result":null,"error":{"code":-8,"message":"x"},"id":2}]',  # one of them
        b'[{"result":"0ff","error":null,"id":1}]',  # odd length
        b'[{"result":"zz","error":null,"id":1}]',  # not hex
        b'[{"result":"' + b"ab" * 40 + b'g0","error":null,"id":1}]',  # not hex past 32 characters
        b'[{"result":"ab\\u0063d","error":null,"id":1}]',  # an escape: JSON reads "abcd"
        b'[{"id":1,"result":"abcd","error":null}]',  # keys in another order
        b'[{"result": "abcd", "error": null, "id": 1}]',  # spaces
        b'[{"result":"abcd","error":null,"id":1}',  # cut short
        b'[{"result":"abcd","error":null,"id":1}] x',  # something after
        b'[{"result":"abcd","error":null,"id":1};{"result":"ab","error":null,"id":2}]',
        b'[{"result":"abcd","error":null,"id":"1"}]',  # a string id
        b"[]", b"", b"<html>",
    ]:
        assert read(other) is None, other


@pytest.mark.parametrize("lean_http", [False, True])
async def test_batch_hex_matches_the_json_reading_on_a_real_node(litecoind, lean_http):
    """Serialized blocks from Litecoin Core: ``batch_hex`` gives the bytes the JSON answer
    holds, in order, for a batch and for a single call; a call the node refuses raises its
    RpcError as ``batch`` does, or takes its place in ``batch_outcomes``. Through httpx and
    through watcher.wire alike (which reads the same answers with one connection kept)."""
    hashes = litecoind.mine(3)
    m = Metrics()
    rpc = JsonRpc(litecoind.url, chain="t", metrics=m, max_batch=2, lean_http=lean_http)
    from watcher.wire import WireTransport

    assert isinstance(rpc._client._transport, WireTransport) == lean_http
    try:
        calls = [("getblock", (h, 0)) for h in hashes]
        as_json = await rpc.batch(calls)
        assert await rpc.batch_hex(calls) == [bytes.fromhex(t) for t in as_json]
        assert await rpc.batch_hex(calls[:1]) == [bytes.fromhex(as_json[0])]
        with pytest.raises(RpcError, match="not found"):
            await rpc.batch_hex([*calls, ("getblock", ("00" * 32, 0))])
        # the outcomes, as the mempool poll reads new transactions: bytes, or the refusal
        *blocks, refused = await rpc.batch_outcomes([*calls, ("getblock", ("00" * 32, 0))], decode="hex")
        assert blocks == [bytes.fromhex(t) for t in as_json]
        assert isinstance(refused, RpcError) and refused.rpc_code == -5
        # a single call the node refuses comes with HTTP 500 from Litecoin Core: still its answer
        with pytest.raises(RpcError, match="not found"):
            await rpc.call("getblock", "00" * 32, 0)
        assert await rpc.call("getblockcount") == litecoind.head()
    finally:
        await rpc.aclose()



def test_answers_are_read_a_mebibyte_at_a_time():
    """watcher raises httpcore's reads from 64 KiB to 1 MiB through httpcore's class
    attribute; an httpcore that renamed it would silently read 64 KiB again (and the scan
    spend ~0.1 ms of CPU a block more): this says so."""
    import httpcore

    from watcher import jsonrpc

    assert jsonrpc.READ_BYTES == 1 << 20
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == jsonrpc.READ_BYTES
