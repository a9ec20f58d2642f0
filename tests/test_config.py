"""Bad configuration is refused with a message naming the key and the problem."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from watcher.auth import APP_SCOPES, SCOPES
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
        "api": {"listen": "127.0.0.1:8420", "token": "ab12cd34ef56ab78cd90ef"},
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
token = "ab12cd34ef56ab78cd90ef"
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
    assert cfg.api.tokens["default"].token == "ab12cd34ef56ab78cd90ef" and cfg.api.port == 8420
    assert cfg.api.tokens["default"].scopes == APP_SCOPES and "admin" not in APP_SCOPES


def example_with_tokens() -> str:
    """The example config with real tokens in place of its placeholders."""
    text = (Path(__file__).parents[1] / "watcher.toml.example").read_text()
    text = text.replace('"REPLACE-with-openssl-rand-hex-32"', '"' + "3f" * 16 + "0123456789abcdef" + '"', 1)
    return text.replace('"REPLACE-with-another-openssl-rand-hex-32"', '"' + "a1b2c3d4e5f6" * 3 + '"', 1)


def test_example_config_in_the_repo_loads(families, tmp_path):
    """As shipped, its tokens are placeholders and refused; with real ones it loads."""
    example = Path(__file__).parents[1] / "watcher.toml.example"
    with pytest.raises(ConfigError, match=r"api\.token: looks like a placeholder"):
        load_config(example, families)
    (tmp_path / "watcher.toml").write_text(example_with_tokens())
    cfg = load_config(tmp_path / "watcher.toml", families)
    assert cfg.chains and set(cfg.api.tokens) == {"default", "admin"}


def test_example_bitcoin_chain_uncommented_loads_as_btc_mainnet(families, tmp_path):
    """The example's commented BTC chain is a working config once uncommented."""
    text = example_with_tokens()
    after = text[text.index("# Bitcoin on your own bitcoind"):]
    block = after[after.index("# [[chains]]"):].split("\n\n")[0]
    toml = "\n".join(line[2:] for line in block.splitlines() if not line.startswith("#  "))
    path = tmp_path / "btc.toml"
    path.write_text(text[:text.index("\n[[chains]]") + 1] + toml + "\n")
    cfg = load_config(path, families)
    (btc,) = cfg.chains
    assert (btc.id, btc.family, btc.spec.network.name, btc.native.symbol, btc.confirmations) == (
        "btc", "bitcoin", "btc", "BTC", 3)
    assert btc.spec.options.fee_bump == "rbf" and btc.spec.options.max_inputs == 100
    assert btc.sweep.to == "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"


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
    ("unknown family", lambda r: r["chains"][0].update(family="tron"), "chains[0].family: unknown chain family 'tron' (available: bitcoin, evm)"),
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
    ("short token", lambda r: r["api"].update(token="abcdefgh"), "api.token: is too short or too repetitive"),
    ("repetitive token", lambda r: r["api"].update(token="aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
     "api.token: is too short or too repetitive"),
    ("the README's placeholder", lambda r: r["api"].update(token="change-me"), "api.token: looks like a placeholder"),
    ("a long placeholder", lambda r: r["api"].update(token="change-me-to-something-long"),
     "api.token: looks like a placeholder"),
    ("admin_token clashes with a named token", lambda r: r["api"].update(
        admin_token="0f1e2d3c4b5a69788796a5b4", tokens={"admin": "1a2b3c4d5e6f7a8b9c0d1e2f"}),
     "api.tokens.admin: the name 'admin' is taken by [api] admin_token"),
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
     "chains[0].payouts.label_rate: 'ten per hour' is not a rate: write N/s, N/min, N/h or N/d"),
    ("payout small bump", lambda r: r["chains"][0].update(payouts={"fee_bump": "0.05"}),
     "chains[0].payouts.fee_bump: must be between 0.1 and 10"),
    ("payout deny typo", lambda r: r["chains"][0].update(payouts={"deny": ["0x12"]}),
     "chains[0].payouts.deny: not an EVM address"),
    ("payouts unknown key", lambda r: r["chains"][0].update(payouts={"max_amont": {}}),
     "chains[0].payouts.max_amont: unknown key (did you mean 'max_amount'?)"),
    ("admin token equals app token", lambda r: r["api"].update(admin_token="ab12cd34ef56ab78cd90ef"),
     "api.admin_token: two token names share the same token"),
    ("bad pause scope", lambda r: r.update(admin={"paused": ["everything"]}), "admin.paused: must list scopes"),
    # tables where arrays of tables belong, and the other way round
    ("chains is a string", lambda r: r.update(chains="x"),
     "chains: must be an array of tables ([[chains]]), got a string"),
    ("[chains] instead of [[chains]]", lambda r: r.update(chains=r["chains"][0]),
     "chains: must be an array of tables: write [[chains]] (double brackets), not [chains]"),
    ("[chains.assets] instead of [[chains.assets]]",
     lambda r: r["chains"][0].update(assets=r["chains"][0]["assets"][0]),
     "chains[0].assets: must be an array of tables: write [[chains.assets]] (double brackets), not [chains.assets]"),
    ("chain entry is not a table", lambda r: r.update(chains=["devnet"]), "chains[0]: must be a table, got a string"),
    ("empty chains", lambda r: r.update(chains=[]), "chains: at least one [[chains]] entry is required"),
    ("[[storage]] instead of [storage]", lambda r: r.update(storage=[r["storage"]]),
     "storage: must be a table, got an array"),
    ("storage is a string", lambda r: r.update(storage="data/watcher.db"), "storage: must be a table, got a string"),
    ("api.tokens is a string", lambda r: r["api"].update(tokens="shop-token-123"),
     "api.tokens: must be a table, got a string"),
    ("sweep is an array", lambda r: r["chains"][0].update(sweep=[]), "chains[0].sweep: must be a table, got an array"),
    # numbers out of range, including the ones TOML can spell but no one means
    ("negative poll_interval", lambda r: r["chains"][0].update(poll_interval=-1.0),
     "chains[0].poll_interval: must be between 0.05 and 3600, got -1.0"),
    ("zero poll_interval", lambda r: r["chains"][0].update(poll_interval=0),
     "chains[0].poll_interval: must be between 0.05 and 3600, got 0.0"),
    ("nan poll_interval", lambda r: r["chains"][0].update(poll_interval=float("nan")),
     "chains[0].poll_interval: must be between 0.05 and 3600, got nan"),
    ("inf rpc_timeout", lambda r: r["chains"][0].update(rpc_timeout=float("inf")),
     "chains[0].rpc_timeout: must be between 0.1 and 600, got inf"),
    ("poll_interval as a string", lambda r: r["chains"][0].update(poll_interval="1s"),
     "chains[0].poll_interval: must be a number, got a string"),
    ("negative start_block", lambda r: r["chains"][0].update(start_block=-1),
     "chains[0].start_block: must be 0 or more, got -1"),
    ("huge confirmations", lambda r: r["chains"][0].update(confirmations=2**70),
     "chains[0].confirmations: must be between 1 and 10000"),
    ("too many decimals", lambda r: r["chains"][0]["assets"][0].update(decimals=78),
     "chains[0].assets[0].decimals: must be between 0 and 77, got 78"),
    ("max_body_bytes too small", lambda r: r["api"].update(max_body_bytes=10),
     "api.max_body_bytes: must be between 1024 and 16777216, got 10"),
    ("listen port out of range", lambda r: r["api"].update(listen="127.0.0.1:70000"),
     "api.listen: port 70000 is out of range"),
    ("listen port zero", lambda r: r["api"].update(listen="127.0.0.1:0"), "api.listen: port 0 is out of range"),
    ("trusted proxy by name", lambda r: r["api"].update(trusted_proxies=["nginx.local"]),
     "api.trusted_proxies: 'nginx.local' is not an IP address or network"),
    ("trusted proxies not a list", lambda r: r["api"].update(trusted_proxies="127.0.0.1"),
     "api.trusted_proxies: must be an array, got a string"),
    ("expiry above its maximum", lambda r: r.update(invoices={"max_expires_in": 3600, "default_expires_in": 7200}),
     "invoices.default_expires_in: must be between 60 and 3600, got 7200"),
    # rpc_url
    ("empty rpc_url", lambda r: r["chains"][0].update(rpc_url=""),
     "chains[0].rpc_url: '' is not an http(s) URL with a host"),
    ("rpc_url with a space", lambda r: r["chains"][0].update(rpc_url=" http://127.0.0.1:8545"),
     "chains[0].rpc_url: ' http://127.0.0.1:8545'"),
    ("rpc_url with a newline", lambda r: r["chains"][0].update(rpc_url="http://127.0.0.1:8545/\n"),
     "chains[0].rpc_url: 'http://127.0.0.1:8545/\\n' contains whitespace or control characters"),
    # a node's URL may carry a password or an API key: an error shows its scheme and host only
    ("rpc_url with a password and a bad port",
     lambda r: r["chains"][0].update(rpc_url="https://user:s3cretpass@node.example:99999/v3/KEY0123456789"),
     "chains[0].rpc_url: 'https://node.example/...' is not a valid URL (Port out of range 0-65535)"),
    ("rpc_url with an API key in its path and a newline",
     lambda r: r["chains"][0].update(rpc_url="https://mainnet.example/v3/KEY0123456789\n"),
     "chains[0].rpc_url: 'https://mainnet.example/...' contains whitespace or control characters"),
    ("rpc_url as an array", lambda r: r["chains"][0].update(rpc_url=["http://127.0.0.1:8545"]),
     "chains[0].rpc_url: must be a string, got an array"),
    ("rpc_url as a date", lambda r: r["chains"][0].update(rpc_url=datetime.datetime(2026, 1, 1, 12, 0)),
     "chains[0].rpc_url: must be a string, got a date-time"),
    # assets
    ("duplicate asset contract", lambda r: r["chains"][0]["assets"].append(
        {"symbol": "USDT2", "contract": TOKEN.lower(), "decimals": 6}),
     f"chains[0].assets[1].contract: contract {TOKEN.lower()} is configured twice"),
    ("duplicate asset symbol", lambda r: r["chains"][0]["assets"].append(
        {"symbol": "USDT", "contract": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8", "decimals": 6}),
     "chains[0].assets[1].symbol: symbol 'USDT' is already used on chain 'devnet'"),
    ("asset without contract", lambda r: r["chains"][0]["assets"][0].pop("contract"),
     "chains[0].assets[0].contract: is required"),
    # webhooks
    ("negative webhook delay", lambda r: r.update(webhooks={"schedule": [0, 5, -5]}),
     "webhooks.schedule: must be 1-50 delays in seconds, each between 0 and 604800"),
    ("empty webhook schedule", lambda r: r.update(webhooks={"schedule": []}),
     "webhooks.schedule: must be 1-50 delays in seconds"),
    ("webhook delays as strings", lambda r: r.update(webhooks={"schedule": ["5s", "5m"]}),
     "webhooks.schedule: must be 1-50 delays in seconds"),
    ("webhook delays as booleans", lambda r: r.update(webhooks={"schedule": [True]}),
     "webhooks.schedule: must be 1-50 delays in seconds"),
    ("webhook delay nan", lambda r: r.update(webhooks={"schedule": [0, float("nan")]}),
     "webhooks.schedule: must be 1-50 delays in seconds"),
    ("webhook schedule is a number", lambda r: r.update(webhooks={"schedule": 5}),
     "webhooks.schedule: must be an array, got an integer"),
    ("zero webhook timeout", lambda r: r.update(webhooks={"timeout": 0}),
     "webhooks.timeout: must be between 0.1 and 300, got 0.0"),
    ("empty allowed host", lambda r: r.update(webhooks={"allowed_hosts": [""]}),
     "webhooks.allowed_hosts: must be a list of host names"),
    # api tokens
    ("token with a space", lambda r: r["api"].update(token="ab12cd34 ef56ab78cd90ef"),
     "api.token: must not contain whitespace"),
    ("bad token name", lambda r: r["api"].update(tokens={"Shop Name": "shop-token-123"}),
     "api.tokens.Shop Name: token names are 1-32 of a-z 0-9 _ -"),
    ("token not a string", lambda r: r["api"].update(tokens={"shop": 12345678}),
     "api.tokens.shop: must be a string, got an integer"),
    ("unknown api key", lambda r: r["api"].update(tokn="x"), "api.tokn: unknown key (did you mean 'token'?)"),
    # storage, keys, log
    ("empty storage path", lambda r: r["storage"].update(path="  "), "storage.path: must not be empty"),
    ("storage path is a directory", lambda r: r["storage"].update(path="."), "storage.path: '"),
    ("storage path under a file", lambda r: r["storage"].update(path="watcher.toml/watcher.db"), "storage.path: '"),
    ("bad synchronous", lambda r: r["storage"].update(synchronous="off"),
     "storage.synchronous: must be one of 'normal', 'full', 'extra', got 'off'"),
    ("negative watched_in_memory", lambda r: r["storage"].update(watched_in_memory=-1),
     "storage.watched_in_memory: must be between 0 and 100000000, got -1"),
    ("watched_in_memory not a number", lambda r: r["storage"].update(watched_in_memory="many"),
     "storage.watched_in_memory: "),
    ("empty mnemonic_file", lambda r: r["keys"].update(mnemonic_file=""), "keys.mnemonic_file: is required"),
    ("passphrase without seed", lambda r: r.update(keys={"xpub": "xpub6C", "passphrase_file": "p.txt"}),
     "keys.passphrase_file: only makes sense with mnemonic_file"),
    ("bad log level", lambda r: r.update(log={"level": "verbose"}),
     "log.level: must be one of 'debug', 'info', 'warning', 'error', got 'verbose'"),
]


@pytest.mark.parametrize("name,change,message", CASES, ids=[c[0] for c in CASES])
def test_bad_config_names_key_and_problem(tmp_path, families, name, change, message):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, mutate(change), families)
    assert str(exc.value).startswith(message), str(exc.value)


