"""Operating watcher: backups of the live database, reconciliation against the chain,
readiness that follows the node, and logs that never carry a secret."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import trio

from tests.support.daemon import (
    API_TOKEN,
    TEST_MNEMONIC,
    DaemonProcess,
    chain_entry,
    free_port,
    running,
    wait_http,
    wait_until,
    write_config,
)
from tests.support.evm import Anvil, Token, calldata, compile_contracts, deploy
from tests.support.receiver import receiving
from watcher.backup import backup
from watcher.cli import main as cli_main
from watcher.keys import Keyring
from watcher.store.db import Database
from watcher_evm.family import EVM_KEYS

APP = {"authorization": f"Bearer {API_TOKEN}"}
ADMIN_TOKEN = "admin-token-0123456789"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watcher", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def transfers(port: int) -> list[dict]:
    return httpx.get(f"http://127.0.0.1:{port}/v1/transfers", params={"limit": 1000}, headers=APP,
                     trust_env=False).json()["items"]


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_backup_of_a_running_daemon_restores_and_continues(tmp_path, anvil: Anvil):
    port = free_port()
    cfg = write_config(tmp_path / "live", [chain_entry("devnet", anvil.url)], api_port=port)
    proc = DaemonProcess(cfg).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        alice = httpx.post(f"http://127.0.0.1:{port}/v1/addresses", json={"chain": "devnet", "label": "alice"},
                           headers=APP).json()["address"]
        for i in range(5):
            anvil.send(anvil.accounts[1], alice, 10**15 + i)
        anvil.mine(2)
        wait_for(lambda: len([t for t in transfers(port) if t["status"] == "confirmed"]) == 5, what="deposits")
        r = cli("backup", str(tmp_path / "backup.db"), "-c", str(cfg), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "integrity ok" in r.stdout and (tmp_path / "backup.db").stat().st_mode & 0o777 == 0o600
        again = cli("backup", str(tmp_path / "backup.db"), "-c", str(cfg), cwd=tmp_path)
        assert again.returncode == 1 and "--force" in again.stderr
        anvil.send(anvil.accounts[1], alice, 7)  # after the backup: the restored daemon must find it
        anvil.mine(2)
    finally:
        proc.stop()
    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    shutil.copy(tmp_path / "backup.db", restored_dir / "watcher.db")
    port2 = free_port()
    cfg2 = write_config(restored_dir, [chain_entry("devnet", anvil.url)], api_port=port2)
    proc = DaemonProcess(cfg2).start()
    try:
        wait_http(f"http://127.0.0.1:{port2}/healthz")
        items = wait_for(lambda: (t := transfers(port2)) and len(t) == 6 and all(x["status"] == "confirmed" for x in t)
                         and t, what="the restored daemon catching up")
        assert sorted(int(t["base_units"]) for t in items) == sorted([10**15 + i for i in range(5)] + [7])
        assert all(t["label"] == "alice" for t in items)
    finally:
        proc.stop()


class Committer:
    """A second connection committing a small write every ``every`` seconds from a thread,
    as the daemon commits at every block; ``stop()`` ends it (call it in a ``finally``)."""

    def __init__(self, path: Path, every: float):
        self.path, self.every = path, every
        self.commits = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            while not self.stopping.is_set():
                conn.execute("INSERT INTO ticks (at) VALUES (?)", (time.time(),))
                self.commits += 1
                self.stopping.wait(self.every)
        finally:
            conn.close()

    def start(self) -> Committer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


def test_backup_completes_while_another_connection_keeps_committing(tmp_path):
    """A 40 MB database and a writer committing every 5 ms, as a busy daemon does. The backup
    used to copy 256 pages a step, and SQLite restarts an online backup from its first page
    whenever another connection writes between two steps: once a pass over the file takes
    longer than the gap between commits it never finished (a 205 MB database was still not
    backed up after 30 s). One step under one read transaction (WAL: the writer goes on)
    finishes, with a consistent copy."""
    source = tmp_path / "watcher.db"
    db = Database(source)
    db.migrate()
    with db.transaction() as conn:
        conn.execute("CREATE TABLE filler (n INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        conn.executemany("INSERT INTO filler (n, data) VALUES (?, randomblob(4000))", [(i,) for i in range(10_000)])
        conn.execute("CREATE TABLE ticks (n INTEGER PRIMARY KEY, at REAL NOT NULL)")
    db.close()
    assert source.stat().st_size > 30 * 2**20  # a pass over it takes far longer than 5 ms
    target = tmp_path / "backup.db"
    writer = Committer(source, every=0.005).start()
    result: list[int | BaseException] = []

    def run() -> None:
        try:
            result.append(backup(source, target))
        except BaseException as e:  # handed to the test's thread
            result.append(e)

    copier = threading.Thread(target=run, daemon=True)
    try:
        while writer.commits < 5:  # the writer is going before the backup starts
            time.sleep(0.01)
        with contextlib.closing(sqlite3.connect(source)) as c:
            ticks_before = c.execute("SELECT MAX(n) FROM ticks").fetchone()[0]
        started = time.monotonic()
        copier.start()
        copier.join(timeout=20)
        took = time.monotonic() - started
        assert not copier.is_alive(), f"the backup did not finish in 20 s ({writer.commits} commits meanwhile)"
        assert writer.commits > ticks_before  # the writer was committing all along
    finally:
        writer.stop()
        copier.join(timeout=60)  # without a writer even the old stepwise copy ends
    assert len(result) == 1 and isinstance(result[0], int), result
    assert took < 10, took
    with contextlib.closing(sqlite3.connect(target)) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("SELECT COUNT(*), MIN(n), MAX(n) FROM filler").fetchone() == (10_000, 0, 9999)
        ticks = [r[0] for r in c.execute("SELECT n FROM ticks ORDER BY n")]
        assert ticks[:ticks_before] == list(range(1, ticks_before + 1))  # everything committed before it
        assert ticks == list(range(1, len(ticks) + 1))  # a snapshot: no gap
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
    assert target.stat().st_mode & 0o777 == 0o600 and not target.with_name("backup.db.partial").exists()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name.startswith("watcher.db")}


def watcher_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``watcher ARGS`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    capsys.readouterr()
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_restore_puts_the_backup_in_place_not_a_crashed_daemons_wal(tmp_path, capsys):
    """The documented restore was: stop the daemon, put the copy at storage.path, start it. A
    daemon that died by kill -9 leaves watcher.db-wal behind, and SQLite replays it onto the
    copy put in its place. ``watcher restore`` refuses while the daemon runs, moves the
    database and its -wal/-shm aside together, and puts exactly the backup in place."""
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9")], api_port=port)
    live, saved = tmp_path / "watcher.db", tmp_path / "backup.db"
    proc = DaemonProcess(cfg).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        assert watcher_cli(capsys, "backup", str(saved), "-c", str(cfg))[0] == 0
        assert watcher_cli(capsys, "pause", "payouts", "-c", str(cfg))[0] == 0  # a write after the backup
        before = _files(tmp_path)
        code, _, err = watcher_cli(capsys, "restore", str(saved), "-c", str(cfg))
        assert code == 1 and "in use (is the daemon running?)" in err, err
        assert _files(tmp_path).keys() == before.keys()  # nothing moved
        proc.kill()  # kill -9: no checkpoint, the write after the backup is only in the -wal
    finally:
        proc.stop()
    assert (tmp_path / "watcher.db-wal").stat().st_size > 0
    # what the old procedure gave: the copy, with the dead daemon's -wal replayed onto it
    old_way = tmp_path / "old-way"
    old_way.mkdir()
    shutil.copy(saved, old_way / "watcher.db")
    shutil.copy(tmp_path / "watcher.db-wal", old_way / "watcher.db-wal")
    with contextlib.closing(sqlite3.connect(old_way / "watcher.db")) as c:
        assert c.execute("SELECT COUNT(*) FROM audit_log WHERE action = 'admin.pause'").fetchone()[0] == 1

    crashed = _files(tmp_path)
    r = cli("restore", str(saved), "-c", str(cfg), cwd=tmp_path)  # the real command, once
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "watcher.db-wal").exists() and not (tmp_path / "watcher.db-shm").exists()
    assert live.stat().st_mode & 0o777 == 0o600
    with contextlib.closing(sqlite3.connect(live)) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # the backup, not the -wal's pages: the audit log is the backup's...
        assert c.execute("SELECT COUNT(*) FROM audit_log WHERE action = 'admin.pause'").fetchone()[0] == 0
        # ...and the kill switch is taken over as it was (a pause made since stays on)
        assert c.execute("SELECT value FROM meta WHERE key = 'paused'").fetchone()[0] == '["payouts"]'
    assert "the kill switch" in r.stdout
    # the crashed database and its -wal are kept aside together, byte for byte: nothing is lost
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("watcher.db.before-restore-")
                and not p.name.endswith(("-wal", "-shm"))]
    assert aside.read_bytes() == crashed["watcher.db"]
    assert aside.with_name(aside.name + "-wal").read_bytes() == crashed["watcher.db-wal"]
    assert aside.with_name(aside.name + "-shm").exists()
    assert str(aside) in r.stdout
    with contextlib.closing(sqlite3.connect(aside)) as c:  # opened, it holds the later write
        assert c.execute("SELECT COUNT(*) FROM audit_log WHERE action = 'admin.pause'").fetchone()[0] == 1


def test_restore_keeps_every_address_handed_out_and_every_key_revoked_since_the_backup(tmp_path, capsys):
    """Indexes are handed out as the highest one so far plus one. Restoring a backup taken
    before bob's address was made handed bob's index (and address) to the next label,
    carol: two users, one deposit address, and bob's deposits credited to carol. A key
    revoked since the backup came back to life. Restore now takes over, from the database it
    replaces, every address ever handed out and the keys as they are now."""
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9")])

    def run(*args: str) -> str:
        code, out, err = watcher_cli(capsys, *args, "-c", str(cfg))
        assert code == 0, err
        return out

    def address(label: str) -> dict:
        return json.loads(run("address", "new", "--chain", "devnet", "--label", label, "--json").splitlines()[-1])

    alice = address("alice")
    key = json.loads(run("keys", "create", "--name", "shop", "--scopes", "read,payouts").splitlines()[-1])
    run("backup", str(tmp_path / "backup.db"))
    bob = address("bob")
    run("keys", "revoke", key["id"])
    out = run("restore", str(tmp_path / "backup.db"))
    carol = address("carol")
    assert len({alice["address"], bob["address"], carol["address"]}) == 3, (bob, carol)
    assert "1 derivations" in out and "1 addresses" in out, out
    assert [alice["derivation_index"], bob["derivation_index"], carol["derivation_index"]] == [0, 1, 2]
    assert {**address("bob"), "created": True} == bob  # bob keeps his, and it is watched
    listed = json.loads(run("keys", "list", "--json"))
    assert [k["status"] for k in listed if k["id"] == key["id"]] == ["revoked"]


# a process that commits, then dies without closing (as by kill -9): its write stays in the -wal
CRASHING_WRITER = """
import os, sys
from watcher.store.db import Database
db = Database(sys.argv[1])
with db.transaction() as conn:
    conn.execute("INSERT INTO meta (key, value) VALUES ('after', 'the backup')")
