"""What a chain family implements to run the conformance suite against its own real node.

The suite (``test_conformance.py``) drives watcher only through its HTTP API and judges
only against the chain, so a family plugs in with one class: a :class:`FamilyHarness` that
starts its real node, pays from a funded test payer, mines, reorganises, holds fees and reads
balances. Everything here is plain synchronous code (the tests call it from Trio; each call
should take well under a second or two).

Conventions every method keeps:

- **Addresses** are passed and returned in the display form the API shows
  (``spec.display_address``); a harness accepts any form its own node accepts.
- **Amounts** are integers in base units of the asset (wei, sat...), never floats.
- **Assets** are the symbols the family's ``chain_entry`` configures: :attr:`assets` lists
  the native coin first, then tokens (if the family has any).
- **Mining is manual.** Nothing is mined unless the test calls :meth:`mine` (or a method
  documented to mine, such as :meth:`fund`). A transaction sent with :meth:`pay`, or by
  watcher, waits in the node's mempool until then. (EVM: anvil with automine off; a UTXO
  regtest node mines only on ``generatetoaddress`` anyway.)
- **Processes**: :meth:`start` starts the node as a child process on loopback (a free port,
  data under ``workdir``) and remembers its PID; :meth:`stop` stops exactly that PID and is
  safe to call twice or after a failed start.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

#: Every fail point of the money-moving code (watcher/failpoints.py). A family declares in
#: :attr:`FamilyHarness.failpoints` the ones its wallet reaches; the others are skipped.
ALL_FAILPOINTS = (
    "payout.stored", "payout.sent", "payout.mined",
    "sweep.stored", "sweep.sent", "sweep.mined",
    "topup.stored", "topup.sent", "topup.mined",
)


class FamilyHarness:
    """One chain family's real node, as the conformance suite needs it.

    Subclass it, fill in every method that raises ``NotImplementedError``, and add the class
    to ``HARNESSES`` in ``test_conformance.py``. The suite constructs one harness per test
    with a fresh ``workdir``, calls :meth:`start`, and :meth:`stop` at the end whatever
    happened.
    """

    #: The family name (``family = "..."`` in config); also the test id.
    family: ClassVar[str]
    #: The asset symbols the suite exercises: the native coin first, then tokens if any.
    assets: tuple[str, ...]
    #: The fail points this family's wallet reaches. A family without gas top-ups leaves out
    #: ``topup.*``; the kill tests of points not listed are skipped.
    failpoints: frozenset[str] = frozenset(ALL_FAILPOINTS)
    #: Tests this family fails because of a known bug in watcher, each with the bug written
    #: down: ``{"test_name": "reason"}``, or ``{"test_name[payout.sent]": ...}`` for one fail
    #: point. They run as ``xfail(strict=True)``: the suite stays green, and a fix turns
    #: them into failures until the entry is removed.
    known_bugs: ClassVar[dict[str, str]] = {}

    def __init__(self, workdir: Path):
        self.workdir = workdir

    @property
    def chain_id(self) -> str:
        """The ``id`` of the chain in watcher's config (and in API paths)."""
        return self.family

    @property
    def native(self) -> str:
        return self.assets[0]

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.assets[1:]

    # --- the node's life ----------------------------------------------------------------

    def start(self) -> None:
        """Start the real node (a child process on 127.0.0.1, data under ``workdir``), wait
        until it answers, and prepare everything the other methods need: a funded payer
        (with every token too), contracts deployed, enough blocks for spendable coins.
        Leave the node in manual mining (see the module docstring)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the node started by :meth:`start`, by its PID (SIGTERM, then SIGKILL after
        a timeout), and remove what it left in temporary places. Idempotent."""
        raise NotImplementedError

    # --- configuration --------------------------------------------------------------------

    def chain_entry(self, **extra: Any) -> dict[str, Any]:
        """The ``[[chains]]`` entry (a dict for ``tomli_w``) for watcher to watch this node:
        ``id`` (:attr:`chain_id`), ``family``, ``rpc_url``, ``confirmations`` (2 unless
        ``extra`` says otherwise), ``finality_depth``, ``start_block`` (the current head, so
        nothing earlier is scanned), ``poll_interval`` (0.1 s), ``assets`` for the tokens, and
        the family's own keys (e.g. EVM ``chain_id``, Bitcoin ``network``). ``extra`` keys
        (``confirmations``, ``sweep``, ``payouts``...) override or are added as given."""
        raise NotImplementedError

    def decimals(self, asset: str) -> int:
        """Decimals of an asset of :attr:`assets`, as configured."""
        raise NotImplementedError

    def units(self, asset: str, text: str) -> int:
        """Base units of a decimal amount (``units("ETH", "1.5")``)."""
        from watcher.money import parse_amount

        return parse_amount(text, self.decimals(asset))

    # --- addresses and money ------------------------------------------------------------

    def fresh_address(self) -> str:
        """An address of this chain that nothing has ever used and no test key controls:
        payout recipients, treasuries and externally watched addresses. Its balance is 0
        and stays 0 until someone pays it."""
        raise NotImplementedError

    def pay(self, to: str, asset: str, amount: int) -> str:
        """Send ``amount`` of ``asset`` to ``to`` from a funded test payer of the node (not
        through watcher) and return the txid in the form watcher reports it (the chain
        spec's canonical txid). The transaction is accepted into the mempool, **not mined**.
        Each payment makes exactly one transfer to ``to``. Consecutive calls must not depend
        on each other: :meth:`reorg` may drop one and keep the next (EVM: payers take turns,
        so no two pending payments share a sender's nonce sequence)."""
        raise NotImplementedError

    def fund(self, address: str, asset: str, amount: int) -> None:
        """Give ``address`` (e.g. watcher's hot wallet) ``amount`` of ``asset`` and return once
        it is mined (this mines blocks; other pending transactions may be mined with them).
        Not called while fees are held."""
        raise NotImplementedError

    def balance(self, address: str, asset: str) -> int:
        """What ``address`` holds of ``asset`` at the node's newest block, in base units:
        the judge of every money-moving test (a payout to a fresh address paid twice shows
        twice the amount). A UTXO family counts the address's confirmed unspent outputs."""
        raise NotImplementedError

    # --- blocks -----------------------------------------------------------------------------

    def head(self) -> int:
        """The number (height) of the node's newest block, as watcher's client reports it."""
        raise NotImplementedError

    def mine(self, blocks: int = 1) -> None:
        """Mine ``blocks`` blocks now, taking pending transactions (unless fees are held).
        Returns once the node reports the new head."""
        raise NotImplementedError

    def reorg(self, depth: int, keep: Sequence[str] = ()) -> None:
        """Replace the newest ``depth`` blocks by ``depth`` new ones (the head's height does
        not change) and return once the node reports the new chain. Transactions whose txid
        is in ``keep`` are in the new blocks. The other transactions of the replaced blocks
        are not: those the harness sent itself (:meth:`pay`, :meth:`fund`) are gone for good
        (never mined later, e.g. conflicted out by a new block); those watcher sent may be
        forgotten by the node (anvil) or go back to its mempool (Bitcoin Core) — either way
        watcher must see them mined exactly once in the end. (EVM: ``anvil_reorg``; Bitcoin
        Core: ``invalidateblock``, then new blocks with the kept transactions and, for each
        dropped payment, a conflicting spend of one of its inputs.)"""
        raise NotImplementedError

    # --- fees -------------------------------------------------------------------------------

    def hold_fees(self) -> None:
        """From now on, transactions already signed and sent (at the fees the node quoted
        before the hold) cannot be mined: blocks :meth:`mine` makes leave them out while the
        chain still grows, so that watcher's stuck-transaction replacement (``[chains.payouts]
        stuck_after``) has to act. A replacement signed after the hold, paying the new fee
        level, may be mined. (EVM: each block's base fee is set far above the old quote with
        ``anvil_setNextBlockBaseFeePerGas``; a UTXO family can mine blocks that take no
        mempool transaction.)"""
        raise NotImplementedError

    def release_fees(self) -> None:
        """End :meth:`hold_fees`: the following blocks take pending transactions again."""
        raise NotImplementedError
