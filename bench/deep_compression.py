"""Deep Compression (Han et al. 2016, arXiv:1510.00149) reproduced on lowbit's own baselines.

    python -m bench.deep_compression                   # LeNet-300-100 and LeNet-5 on MNIST
    python -m bench.deep_compression resnet20          # the CIFAR-10 row (needs the ResNet-20 baseline)

Runs ``recipes/deep_compression/NAME.yaml`` (resumable: runs live under ``$LOWBIT_RUNS``), then writes
``bench/results/deep_compression.json`` and copies each report and its weight plot to
``bench/results/deep_compression/``. Targets (issue #3): LeNet-300-100 >= 40x, LeNet-5 >= 39x, each with
test error at most baseline + 0.1 points; ResNet-20 accuracy within 1 point of its baseline.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bench._common import RESULTS, data_dir, runs_dir, write_results
from lowbit.recipe import load_recipe, run_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "deep_compression"
PAPER = {  # Han et al., Tables 1-3: error before -> after, size before -> after, ratio
    "lenet300_100": {"paper_error_pct": [1.64, 1.58], "paper_kb": [1070, 27], "paper_ratio": 40},
    "lenet5": {"paper_error_pct": [0.80, 0.74], "paper_kb": [1720, 44], "paper_ratio": 39},
    "resnet20": {},
}
TARGET_RATIO = {"lenet300_100": 40.0, "lenet5": 39.0, "resnet20": None}
MAX_ERROR_DELTA = {"lenet300_100": 0.1, "lenet5": 0.1, "resnet20": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {list(PAPER)} (default: the LeNets)")
    args = ap.parse_args()
    names = args.models or ["lenet300_100", "lenet5"]
    unknown = set(names) - set(PAPER)
    if unknown:
        ap.error(f"no Deep Compression recipe for {sorted(unknown)}; choose from {list(PAPER)}")
    out_dir = RESULTS / "deep_compression"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        recipe_path = RECIPES / f"{name}.yaml"
        run = runs_dir() / "deep_compression" / name
        recipe = load_recipe(recipe_path, [f"output={run}"])
        res = run_recipe(recipe, data_dir=data_dir(), resume=True,
                         command=f"python -m bench.deep_compression {name}")
        before, enc = res["evaluate"]["test_acc"], res["encode"]
        delta = (100 - enc["decoded_test_acc"]) - (100 - before)
        target = TARGET_RATIO[name]
        row = {
            "recipe": str(recipe_path.relative_to(RECIPES.parents[1])),
            "test_error_before_pct": round(100 - before, 2),
            "test_error_after_pct": round(100 - enc["decoded_test_acc"], 2),
            "error_delta_points": round(delta, 2), "dense_bytes": enc["dense_bytes"], "file_bytes": enc["file_bytes"],
            "ratio": round(enc["ratio"], 2), "ratio_before_huffman": round(enc["ratio_pq"], 2),
            "kept_pct": round(100 * enc["codec"]["totals"]["kept"] / enc["codec"]["totals"]["numel"], 2),
            "bit_exact_decode": enc["bit_exact"],
            "meets_target": (target is None or enc["ratio"] >= target) and delta <= MAX_ERROR_DELTA[name],
            "target_ratio": target, "max_error_delta_points": MAX_ERROR_DELTA[name], **PAPER[name],
            "layers": {t["name"]: {k: t[k] for k in ("numel", "kept", "weight_bits", "weight_bits_huffman",
                                                      "index_bits", "index_bits_huffman", "total_bytes")}
                       for t in enc["codec"]["tensors"] if t["kind"] == "sparse"},
        }
        shutil.copyfile(run / "weights.png", out_dir / f"{name}_weights.png")
        report = (run / "report.md").read_text().replace("](weights.png)", f"]({name}_weights.png)")
        (out_dir / f"{name}_report.md").write_text(report)  # the plot under its name in results/
        write_results("deep_compression", {name: row})
        print(f"{name}: {row['dense_bytes'] / 1000:.0f} KB -> {row['file_bytes'] / 1000:.1f} KB = {row['ratio']:.1f}x, "
              f"error {row['test_error_before_pct']:.2f}% -> {row['test_error_after_pct']:.2f}% "
              f"({'meets' if row['meets_target'] else 'MISSES'} the target)")


if __name__ == "__main__":
    main()