os._exit(0)
"""


def test_restore_refuses_what_is_not_a_watcher_backup(tmp_path, capsys):
    """Garbage, another application's SQLite file, a truncated backup, a file whose -wal lies
    beside it: refused with a reason and exit 1, and the database and its -wal stay as they
    were."""
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9")])
    db = Database(tmp_path / "watcher.db")
    db.migrate()
    db.close()
    good = tmp_path / "good.db"
    backup(tmp_path / "watcher.db", good)
    subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(tmp_path / "watcher.db")], check=True, timeout=30)
    assert (tmp_path / "watcher.db-wal").stat().st_size > 0
    (tmp_path / "garbage.db").write_bytes(b"not a database at all\n" * 100)
    with contextlib.closing(sqlite3.connect(tmp_path / "other.db")) as c:
        c.execute("CREATE TABLE notes (body TEXT)")
        c.execute("INSERT INTO notes VALUES ('hello')")
        c.commit()
    size = good.stat().st_size
    (tmp_path / "truncated.db").write_bytes(good.read_bytes()[: size // 2])
    shutil.copy(good, tmp_path / "half.db")  # a database copied by hand without its -wal
    shutil.copy(tmp_path / "watcher.db-wal", tmp_path / "half.db-wal")
    before = _files(tmp_path)
    for name, reason in (("garbage.db", "not an SQLite database"), ("other.db", "not a watcher database"),
                         ("truncated.db", "integrity"), ("missing.db", "no file"),
                         ("half.db", "has a -wal beside it"), ("watcher.db", "the database itself")):
        code, _, err = watcher_cli(capsys, "restore", str(tmp_path / name), "-c", str(cfg))
        assert code == 1 and reason in err, (name, code, err)
        assert _files(tmp_path) == before, name
    assert not [p for p in tmp_path.iterdir() if ".restoring" in p.name or "before-restore" in p.name]


async def test_reconcile_matches_after_deposits_and_sweeps_then_finds_a_gap(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry(
        "devnet", anvil.url, tokens=[("USDT", token.address, 6)], confirmations=2,
        sweep={"to": "0x000000000000000000000000000000000000bEEF", "min_amount": {"ETH": "0.01", "USDT": "1"},
               "interval": 0})], api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})
    fwd = deploy(anvil, compile_contracts()["Forwarder"], [], [])
    with trio.fail_after(90):
        async with running(cfg, api=True) as d:
            hot = d.store.hot_wallet("devnet")
            anvil.wait_receipt(anvil.send(anvil.accounts[0], hot, 10**18))
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            bob, _ = d.store.addresses.deposit_address("devnet", "bob")
            anvil.wait_receipt(anvil.send(anvil.accounts[1], alice.address, 3 * 10**17))
            anvil.wait_receipt(token.mint(bob.address, 50_000_000))
            anvil.wait_receipt(token.mint(alice.address, 2_000_000))
            # interval 0: sweeps run only when asked, so ask once the deposits are confirmed
            # (a run before that finds no candidates, and none would follow)
            while len([t for t in d.views.transfers(chain="devnet")[0] if t["status"] == "confirmed"]) < 3:
                anvil.mine(1)
                await trio.sleep(0.15)
            d.senders["devnet"].sweeper.request()
            deadline = trio.current_time() + 60
            while not ((s := d.views.sweeps()[0]) and len(s) == 3 and all(x["status"] == "confirmed" for x in s)):
                assert trio.current_time() < deadline, s
                anvil.mine(1)
                await trio.sleep(0.15)
            anvil.mine(3)
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head())
    r = await trio.to_thread.run_sync(lambda: cli("reconcile", "--json", "-c", str(cfg), cwd=tmp_path))
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"], r.stdout
    statuses = {(line["address"].lower(), line["asset"]): line for line in report["lines"]}
    assert statuses[(alice.address, "ETH")]["status"] == "ok"
    assert statuses[(bob.address, "ETH")]["status"] == "ok"  # top-up in, fee out, dust left: all accounted
    assert statuses[(bob.address, "USDT")]["actual"] == "0"
    # money arrives that watcher did not record: an internal transfer, with tracing off
    anvil.wait_receipt(anvil.send(anvil.accounts[1], fwd, 12345,
                                  calldata("forward(address[],uint256[])", [alice.address], [12345])))
    anvil.mine(3)
    async with running(cfg) as d:
        await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head())
    r = await trio.to_thread.run_sync(lambda: cli("reconcile", "-c", str(cfg), cwd=tmp_path))
    assert r.returncode == 1
    assert "mismatch" in r.stdout and "difference 0.000000000000012345" in r.stdout and "(alice)" in r.stdout


async def test_readyz_follows_the_node(tmp_path, anvil: Anvil):
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, rpc_timeout=0.5, max_lag=5, batch_size=2,
                                              poll_interval=0.1)], api_port=port)
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                                  trust_env=False) as http:
            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await wait_until(lambda: d.watchers["devnet"].status.node_up)
            assert await ready()
            anvil.pause()
            try:
                await wait_until(lambda: not d.watchers["devnet"].status.node_up, what="node marked down")
                r = await http.get("/readyz")
                assert r.status_code == 503 and r.json()["chains"]["devnet"]["problem"] == "node unreachable"
            finally:
                anvil.resume()
            await wait_until(lambda: d.watchers["devnet"].status.node_up, what="node back")
            assert await ready()
            # far behind (more than max_lag): unready until caught up
            anvil.mine(400)
            saw_lagging = False
            for _ in range(200):
                r = await http.get("/readyz")
                if r.status_code == 503 and "lagging" in (r.json()["chains"]["devnet"]["problem"] or ""):
                    saw_lagging = True
                    break
                await trio.sleep(0.01)
            assert saw_lagging
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head(), timeout=60)
            await wait_until(lambda: d.watchers["devnet"].status.lag == 0)
            assert await ready()


def test_secrets_never_reach_the_logs(tmp_path, anvil: Anvil, token: Token):
    """A full run (deposits, an invoice, a webhook, a payout, a sweep with gas top-up), then
    the log is searched for the seed, private keys and tokens."""
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry(
        "devnet", anvil.url, tokens=[("USDT", token.address, 6)], confirmations=1,
        sweep={"to": "0x000000000000000000000000000000000000bEEF", "min_amount": {"USDT": "1"}, "interval": 0.5})],
        api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})
    keyring = Keyring.from_mnemonic(TEST_MNEMONIC)
    proc = DaemonProcess(cfg).start()
    secrets: list[str] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=APP, trust_env=False, timeout=10)

        async def with_receiver() -> None:
            async with receiving() as rx:
                hook = (await trio.to_thread.run_sync(lambda: api.post(
                    "/v1/webhooks", json={"url": rx.url, "events": ["*"]}))).json()
                secrets.append(hook["secret"])
                await trio.to_thread.run_sync(run_workload)
                await trio.sleep(1)

        def run_workload() -> None:
            hot = api.get("/v1/admin/status", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).json()
            hot = hot["hot_wallets"]["devnet"]
            anvil.wait_receipt(anvil.send(anvil.accounts[0], hot, 10**18))
            anvil.wait_receipt(token.mint(hot, 10**9))
            alice = api.post("/v1/addresses", json={"chain": "devnet", "label": "alice"}).json()["address"]
            anvil.wait_receipt(token.mint(alice, 5_000_000))
            inv = api.post("/v1/invoices", json={"chain": "devnet", "asset": "USDT", "amount": "1"}).json()
            anvil.wait_receipt(token.mint(inv["address"], 1_000_000))
            p = api.post("/v1/payouts", json={"chain": "devnet", "asset": "USDT", "amount": "3",
                                              "to": anvil.accounts[4], "idempotency_key": "k"}).json()
            deadline = time.monotonic() + 40
            while True:
                anvil.mine(1)
                done = api.get(f"/v1/payouts/{p['id']}").json()["status"] == "completed"
                swept = [s for s in api.get("/v1/sweeps").json()["items"] if s["status"] == "confirmed"]
                if done and len(swept) >= 2:
                    break
                assert time.monotonic() < deadline, (done, swept)
                time.sleep(0.2)

        trio.run(with_receiver)
    finally:
        proc.stop()
    log = proc.log()
    assert "sweep" in log and "payout" in log and "invoice" in log  # the log did cover the workload
    secrets += [TEST_MNEMONIC, API_TOKEN, ADMIN_TOKEN,
                keyring.private_key(EVM_KEYS.hot_path, 0).hex(),
                keyring.private_key(EVM_KEYS.deposit_path, 0).hex(), keyring.private_key(EVM_KEYS.deposit_path, 1).hex()]
    words = TEST_MNEMONIC.split()
    secrets += [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]
    secrets.append(secrets[0].removeprefix("whsec_"))
    for s in secrets:
        assert s not in log and s.lower() not in log.lower(), "a secret reached the log"


async def test_node_credentials_and_api_keys_in_rpc_url_never_reach_logs_or_the_api(tmp_path, caplog):
    """An rpc_url may carry credentials (http://user:pass@host) or a provider's key in its
    path: logs, errors and /v1/chains name the node by scheme, host and port only."""
    import logging

    caplog.set_level(logging.DEBUG)
    port = free_port()
    dead = free_port()
    url = f"http://watcher:topsecret-pw@127.0.0.1:{dead}/v3/key-abc123?apikey=also-secret"
    cfg = write_config(tmp_path, [chain_entry("devnet", url)], api_port=port)
    with trio.fail_after(30):
        async with running(cfg, api=True) as d, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {API_TOKEN}"},
                trust_env=False) as http:
            await wait_until(lambda: d.watchers["devnet"].status.error, what="the node error")
            chains = (await http.get("/v1/chains")).text
            ready = (await http.get("/readyz")).text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"127.0.0.1:{dead}" in logged  # the node is named...
    for secret in ("topsecret-pw", "key-abc123", "also-secret"):  # ...without what it must not show
        assert secret not in logged and secret not in chains and secret not in ready, secret
