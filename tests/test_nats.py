"""The nats plugin against a real ``nats-server -js``: every event in the stream exactly once
and in outbox order per chain, through SIGKILLs of the daemon mid-publish and a restart of
nats-server; two watchers (different chains) feeding one stream, read by a durable consumer
with two workers that see every event exactly once."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter

import httpx
import pytest
import trio

from tests.support.daemon import (
    AUTH,
    DaemonProcess,
    chain_entry,
    free_port,
    running,
    wait_http,
    wait_until,
    write_config,
)
from tests.support.evm import Anvil
from tests.support.natsserver import nats_server, read_stream
from watcher import views
from watcher_nats import NatsConfig, parse_duration


def nats_table(url: str, **extra) -> dict:
    return {"nats": {"url": url, "stream": "WATCHER", "subject_prefix": "watcher", **extra}}


def all_events(api: str) -> list[dict]:
    out, after = [], 0
    with httpx.Client(base_url=api, headers=AUTH, trust_env=False, timeout=10) as http:
        while True:
            page = http.get("/v1/events", params={"after": after, "limit": 500}).json()["items"]
            if not page:
                return out
            out += page
            after = page[-1]["seq"]


def test_config_and_durations(tmp_path):
    from watcher.config import load_config
    from watcher.errors import ConfigError
    from watcher.plugins import chain_families, config_sections, make_plugin_manager

    pm = make_plugin_manager()
    assert parse_duration("10m") == 600 and parse_duration("90s") == 90 and parse_duration("2h") == 7200
    assert parse_duration("10") is None and parse_duration("1d") is None
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:1")],
                       extra=nats_table(["nats://a:4222", "nats://b:4222"], duplicate_window="2m", start="all"))
    n = load_config(cfg, chain_families(pm), config_sections(pm)).sections["nats"]
    assert n == NatsConfig(servers=("nats://a:4222", "nats://b:4222"), duplicate_window=120.0, start="all")
    for bad, where in [({"url": "http://x"}, "nats.url"), ({"start": "old"}, "nats.start"),
                       ({"duplicate_window": "ten"}, "nats.duplicate_window"), ({"stream": "a.b"}, "nats.stream"),
                       ({"subject_prefix": "a..b"}, "nats.subject_prefix"), ({"colour": 1}, "nats.colour")]:
        cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:1")],
                           extra={"nats": {"url": "nats://a:4222", **bad}})
        with pytest.raises(ConfigError) as e:
            load_config(cfg, chain_families(pm), config_sections(pm))
        assert str(e.value).startswith(where), str(e.value)


def test_every_event_once_in_order_through_kills_and_a_server_restart(tmp_path, anvil: Anvil, capsys):
    rng = random.Random(16)
    with nats_server() as server:
        port = free_port()
        cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)], api_port=port,
                           extra={**nats_table(server.url), "log": {"level": "info"}})
        api = f"http://127.0.0.1:{port}"
        daemon = DaemonProcess(cfg)
        created = 0
        kills = 0
        try:
            for rnd in range(5):
                daemon.start()
                wait_http(f"{api}/healthz", timeout=30)
                stop = threading.Event()

                def create(stop: threading.Event = stop) -> None:
                    nonlocal created
                    with httpx.Client(base_url=api, headers=AUTH, trust_env=False, timeout=5) as http:
                        while not stop.is_set():
                            try:
                                r = http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "1"})
                            except httpx.HTTPError:
                                return  # the daemon was killed
                            if r.status_code == 201:
                                created += 1

                worker = threading.Thread(target=create)
                worker.start()
                target = created + rng.randint(150, 300)
                while created < target:
                    threading.Event().wait(0.01)
                if rnd == 2:
                    server.restart()  # NATS itself goes away and comes back while events flow
                    target = created + 100
                    while created < target:
                        threading.Event().wait(0.01)
                if rnd < 4:
                    daemon.kill()  # SIGKILL mid-publish: events written, some not yet acknowledged
                    kills += 1
                stop.set()
                worker.join(timeout=30)
            events = all_events(api)
            assert len(events) >= 1000 and created >= 1000, (len(events), created)
            end = time.monotonic() + 60
            while True:
                stream = read_stream(server.url, "WATCHER")
                if len(stream) >= len(events) or time.monotonic() > end:
                    break
                time.sleep(0.5)
            ids = [m["msg_id"] for m in stream]
            dup = [i for i, c in Counter(ids).items() if c > 1]
            assert not dup, f"{len(dup)} events twice in the stream"
            assert set(ids) == {e["id"] for e in events}, "the stream and the outbox differ"
            assert [m["body"]["seq"] for m in stream] == sorted(m["body"]["seq"] for m in stream)  # outbox order
            first = stream[0]
            assert first["subject"] == f"watcher.devnet.{first['body']['type']}"
            assert first["body"] == next(e for e in events if e["id"] == first["msg_id"])  # as GET /v1/events
            r = httpx.get(f"{api}/readyz", trust_env=False).json()
            assert r["plugins"] == {"nats": None}
            metrics = httpx.get(f"{api}/metrics", trust_env=False).text
            with capsys.disabled():
                print(f"\n[nats] {len(events)} events, {created} invoices, {kills} SIGKILLs, 1 nats-server restart: "
                      f"{len(stream)} messages, none twice; "
                      + " ".join(line for line in metrics.splitlines() if line.startswith("watcher_nats_duplicates")))
        finally:
            daemon.stop()


async def test_two_watchers_one_stream_a_durable_consumer_with_two_workers(tmp_path, anvil: Anvil):
    with nats_server() as server:
        ports = [free_port(), free_port()]
        cfgs = [write_config(tmp_path / name, [chain_entry(name, anvil.url)], api_port=port,
                             extra=nats_table(server.url)) for name, port in zip(("alpha", "beta"), ports, strict=True)]
        async with running(cfgs[0], api=True) as a, running(cfgs[1], api=True) as b:
            for d, name in ((a, "alpha"), (b, "beta")):
                for _ in range(60):
                    d.store.invoices.create(chain=name, asset="ETH", amount=10**18, mode="sale", expires_in=600,
                                            tolerance_ppm=0, order_id=None, metadata={}, actor="t")
            expected = {e.id for d in (a, b) for e in d.store.events.list(limit=1000)}
            assert len(expected) >= 120
            with trio.fail_after(30):
                while a.sinks.behind("nats") or b.sinks.behind("nats"):
                    await trio.sleep(0.1)

        def consume() -> list[tuple[int, str, str]]:
            async def main() -> list[tuple[int, str, str]]:
                import nats

                nc = await nats.connect(server.url)
                js = nc.jetstream()
                seen: list[tuple[int, str, str]] = []

                async def worker(n: int) -> None:
                    sub = await js.pull_subscribe("watcher.>", durable="apps", stream="WATCHER")
                    idle = 0
                    while idle < 3:
                        try:
                            msgs = await sub.fetch(25, timeout=0.5)
                        except TimeoutError:  # nats.errors.TimeoutError, or a bare one when its
                            idle += 1  # deadline ran out between two of its own steps (nats-py 2.x)
                            continue
                        idle = 0
                        for m in msgs:
                            seen.append((n, m.headers["Nats-Msg-Id"], json.loads(m.data)["data"].get("chain", "")))
                            await m.ack()

                await asyncio.gather(worker(1), worker(2))
                await nc.close()
                return seen

            return asyncio.run(main())

        seen = await trio.to_thread.run_sync(consume)
        ids = Counter(i for _, i, _ in seen)
        assert set(ids) == expected and all(c == 1 for c in ids.values()), "every event exactly once"
        assert {n for n, _, _ in seen} == {1, 2}  # both workers took part
        assert {c for _, _, c in seen} >= {"alpha", "beta"}


async def test_nats_down_holds_up_only_the_plugin_and_readyz_says_so(tmp_path, anvil: Anvil):
    port = free_port()
    nats_port = free_port()  # nothing listens there yet
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)], api_port=port,
                       extra=nats_table(f"nats://127.0.0.1:{nats_port}", max_behind=5, timeout=1.0))
    async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                              headers=AUTH, trust_env=False) as http:
        for _ in range(10):
            assert (await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "1"})
                    ).status_code == 201  # the API does not wait for NATS
        with trio.fail_after(20):
            while (r := await http.get("/readyz")).status_code == 200:
                await trio.sleep(0.1)
        body = r.json()
        assert body["plugins"]["nats"] == "10 events not yet in JetStream (max_behind 5)"
        assert body["chains"]["devnet"]["ready"]  # scanning goes on
        reg = d.metrics.registry
        await wait_until(lambda: reg.get_sample_value("watcher_nats_failures_total") >= 1, what="a failed batch")
        assert reg.get_sample_value("watcher_nats_connected") == 0
        with nats_server(port=nats_port) as server:  # NATS comes: the backlog goes out
            with trio.fail_after(40):
                while (await http.get("/readyz")).status_code != 200:
                    await trio.sleep(0.2)
            stream = await trio.to_thread.run_sync(read_stream, server.url, "WATCHER")
            assert len(stream) == 10 and d.sinks.behind("nats") == 0
            assert reg.get_sample_value("watcher_nats_connected") == 1


async def test_tls_with_a_ca_file(tmp_path, anvil: Anvil):
    with nats_server(tls=True) as server:
        cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)],
                           extra=nats_table(server.url, tls_ca_file=str(server.ca_file)))
        async with running(cfg) as d:
            for _ in range(5):
                d.store.invoices.create(chain="devnet", asset="ETH", amount=1, mode="sale", expires_in=600,
                                        tolerance_ppm=0, order_id=None, metadata={}, actor="t")
            with trio.fail_after(20):
                while d.sinks.behind("nats"):
                    await trio.sleep(0.1)
        stream = await trio.to_thread.run_sync(lambda: read_stream(server.url, "WATCHER", ca_file=server.ca_file))
        assert [m["body"]["type"] for m in stream] == ["invoice.created"] * 5


async def test_start_all_backfills_the_outbox_once_and_new_does_not(tmp_path, anvil: Anvil):
    def make(d, n):
        for _ in range(n):
            d.store.invoices.create(chain="devnet", asset="ETH", amount=1, mode="sale", expires_in=600,
                                    tolerance_ppm=0, order_id=None, metadata={}, actor="t")

    with nats_server() as server:
        plain = write_config(tmp_path / "a", [chain_entry("devnet", anvil.url)])
        async with running(plain) as d:  # no [nats] yet: no cursor is made for it
            make(d, 7)
            assert d.sinks.behind("nats") is None
        backfill = write_config(tmp_path / "a", [chain_entry("devnet", anvil.url)],
                                extra=nats_table(server.url, start="all"))
        for _ in range(2):  # "all" backfills once: the second start does not publish again
            async with running(backfill) as d:
                make(d, 1)
                with trio.fail_after(20):
                    while d.sinks.behind("nats"):
                        await trio.sleep(0.1)
        stream = await trio.to_thread.run_sync(read_stream, server.url, "WATCHER")
        assert len(stream) == 9 and len({m["msg_id"] for m in stream}) == 9
        async with running(write_config(tmp_path / "c", [chain_entry("devnet", anvil.url)])) as d:
            make(d, 3)  # written before [nats] is on, with start = "new": never published
        async with running(write_config(tmp_path / "c", [chain_entry("devnet", anvil.url)],
                                        extra=nats_table(server.url, stream="NEW", subject_prefix="fresh"))) as d:
            make(d, 2)
            with trio.fail_after(20):
                while d.sinks.behind("nats"):
                    await trio.sleep(0.1)
        stream = await trio.to_thread.run_sync(read_stream, server.url, "NEW")
        assert len(stream) == 2 and all(m["subject"] == "fresh.devnet.invoice.created" for m in stream)


async def test_an_event_over_the_servers_max_payload_goes_out_shortened_and_the_rest_follow(tmp_path,
                                                                                             anvil: Anvil):
    """An invoice with thousands of dust payments (anyone can send them to its address) has
    an event over NATS's 1 MiB max_payload. nats-py refused it on every attempt, and the
    sink retried the same batch for ever: no event after it reached JetStream again. It
    now goes out without its lists and objects (``truncated`` names them; the whole event
    stays in ``GET /v1/events``), and the next ones follow."""
    with nats_server() as server:
        cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)], extra=nats_table(server.url))
        async with running(cfg) as d:
            payments = [{"transfer_id": f"tr_{i:026d}", "txid": "0x" + f"{i:064x}", "amount": "0.000001",
                         "status": "confirmed", "counted": True} for i in range(9000)]
            with d.store.db.transaction():
                d.store.events.emit("invoice.expired", {"id": "inv_dust", "chain": "devnet", "status": "expired",
                                                        "received": "0.009", "payments": payments},
                                    chain="devnet", subject="inv_dust")
            big = d.store.events.list(subject="inv_dust", limit=1)[0]
            assert len(views.event_json(big)) > 1024 * 1024
            for _ in range(2):
                d.store.invoices.create(chain="devnet", asset="ETH", amount=1, mode="sale", expires_in=600,
                                        tolerance_ppm=0, order_id=None, metadata={}, actor="t")
            with trio.fail_after(20):
                while d.sinks.behind("nats"):
                    await trio.sleep(0.1)
        stream = await trio.to_thread.run_sync(read_stream, server.url, "WATCHER")
        assert [m["body"]["type"] for m in stream] == ["invoice.expired", "invoice.created", "invoice.created"]
        short = stream[0]["body"]
        assert short["id"] == big.id and short["truncated"] == ["payments"] and short["size"] > 1024 * 1024
        assert short["data"] == {"id": "inv_dust", "chain": "devnet", "status": "expired", "received": "0.009"}


def test_a_message_is_the_event_as_listed_with_its_stored_data_spliced_in(tmp_path):
    """The plugin publishes ``views.event_json``: the stored data text is spliced in, not parsed
    and rendered again. Its bytes must be exactly those of rendering ``GET /v1/events``'s view,
    for what a label or a note can hold (quotes, backslashes, non-ASCII, control characters)
    and for amounts beyond 64 bits; the event as emitted splices the same text."""
    from prometheus_client import CollectorRegistry

    from watcher import views
    from watcher.daemon import Daemon

    data = {"z": "last", "label": 'a "quoted" \\ label \u00e9\u4e2d\U0001f600\n\t\x01', "amount": str(2**255 + 1),
            "n": 2**70, "nested": {"b": [1, None, True], "a": {}}, "empty": ""}
    # opened, never run: no node is asked anything
    daemon = Daemon.open(write_config(tmp_path, [chain_entry("c1", f"http://127.0.0.1:{free_port()}")]),
                         registry=CollectorRegistry())
    try:
        with daemon.store.db.transaction():
            emitted = daemon.store.events.emit("test.spliced", data, chain="c1", subject='sub "x"')
        (listed,) = daemon.store.events.list(types=("test.spliced",))
    finally:
        daemon.close()
    # read back (what the sink publishes), the data's keys come in stored (sorted) order
    assert views.event_json(listed) == json.dumps(views.event(listed), separators=(",", ":")).encode()
    for e in (emitted, listed):
        text = views.event_json(e)
        assert json.loads(text) == {"id": emitted.id, "seq": emitted.seq, "type": "test.spliced",
                                    "timestamp": views.iso_ms(emitted.created_at), "data": data}
    assert listed.data == data and listed == emitted
