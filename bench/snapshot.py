"""Carry benchmark runs from one machine to the next through git.

    python -m bench.snapshot save distill quant_multibit   # copy those runs into bench/checkpoints/runs/
    python -m bench.snapshot restore                       # copy every committed snapshot back into $LOWBIT_RUNS
    python -m bench.snapshot list                          # what the snapshot holds

Long benchmarks keep their run directories under ``$LOWBIT_RUNS`` (default ``~/.cache/lowbit/runs``), which a
fresh machine does not have. ``save PATH...`` copies the run directories under ``$LOWBIT_RUNS/PATH`` into
``bench/checkpoints/runs/PATH`` so that they can be committed; on another machine ``restore`` puts them back, and
starting the benchmark again resumes every unfinished run from its last checkpoint (``fit(..., resume=True)``)
and only re-reads the finished ones (``fit`` re-reads a finished run from its final ``last.safetensors``, so
that file is kept for finished runs too). A file larger than ``--max-mb`` is left out with a message, so that
the repository does not grow by accident; such runs must finish within one session or be saved with a larger
limit on purpose. ``restore`` never overwrites a file the run directory already has: a run
that went further here keeps its own state.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bench._common import CHECKPOINTS, runs_dir

SNAPSHOT = CHECKPOINTS / "runs"


def _run_files(root: Path) -> list[Path]:
    """The files under ``root`` (relative to it), without hidden ones (a checkpoint's temporary file)."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def save(paths: list[str], runs: Path, dest: Path, max_mb: float = 8.0) -> list[Path]:
    """Copy the run directories ``runs/PATH`` into ``dest/PATH`` (replacing what ``dest/PATH`` held); the
    copied files. ValueError naming the run directories there are when a PATH has none."""
    copied = []
    for rel in paths:
        src = runs / rel
        if not src.is_dir():
            there = sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
            raise ValueError(f"no runs under {src}; {runs} holds {there or 'nothing'}")
        if (dest / rel).exists():
            shutil.rmtree(dest / rel)  # the snapshot mirrors the runs as they are now
        for f in _run_files(src):
            size = (src / f).stat().st_size
            if size > max_mb * 2**20:
                print(f"left out {src / f}: {size / 2**20:.1f} MB > --max-mb {max_mb:g}")
                continue
            (dest / rel / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / f, dest / rel / f)
            copied.append(dest / rel / f)
    return copied


def restore(src: Path, runs: Path) -> list[Path]:
    """Copy every file of the snapshot ``src`` into ``runs`` where ``runs`` lacks it; the copied files."""
    copied = []
    for f in _run_files(src) if src.is_dir() else []:
        if (runs / f).exists():
            continue
        (runs / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, runs / f)
        copied.append(runs / f)
    return copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="copy $LOWBIT_RUNS/PATH into bench/checkpoints/runs/PATH")
    s.add_argument("paths", nargs="+", metavar="PATH", help="run directories relative to $LOWBIT_RUNS, e.g. distill")
    s.add_argument("--max-mb", type=float, default=8.0, help="leave out larger files (default 8)")
    sub.add_parser("restore", help="copy bench/checkpoints/runs/ into $LOWBIT_RUNS where files are missing")
    sub.add_parser("list", help="the files the snapshot holds")
    args = ap.parse_args()
    if args.cmd == "save":
        try:
            files = save(args.paths, runs_dir(), SNAPSHOT, args.max_mb)
        except ValueError as e:
            ap.error(str(e))
        print(f"{len(files)} files in {SNAPSHOT} ({sum(f.stat().st_size for f in files) / 2**20:.1f} MB): commit them")
    elif args.cmd == "restore":
        files = restore(SNAPSHOT, runs_dir())
        print(f"{len(files)} files restored into {runs_dir()}")
    else:
        for f in _run_files(SNAPSHOT) if SNAPSHOT.is_dir() else []:
            print(f"{(SNAPSHOT / f).stat().st_size / 2**20:8.2f} MB  {f}")


if __name__ == "__main__":
    main()
