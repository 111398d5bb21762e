"""Every shipped preset parses, builds and gets a complete optimizer; dense baselines match active params."""

import pytest
import torch

from moelab.config import load_config
from moelab.model import Transformer
from moelab.model.counting import count_params
from moelab.presets import PRESET_DIR, preset_names
from moelab.train.optim import param_groups

CONFIGS = [PRESET_DIR / f"{name}.yaml" for name in preset_names()]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_preset_parses_builds_and_groups(path):
    cfg = load_config(path)
    with torch.device("meta"):  # shapes only: the large preset would need GBs
        model = Transformer(cfg.model)
    groups = param_groups(model, cfg.train.weight_decay)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("moe, dense", [("tiny", "tiny-dense"), ("small", "small-dense")])
def test_dense_baselines_have_the_moe_active_parameters(moe, dense):
    root = CONFIGS[0].parent
    a = count_params(load_config(root / f"{moe}.yaml").model)
    b = count_params(load_config(root / f"{dense}.yaml").model)
    assert b.total == b.active
    # equal up to the router gates (d_model x E per MoE layer), which only the MoE has
    assert abs(a.active - a.routers - b.active) / b.active < 1e-3


def test_demo_is_a_few_million_parameters():
    cfg = load_config(CONFIGS[0].parent / "demo.yaml")
    assert 1e6 < count_params(cfg.model).total < 2e7 and cfg.model.moe_layer_ids()
