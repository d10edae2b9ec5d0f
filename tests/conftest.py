"""Shared fixtures, and the rule that a test fails if anything logged an unexpected
warning or error (as S3QL's test suite does): the daemon's log is part of what we test.

A test that expects a logged warning or error says so with
`@pytest.mark.expected_log("regex", ...)`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from annofs.volume import Volume

SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expected_log(*patterns): log records at WARNING or above that may appear")


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def fail_on_unexpected_log(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if a WARNING or worse was logged that the test did not declare."""
    handler = _Collector()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    marker = request.node.get_closest_marker("expected_log")
    patterns = [re.compile(p) for p in (marker.args if marker else ())]
    unexpected = [
        r for r in handler.records
        if not any(p.search(r.getMessage()) for p in patterns)
    ]
    if unexpected:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in unexpected)
        pytest.fail(f"unexpected log records:\n{lines}", pytrace=False)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A path for a new store."""
    return tmp_path / "store"


@pytest.fixture
def vol(store_dir: Path) -> Iterator[Volume]:
    """A fresh, initialised store, opened."""
    v = Volume.open(store_dir, create=True)
    try:
        yield v
    finally:
        v.close()
