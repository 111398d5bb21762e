"""Analysis of dynamic routing: experts per token by domain, group specialisation, experts per task;
multi-task training gets task ids from prepare's per-input ranges."""

import torch

from moelab.analysis import dynamic
from moelab.analysis.trace import LayerTrace, RoutingTrace, summarise
from moelab.data import prepare
from moelab.train.loop import train
from moelab.train.task_ids import task_names, token_tasks


def test_layer_stats_by_domain_groups_and_tasks():
    ids = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    keep = torch.tensor([[True, False], [True, True], [True, False], [True, True]])
    dom = torch.tensor([0, 1, 0, 1])
    trace = RoutingTrace(
        torch.arange(4), 4, 2, {0: LayerTrace(ids, keep, 0.0)}, dom, ["easy", "hard"], 8, num_groups=2, task_ids=dom
    )
    s = summarise(trace)
    lay = s["layers"][0]
    assert lay["experts_per_token"] == 1.5 and lay["k_dist"] == [0.0, 0.5, 0.5]
    assert lay["experts_per_token_by_domain"] == [1.0, 2.0]
    # domain 0 -> group 0, domain 1 -> group 1: I = H(domain over kept assignments) = H(1/3, 2/3)
    assert abs(lay["group_mutual_information"] - 0.9183) < 1e-3
    assert lay["task_distribution"][0][:2] == [1.0, 0.0]
    assert any("experts/token" in line for line in dynamic.format_lines(s))


def test_multitask_training_and_analysis(tmp_path):
    from moelab.analysis.run import analyze_run
    from tests.train.train_helpers import tiny_cfg

    for name, text in (("a", "1+2=3\n" * 400), ("b", "hello world. " * 300)):
        (tmp_path / name).mkdir()
        for i in range(10):
            (tmp_path / name / f"{i}.txt").write_text(text)
    meta = prepare([str(tmp_path / "a"), str(tmp_path / "b")], "byte", tmp_path / "data", val_fraction=0.2, workers=0)
    assert len(task_names(meta)) == 2
    t = token_tasks(meta, "train", meta["splits"]["train"]["tokens"])
    assert set(t.tolist()) == {0, 1}
    cfg = tiny_cfg(tmp_path / "data", model={"moe": {"num_tasks": 2, "task_balance_coef": 0.01}}, train={"steps": 3})
    train(cfg, tmp_path / "run")
    analysis, _ = analyze_run(tmp_path / "run", tokens=2048, domains="input")
    assert len(analysis["layers"][0]["task_distribution"]) == 2
