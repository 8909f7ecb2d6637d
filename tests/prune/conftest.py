"""Pruning tests run on one thread (the CI machine is small and shared) with tiny models and data."""

from __future__ import annotations

import pytest

from lowbit.data import Dataset, load_dataset


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits")
