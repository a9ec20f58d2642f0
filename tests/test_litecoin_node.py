"""The Bitcoin family's real node starts as the tests need it: regtest, our flags, a funded
payer wallet, mining past MWEB's activation height, reorgs by invalidateblock."""

from __future__ import annotations

import pytest

from tests.support.litecoin import Litecoind


@pytest.fixture
def litecoind():
    node = Litecoind()
    node.start()
    try:
        yield node
    finally:
        node.close()


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
