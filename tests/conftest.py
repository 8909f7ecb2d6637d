"""Shared fixtures: the developers' data directory (``../shared/data``) when it exists."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Decoded caches go to a per-session temp dir unless the developer set LOWBIT_CACHE; each test
    starts from seed 0 on one intra-op thread (the tests' tensors are small: threads that wait for each
    other on a busy 2-core machine made them 5-10x slower) and the thread setting is restored after."""
    if not os.environ.get("LOWBIT_CACHE"):
        monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``, or skip with the reason (a user's machine does not have it; CI does)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data sets at {SHARED_DATA} (present for developers and CI)")
    return SHARED_DATA
