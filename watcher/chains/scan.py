"""The reading half of the chain contract: what a family's client answers about its chain.

Every family implements it, whether or not it can send. A client never touches the store:
the core decides what is watched, what is credited and when.

Transfer indexes: a transfer is identified by ``(chain, txid, index)``. Families choose the
index scheme for their chain and must keep it stable (the EVM family: the log index for a
token transfer, -1 for a transaction's own value, -(2 + n) for the n-th internal transfer; a
UTXO family: the output index).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar

import trio

from ..errors import NodeError

if TYPE_CHECKING:
    from ..config import AssetConfig, ChainConfig

K = TypeVar("K", str, bytes)  # what an AddressFilter is asked about: a canonical address, or a match key


class AddressFilter(Protocol):
    """Given canonical addresses (or, for a family with ``ChainSpec.matches_by_key``, match
    keys: bytes), return the subset watched on this chain. Cheap, synchronous, safe to call
    with thousands of candidates at once (the core answers it from memory, or from an index
    above ``[storage] watched_in_memory`` addresses)."""

    def __call__(self, candidates: Iterable[K], /) -> set[K]: ...


def key_prefixes(watched: AddressFilter, prefixes: Iterable[bytes]) -> set[bytes]:
    """Which of ``prefixes`` begin at least one watched match key, for a family that matches
    by key and only needs to look for the kinds of key that are watched (e.g. the Bitcoin
    family's script shapes). The core's filter answers it from its index (a ``prefixes``
    method); any other callable is taken to watch every kind."""
    ask: Callable[[Iterable[bytes]], set[bytes]] | None = getattr(watched, "prefixes", None)
    wanted = set(prefixes)
    return wanted if ask is None else ask(wanted) & wanted


def watched_keys(watched: AddressFilter) -> AbstractSet[Any] | None:
    """Every watched match key (or address), where the core holds them in memory (at most
    ``[storage] watched_in_memory``): a family may then test each candidate as it finds it,
    without collecting them first. Read-only, and current only until the caller next yields;
    the filter itself stays the answer. None when the core has no such set (ask the filter)."""
    ask: Callable[[], AbstractSet[Any] | None] | None = getattr(watched, "in_memory", None)
    return None if ask is None else ask()


TransferKind = Literal["native", "token", "internal"]


@dataclass(frozen=True, slots=True)
class Transfer:
    """A value movement to a watched address, as found on chain."""

    txid: str
    index: int
    kind: TransferKind
    asset: str  # the asset's symbol in this chain's config
    to: str  # canonical address
    sender: str  # canonical address ("" if the chain has no single sender)
    amount: int  # base units, > 0
    min_depth: int = 0  # confirmations it needs at least, whatever the chain's (a coinbase output: 100)


@dataclass(frozen=True, slots=True)
class Block:
    """One block of the canonical chain as the node sees it, with the transfers in it that
    pay watched addresses."""

    number: int
    hash: str
    parent_hash: str
    timestamp: int
    transfers: tuple[Transfer, ...] = ()


@dataclass(frozen=True, slots=True)
class Unspent:
    """An unspent output at a watched address (UTXO chains), as the node's UTXO set holds it."""

    address: str  # canonical
    txid: str
    index: int
    amount: int  # base units of the native coin
    height: int  # the block that holds it


@dataclass(frozen=True, slots=True)
class Mempool:
    """What a node's mempool holds for us, as answered by :meth:`ChainClient.mempool`:
    ``transfers`` to watched addresses in unmined transactions, the ``txids`` of every
    transaction in it, and the node's ``height`` read *after* them (a transaction of ours
    absent from ``txids`` and from every block up to ``height`` was neither pending nor mined
    when asked: replaced, double-spent or dropped)."""

    transfers: tuple[Transfer, ...]
    txids: frozenset[str]
    height: int


@dataclass(frozen=True, slots=True)
class TxLookup:
    """Where a transaction stands, as answered by :meth:`ChainClient.lookup_tx`."""

    txid: str
    status: Literal["unknown", "pending", "failed", "included"]
    block: Block | None = None  # for "included": the block, carrying the transfers of this tx


class _HasConfig(Protocol):
    cfg: ChainConfig


_C = TypeVar("_C", bound=_HasConfig)
_P = ParamSpec("_P")
_T = TypeVar("_T")


def node_data(fn: Callable[Concatenate[_C, _P], Coroutine[Any, Any, _T]]
              ) -> Callable[Concatenate[_C, _P], Coroutine[Any, Any, _T]]:
    """For a client's methods: an answer of the wrong type or shape (a number that is not a
    number, a block that is a string, a missing field) is the node's fault. It becomes a
    :class:`~watcher.errors.NodeError`, which the core backs off and retries, instead of an
    exception that would end the chain's task and with it the daemon. The client has ``cfg``
    (its :class:`~watcher.config.ChainConfig`)."""

    @functools.wraps(fn)
    async def wrapper(self: _C, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await fn(self, *args, **kwargs)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise NodeError(f"{self.cfg.id}: malformed answer from the node in {fn.__name__}: "
                            f"{type(e).__name__}: {str(e)[:200]}") from e

    return wrapper


class ChainClient:
    """Talks to one chain's node. Every method may raise :class:`watcher.errors.NodeError`
    (the core retries with backoff) or :class:`watcher.errors.InconsistentData` (the node
    changed its mind mid-request; the core asks again)."""

    async def __aenter__(self) -> ChainClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release connections."""

    async def subscribe_heads(self, ws_url: str, on_head: Callable[[int], None], *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """For a family with ``ChainSpec.push``: subscribe to new heads at a node's ``ws_url``,
        call ``task_status.started()`` once subscribed, then ``on_head(number)`` for every head
        pushed, until the subscription drops (return, or raise ``NodeError``; the core
        reconnects with backoff and keeps polling meanwhile)."""
        raise NodeError(f"this family cannot subscribe to new heads ({ws_url})")

    async def check(self) -> dict[str, Any]:
        """Called when the chain starts: verify the node serves the configured chain (raise
        :class:`watcher.errors.ChainMismatch` if not) and return facts for logs and
        ``/v1/chains`` (e.g. ``{"chain_id": 1}``). The core remembers them with the chain's
        cursor and refuses a node that later reports different ones."""
        return {}

    async def head(self) -> int:
        """The number of the newest block the node has."""
        raise NotImplementedError

    async def block_hashes(self, numbers: list[int]) -> dict[int, tuple[str, str]]:
        """``{number: (hash, parent_hash)}`` for each number the node has; missing numbers
        are left out. Used to find the common ancestor after a reorg."""
        raise NotImplementedError

    async def fetch_blocks(self, start: int, end: int, watched: AddressFilter) -> list[Block]:
        """Blocks ``start..end`` (inclusive), in order, each with the transfers to addresses
        for which ``watched`` says yes. Failed transactions are never reported. May return
        fewer blocks than asked (a prefix) if the node does not have them all yet."""
        raise NotImplementedError

    async def mempool(self, watched: AddressFilter) -> Mempool | None:
        """Transfers to watched addresses waiting in the node's mempool (see :class:`Mempool`),
        or None for a chain or configuration without it (the default). Called once per poll
        while the scan is at the head."""
        return None

    async def unspent(self, addresses: Sequence[str]) -> list[Unspent] | None:
        """Every unspent output of these addresses in the node's UTXO set (a UTXO family, for
        ``watcher reconcile``), or None where balances are accounts (the default)."""
        return None

    async def lookup_tx(self, txid: str, watched: AddressFilter) -> TxLookup:
        """Find one transaction (for ``submit-tx``): is it unknown, pending, failed or
        included, and if included, in which block and with which watched transfers."""
        raise NotImplementedError

    async def balance(self, address: str, asset: AssetConfig, block: int | None = None) -> int:
        """What ``address`` holds of ``asset``, in base units, at ``block`` (None: the
        latest block). A family that cannot answer for a past block raises
        :class:`watcher.errors.NodeError` with ``retryable=False`` for it."""
        raise NotImplementedError
