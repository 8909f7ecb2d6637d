"""Does 90% sparsity make a Linear layer faster on this CPU? Scalpel's question, measured side by side.

    python -m bench.scalpel_speed                   # 1 thread (default), both layers
    python -m bench.scalpel_speed --threads 2 --repeats 31

Layers: LeNet-300-100's fc1 (784 -> 300, trained weights from bench/checkpoints when present) and a
4096 x 4096 layer (random weights). Each is pruned to 90% of its weights four ways and timed at batch
1 and 64 (median over ``--repeats`` timings, each a loop long enough to take >= 2 ms; the variants are
timed round-robin so that load from other processes hits them alike):

    dense_torch       F.linear on the unpruned weight (torch fp32: oneDNN/MKL sgemm), the reference
    csr_torch         unstructured magnitude pruning, W stored as torch.sparse_csr, torch.sparse.mm
    csr_numba         the same unstructured weights in lowbit.prune.simd's kernel with group size 1
                      (= plain CSR), so the SIMD kernel's gain is measured against the same code
    simd4/simd8       Scalpel SIMD-aware pruning (aligned groups of 4 / 8 along the input, L2 score),
                      packed group-CSR, numba kernel (k unrolled, fastmath, AVX2 on this CPU)
    simd8_dense       the simd8 kernel on the *unpruned* weight: how the numba kernel compares with
                      MKL on the same work (calibration, not a pruning result)
    node_dense_torch  Scalpel node pruning: 90% of output neurons removed, F.linear on the smaller
                      dense weight (the next layer's input shrinks too; not timed here)

For fc1 the rows also give the MNIST test accuracy of LeNet-300-100 with only fc1 pruned that way, one
shot, without fine-tuning (Scalpel and Deep Compression fine-tune; this is the raw cost of each shape).
Writes bench/results/scalpel_speed.json.

References:
    Yu et al., "Scalpel: Customizing DNN Pruning to the Underlying Hardware Parallelism", ISCA 2017.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import numba
import torch
import torch.nn.functional as F
from torch import nn

from bench._common import CHECKPOINTS, data_dir, write_results
from lowbit.data import load_dataset
from lowbit.models import create_model
from lowbit.prune import PruneConfig, prune_, prune_nodes_, simd_prune_
from lowbit.prune.simd import group_sparse_linear, pack_groups
from lowbit.timing import interleaved_medians
from lowbit.train import evaluate, load_model

SPARSITY = 0.9
IMPL = {  # what each row ran, stored with the numbers
    "dense_torch": "torch F.linear, unpruned fp32 weight (oneDNN/MKL sgemm)",
    "csr_torch": "unstructured magnitude pruning; torch.sparse.mm on a torch.sparse_csr weight (MKL sparse)",
    "csr_numba": "unstructured magnitude pruning; lowbit.prune.simd numba kernel with group size 1 (plain CSR)",
    "simd4_numba": "Scalpel SIMD-aware pruning, aligned groups of 4; lowbit.prune.simd numba group-CSR kernel",
    "simd8_numba": "Scalpel SIMD-aware pruning, aligned groups of 8; lowbit.prune.simd numba group-CSR kernel",
    "simd8_dense": "calibration: the k=8 numba kernel on the unpruned weight (all groups kept)",
    "node_dense_torch": "Scalpel node pruning, 90% of output neurons removed; torch F.linear on the smaller weight",
}


def _time_us(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median microseconds per call of each function, timed round-robin (one timing of each per round), so a
    change in the machine's load hits all of them alike; each timing loops the call for >= 2 ms."""
    med = interleaved_medians(fns, rounds=repeats, warmup=3, min_timing_s=0.002)["wall"]
    return {name: 1e6 * s for name, s in med.items()}


def _lenet() -> tuple[nn.Module, bool]:
    path = CHECKPOINTS / "lenet300_100.safetensors"
    if path.exists():
        return load_model(path)[0].eval(), True
    torch.manual_seed(0)
    return create_model("lenet300_100").eval(), False


