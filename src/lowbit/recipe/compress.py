"""Recipe stages of the Deep Compression pipeline: ``prune``, ``cluster``, ``encode``, ``report``.

    stages:
      - {type: evaluate}                                  # the baseline's accuracy
      - {type: prune, threshold: sparsity, rules: {"*": 0.9}}
      - {type: train, epochs: 10, lr: 0.01}               # retrain; the masks keep pruned weights at 0
      - {type: cluster, types: {Linear: 5, Conv2d: 8}}
      - {type: train, epochs: 3, lr: 0.0005}              # fine-tune the shared centroids
      - {type: encode, path: model.lbz}                   # Huffman + sparse index; decode and verify
      - {type: report}                                    # the paper's table, Markdown + JSON + PNG

Glue only: the algorithms live in :mod:`lowbit.prune`, :mod:`lowbit.cluster` and :mod:`lowbit.codec`.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from lowbit.cluster import ClusterConfig, cluster_, is_shared, shared_weights
from lowbit.codec import CompressedTensor, load_model, save_model
from lowbit.prune import MaskCallback, PruneConfig, masks_of, prune_
from lowbit.prune.masks import MASK_SUFFIX
from lowbit.recipe.stages import Context, register_stage
from lowbit.train import evaluate
from lowbit.train.engine import model_meta

__all__ = ["EncodeConfig", "ReportConfig", "clean_state", "compressed_state"]


def _snapshot(ctx: Context, label: str) -> None:
    """Keep a copy of every Linear/Conv weight under ``label`` (the first time only)."""
    if label in ctx.snapshots:
        return
    ctx.snapshots[label] = {
        name: m.weight.detach().cpu().numpy().ravel().copy()
        for name, m in ctx.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }


@register_stage("prune", PruneConfig)
def prune_stage(ctx: Context, cfg: PruneConfig) -> dict[str, Any]:
    """Prune one shot (lowbit.prune.prune_); later train stages keep the pruned weights at exactly 0."""
    _snapshot(ctx, "before pruning")
    sparsity = prune_(ctx.model, cfg)
    if not any(isinstance(c, MaskCallback) for c in ctx.callbacks):
        ctx.callbacks.append(MaskCallback())
    sizes = {n: dict(ctx.model.named_parameters())[n].numel() for n in sparsity}
    total = sum(sparsity[n] * sizes[n] for n in sparsity) / max(1, sum(sizes.values()))
    print(f"{ctx.stage_key}: " + ", ".join(f"{n} {100 * (1 - s):.1f}% kept" for n, s in sparsity.items()))
    return {"sparsity": sparsity, "total_sparsity": total}


@register_stage("cluster", ClusterConfig)
def cluster_stage(ctx: Context, cfg: ClusterConfig) -> dict[str, Any]:
    """Share weights by per-layer k-means (lowbit.cluster.cluster_); train stages then tune the centroids."""
    _snapshot(ctx, "after pruning")
    bits = cluster_(ctx.model, cfg)
    print(f"{ctx.stage_key}: " + ", ".join(f"{n} {b} bits" for n, b in bits.items()))
    return {"bits": bits}


class EncodeConfig(BaseModel):
    """Where to write the ``.lbz`` file and the relative-index width per layer."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    path: str = Field("model.lbz", description="relative to the run directory")
    index_bits: dict[str, int] = Field(
        default_factory=lambda: {"Conv2d": 8, "Linear": 5},
        description="module-name glob or layer type -> bits per relative index (paper: 8 conv, 5 fc)")

    @field_validator("index_bits")
    @classmethod
    def _range(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: b for k, b in v.items() if not 1 <= b <= 16}
        if bad:
            raise ValueError(f"index bits must be in 1..16, got {bad}")
        return v

    def bits_for(self, name: str, module: nn.Module) -> int:
        for key, bits in self.index_bits.items():
            if key == name or fnmatch.fnmatchcase(name, key):
                return bits
        types = {cls.__name__ for cls in type(module).__mro__}  # a parametrized Linear is still a Linear
        for key, bits in self.index_bits.items():
            if key in types:
                return bits
        raise ValueError(f"encode: no index_bits rule for layer {name!r} ({type(module).__name__}); "
                         f"rules: {self.index_bits}")


