"""Reading serialized blocks and transactions (``watcher_bitcoin.rawblock``) against what a real
Litecoin Core node says about the same bytes: header fields, every output's txid, index, exact
satoshis and script, the candidate scripts a scan looks up, and the node's own decoding as the
fallback for a serialization the parser does not know."""

from __future__ import annotations

import binascii
import random
import shutil
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from tests.support.daemon import running, wait_until, write_config
from tests.support.litecoin import COIN, Litecoind
from watcher.core import Core
from watcher_bitcoin import rawblock
from watcher_bitcoin.address import to_script
from watcher_bitcoin.networks import NETWORKS

LTC = NETWORKS["ltc-regtest"]
NATIVE = rawblock._rawscan


@pytest.fixture(params=["c", "python"])
def parser(request, monkeypatch):
    """Each test that takes it runs on both implementations of the scan's loops: the C module
    (``_rawscan``, built by setup.py) and the same in Python (where it cannot be built)."""
    if request.param == "python":
        monkeypatch.setattr(rawblock, "_rawscan", None)
        monkeypatch.setattr(rawblock, "unhex", binascii.unhexlify)
    else:
        _needs_native()
    return request.param


def _needs_native() -> None:
    """The C module must be there wherever it can be built (a C compiler: the install builds
    it, and a build that silently stopped would only show as a slower catch-up)."""
    if NATIVE is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("the C scanner (watcher_bitcoin._rawscan) was not built: see setup.py")
        pytest.skip("no C compiler here: watcher_bitcoin.rawblock runs in Python only")


def _sats(value: Decimal) -> int:
    return int(value * COIN)


