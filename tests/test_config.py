"""Bad configuration is refused with a message naming the key and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from watcher.config import load_config
from watcher.errors import ConfigError
from watcher.plugins import chain_families, make_plugin_manager

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


@pytest.fixture(scope="module")
def families():
    return chain_families(make_plugin_manager())


def base() -> dict:
    return {
        "storage": {"path": "data/watcher.db"},
        "keys": {"mnemonic_file": "data/seed.txt"},
        "api": {"listen": "127.0.0.1:8420", "token": "change-me"},
        "chains": [{
            "id": "devnet", "family": "evm", "rpc_url": "http://127.0.0.1:8545", "native_symbol": "ETH",
            "confirmations": 2, "start_block": 0, "poll_interval": 1.0,
            "assets": [{"symbol": "USDT", "contract": TOKEN, "decimals": 6}],
        }],
    }


def load(tmp_path: Path, raw: dict, families):
    p = tmp_path / "watcher.toml"
    p.write_text(tomli_w.dumps(raw))
    return load_config(p, families)


def test_the_minimal_form_from_the_issue_loads_exactly_as_written(tmp_path, families):
    text = f'''
[storage]
path = "data/watcher.db"
[keys]
mnemonic_file = "data/seed.txt"   # BIP39 words; or: xpub = "xpub..." for watch-only
[api]
listen = "127.0.0.1:8420"
token = "change-me"
[[chains]]
id = "devnet"
family = "evm"
rpc_url = "http://127.0.0.1:8545"
native_symbol = "ETH"
confirmations = 2
start_block = 0        # optional; default: the head when the chain is first seen
poll_interval = 1.0    # optional, seconds
[[chains.assets]]
symbol = "USDT"
contract = "{TOKEN}"
decimals = 6
'''
    p = tmp_path / "watcher.toml"
    p.write_text(text)
    cfg = load_config(p, families)
    chain = cfg.chain("devnet")
    assert chain.confirmations == 2 and chain.start_block == 0 and chain.poll_interval == 1.0
    assert [a.symbol for a in chain.assets] == ["ETH", "USDT"]
    assert chain.asset("USDT").contract == TOKEN.lower() and chain.asset("USDT").decimals == 6
    assert cfg.storage.path == tmp_path / "data" / "watcher.db"  # relative to the config file
    assert cfg.keys.mnemonic_file == tmp_path / "data" / "seed.txt"
    assert cfg.api.tokens == {"default": "change-me"} and cfg.api.port == 8420


def test_example_config_in_the_repo_loads(families):
    cfg = load_config(Path(__file__).parents[1] / "watcher.toml.example", families)
    assert cfg.chains


def mutate(fn):
    raw = base()
    fn(raw)
    return raw


CASES = [
    ("unknown top-level key", lambda r: r.update(stroage={}), "stroage: unknown key (did you mean 'storage'?)"),
    ("unknown chain key", lambda r: r["chains"][0].update(confirmation=3),
     "chains[0].confirmation: unknown key (did you mean 'confirmations'?)"),
    ("unknown asset key", lambda r: r["chains"][0]["assets"][0].update(decimal=6),
     "chains[0].assets[0].decimal: unknown key (did you mean 'decimals'?)"),
    ("missing chains", lambda r: r.pop("chains"), "chains: at least one [[chains]] entry is required"),
    ("missing rpc_url", lambda r: r["chains"][0].pop("rpc_url"), "chains[0].rpc_url: is required"),
    ("bad url", lambda r: r["chains"][0].update(rpc_url="localhost:8545"),
     "chains[0].rpc_url: 'localhost:8545' is not an http(s) URL with a host"),
    ("bad port", lambda r: r["chains"][0].update(rpc_url="http://127.0.0.1:99999"), "chains[0].rpc_url:"),
    ("wrong type", lambda r: r["chains"][0].update(confirmations="2"), "chains[0].confirmations: must be an integer, got a string"),
    ("zero confirmations", lambda r: r["chains"][0].update(confirmations=0), "chains[0].confirmations: must be between 1 and 10000"),
    ("unknown family", lambda r: r["chains"][0].update(family="tron"), "chains[0].family: unknown chain family 'tron' (available: evm)"),
    ("duplicate chain id", lambda r: r["chains"].append(dict(r["chains"][0])), "chains[1].id: duplicate chain id 'devnet'"),
    ("bad chain id", lambda r: r["chains"][0].update(id="Dev Net"), "chains[0].id:"),
    ("bad checksum contract", lambda r: r["chains"][0]["assets"][0].update(contract=TOKEN[:-1] + "A"),
     "chains[0].assets[0].contract: EVM address has a bad EIP-55 checksum"),
    ("short contract", lambda r: r["chains"][0]["assets"][0].update(contract="0x1234"),
     "chains[0].assets[0].contract: not an EVM address"),
    ("symbol clash", lambda r: r["chains"][0]["assets"][0].update(symbol="ETH"),
     "chains[0].assets[0].symbol: symbol 'ETH' is already used on chain 'devnet'"),
    ("no keys", lambda r: r.pop("keys"), "keys: is required"),
    ("both seed and xpub", lambda r: r["keys"].update(xpub="xpub123"), "keys.xpub: set either mnemonic_file or xpub, not both"),
    ("bad listen", lambda r: r["api"].update(listen="8420"), "api.listen: '8420' is not host:port"),
    ("public without token", lambda r: (r["api"].pop("token"), r["api"].update(listen="0.0.0.0:8420")),
     "api.listen: '0.0.0.0' is not a loopback address: set api.token first"),
    ("short token", lambda r: r["api"].update(token="abc"), "api.token: must be at least 8 characters"),
    ("finality below confirmations", lambda r: r["chains"][0].update(confirmations=10, finality_depth=5),
     "chains[0].finality_depth: must be at least confirmations (10)"),
    ("family option type", lambda r: r["chains"][0].update(trace_internal="yes"),
     "chains[0].trace_internal: must be a boolean, got a string"),
    ("sweep without treasury", lambda r: r["chains"][0].update(sweep={"min_amount": {"ETH": "1"}}),
     "chains[0].sweep.to: is required"),
    ("sweep bad treasury", lambda r: r["chains"][0].update(sweep={"to": "0xnope"}),
     "chains[0].sweep.to: not an EVM address"),
    ("sweep unknown asset", lambda r: r["chains"][0].update(sweep={"to": TOKEN, "min_amount": {"DOGE": "1"}}),
     "chains[0].sweep.min_amount.DOGE: unknown asset"),
    ("payout bad amount", lambda r: r["chains"][0].update(payouts={"max_amount": {"USDT": "1.0000001"}}),
     "chains[0].payouts.max_amount.USDT: USDT '1.0000001' has more than 6 decimal places"),
    ("payout bad rate", lambda r: r["chains"][0].update(payouts={"label_rate": "ten per hour"}),
     "chains[0].payouts.label_rate: 'ten per hour' is not N/s"),
    ("payout small bump", lambda r: r["chains"][0].update(payouts={"fee_bump": "0.05"}),
     "chains[0].payouts.fee_bump: must be between 0.1 and 10"),
    ("payout deny typo", lambda r: r["chains"][0].update(payouts={"deny": ["0x12"]}),
     "chains[0].payouts.deny: not an EVM address"),
    ("payouts unknown key", lambda r: r["chains"][0].update(payouts={"max_amont": {}}),
     "chains[0].payouts.max_amont: unknown key (did you mean 'max_amount'?)"),
    ("admin token equals app token", lambda r: r["api"].update(admin_token="change-me"),
     "api.admin_token: two token names share the same token"),
    ("bad pause scope", lambda r: r.update(admin={"paused": ["everything"]}), "admin.paused: must list scopes"),
]


@pytest.mark.parametrize("name,change,message", CASES, ids=[c[0] for c in CASES])
def test_bad_config_names_key_and_problem(tmp_path, families, name, change, message):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, mutate(change), families)
    assert str(exc.value).startswith(message), str(exc.value)


def test_not_toml(tmp_path, families):
    p = tmp_path / "watcher.toml"
    p.write_text("[storage\npath=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p, families)


def test_missing_file(tmp_path, families):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml", families)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watcher", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_run_with_bad_config_exits_2_naming_the_key(tmp_path):
    raw = mutate(lambda r: r["chains"][0].update(rpc_url="ftp://example"))
    (tmp_path / "watcher.toml").write_text(tomli_w.dumps(raw))
    r = run_cli("run", "-c", "watcher.toml", cwd=tmp_path)
    assert r.returncode == 2
    assert "watcher: error: chains[0].rpc_url: 'ftp://example' is not an http(s) URL" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()  # nothing was created


def test_run_with_unreadable_seed_exits_2(tmp_path):
    (tmp_path / "watcher.toml").write_text(tomli_w.dumps(base()))
    r = run_cli("run", "-c", "watcher.toml", cwd=tmp_path)
    assert r.returncode == 2
    assert "keys.mnemonic_file: cannot read" in r.stderr and "seed.txt" in r.stderr


def test_run_with_bad_seed_words_does_not_echo_them(tmp_path):
    (tmp_path / "data").mkdir()
    words = "zebra " * 11 + "wrongword"
    (tmp_path / "data" / "seed.txt").write_text(words)
    (tmp_path / "watcher.toml").write_text(tomli_w.dumps(base()))
    r = run_cli("run", "-c", "watcher.toml", cwd=tmp_path)
    assert r.returncode == 2
    assert "not a valid English BIP39 mnemonic (12 words" in r.stderr
    assert "zebra" not in r.stderr and "wrongword" not in r.stderr
