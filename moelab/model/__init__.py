"""The MoE transformer: layers, routers, dispatch, experts, losses."""

from moelab.model.moe import MoELayer, RoutingStats
from moelab.model.router import Routing
from moelab.model.router_registry import build_router
from moelab.model.transformer import ModelOutput, Transformer

__all__ = ["MoELayer", "ModelOutput", "Routing", "RoutingStats", "Transformer", "build_router"]
