"""Fail points: named places in the money-moving code where a test has the daemon killed with
SIGKILL (no cleanup, like a power cut) to prove that a crash exactly there never loses or
repeats a transfer. The conformance suite (tests/conformance) sets
``WATCHER_FAILPOINTS="payout.stored,..."`` on a daemon subprocess; unset, a fail point is a
set lookup and nothing else.

Points (``<purpose>`` is ``payout``, ``sweep``, ``topup``, ``filler`` or ``bump``, a CPFP child):

- ``<purpose>.stored``: the signed transaction and the wallet's new state are committed,
  nothing is broadcast yet;
- ``<purpose>.sent``: the node accepted the broadcast, the database does not know yet;
- ``<purpose>.mined``: the transaction is recorded as mined, its payout or sweep has not moved on.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

_ACTIVE = frozenset(p.strip() for p in os.environ.get("WATCHER_FAILPOINTS", "").split(",") if p.strip())


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL if ``name`` is an active fail point."""
    if name in _ACTIVE:
        log.critical("fail point %s reached: killing the process (SIGKILL)", name)
        os.kill(os.getpid(), signal.SIGKILL)
