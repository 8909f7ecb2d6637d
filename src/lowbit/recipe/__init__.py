"""YAML recipes: a model, a data set and an ordered list of stages, validated before anything runs.

    recipe = load_recipe("recipes/demo.yaml", overrides=["stages.0.epochs=1"])
    results = run_recipe(recipe, data_dir=None)

Stage types come from the ``stages`` registry (``@register_stage(name, ConfigModel)``); see
:mod:`lowbit.recipe.stages` for the built-in ``train``, ``evaluate``, ``summary`` and ``save``.
"""

from lowbit.recipe import compress, distill_stages, int8_stages, quant_stages  # noqa: F401  (register their stages)
from lowbit.recipe.loader import apply_overrides, load_recipe, read_yaml
from lowbit.recipe.runner import build_model, run_recipe
from lowbit.recipe.schema import DataSpec, ModelSpec, Recipe, RecipeError, StageCall, validate_recipe
from lowbit.recipe.stages import Context, StageDef, register_stage, stages

__all__ = [
    "Context", "DataSpec", "ModelSpec", "Recipe", "RecipeError", "StageCall", "StageDef", "apply_overrides",
    "build_model", "load_recipe", "read_yaml", "register_stage", "run_recipe", "stages", "validate_recipe",
]
