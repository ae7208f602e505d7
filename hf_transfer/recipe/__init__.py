"""Recipes: the schema (one dataclass per section), building and checking, files and overrides."""

from hf_transfer.recipe.checks import recipe_from_dict, unknown_key_error, validate
from hf_transfer.recipe.files import (
    PACKAGE_RECIPES_DIR,
    available_recipes,
    find_recipe,
    load_recipe,
    merge_values,
    parse_overrides,
)
from hf_transfer.recipe.schema import (
    LENGTH_WINDOW,
    AdaptationConfig,
    AugmentConfig,
    DataConfig,
    HeadConfig,
    LoraConfig,
    ModelConfig,
    MultimodalConfig,
    OutputConfig,
    RankConfig,
    Recipe,
    StrategyConfig,
    TrainingConfig,
    check_repo_id,
)

__all__ = [
    "LENGTH_WINDOW", "AdaptationConfig", "AugmentConfig", "DataConfig", "HeadConfig", "LoraConfig", "ModelConfig",
    "MultimodalConfig", "OutputConfig", "PACKAGE_RECIPES_DIR", "RankConfig", "Recipe", "StrategyConfig",
    "TrainingConfig", "available_recipes", "check_repo_id", "find_recipe", "load_recipe", "merge_values", "parse_overrides",
    "recipe_from_dict", "unknown_key_error", "validate",
]
