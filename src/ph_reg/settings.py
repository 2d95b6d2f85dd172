"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from ph_reg.pipelines.hooks import NodeSeedHooks

HOOKS = (NodeSeedHooks(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/paper and conf/paper_dinov2 override single keys of the base parameters, not whole top-level blocks
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
}
