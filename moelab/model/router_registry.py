"""Router names -> router classes, and `build_router`, the one place a layer's router is made.

The names are `config.RouterName`; `tests/model/test_model_moe.py` checks the two lists are equal, so a
router added to one and not the other fails at once.
"""

from __future__ import annotations

from torch import nn

from moelab.config import MoEConfig
from moelab.model.router import (
    ExpertChoiceRouter,
    GumbelRouter,
    NoisyTopKRouter,
    Router,
    SigmoidRouter,
    SoftmaxTopKRouter,
    TopKSoftmaxRouter,
)
from moelab.model.routers_dynamic import HierarchicalRouter, TopPRouter

ROUTER_CLASSES: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "topk_softmax": TopKSoftmaxRouter,
    "sigmoid": SigmoidRouter,
    "noisy_topk": NoisyTopKRouter,
    "gumbel": GumbelRouter,
    "expert_choice": ExpertChoiceRouter,
    "top_p": TopPRouter,
    "hierarchical": HierarchicalRouter,
}


def build_router(d_model: int, cfg: MoEConfig) -> Router:
    """The router `cfg` names; softmax top-k with null experts is the top-p router's fixed-k form; a task
    embedding (`num_tasks`, N(0, init_std) like every router weight) can sit on any router."""
    if cfg.router == "softmax_topk" and cfg.num_null_experts:
        router: Router = TopPRouter(d_model, cfg, use_top_p=False)
    else:
        router = ROUTER_CLASSES[cfg.router](d_model, cfg)
    if cfg.num_tasks:
        router.task_embed = nn.Embedding(cfg.num_tasks, d_model)
    return router