def test_storage_path_problems_are_named(tmp_path, families):
    with pytest.raises(ConfigError, match=r"^storage.path: '.*' is a directory"):
        load(tmp_path, mutate(lambda r: r["storage"].update(path=".")), families)
    with pytest.raises(ConfigError, match=r"^storage.path: '.*watcher.toml' is not a directory, so .* cannot be"):
        load(tmp_path, mutate(lambda r: r["storage"].update(path="watcher.toml/sub/watcher.db")), families)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_storage_path_in_a_read_only_directory(tmp_path, families):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"^storage.path: cannot create .* is not writable by this user"):
        load(tmp_path, mutate(lambda r: r["storage"].update(path="ro/watcher.db")), families)


def test_not_toml(tmp_path, families):
    p = tmp_path / "watcher.toml"
    p.write_text("[storage\npath=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p, families)


GOOD_TOML = f'''[storage]
path = "data/watcher.db"
[keys]
mnemonic_file = "data/seed.txt"
[api]
listen = "127.0.0.1:8420"
token = "ab12cd34ef56ab78cd90ef"
[[chains]]
id = "devnet"
family = "evm"
rpc_url = "http://127.0.0.1:8545"
[[chains.assets]]
symbol = "USDT"
contract = "{TOKEN}"
decimals = 6
'''

TOML_MISTAKES = [
    ("unclosed table header", GOOD_TOML.replace("[api]", "[api"), "line 5, column 5"),
    ("value missing", GOOD_TOML.replace('token = "ab12cd34ef56ab78cd90ef"', "token = "), "line 7, column 9"),
    ("unquoted string", GOOD_TOML.replace('"devnet"', "devnet"), "line 9"),
    ("key given twice", GOOD_TOML.replace('token = "ab12cd34ef56ab78cd90ef"', 'token = "ab12cd34ef56ab78cd90ef"\ntoken = "again-again"'),
     "line 8"),
    ("table given twice", GOOD_TOML + "[storage]\n", "line 16"),
    ("[chains] after [[chains]]", GOOD_TOML + "[chains]\nid = 1\n", "line 16"),
    ("single-quoted key with newline", GOOD_TOML + "'a\nb' = 1\n", "line 16"),
    ("NUL byte", GOOD_TOML.replace("ab12cd34ef56ab78cd90ef", "change\x00me"), "line 7"),
]


@pytest.mark.parametrize("name,text,where", TOML_MISTAKES, ids=[m[0] for m in TOML_MISTAKES])
def test_toml_syntax_errors_name_line_and_column(tmp_path, families, name, text, where):
    p = tmp_path / "watcher.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(p, families)
    assert "not valid TOML" in str(exc.value) and f"(at {where}" in str(exc.value), str(exc.value)


def test_good_toml_of_the_syntax_cases_loads(tmp_path, families):
    p = tmp_path / "watcher.toml"
    p.write_text(GOOD_TOML)
    assert load_config(p, families).chain("devnet").asset("USDT").decimals == 6


def test_config_file_not_utf8_or_not_a_file(tmp_path, families):
    p = tmp_path / "watcher.toml"
    p.write_bytes(GOOD_TOML.replace("ab12cd34ef56ab78cd90ef", "change-m\u00e9").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not valid TOML: the file is not UTF-8 \(bad byte at line 7\)"):
        load_config(p, families)
    p.write_bytes(b"\xff\xfe" + GOOD_TOML.encode("utf-16-le"))
    with pytest.raises(ConfigError, match=r"not UTF-8 \(bad byte at line 1\)"):
        load_config(p, families)
    d = tmp_path / "dir.toml"
    d.mkdir()
    with pytest.raises(ConfigError, match=r"cannot read config file .*dir.toml.*: Is a directory"):
        load_config(d, families)
    (tmp_path / "empty.toml").write_text("")
    with pytest.raises(ConfigError, match=r"^storage: is required"):
        load_config(tmp_path / "empty.toml", families)


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


RUN_MISTAKES = [
    ("toml syntax", lambda t: t.replace("[api]", "[api"), "watcher.toml: not valid TOML: Expected ']' at the end "
     "of a table declaration (at line 5, column 5)"),
    ("[chains] instead of [[chains]]", lambda t: t.replace("[[chains]]", "[chains]").replace("[[chains.assets]]", "[chains.assets]"),
     "chains: must be an array of tables: write [[chains]] (double brackets), not [chains]"),
    ("chains is a string", lambda t: 'chains = "devnet"\n' + t.split("[[chains]]")[0],
     "chains: must be an array of tables ([[chains]]), got a string"),
    ("negative poll_interval", lambda t: t.replace('family = "evm"', 'family = "evm"\npoll_interval = -2'),
     "chains[0].poll_interval: must be between 0.05 and 3600, got -2.0"),
    ("empty rpc_url", lambda t: t.replace('"http://127.0.0.1:8545"', '""'),
     "chains[0].rpc_url: '' is not an http(s) URL with a host"),
    ("duplicate asset contract", lambda t: t + f'[[chains.assets]]\nsymbol = "USDC"\ncontract = "{TOKEN}"\ndecimals = 6\n',
     f"chains[0].assets[1].contract: contract {TOKEN} is configured twice"),
    ("webhook delay negative", lambda t: t.replace("[api]", "[webhooks]\nschedule = [0, -1]\n[api]"),
     "webhooks.schedule: must be 1-50 delays in seconds, each between 0 and 604800"),
    ("storage path is a directory", lambda t: t.replace('"data/watcher.db"', '"."'), "storage.path: '"),
    ("storage path in /proc", lambda t: t.replace('"data/watcher.db"', '"/proc/watcher-test.db"'),
     "storage.path: "),
    ("xpub that is not one", lambda t: t.replace('mnemonic_file = "data/seed.txt"', 'xpub = "xpub-nope"'),
     "keys.xpub: not a valid extended public key"),
]


@pytest.mark.parametrize("name,change,message", RUN_MISTAKES, ids=[m[0] for m in RUN_MISTAKES])
def test_run_with_config_mistakes_exits_2_naming_the_key(tmp_path, name, change, message):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "seed.txt").write_text(" ".join(["abandon"] * 11 + ["about"]))
    (tmp_path / "data" / "seed.txt").chmod(0o600)
    (tmp_path / "watcher.toml").write_text(change(GOOD_TOML))
    r = run_cli("run", "-c", "watcher.toml", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f"watcher: error: {message}" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "data" / "watcher.db").exists()


def test_seed_file_that_is_a_directory_exits_2(tmp_path):
    (tmp_path / "data" / "seed.txt").mkdir(parents=True)
    (tmp_path / "watcher.toml").write_text(GOOD_TOML)
    r = run_cli("run", "-c", "watcher.toml", cwd=tmp_path)
    assert r.returncode == 2
    assert "watcher: error: keys.mnemonic_file: cannot read" in r.stderr and "Is a directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_seed_file_that_is_not_utf8_exits_2(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "seed.txt").write_bytes(b"\xff\xfe binary junk")
    (tmp_path / "data" / "seed.txt").chmod(0o600)
    (tmp_path / "watcher.toml").write_text(GOOD_TOML)
    r = run_cli("check-config", "-c", "watcher.toml", cwd=tmp_path)
    assert r.returncode == 2 and "keys.mnemonic_file:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_world_readable_seed_is_warned_about(tmp_path):
    (tmp_path / "data").mkdir()
    seed = tmp_path / "data" / "seed.txt"
    seed.write_text(" ".join(["abandon"] * 11 + ["about"]))
    seed.chmod(0o644)
    (tmp_path / "watcher.toml").write_text(GOOD_TOML)
    r = run_cli("check-config", "-c", "watcher.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "keys.mnemonic_file" in r.stderr and "readable by group or others (mode 644); chmod 600 it" in r.stderr
    assert "abandon" not in r.stderr + r.stdout
    seed.chmod(0o600)
    r = run_cli("check-config", "-c", "watcher.toml", cwd=tmp_path)
    assert r.returncode == 0 and "readable" not in r.stderr


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


def test_api_tokens_with_scopes_limits_and_hosts(tmp_path, families):
    raw = base()
    raw["api"].update(admin_token="0f1e2d3c4b5a69788796a5b4", rate_limit="50/s", payout_rate_limit="3/h",
                      hosts=["watcher.internal", "proxy.example.org:443"],
                      tokens={"shop": {"token": "5e6f7a8b9c0d1e2f3a4b5c6d", "scopes": ["read", "invoices"]},
                              "legacy": "9a8b7c6d5e4f3a2b1c0d9e8f"})
    cfg = load(tmp_path, raw, families)
    api = cfg.api
    assert api.tokens["shop"].scopes == {"read", "invoices"} and api.tokens["legacy"].scopes == APP_SCOPES
    assert api.tokens["admin"].scopes == set(SCOPES) and "admin" not in api.tokens["default"].scopes
    assert str(api.rate_limit) == "50/s" and str(api.payout_rate_limit) == "3/h"
    assert api.hosts == {"watcher.internal:8420", "proxy.example.org:443"}
    assert api.tokens["shop"].principal(api).id == "config:shop"
    assert "5e6f7a8b" not in repr(api.tokens["shop"])  # the token is not in its repr
    defaults = load(tmp_path, base(), families).api
    assert defaults.hosts == {"127.0.0.1:8420", "localhost:8420", "[::1]:8420"}
    for bad, message in (({"shop": {"token": "5e6f7a8b9c0d1e2f3a4b5c6d", "scopes": ["root"]}},
                          "api.tokens.shop.scopes: unknown scope 'root'"),
                         ({"shop": {"token": "5e6f7a8b9c0d1e2f3a4b5c6d", "scopes": []}},
                          "api.tokens.shop.scopes: a key needs at least one scope"),
                         ({"shop": {"scopes": ["read"]}}, "api.tokens.shop.token")):
        raw = base()
        raw["api"]["tokens"] = bad
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(tmp_path, raw, families)
    raw = base()
    raw["api"]["rate_limit"] = "lots"
    with pytest.raises(ConfigError, match=re.escape("api.rate_limit: 'lots' is not a rate")):
        load(tmp_path, raw, families)
