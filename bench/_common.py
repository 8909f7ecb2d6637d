"""Shared by the benchmarks: the results-file shape, the machine description, data lookup."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
CHECKPOINTS = Path(__file__).parent / "checkpoints"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_dir() -> str | None:
    """``$LOWBIT_DATA`` if set, else the developers' ``../shared/data`` if present."""
    if os.environ.get("LOWBIT_DATA"):
        return os.environ["LOWBIT_DATA"]
    return str(SHARED_DATA) if SHARED_DATA.is_dir() else None


def runs_dir() -> Path:
    """Where long benchmark runs keep resumable checkpoints (outside the work tree)."""
    return Path(os.environ.get("LOWBIT_RUNS") or Path.home() / ".cache" / "lowbit" / "runs")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads, {platform.system()}"


def write_results(name: str, results: dict[str, dict[str, Any]], merge: bool = True) -> Path:
    """Write ``bench/results/NAME.json`` in the one shape every results file has; rows already in
    the file and not re-measured are kept when ``merge`` is set."""
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text())["results"] if merge and path.exists() else {}
    command = "python -m bench." + Path(sys.argv[0]).stem + " " + shlex.join(sys.argv[1:])
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    # merged files hold rows of several runs: each row says which command and when measured it
    fresh = {k: ({**v, "command": command, "date": date} if isinstance(v, dict) else v) for k, v in results.items()}
    doc = {"command": command, "date": date, "machine": machine(), "results": {**old, **fresh}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: a bench running beside reads it whole
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path