def test_blocks_and_transactions_read_as_the_node_decodes_them(litecoind: Litecoind, parser):
    node = litecoind
    node.payer  # noqa: B018
    # outputs of every type the wallet writes, several in one transaction, one zero-value
    to = [node.rpc("getnewaddress", "", kind, wallet="payer") for kind in ("bech32", "p2sh-segwit", "legacy")]
    node.rpc("sendmany", "", {to[0]: "0.1", to[1]: "0.2", to[2]: "0.30000001"}, wallet="payer")
    node.send(to[0], 123_456_789)
    (block_hash,) = node.mine(1)
    raw = bytes.fromhex(node.rpc("getblock", block_hash, 0))
    verbose = node.rpc("getblock", block_hash, 2)
    assert len(verbose["tx"]) == 3

    head = rawblock.header(raw)
    assert (head.hash, head.parent_hash, head.timestamp) == (verbose["hash"], verbose["previousblockhash"],
                                                            verbose["time"])
    expected = [(tx["txid"], out["n"], _sats(out["value"]), out["scriptPubKey"]["hex"], n == 0)
                for n, tx in enumerate(verbose["tx"]) for out in tx["vout"]]
    every_script = {bytes.fromhex(e[3]) for e in expected}
    got = [(o.txid, o.vout, o.value, o.script.hex(), o.coinbase) for o in rawblock.outputs_to(raw, every_script)]
    assert got == expected
    # only what is asked for; the walk stops after the last transaction holding it
    one = bytes.fromhex(expected[-1][3])
    assert [o.txid for o in rawblock.outputs_to(raw, {one})] == [e[0] for e in expected if e[3] == one.hex()]
    assert rawblock.outputs_to(raw, {to_script(LTC, node.rpc("getnewaddress", "", "bech32", wallet="payer"))}) == []

    # every standard output script is a candidate (the coinbase's witness commitment is not standard)
    standard = {bytes.fromhex(e[3]) for e in expected if not e[3].startswith("6a")}
    assert standard <= rawblock.candidate_scripts(raw)
    assert {to_script(LTC, a) for a in to} <= standard
    # or only those of the shapes asked for
    for shape in rawblock.FINDERS:
        of_shape = rawblock.candidate_scripts(raw, {shape})
        assert {k for k in standard if k.startswith(shape)} <= of_shape
        assert all(k.startswith(shape) for k in of_shape)

    for n, tx in enumerate(verbose["tx"]):
        tx_raw = bytes.fromhex(node.rpc("getrawtransaction", tx["txid"], False, block_hash))
        assert rawblock.txid(tx_raw) == tx["txid"]
        assert [(o.vout, o.value, o.script.hex(), o.coinbase) for o in rawblock.tx_outputs(tx_raw)] == [
            (out["n"], _sats(out["value"]), out["scriptPubKey"]["hex"], n == 0) for out in tx["vout"]]
        if n == 0:
            continue
        with pytest.raises(ValueError, match="truncated"):
            rawblock.tx_outputs(tx_raw[:-3])
        with pytest.raises(ValueError, match="after the transaction"):
            rawblock.tx_outputs(tx_raw + b"\x00")
    with pytest.raises(ValueError):
        rawblock.outputs_to(raw[: len(raw) // 2], every_script)
    with pytest.raises(ValueError, match="shorter than its header"):
        rawblock.header(raw[:60])


def test_hex_text_is_read_as_binascii_reads_it_and_anything_else_refused(parser):
    """``rawblock.unhex`` (how the node's hex answers become bytes) gives what
    ``bytes.fromhex`` gives for every length (the C one reads 32 characters a round, then one
    pair at a time), either case and a slice of a larger text; a character that is not a hex
    digit, wherever it is, or an odd length is a ValueError."""
    rng = random.Random(11)
    for n in [*range(0, 70), 255, 256, 4097]:
        data = rng.randbytes(n)
        text = data.hex()
        mixed = "".join(c.upper() if rng.random() < 0.5 else c for c in text)
        for t in (text, text.upper(), mixed):
            assert rawblock.unhex(memoryview(t.encode())) == data, (n, t)
        framed = memoryview(b'"result":"' + text.encode() + b'"')
        assert rawblock.unhex(framed[10:10 + len(text)]) == data
    # just outside each range of digits, and bytes that are not ASCII
    strangers = b"/:@G`g \x00\x7f\x80\xff"
    for at in range(80):
        for c in strangers:
            text = bytearray(rng.randbytes(40).hex().encode())
            text[at] = c
            with pytest.raises(ValueError):
                rawblock.unhex(memoryview(bytes(text)))
    for odd in (b"0", b"abc", b"ab" * 20 + b"a"):
        with pytest.raises(ValueError):
            rawblock.unhex(memoryview(odd))


def test_candidates_overlap_and_unknown_serializations_are_refused(parser):
    # a P2WPKH script whose 20-byte program itself holds the start of another candidate: both found
    inner = bytes.fromhex("0014") + bytes(range(20))
    program = b"\x16" + inner[:19]
    outer = b"\x16\x00\x14" + program
    found = rawblock.candidate_scripts(b"\xff" + outer + inner[19:] + b"\xff" * 30)
    assert outer[1:] in found and inner in found
    # Litecoin's MWEB transactions (flag 0x08) are not read here: the client asks the node
    mweb = (2).to_bytes(4, "little") + b"\x00\x08" + b"\x01" + b"\x00" * 36 + b"\x00" + b"\xff" * 4 + b"\x00" * 8
    with pytest.raises(rawblock.Unsupported):
        rawblock.tx_outputs(mweb)


async def test_a_block_the_parser_cannot_read_is_read_from_the_nodes_json(tmp_path, litecoind: Litecoind,
                                                                         monkeypatch):
    """A block holding a serialization the parser refuses (on mainnet: MWEB) is credited from
    ``getblock <hash> 2`` with exact amounts, the same transfers the parser gives."""
    node = litecoind
    node.payer  # noqa: B018

    def refuse(block: bytes, scripts: set[bytes]) -> list[rawblock.Output]:
        raise rawblock.Unsupported("transaction flag 0x8")

    monkeypatch.setattr(rawblock, "outputs_to", refuse)
    entry = {"id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": node.url, "confirmations": 1,
             "start_block": 0, "poll_interval": 0.1}
    cfg = write_config(tmp_path, [entry])
    async with running(cfg) as d:
        alice = d.store.addresses.deposit_address("ltc", "alice")[0].address
        txid = node.rpc("sendmany", "", {alice: "1.00000001", node.payer: "2"}, wallet="payer")
        node.mine(1)
        got = await wait_until(lambda: d.views.transfers(chain="ltc", limit=10)[0], what="a transfer")
    assert [(t["txid"], t["address"], t["base_units"]) for t in got] == [(txid, alice, str(COIN + 1))]


def test_watched_addresses_are_looked_up_by_script_and_old_rows_get_theirs(tmp_path):
    """The scan finds output scripts, so a Bitcoin chain's addresses are looked up by their
    script (the match key); a row without one (written before migration m007) gets it when the
    store opens."""
    entry = {"id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": "http://127.0.0.1:9"}
    cfg = write_config(tmp_path, [entry])
    core = Core.open(cfg, registry=CollectorRegistry())
    try:
        alice = core.store.addresses.deposit_address("ltc", "alice")[0].address
        legacy = "mipcBbFg9gMiCh81Kj8tqqdgoZub1ZJRfn"  # P2PKH on the test networks
        core.store.addresses.watch_external("ltc", legacy, None)
        scripts = {to_script(LTC, a): a for a in (alice, legacy)}
        assert core.store.addresses.watched("ltc", [*scripts, bytes.fromhex("0014" + "00" * 20)]) == set(scripts)
        assert core.store.addresses.watched("ltc", [alice, legacy]) == set()  # addresses are not keys
        # the index keeps each key's hex
        assert {r[0] for r in core.store.db.query("SELECT match_key FROM addresses WHERE chain = 'ltc'"
                                                  " AND kind != 'hot'")} == {k.hex() for k in scripts}
        # the kinds of script watched: the scan looks only for their shapes
        assert core.store.addresses.key_prefixes("ltc", rawblock.FINDERS) == {b"\x00\x14", b"\x76\xa9\x14"}
        assert core.store.addresses.key_prefixes(
            "ltc", [bytes.fromhex(p) for p in ("00", "0013", "0015", "76a9", "76a915", "a9")]) == {b"\x00", b"\x76\xa9"}
        with core.store.db.transaction() as conn:
            conn.execute("UPDATE addresses SET match_key = NULL")
    finally:
        core.close()
    core = Core.open(cfg, registry=CollectorRegistry())
    try:
        assert core.store.db.scalar("SELECT count(*) FROM addresses WHERE match_key IS NULL") == 0
        assert core.store.addresses.watched("ltc", scripts) == set(scripts)
    finally:
        core.close()


def _compact(n: int) -> bytes:
    return bytes([n]) if n < 0xFD else b"\xfd" + n.to_bytes(2, "little")


def _segwit_tx(tag: int, outputs: list[tuple[int, bytes]], witness_item: int) -> bytes:
    """A segwit transaction with one input whose witness holds an item of ``witness_item``
    bytes (3-byte compact sizes from 253 on)."""
    body_in = _compact(1) + bytes([tag]) * 32 + b"\x00\x00\x00\x00" + _compact(0) + b"\xfd\xff\xff\xff"
    body_out = _compact(len(outputs)) + b"".join(v.to_bytes(8, "little") + _compact(len(s)) + s for v, s in outputs)
    witness = _compact(2) + _compact(witness_item) + b"\x30" * witness_item + _compact(33) + b"\x02" * 33
    return (2).to_bytes(4, "little") + b"\x00\x01" + body_in + body_out + witness + b"\x00" * 4


def test_long_compact_sizes_blocks_of_many_transactions_and_big_witness_items(parser):
    """More than 252 transactions, outputs and witness items of 253 bytes and more are
    written with 3-byte compact sizes; the walk reads them and finds the payment in the last
    transaction, with the txid embit computes."""
    from embit.transaction import Transaction

    watched = bytes.fromhex("0014") + bytes(range(20))
    other = bytes.fromhex("0014") + b"\xee" * 20
    txs = [_segwit_tx(n % 250, [(1000 + n, other)], 300) for n in range(299)]
    txs.append(_segwit_tx(7, [(5, other)] * 260 + [(123_456, watched)], 253))
    block = b"\x00" * 80 + _compact(len(txs)) + b"".join(txs)
    (found,) = rawblock.outputs_to(block, {watched})
    assert (found.vout, found.value, found.script, found.coinbase) == (260, 123_456, watched, False)
    assert found.txid == Transaction.parse(txs[-1]).txid().hex()
    assert [o.vout for o in rawblock.tx_outputs(txs[-1])][-1] == 260
    assert watched in rawblock.candidate_scripts(block)


def test_a_long_output_script_that_starts_with_a_watched_one_is_not_taken_for_it(parser):
    """An output script of 0x1600-0x16ff bytes has its length written fd 00 16: the byte
    before it is a P2WPKH script's length. One that starts with a watched P2WPKH script (any
    consensus-valid bytes after it) was taken for a payment to it, with the whole blob as
    its script, which no address is: every fetch of that block failed, and the chain's scan
    stopped for good. Only an output whose script is exactly the watched one is a payment."""
    watched = bytes.fromhex("0014") + bytes(range(20))
    blob = watched + b"\x6a" * (0x1600 - len(watched))
    honest = _segwit_tx(1, [(1, blob), (7_000, watched)], 72)
    block = b"\x00" * 80 + _compact(1) + honest
    found = rawblock.outputs_to(block, {watched})
    assert [(o.vout, o.value, o.script) for o in found] == [(1, 7_000, watched)]
    assert [len(o.script) for o in rawblock.tx_outputs(honest)] == [0x1600, 22]


async def test_an_address_of_a_new_kind_watched_while_its_block_downloads_is_found_in_it(tmp_path,
                                                                                         litecoind: Litecoind):
    """The scan searches a block only for the shapes of script it watches. Both the shapes and
    the watched scripts are read once a part of the fetch has arrived, so an address of a kind
    first watched while the part was downloading is looked for in it."""
    node = litecoind
    node.payer  # noqa: B018
    legacy = node.rpc("getnewaddress", "", "legacy", wallet="payer")  # P2PKH
    key = to_script(LTC, legacy)
    txid = node.send(legacy, 1_000_000)
    node.mine(1)
    head = node.head()

    class Watched:  # the core's filter; the P2PKH address is watched once ``added``
        added = False

        def __call__(self, candidates: Iterable[bytes]) -> set[bytes]:
            return {k for k in candidates if k == key and self.added}

        def prefixes(self, prefixes: Iterable[bytes]) -> set[bytes]:
            return {b"\x00\x14", b"\x76\xa9\x14"} if self.added else {b"\x00\x14"}

    entry = {"id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": node.url}
    core = Core.open(write_config(tmp_path, [entry]), registry=CollectorRegistry())
    try:
        async with core.open_client("ltc") as client:
            watched = Watched()
            download = client.rpc.batch_hex

            async def watched_meanwhile(calls: Any) -> list[bytes]:
                raw = await download(calls)
                watched.added = True  # the app watched the address while the node answered
                return raw

            client.rpc.batch_hex = watched_meanwhile  # type: ignore[method-assign]
            blocks = await client.fetch_blocks(head, head, watched)
            assert [(t.txid, t.to) for b in blocks for t in b.transfers] == [(txid, legacy)]
    finally:
        core.close()


async def test_heads_and_hashes_never_queue_behind_block_downloads(tmp_path, litecoind: Litecoind):
    """A catch-up keeps ``rpc_concurrency`` block downloads in flight, and more wait for a slot.
    The small calls (the head, the next batch's hashes) have requests of their own beside
    them: queued behind the downloads, the next batch's hashes came back after the node had
    served every block asked for, and it sat idle meanwhile."""
    node = litecoind
    node.mine(2)
    head = node.head()
    entry = {"id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": node.url, "rpc_concurrency": 1}
    core = Core.open(write_config(tmp_path, [entry]), registry=CollectorRegistry())
    try:
        async with core.open_client("ltc") as client:
            got = []

            async def fetch() -> None:
                got.extend(await client.fetch_blocks(head - 1, head, lambda candidates: set()))

            slots = client._parts
            async with trio.open_nursery() as nursery:
                await slots.acquire()  # the only download slot, as a download in flight holds it
                nursery.start_soon(fetch)
                with trio.fail_after(30):
                    assert await client.head() == head
                    assert (await client.block_hashes([head]))[head][0] == node.rpc("getblockhash", head)
                    while slots.statistics().tasks_waiting == 0:  # the fetch has its hashes, waits for a slot
                        await trio.sleep(0.01)
                assert got == []
                slots.release()
            assert [(b.number, b.hash) for b in got] == [(n, node.rpc("getblockhash", n)) for n in (head - 1, head)]
    finally:
        core.close()


def test_the_c_and_python_walks_agree_on_every_block_whole_or_damaged():
    """The C loops against the Python ones on the same bytes: blocks of many shapes (short
    and long compact sizes, several outputs, legacy and segwit transactions), then the same
    cut short and with bytes changed. Both give the same outputs, or both refuse the block the
    same way (ValueError, or Unsupported with the same flag)."""
    _needs_native()
    rng = random.Random(11)
    watched = [bytes.fromhex("0014") + bytes([k]) * 20 for k in range(4)] + [
        b"\xa9\x14" + b"\x07" * 20 + b"\x87", b"\x51\x20" + b"\x09" * 32]

    def legacy_tx(outputs: list[tuple[int, bytes]]) -> bytes:
        body_in = _compact(1) + rng.randbytes(32) + b"\x01\x00\x00\x00" + _compact(3) + b"\x51\x16\x00" + b"\xff" * 4
        body_out = _compact(len(outputs)) + b"".join(v.to_bytes(8, "little") + _compact(len(s)) + s for v, s in outputs)
        return (1).to_bytes(4, "little") + body_in + body_out + b"\x00" * 4

    def block() -> bytes:
        txs = []
        for _ in range(rng.randint(1, 300)):
            outputs = [(rng.randrange(2**64), rng.choice(watched) if rng.random() < 0.2 else rng.randbytes(22))
                       for _ in range(rng.randint(1, 4))]
            txs.append(_segwit_tx(rng.randrange(256), outputs, rng.choice([1, 72, 300]))
                       if rng.random() < 0.7 else legacy_tx(outputs))
        return rng.randbytes(80) + _compact(len(txs)) + b"".join(txs)

    def both(fn, *args):
        said = []
        for impl in (NATIVE, None):
            rawblock._rawscan = impl
            try:
                said.append(fn(*args))
            except rawblock.Unsupported as e:
                said.append(("unsupported", str(e)))
            except ValueError:
                said.append("ValueError")
            finally:
                rawblock._rawscan = NATIVE
        return said

    hits = refused = 0
    for _ in range(30):
        whole = block()
        for data in [whole] + [whole[:rng.randrange(len(whole))] for _ in range(10)] + [
                bytes(b ^ (rng.randrange(1, 256) if rng.random() < 0.001 else 0) for b in whole) for _ in range(10)]:
            c, py = both(rawblock.candidate_scripts, data)
            assert c == py
            wanted = set(rng.sample(watched, 3))
            # only the watched ones, each tested as it is found
            assert both(rawblock.candidate_scripts, data, rawblock.FINDERS, wanted) == [c & wanted, c & wanted]
            c, py = both(rawblock.outputs_to, data, wanted)
            assert c == py
            hits += len(c) if isinstance(c, list) else 0
            refused += not isinstance(c, list)
    assert hits > 100 and refused > 50  # both paths were taken many times

    # and bytes made to hit each refusal: no inputs, an unknown flag, compact sizes running
    # past the end (3, 5 and 9 bytes), a block shorter than a header
    pay = watched[0]
    good = _segwit_tx(1, [(5, pay)], 72)
    no_inputs = good[:6] + b"\x00" + _compact(1) + (5).to_bytes(8, "little") + _compact(22) + pay + b"\x00" * 4
    mweb = good[:5] + b"\x08" + good[6:]
    for bad, refusal in [(no_inputs, "ValueError"), (mweb, ("unsupported", "transaction flag 0x8"))] + [
            (good[:6] + marker + b"\x01", "ValueError") for marker in (b"\xfd", b"\xfe", b"\xff")]:
        for data in (b"\x00" * 80 + _compact(1) + bad, b"\x00" * 80 + _compact(2) + bad + good):
            if pay in data:  # (the cut ones hold no payment alone: nothing to read)
                assert both(rawblock.outputs_to, data, {pay}) == [refusal, refusal]
    assert both(rawblock.outputs_to, b"\x00" * 80, {b"\x00" * 5}) == [[], []]  # no place of it: nothing read
    assert both(rawblock.outputs_to, b"\x00" * 50 + b"\x16" + pay, {pay}) == ["ValueError", "ValueError"]


async def test_requests_for_blocks_are_sized_by_the_blocks_the_node_sends(tmp_path, litecoind: Litecoind, monkeypatch):
    """A request's blocks are up to 50 and about PART_HEX of hex: a main network block is
    ~3 MB of hex, and 50 a request, 8 requests in flight, would be answers of 150 MB each.
    Before any block is seen, a block is taken as large (as on main networks; regtest's
    guess is smaller); then as the last parts were: a larger block counts at once, smaller
    ones a quarter a part."""
    from watcher_bitcoin import client as bclient

    node = litecoind
    node.mine(33)
    head = node.head()
    empty_hex = 2 * len(bytes.fromhex(node.rpc("getblock", node.rpc("getblockhash", head), 0)))
    monkeypatch.setattr(bclient, "PART_HEX", 10 * empty_hex + empty_hex // 2)
    monkeypatch.setitem(bclient.FIRST_GUESS, "regtest", 20 * empty_hex)  # a large guess: 1 block a request
    entry = {"id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": node.url}
    core = Core.open(write_config(tmp_path, [entry]), registry=CollectorRegistry())
    try:
        async with core.open_client("ltc") as client:
            sizes: list[int] = []
            download = client.rpc.batch_hex

            async def counted(calls: Any) -> list[bytes]:
                sizes.append(len(calls))
                return await download(calls)

            client.rpc.batch_hex = counted  # type: ignore[method-assign]
            nothing = lambda candidates: set()  # noqa: E731
            first = await client.fetch_blocks(head - 31, head - 20, nothing)  # the guess down to them: 20 * 0.75**12 < 1
            assert sizes == [1] * 12 and [b.number for b in first] == list(range(head - 31, head - 19))
            sizes.clear()
            later = await client.fetch_blocks(head - 19, head, nothing)  # 10 empty blocks a request now
            assert sizes == [10, 10] and [b.number for b in later] == list(range(head - 19, head + 1))
            # a large block (a transaction of 300 outputs): the next requests are small at once
            node.payer  # noqa: B018
            outs = {node.rpc("getnewaddress", wallet="payer"): "0.001" for _ in range(300)}
            node.rpc("sendmany", "", outs, wallet="payer")
            (big,) = node.mine(1)
            assert 2 * len(bytes.fromhex(node.rpc("getblock", big, 0))) > 10 * empty_hex
            await client.fetch_blocks(head + 1, head + 1, nothing)
            assert client.part_size() == 1
    finally:
        core.close()
