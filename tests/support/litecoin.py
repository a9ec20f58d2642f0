"""A real Litecoin Core node for the Bitcoin family's tests: ``litecoind -regtest`` (Debian's
package, Litecoin Core 0.21, the same RPC as Bitcoin Core 0.21), on 127.0.0.1 with free ports,
a temporary datadir and RPC credentials, stopped by PID. Nothing is mocked.

Flags (see the issue): ``-mempoolreplacement=1`` turns BIP125 replacement on (Litecoin Core has
it off by default; ``replacement=False`` keeps the default, for CPFP tests);
``-vbparams=mweb:-2:0`` keeps MWEB from activating (else block 431 cannot be mined without an
MWEB peg-in); ``-fallbackfee`` lets the payer's wallet send on regtest, where
``estimatesmartfee`` has no data. The test payer uses a wallet inside the node; watcher never
does.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import trio

RPC_USER, RPC_PASSWORD = "watcher-test", "regtest-password-0123"
COIN = 10**8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RpcFailure(Exception):
    def __init__(self, method: str, error: dict[str, Any]):
        super().__init__(f"{method}: {error}")
        self.code = error.get("code")
        self.message = error.get("message", "")


def _client() -> httpx.Client:
    """The test's own client of the node. The node drops a keep-alive connection idle for
    ``-rpcservertimeout`` (2 s here); a request sent on it just as it does fails with "Server
    disconnected without sending a response" (it failed a soak once). Connections idle for 1 s
    are not reused."""
    return httpx.Client(timeout=60, trust_env=False, limits=httpx.Limits(keepalive_expiry=1.0))


class Litecoind:
    """One regtest node. ``with Litecoind() as node:`` starts and stops it."""

    def __init__(self, *, replacement: bool = True, txindex: bool = True, cookie: bool = False,
                 extra: tuple[str, ...] = ()):
        self.replacement = replacement
        self.cookie = cookie  # authenticate with the .cookie file the node writes at each start
        self.txindex = txindex
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.datadir: Path | None = None
        self.rpc_port = self.p2p_port = 0
        self._client = _client()
        self._ids = 0
        self._payer: str | None = None

    def __enter__(self) -> Litecoind:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The RPC URL with its credentials, as a watcher config's ``rpc_url`` takes it (without
        them when the node uses its cookie file)."""
        if self.cookie:
            return f"http://127.0.0.1:{self.rpc_port}"
        return f"http://{RPC_USER}:{RPC_PASSWORD}@127.0.0.1:{self.rpc_port}"

    @property
    def cookie_file(self) -> Path:
        assert self.datadir is not None
        return self.datadir / "regtest" / ".cookie"

    def _auth(self) -> tuple[str, str]:
        if self.cookie:
            user, _, password = self.cookie_file.read_text().strip().partition(":")
            return user, password
        return RPC_USER, RPC_PASSWORD

    def start(self) -> None:
        """Start on a new datadir, or again on the same one (and the same ports) after stop()."""
        if shutil.which("litecoind") is None:
            raise RuntimeError("litecoind is not installed: run `make deps` (Debian package litecoind)")
        if self.datadir is None:
            self.datadir = Path(tempfile.mkdtemp(prefix="litecoind-"))
            self.rpc_port, self.p2p_port = _free_port(), _free_port()
        auth = [] if self.cookie else [f"-rpcuser={RPC_USER}", f"-rpcpassword={RPC_PASSWORD}"]
        args = ["litecoind", "-regtest", f"-datadir={self.datadir}", f"-rpcport={self.rpc_port}",
                f"-port={self.p2p_port}", "-rpcbind=127.0.0.1", "-rpcallowip=127.0.0.1",
                *auth, "-server=1", "-listen=0", "-dnsseed=0",
                "-discover=0", "-fallbackfee=0.0001", "-vbparams=mweb:-2:0", "-printtoconsole=0",
                f"-txindex={int(self.txindex)}", *(["-mempoolreplacement=1"] if self.replacement else []),
                # Litecoin Core 0.21 stopped while a client (a running watcher) has connected
                # waits for its HTTP connections to time out: -rpcservertimeout, 30 s by default
                # (docs/bitcoin.md). 2 s also has the node drop idle keep-alive connections
                # under watcher, as a busy or restarted node does
                "-rpcservertimeout=2", *self.extra]
        self._log = self.datadir / "stderr.log"
        with open(self._log, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.rpc("getblockchaininfo")
                if self._payer is not None:  # started again: the payer's wallet is not loaded by itself
                    self.rpc("loadwallet", "payer")
                return
            except (httpx.HTTPError, RpcFailure, OSError):  # OSError: no cookie written yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    said = self._log.read_text(errors="replace")
                    self.close()
                    raise RuntimeError(f"litecoind did not start: {said[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop by PID: SIGTERM (a clean shutdown), then SIGKILL. Our keep-alive connection
        goes first: the node's HTTP server waits for open connections before it exits."""
        self._client.close()
        self._client = _client()
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        self._client.close()
        if self.datadir is not None:
            shutil.rmtree(self.datadir, ignore_errors=True)
            self.datadir = None

    # --- JSON-RPC -----------------------------------------------------------------------

    def rpc(self, method: str, *params: Any, wallet: str | None = None) -> Any:
        self._ids += 1
        path = f"/wallet/{wallet}" if wallet else "/"
        r = self._client.post(f"http://127.0.0.1:{self.rpc_port}{path}", auth=self._auth(),
                              json={"jsonrpc": "1.0", "id": self._ids, "method": method, "params": list(params)})
        data = r.json(parse_float=Decimal)
        if data.get("error"):
            raise RpcFailure(method, data["error"])
        return data["result"]

    def batch(self, calls: list[tuple[str, list[Any]]], wallet: str | None = None) -> list[Any]:
        """Many calls in one JSON-RPC batch; their results in order (raises on the first error)."""
        path = f"/wallet/{wallet}" if wallet else "/"
        body = [{"jsonrpc": "1.0", "id": n, "method": m, "params": p} for n, (m, p) in enumerate(calls)]
        r = self._client.post(f"http://127.0.0.1:{self.rpc_port}{path}", auth=self._auth(), json=body)
        answers = sorted(r.json(parse_float=Decimal), key=lambda a: a["id"])
        for (method, _), a in zip(calls, answers, strict=True):
            if a.get("error"):
                raise RpcFailure(method, a["error"])
        return [a["result"] for a in answers]

    # --- the test payer (a wallet inside the node) ----------------------------------------

    @property
    def payer(self) -> str:
        """An address of the node's own "payer" wallet, funded with mature coinbase coins."""
        if self._payer is None:
            self.rpc("createwallet", "payer")
            self._payer = self.rpc("getnewaddress", "", "bech32", wallet="payer")
            self.rpc("generatetoaddress", 101, self._payer)  # one coinbase matures
        return self._payer

    def head(self) -> int:
        return int(self.rpc("getblockcount"))

    def mine(self, blocks: int = 1) -> list[str]:
        return list(self.rpc("generatetoaddress", blocks, self.payer))

    def mine_empty(self, blocks: int = 1) -> list[str]:
        """Blocks without the mempool's transactions (``generateblock`` with none)."""
        return [str(self.rpc("generateblock", self.payer, [])["hash"]) for _ in range(blocks)]

    def send(self, to: str, sats: int) -> str:
        """Pay ``sats`` from the payer wallet to ``to`` (into the mempool); the txid."""
        return str(self.rpc("sendtoaddress", to, str(Decimal(sats) / COIN), wallet="payer"))

    def invalidate(self, depth: int) -> str:
        """Drop the last ``depth`` blocks (their transactions go back to the mempool); returns
        the hash of the first dropped block, for ``reconsider``."""
        first = self.rpc("getblockhash", self.head() - depth + 1)
        self.rpc("invalidateblock", first)
        return str(first)

    def reconsider(self, block_hash: str) -> None:
        self.rpc("reconsiderblock", block_hash)


def ltc_entry(node: Litecoind, **extra: Any) -> dict[str, Any]:
    """A ``[[chains]]`` entry watching ``node`` as chain ``ltc`` (``extra`` overrides)."""
    return {"id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": node.url, "confirmations": 2,
            "finality_depth": 10, "start_block": 0, "poll_interval": 0.1, **extra}


async def mine(node: Litecoind, n: int = 1) -> None:
    """Mine ``n`` blocks without blocking the test's Trio loop."""
    await trio.to_thread.run_sync(node.mine, n)
