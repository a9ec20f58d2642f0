"""The Bitcoin family's real node starts as the tests need it: regtest, our flags, a funded
payer wallet, mining past MWEB's activation height, reorgs by invalidateblock."""

from __future__ import annotations

import pytest

from tests.support.litecoin import Litecoind


def test_regtest_node_pays_mines_past_mweb_and_reorgs(litecoind: Litecoind):
    info = litecoind.rpc("getblockchaininfo")
    assert info["chain"] == "regtest"
    assert litecoind.rpc("getnetworkinfo")["localrelay"] is True
    litecoind.mine(340)  # past block 431, where MWEB would activate without -vbparams=mweb:-2:0
    assert litecoind.head() >= 441
    to = litecoind.rpc("getnewaddress", "", "bech32", wallet="payer")
    txid = litecoind.send(to, 12_345_678)
    assert txid in litecoind.rpc("getrawmempool")
    (block,) = litecoind.mine(1)
    assert txid in litecoind.rpc("getblock", block)["tx"]
    dropped = litecoind.invalidate(1)
    assert txid in litecoind.rpc("getrawmempool")  # back in the mempool
    litecoind.reconsider(dropped)
    assert litecoind.rpc("getbestblockhash") == block


async def test_a_bitcoin_core_error_answered_with_http_500_is_the_nodes_answer(litecoind: Litecoind):
    """Bitcoin Core answers a failed single call with HTTP 500 (and an unknown method with
    404) and a JSON-RPC error body: that is an RpcError with the node's code, not a transport
    failure to retry; the family marks its own final codes."""
    from prometheus_client import CollectorRegistry

    from watcher.errors import RpcError
    from watcher.jsonrpc import JsonRpc, RetryPolicy
    from watcher.metrics import Metrics

    rpc = JsonRpc(litecoind.url, chain="ltc", metrics=Metrics(CollectorRegistry()), final_codes=frozenset({-8}),
                  retry=RetryPolicy(attempts=1))
    try:
        assert await rpc.call("getblockcount") == 0
        with pytest.raises(RpcError) as e:
            await rpc.call("getblockhash", 10**6)
        assert e.value.rpc_code == -8 and not e.value.retryable and "out of range" in e.value.message
        with pytest.raises(RpcError) as e:
            await rpc.call("no_such_method")
        assert e.value.rpc_code == -32601
        # amounts as exact decimals when asked, floats otherwise
        from decimal import Decimal

        assert (await rpc.call_exact("getnetworkinfo"))["relayfee"] == Decimal("0.00001")
        assert isinstance((await rpc.call("getnetworkinfo"))["relayfee"], float)
    finally:
        await rpc.aclose()


def test_node_labels_never_show_credentials_or_keys():
    from watcher.config import redacted_url

    assert redacted_url("http://user:s3cret@127.0.0.1:9332/") == "http://127.0.0.1:9332"
    assert redacted_url("https://mainnet.infura.io/v3/0123456789abcdef") == "https://mainnet.infura.io"
    assert redacted_url("http://u:p@[::1]:8545?key=x") == "http://[::1]:8545"