def clean_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` as a fresh model of its architecture has it: shared weights baked in,
    masks dropped. ``model`` is not changed.

    (Not via ``strip_sharing_`` on a deep copy: torch's parametrized modules share one generated class
    between copies, and removing the parametrization from the copy deletes the property on the original.)
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if ".parametrizations." not in f".{k}"}
    for name, module in model.named_modules():
        if is_shared(module):
            state[f"{name}.weight"] = module.weight.detach().cpu()
    # a pruning mask is the buffer "<param>_mask" beside its parameter
    return {k: v for k, v in state.items() if not (k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in state)}


def compressed_state(model: nn.Module, cfg: EncodeConfig) -> dict[str, CompressedTensor | torch.Tensor]:
    """The state dict to encode: shared (clustered) weights as :class:`CompressedTensor`, the rest raw.

    A pruned layer that was not clustered is stored sparse with its distinct values as the codebook.
    """
    state: dict[str, CompressedTensor | torch.Tensor] = dict(clean_state(model))
    modules = dict(model.named_modules())
    for name, layer in shared_weights(model).items():
        k = len(layer.centroids)
        state[f"{name}.weight"] = CompressedTensor(
            layer.shape, layer.positions.numpy(), layer.codes.numpy(), layer.centroids.numpy(),
            index_bits=cfg.bits_for(name, modules[name]), weight_bits=max(1, (k - 1).bit_length()))
    for key in masks_of(model):
        name = key.rsplit(".", 1)[0]
        if is_shared(modules[name]):
            continue
        weight = state[key]
        assert isinstance(weight, torch.Tensor)
        values = torch.unique(weight[weight != 0])
        if len(values) > 1 << 16:
            raise ValueError(f"encode: {key} has {len(values)} distinct values; cluster it first (at most 2^16)")
        state[key] = CompressedTensor.from_dense(weight, values.numpy(), index_bits=cfg.bits_for(name, modules[name]))
    return state


@register_stage("encode", EncodeConfig)
def encode_stage(ctx: Context, cfg: EncodeConfig) -> dict[str, Any]:
    """Write the .lbz file (sparse index + Huffman), decode it into a fresh model, verify it bit-exactly."""
    _snapshot(ctx, "after sharing")
    path = ctx.run_dir / cfg.path
    report = save_model(path, compressed_state(ctx.model, cfg), model_meta(ctx.model),
                        meta={"dataset": ctx.data.name, "input_shape": list(ctx.data.input_shape)})
    decoded, _ = load_model(path)
    expected = clean_state(ctx.model)
    got = decoded.state_dict()
    mismatched = [k for k in expected if not torch.equal(expected[k], got[k])]
    if mismatched:
        raise RuntimeError(f"encode: the decoded model differs from the compressed one in {mismatched}")
    acc = evaluate(decoded, ctx.data.loader("test", 512))
    print(report.table())
    print(f"{ctx.stage_key}: wrote {path} ({report.file_bytes:,} bytes, {report.ratio:.1f}x); decoded model "
          f"is bit-exact, test acc {acc['acc']:.2f}%")
    (ctx.run_dir / "codec_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return {"path": str(path), "file_bytes": report.file_bytes, "dense_bytes": report.dense_bytes,
            "ratio": report.ratio, "ratio_pq": report.ratio_pq, "bit_exact": True,
            "decoded_test_acc": acc["acc"], "decoded_test_loss": acc["loss"], "codec": report.to_dict()}


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    file: str = Field("report.md", description="Markdown report, relative to the run directory")
    plot: str = Field("weights.png", description="weight distributions before/after pruning and sharing")


@register_stage("report", ReportConfig, requires=("encode",))
def report_stage(ctx: Context, cfg: ReportConfig) -> dict[str, Any]:
    """The paper-style report: per-layer table, totals, accuracy before/after; Markdown, JSON and PNG."""
    from lowbit.report.compression import compression_report
    from lowbit.report.plots import plot_weight_distributions

    encode = next(r for k, r in ctx.results.items() if k.startswith("encode"))  # the schema checked it exists
    before = next((r for k, r in ctx.results.items() if k.startswith("evaluate")), None)
    plot = plot_weight_distributions(ctx.snapshots, ctx.run_dir / cfg.plot) if ctx.snapshots else None
    text, summary = compression_report(
        title=ctx.recipe_name, model=model_meta(ctx.model)["name"], dataset=ctx.data.name,
        codec=encode["codec"], acc_before=before["test_acc"] if before else None,
        acc_after=encode["decoded_test_acc"], plot=plot.name if plot else None)
    (ctx.run_dir / cfg.file).write_text(text)
    print(text)
    return {"file": cfg.file, "plot": cfg.plot if plot else None, **summary}
