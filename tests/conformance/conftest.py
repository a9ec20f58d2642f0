"""The ``harness`` fixture: one real node per test, for each chain family in ``HARNESSES``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from .bitcoin import LitecoinHarness
from .evm import EvmHarness
from .harness import FamilyHarness

#: Every family that runs the conformance suite; a new family appends its harness class.
HARNESSES: list[type[FamilyHarness]] = [EvmHarness, LitecoinHarness]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A family's ``known_bugs`` run as strict xfails, for that family only."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        family = params.get("harness")
        if family is None:
            continue
        name = getattr(item, "originalname", item.name)
        keys = [name] + ([f"{name}[{params['point']}]"] if "point" in params else [])
        reason = next((family.known_bugs[k] for k in keys if k in family.known_bugs), None)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(strict=True, reason=reason))


@pytest.fixture(params=HARNESSES, ids=lambda cls: cls.family)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FamilyHarness]:
    h = request.param(tmp_path / "node")
    h.workdir.mkdir(parents=True, exist_ok=True)
    try:
        h.start()
        yield h
    finally:
        h.stop()


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A daemon (in the test's process) that logs an error or a traceback while doing its
    job is a finding, even when the money ends up right."""
    yield
    bad = [f"{r.levelname} {r.name}: {r.getMessage()[:500]}" for r in caplog.get_records("call")
           if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, "\n".join(bad)
