"""Kedro project settings, and the configuration loader that lets one environment extend another."""

from __future__ import annotations

from typing import Any

from kedro.config import MissingConfigException, OmegaConfigLoader
from omegaconf import OmegaConf

from ph_reg.hooks import ProjectHooks

#: A file in a configuration environment that names the environment it extends (``parent: paper``). Its name
#: matches none of the loader's config patterns, so Kedro never reads it as parameters, catalog or globals.
PARENT_FILE = "parent.yml"
PARENT_KEY = "parent"


class LayeredConfigLoader(OmegaConfigLoader):
    """``OmegaConfigLoader`` whose run environment may extend another one: ``conf/<env>/parent.yml`` holding
    ``parent: <other env>`` makes ``--env <env>`` load base, then the parent (and its own parent, and so on), then
    ``<env>``, each layer merged onto the previous one with the key's merge strategy (``soft`` for parameters and
    globals here). An environment without ``parent.yml`` is Kedro's usual base + env.

    So ``conf/paper_cached`` holds only its differences from ``conf/paper``. Everything that builds the project's
    configuration (``kedro run``, ``kedro viz``, the parameter-validation hook, notebooks) goes through this class.
    """

    def env_chain(self) -> list[str]:
        """The environments layered on top of base, outermost parent first, the run environment last."""
        run_env = self.env or self.default_run_env
        if not run_env or run_env == self.base_env:
            return []
        chain = [run_env]
        while True:
            parent = self._declared_parent(chain[0])
            if parent is None or parent == self.base_env:
                return chain
            if parent in chain:
                cycle = " -> ".join([*reversed(chain), parent])
                raise ValueError(f"configuration environments extend each other in a cycle: {cycle} "
                                 f"(check their {PARENT_FILE})")
            if not self._fs.isdir(self._get_conf_env_path(parent)):
                raise MissingConfigException(
                    f"{self._get_conf_env_path(chain[0])}/{PARENT_FILE} names the parent environment {parent!r}, "
                    f"which does not exist in {self.conf_source}")
            chain.insert(0, parent)

    def _declared_parent(self, env: str) -> str | None:
        path = f"{self._get_conf_env_path(env)}/{PARENT_FILE}"
        if not self._fs.isfile(path):
            return None
        with self._fs.open(path) as handle:
            declared = OmegaConf.to_container(OmegaConf.create(handle.read().decode("utf8")) or {})
        parent = declared.get(PARENT_KEY) if isinstance(declared, dict) else None
        if not isinstance(declared, dict) or set(declared) != {PARENT_KEY} or not isinstance(parent, str) or not parent:
            raise ValueError(f"{path} must hold exactly one key, {PARENT_KEY!r}: the name of the environment that "
                             f"{env!r} extends (e.g. '{PARENT_KEY}: paper'); got {declared!r}")
        return parent

    def __getitem__(self, key: str) -> dict[str, Any]:
        chain = self.env_chain()
        if len(chain) < 2 or key in self or key not in self.config_patterns:
            return super().__getitem__(key)  # base + at most one env: Kedro's own loading
        self._register_runtime_params_resolver()
        if key == "globals":  # as Kedro does: runtime_params may not feed globals
            OmegaConf.clear_resolver("runtime_params")
        patterns, processed = list(self.config_patterns[key]), set()
        environment_variables = key == "credentials"
        base_path = self._get_conf_env_path(self.base_env)
        merged = self.load_and_merge_dir_config(base_path, patterns, key, processed, environment_variables)
        for env in chain:
            env_path = self._get_conf_env_path(env)
            layer = self.load_and_merge_dir_config(env_path, patterns, key, processed, environment_variables)
            merged = self._merge_configs(merged, layer, key, env_path)
        if not processed and key != "globals":
            raise MissingConfigException(f"No files of YAML or JSON format found in {base_path} or in the "
                                         f"environments {chain} matching the glob pattern(s): {patterns}")
        return merged


HOOKS = (ProjectHooks(),)

CONFIG_LOADER_CLASS = LayeredConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/paper and conf/paper_dinov2 override single keys of the base parameters, not whole top-level blocks
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
}
