"""Character-level text (tinyshakespeare): the first 90% is train, the last 10% validation."""

from __future__ import annotations

import numpy as np

from lowbit.data._files import DataIntegrityError, data_dirs, not_found, verify_sha256

__all__ = ["load_text_arrays"]

_MAX_BYTES = 64 << 20  # a text corpus above 64 MB is not what this loader is for


def load_text_arrays(
    name: str, split: str, data_dir: str | None = None
) -> tuple[np.ndarray, list[str]]:
    """(token ids int64 (N,), vocabulary) for ``train`` (first 90%) or ``test`` (last 10%)."""
    looked = data_dirs(data_dir)
    for d in looked:
        path = d / f"{name}.txt"
        if path.exists():
            break
    else:
        raise not_found(name, looked, f"{name}.txt", "It is the usual 1.1 MB character-level corpus.")
    if path.stat().st_size > _MAX_BYTES:
        raise DataIntegrityError(f"{path}: {path.stat().st_size} bytes; at most {_MAX_BYTES} allowed")
    verify_sha256(path)
    text = path.read_text(encoding="utf-8")
    vocab = sorted(set(text))  # vocabulary over the whole corpus so both splits share ids
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((lookup[c] for c in text), np.int64, len(text))
    cut = int(0.9 * len(ids))
    return (ids[:cut] if split == "train" else ids[cut:]), vocab
