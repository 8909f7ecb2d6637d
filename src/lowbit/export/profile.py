"""Where onnxruntime spends the time of an ONNX model: its own profiler, per node of the optimized graph.

    from lowbit.export.profile import profile_onnx
    prof = profile_onnx("model.onnx", batch=64, threads=2)
    prof["by_op"]["QLinearConv"]["share_pct"], prof["nodes"][0]   # the dearest node first

An int8 file can be slower than its float twin although every convolution runs on an integer kernel (LeNet-5 at
batch 64 on an AVX2 CPU: its first convolution has one input channel, and its ``QLinearConv`` takes 45% of the int8
run, 4.7x the time of the float NCHWc convolution). The total says *that* it lost; this says *where*. The profile is
onnxruntime's (``SessionOptions.enable_profiling``): a ``*_kernel_time`` event per node and run, of which this
keeps the median over ``runs`` runs after ``warmup`` untimed ones. A run's wall time is measured apart, in a
session without the profiler (which slowed an int8 ResNet-20 by a third). Between kernels onnxruntime does work
of its own, but the two numbers come from two sessions, so on a noisy machine the kernels' sum can exceed it.
Each node is marked ``integer``, ``float`` (a float convolution or matrix product: the expensive kind) or
``other`` (pooling, layout changes, (de)quantization).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.export.onnx_qdq import FLOAT_COMPUTE_OPS, INTEGER_COMPUTE_OPS, session_options

__all__ = ["profile_onnx", "format_profile"]

_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def _kind(op: str) -> str:
    return "integer" if op in INTEGER_COMPUTE_OPS else "float" if op in FLOAT_COMPUTE_OPS else "other"


def profile_onnx(path: str | os.PathLike[str], batch: int = 1, threads: int = 1, runs: int = 20, warmup: int = 5,
                 level: str = "all", seed: int = 0) -> dict[str, Any]:
    """Profile one ONNX file in onnxruntime (CPU) on random inputs of batch ``batch``.

    The model's inputs must have a static shape apart from a symbolic first (batch) dimension.

    Returns:
        ``{"file", "batch", "threads", "level", "runs", "kernel_ms", "by_op", "nodes"}``. ``kernel_ms`` is the sum
        of the nodes' median times; ``by_op`` maps each op type to ``{"count", "ms", "share_pct", "kind"}``
        (dearest first); ``nodes`` lists ``{"name", "op", "kind", "ms", "share_pct"}``, dearest first.

    Example:
        >>> profile_onnx("m.onnx", batch=64)["nodes"][0]["op"]       # doctest: +SKIP
        'QLinearConv'
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such ONNX file")
    for key, value in (("batch", batch), ("threads", threads), ("runs", runs)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    so = session_options(level, threads)  # ValueError for an unknown level
    try:
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a file it cannot load
        raise ValueError(f"{path}: onnxruntime cannot load it: {e}") from e
    feeds = _random_feeds(session, path, batch, np.random.default_rng(seed))
    wall = []  # timed without the profiler, which slows some models' runs by a third
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        if i >= warmup:
            wall.append(1e3 * (time.perf_counter() - t0))
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, list[float]] = defaultdict(list)  # per node, in run order
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            times[name].append(e["dur"] / 1e3)
            ops[name] = e.get("args", {}).get("op_name", "?")
    times = {n: ts[warmup:] for n, ts in times.items() if ts[warmup:]}  # the warm-up runs are not timed
    if not times:
        raise RuntimeError(f"{path}: onnxruntime's profile holds no node events; cannot attribute the time")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    total = sum(med.values())
    nodes = sorted(({"name": n, "op": ops[n], "kind": _kind(ops[n]), "ms": round(ms, 4),
                     "share_pct": round(100 * ms / total, 2)} for n, ms in med.items()), key=lambda r: -r["ms"])
    by_op: dict[str, dict[str, Any]] = {}
    for r in nodes:
        o = by_op.setdefault(r["op"], {"count": 0, "ms": 0.0, "share_pct": 0.0, "kind": r["kind"]})
        o["count"] += 1
        o["ms"] += med[r["name"]]
    for o in by_op.values():
        o["share_pct"] = round(100 * o["ms"] / total, 2)
        o["ms"] = round(o["ms"], 4)
    by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1]["ms"]))
    return {"file": str(path), "batch": batch, "threads": threads, "level": level, "runs": runs,
            "wall_ms": round(statistics.median(wall), 4), "kernel_ms": round(total, 4), "by_op": by_op,
            "nodes": nodes}


def _random_feeds(session: Any, path: Path, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of batch ``batch`` for every input of ``session``; ValueError for shapes it cannot fill."""
    feeds = {}
    for inp in session.get_inputs():
        dims = list(inp.shape)
        if any(not isinstance(d, int) for d in dims[1:]):
            raise ValueError(f"{path}: input {inp.name!r} has shape {dims}; only the first (batch) dimension "
                             "may be symbolic")
        if inp.type not in _INPUT_TYPES:
            raise ValueError(f"{path}: input {inp.name!r} is {inp.type}; supported: {sorted(_INPUT_TYPES)}")
        if dims and isinstance(dims[0], int) and dims[0] != batch:
            raise ValueError(f"{path}: input {inp.name!r} has a fixed batch of {dims[0]}; profile it with "
                             f"batch={dims[0]} or export it with a symbolic batch dimension")
        shape = [batch, *dims[1:]]
        dtype = _INPUT_TYPES[inp.type]
        feeds[inp.name] = (rng.standard_normal(shape).astype(dtype) if dtype == np.float32
                           else rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, shape, dtype=dtype))
    return feeds


def format_profile(prof: dict[str, Any], top: int = 10) -> str:
    """The profile as text: the op types, then the ``top`` dearest nodes."""
    lines = [f"{prof['file']}: batch {prof['batch']}, {prof['threads']} thread(s), optimization level "
             f"{prof['level']}, medians of {prof['runs']} runs: {prof['wall_ms']:.3f} ms a run, "
             f"{prof['kernel_ms']:.3f} ms of it in kernels",
             f"  {'op type':24s} {'kind':8s} {'nodes':>5s} {'ms':>9s} {'share':>7s}"]
    lines += [f"  {op:24s} {o['kind']:8s} {o['count']:5d} {o['ms']:9.3f} {o['share_pct']:6.1f}%"
              for op, o in prof["by_op"].items()]
    lines.append(f"  the {min(top, len(prof['nodes']))} dearest nodes:")
    lines += [f"  {r['name'][:40]:40s} {r['op']:18s} {r['ms']:9.3f} {r['share_pct']:6.1f}%"
              for r in prof["nodes"][:top]]
    return "\n".join(lines)
