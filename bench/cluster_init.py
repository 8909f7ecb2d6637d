"""Deep Compression's three k-means initializations compared: LeNet-300-100 on MNIST, 2-5 bits.

    python -m bench.cluster_init                     # no fine-tuning (the default)
    python -m bench.cluster_init --finetune 1        # plus 1 epoch of centroid fine-tuning per row

Every layer of the float baseline (``bench/checkpoints/lenet300_100.safetensors``) is clustered with
``lowbit.cluster.cluster_`` at the same bit width, and the test accuracy is measured with the shared
weights as they come out of k-means. ``random`` is averaged over ``--seeds`` seeds (min and max kept).
Rows ``INIT/Bbit`` go to ``bench/results/cluster_init.json`` with ``test_acc_pct``,
``drop_vs_float_pct`` and ``weight_rel_rmse`` (RMS of W - C[I] over RMS of W, all layers).

The paper (Han et al. 2016, arXiv:1510.00149, Figure 5, AlexNet) finds linear initialization best:
it keeps centroids on the few large weights, which density and random initializations starve.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench._common import CHECKPOINTS, data_dir, write_results
from lowbit.cluster import INITS, ClusterConfig, cluster_, strip_sharing_
from lowbit.data import Dataset, load_dataset
from lowbit.train import TrainConfig, evaluate, fit, load_model

# Summed centroid gradients: a cluster of n weights moves n times faster than one weight, hence the small lr.
FINETUNE = TrainConfig(epochs=1, batch_size=128, lr=1e-4, momentum=0.9, weight_decay=0.0, schedule="cosine",
                       checkpoint_every=0, channels_last=False)


def _rel_rmse(before: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    after = model.state_dict()
    num = sum(float((before[k] - after[k]).pow(2).sum()) for k in before if k.endswith("weight"))
    den = sum(float(before[k].pow(2).sum()) for k in before if k.endswith("weight"))
    return (num / den) ** 0.5


def run_one(path: str, bits: int, init: str, seed: int, data: Dataset, finetune: float) -> tuple[float, float]:
    model, _ = load_model(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cluster_(model, ClusterConfig(types={"Linear": bits}, init=init, seed=seed))  # type: ignore[arg-type]
    if finetune:
        fit(model, data, FINETUNE.model_copy(update={"epochs": finetune, "seed": seed}), show_progress=False)
    strip_sharing_(model)
    acc = evaluate(model, data.loader("test", 1000))["acc"]
    return acc, _rel_rmse(before, model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the random initialization (averaged)")
    ap.add_argument("--finetune", type=float, default=0.0, help="epochs of centroid fine-tuning (default none)")
    args = ap.parse_args()
    path = str(CHECKPOINTS / "lenet300_100.safetensors")
    data = load_dataset("mnist", data_dir())
    base, _ = load_model(path)
    float_acc = evaluate(base, data.loader("test", 1000))["acc"]
    print(f"float baseline: {float_acc:.2f}%   (fine-tuning: {args.finetune} epochs)")
    print(f"{'bits':>4s} " + " ".join(f"{i:>18s}" for i in INITS))
    rows: dict[str, dict[str, object]] = {}
    suffix = f"/ft{args.finetune:g}" if args.finetune else ""
    for bits in args.bits:
        cells = []
        for init in INITS:
            t0 = time.perf_counter()
            seeds = range(args.seeds) if init == "random" else range(1)
            runs = [run_one(path, bits, init, s, data, args.finetune) for s in seeds]
            accs = [a for a, _ in runs]
            acc = statistics.mean(accs)
            row = {"bits": bits, "init": init, "test_acc_pct": round(acc, 2),
                   "drop_vs_float_pct": round(float_acc - acc, 2),
                   "weight_rel_rmse": round(statistics.mean(r for _, r in runs), 4),
                   "finetune_epochs": args.finetune, "float_acc_pct": round(float_acc, 2),
                   "seconds": round(time.perf_counter() - t0, 2)}
            if len(accs) > 1:
                row.update({"seeds": len(accs), "test_acc_min_pct": round(min(accs), 2),
                            "test_acc_max_pct": round(max(accs), 2)})
            rows[f"{init}/{bits}bit{suffix}"] = row
            cells.append(f"{acc:6.2f}% rmse {row['weight_rel_rmse']:.3f}")
        print(f"{bits:>4d} " + " ".join(f"{c:>18s}" for c in cells))
    print("wrote", write_results("cluster_init", rows))


if __name__ == "__main__":
    main()
