"""Kedro hooks: every node is seeded from the ``seed`` parameter and its own name."""

from __future__ import annotations

from kedro.framework.hooks import hook_impl

from ph_reg.utils import derive_seed, seed_everything


class NodeSeedHooks:
    """Seed Python, NumPy and torch before each node from ``(seed, node.name)``.

    A node therefore sees the same random state whether its pipeline runs alone or inside ``__default__``.
    """

    def __init__(self) -> None:
        self.seed = 0

    @hook_impl
    def after_context_created(self, context) -> None:
        self.seed = int(context.params.get("seed", 0))

    @hook_impl
    def before_node_run(self, node) -> None:
        seed_everything(derive_seed(self.seed, node.name))
