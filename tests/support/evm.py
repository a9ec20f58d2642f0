"""Real EVM parts for tests and the devnet: an anvil process, Solidity compiled with solcjs,
and small helpers to deploy contracts and send transactions. Nothing here is mocked.

anvil always runs with ``--prune-history 256`` and a temporary HOME (or it writes gigabytes
to ~/.foundry), on 127.0.0.1 with a port it picks itself (``--port 0``), and is stopped by
PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from eth_abi import encode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "node_modules" / ".bin"
CONTRACTS = ROOT / "tests" / "contracts"
CACHE = ROOT / "tests" / ".cache"
ANVIL_MNEMONIC = "test test test test test test test test test test test junk"


class RpcFailure(Exception):
    pass


class Anvil:
    """One anvil node. ``with Anvil() as node:`` starts and stops it."""

    def __init__(self, *, chain_id: int = 31337, block_time: float | None = None, state: Path | None = None,
                 extra: tuple[str, ...] = (), port: int = 0):
        self.chain_id = chain_id
        self.block_time = block_time
        self.state = state
        self.extra = extra
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self._home: str | None = None
        self._client = httpx.Client(timeout=30, trust_env=False)
        self._lines: list[str] = []

    def __enter__(self) -> Anvil:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if not (BIN / "anvil").exists():
            raise RuntimeError("anvil is not installed: run `make deps` (npm install)")
        self._home = self._home or tempfile.mkdtemp(prefix="anvil-home-")
        args = [str(BIN / "anvil"), "--host", "127.0.0.1", "--port", str(self.port), "--prune-history", "256",
                "--chain-id", str(self.chain_id), "--accounts", "10", "--balance", "1000000"]
        if self.block_time is not None:
            args += ["--block-time", str(self.block_time)]
        if self.state is not None:
            args += ["--state", str(self.state)]
        args += list(self.extra)
        env = {**os.environ, "HOME": self._home}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        port = None
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self._lines.append(line)
            m = re.search(r"Listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            self.stop()
            raise RuntimeError("anvil did not start:\n" + "".join(self._lines[-20:]))
        # keep draining stdout so anvil never blocks on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                self.rpc("eth_chainId")
                return
            except (httpx.HTTPError, RpcFailure):
                time.sleep(0.05)
        raise RuntimeError("anvil does not answer")

    def _drain(self) -> None:
        proc = self.proc
        if proc is None or proc.stdout is None:
            return
        for _ in proc.stdout:
            pass

    def stop(self) -> None:
        """Stop by PID (SIGTERM, then SIGKILL); with ``state`` set, anvil writes it on SIGTERM."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        self._client.close()
        if self._home:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def pause(self) -> None:
        """Freeze the node (SIGSTOP): requests hang, like a node that stopped answering."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    # --- JSON-RPC -------------------------------------------------------------------------

    def rpc(self, method: str, *params: Any) -> Any:
        r = self._client.post(self.url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        data = r.json()
        if data.get("error"):
            raise RpcFailure(f"{method}: {data['error']}")
        return data["result"]

    @property
    def accounts(self) -> list[str]:
        return self.rpc("eth_accounts")

    def head(self) -> int:
        return int(self.rpc("eth_blockNumber"), 16)

    def mine(self, blocks: int = 1) -> None:
        self.rpc("anvil_mine", hex(blocks))

    def automine(self, on: bool) -> None:
        self.rpc("evm_setAutomine", on)

    def reorg(self, depth: int, txs: Sequence[tuple[str, int]] = ()) -> None:
        """Replace the last ``depth`` blocks; ``txs`` are (raw signed tx, offset in the new blocks)."""
        self.rpc("anvil_reorg", depth, [[raw, off] for raw, off in txs])

    def raw_tx(self, txid: str) -> str:
        return self.rpc("eth_getRawTransactionByHash", txid)

    def balance(self, address: str) -> int:
        return int(self.rpc("eth_getBalance", address, "latest"), 16)

    def receipt(self, txid: str) -> dict[str, Any] | None:
        return self.rpc("eth_getTransactionReceipt", txid)

    def wait_receipt(self, txid: str, timeout: float = 30.0) -> dict[str, Any]:
        """The receipt once the transaction is mined (for interval-mining nodes)."""
        deadline = time.monotonic() + timeout
        while (rc := self.receipt(txid)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{txid} not mined within {timeout}s")
            time.sleep(0.05)
        return rc

    def send(self, sender: str, to: str | None, value: int = 0, data: str = "0x", gas: int | None = None) -> str:
        tx: dict[str, Any] = {"from": sender, "value": hex(value), "data": data}
        if to is not None:
            tx["to"] = to
        if gas is not None:
            tx["gas"] = hex(gas)
        return self.rpc("eth_sendTransaction", tx)

    def call(self, to: str, data: str) -> str:
        return self.rpc("eth_call", {"to": to, "data": data}, "latest")


# --- Solidity ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str


def compile_contracts() -> dict[str, Artifact]:
    """Compile every .sol under tests/contracts (named by their path there, so vendored
    packages' relative imports resolve) with the pinned solcjs (cached by source hash)."""
    sources = {p.relative_to(CONTRACTS).as_posix(): p.read_text() for p in sorted(CONTRACTS.rglob("*.sol"))}
    solc = BIN / "solcjs"
    key = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()
                         + (ROOT / "package-lock.json").read_bytes()).hexdigest()[:16]
    cached = CACHE / f"contracts-{key}.json"
    if cached.exists():
        out = json.loads(cached.read_text())
    else:
        if not solc.exists():
            raise RuntimeError("solcjs is not installed: run `make deps` (npm install)")
        std_in = {
            "language": "Solidity",
            "sources": {name: {"content": text} for name, text in sources.items()},
            "settings": {"optimizer": {"enabled": True, "runs": 200},
                         "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}}},
        }
        proc = subprocess.run([str(solc), "--standard-json"], input=json.dumps(std_in), capture_output=True,
                              text=True, timeout=300, check=False)
        text = proc.stdout[proc.stdout.find("{"):]
        out = json.loads(text)
        errors = [e for e in out.get("errors", []) if e.get("severity") == "error"]
        if errors:
            raise RuntimeError("solc: " + "\n".join(e["formattedMessage"] for e in errors))
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(cached)
    arts = {}
    for contracts in out["contracts"].values():
        for name, c in contracts.items():
            arts[name] = Artifact(name=name, abi=c["abi"], bytecode="0x" + c["evm"]["bytecode"]["object"])
    return arts


def calldata(signature: str, *args: Any) -> str:
    """``calldata("transfer(address,uint256)", to, 5)``."""
    types = signature[signature.index("(") + 1:-1]
    type_list = [t for t in types.split(",") if t]
    return "0x" + (function_signature_to_4byte_selector(signature) + encode(type_list, list(args))).hex()


def deploy(node: Anvil, art: Artifact, ctor_types: list[str], ctor_args: list[Any], sender: str | None = None) -> str:
    sender = sender or node.accounts[0]
    data = art.bytecode + encode(ctor_types, ctor_args).hex()
    txid = node.send(sender, None, 0, data)
    rc = node.receipt(txid)
    if rc is None:
        node.mine(1)  # automine is off (interval or manual mining): mine it now
        rc = node.wait_receipt(txid)
    assert rc and int(rc["status"], 16) == 1, f"deploy of {art.name} failed"
    return to_checksum_address(rc["contractAddress"])


class Token:
    """A deployed TestToken."""

    def __init__(self, node: Anvil, address: str, decimals: int):
        self.node = node
        self.address = address
        self.decimals = decimals

    @classmethod
    def deploy(cls, node: Anvil, symbol: str = "USDT", decimals: int = 6) -> Token:
        art = compile_contracts()["TestToken"]
        address = deploy(node, art, ["string", "string", "uint8"], [f"Test {symbol}", symbol, decimals])
        return cls(node, address, decimals)

    def mint(self, to: str, amount: int) -> str:
        return self.node.send(self.node.accounts[0], self.address, 0, calldata("mint(address,uint256)", to, amount))

    def transfer(self, sender: str, to: str, amount: int) -> str:
        return self.node.send(sender, self.address, 0, calldata("transfer(address,uint256)", to, amount))

    def transfer_many(self, sender: str, pays: Sequence[tuple[str, int]]) -> str:
        """One transaction paying each (to, amount): a Transfer log each, in that order."""
        return self.node.send(sender, self.address, 0, calldata("transferMany(address[],uint256[])",
                                                                [to for to, _ in pays], [v for _, v in pays]))

    def balance(self, who: str) -> int:
        return int(self.node.call(self.address, calldata("balanceOf(address)", who)), 16)