def _variants(model: nn.Module, layer: str) -> dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    """Pruned copies of ``model`` (only ``layer`` pruned) and how each runs ``layer`` on an input."""
    out: dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]] = {}
    dense = model.get_submodule(layer)
    out["dense_torch"] = (model, lambda x: F.linear(x, dense.weight, dense.bias))

    unstructured = copy.deepcopy(model)
    prune_(unstructured, PruneConfig(rules={layer: SPARSITY}))
    lin = unstructured.get_submodule(layer)
    w_csr = lin.weight.detach().to_sparse_csr()
    out["csr_torch"] = (unstructured, lambda x: torch.sparse.mm(w_csr, x.t()).t() + lin.bias)
    csr = pack_groups(lin.weight, 1, lin.bias)
    out["csr_numba"] = (unstructured, lambda x: group_sparse_linear(x, csr))

    for k in (4, 8):
        grouped = copy.deepcopy(model)
        simd_prune_(grouped, {layer: SPARSITY}, simd_width=k)
        g = grouped.get_submodule(layer)
        packed = pack_groups(g.weight, k, g.bias)
        out[f"simd{k}_numba"] = (grouped, lambda x, p=packed: group_sparse_linear(x, p))
    full = pack_groups(dense.weight, 8, dense.bias)
    out["simd8_dense"] = (model, lambda x: group_sparse_linear(x, full))

    nodes = copy.deepcopy(model)
    prune_nodes_(nodes, {layer: SPARSITY})
    small = nodes.get_submodule(layer)
    out["node_dense_torch"] = (nodes, lambda x: F.linear(x, small.weight, small.bias))
    return out


def _check(fns: dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]], layer: str,
           in_features: int) -> None:
    """Every sparse path computes its pruned layer (checked against F.linear on the pruned weight)."""
    x = torch.randn(3, in_features)
    for name, (model, fn) in fns.items():
        lin = model.get_submodule(layer)
        torch.testing.assert_close(fn(x), F.linear(x, lin.weight, lin.bias), rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads (default 1)")
    ap.add_argument("--repeats", type=int, default=21, help="timings per measurement; the median is reported")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the MNIST evaluation of the fc1 variants")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    torch.manual_seed(0)

    lenet, trained = _lenet()
    big = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10)).eval()
    cases = [("fc1_784x300", lenet, "fc1", 784), ("fc_4096x4096", big, "0", 4096)]
    test = None if args.no_accuracy else load_dataset("mnist", data_dir()).loader("test", 1000)

    rows: dict[str, dict[str, object]] = {}
    with torch.no_grad():
        for case, model, layer, fin in cases:
            fns = _variants(model, layer)
            _check(fns, layer, fin)
            timings = {}
            for batch in (1, 64):
                x = torch.randn(batch, fin)
                timings[batch] = _time_us({n: (lambda fn=fn, x=x: fn(x)) for n, (_, fn) in fns.items()}, args.repeats)
            for name, (variant, _) in fns.items():
                lin = variant.get_submodule(layer)
                nnz = int((lin.weight != 0).sum()) if name != "simd8_dense" else lin.weight.numel()
                row: dict[str, object] = {
                    "impl": IMPL[name], "weights_kept": nnz, "weights_total": model.get_submodule(layer).weight.numel(),
                    "out_features": lin.out_features,
                }
                for batch, us in timings.items():
                    row[f"latency_us_b{batch}"] = round(us[name], 2)
                    row[f"speedup_vs_torch_dense_b{batch}"] = round(us["dense_torch"] / us[name], 3)
                if test is not None and case.startswith("fc1") and name != "simd8_dense":
                    row["test_acc_pct_no_finetune"] = round(evaluate(variant, test)["acc"], 2)
                    row["weights_from"] = "bench/checkpoints/lenet300_100.safetensors" if trained else "random init"
                rows[f"{case}/{name}"] = row

    path = write_results("scalpel_speed", rows, merge=False)
    print(f"\n90% weight sparsity, fp32, {args.threads} thread(s), median of {args.repeats}; "
          "speedup = torch dense latency / latency")
    head = f"{'layer/method':32s} {'kept':>9s} {'b1 us':>9s} {'x b1':>6s} {'b64 us':>9s} {'x b64':>6s} {'acc %':>6s}"
    print(head + "\n" + "-" * len(head))
    for key, r in rows.items():
        acc = r.get("test_acc_pct_no_finetune", "")
        print(f"{key:32s} {r['weights_kept']:>9} {r['latency_us_b1']:>9} {r['speedup_vs_torch_dense_b1']:>6} "
              f"{r['latency_us_b64']:>9} {r['speedup_vs_torch_dense_b64']:>6} {acc!s:>6}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
