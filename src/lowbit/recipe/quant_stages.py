"""Recipe stage ``quantize``: swap Conv2d/Linear layers for quantized ones (quantization-aware training).

    stages:
      - type: quantize                                   # the config IS lowbit.quant.QuantConfig
        rules: {"*": {weight: ste_sign, input: ste_sign}}
        keep_first_last: true                            # first and last layer stay float (the default)
      - {type: train, epochs: 10, lr: 0.01}              # QAT: the train stage trains the latent weights
      - {type: summary}                                  # bit widths and BOPs per layer

Glue only: the rules and the swap live in :mod:`lowbit.quant.api`, the layers in :mod:`lowbit.nn`.
"""

from __future__ import annotations

from typing import Any

from lowbit.quant.api import QuantConfig, quantize_
from lowbit.recipe.stages import Context, register_stage

__all__: list[str] = []


@register_stage("quantize", QuantConfig)
def quantize_stage(ctx: Context, cfg: QuantConfig) -> dict[str, Any]:
    """Quantize layers by per-layer rules (lowbit.quantize_); later train stages do quantization-aware training."""
    report = quantize_(ctx.model, cfg)
    print(f"{ctx.stage_key}: {report}")
    return report.to_dict()
