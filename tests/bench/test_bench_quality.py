"""`moelab bench quality`: the study's pieces (dense twin, summary, routing health) and the whole study end to
end on micro shapes (the real runs are in BENCHMARKS.md and docs/quality.md)."""

import json

import pytest
import yaml

from moelab.bench.quality_setup import (
    active_ffn_width,
    load_recipe,
    model_configs,
    prepare_corpus,
    routing_health,
    summarise,
)
from moelab.cli import main
from moelab.config import Config, from_dict
from moelab.errors import UserError
from moelab.model.counting import count_params

MICRO = [
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.n_layers=2",
    "model.moe.expert_dim=16",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "train.batch_size=2",
    "train.warmup_steps=2",
    "eval.batches=2",
]


def test_dense_twin_has_the_moe_active_parameters(tmp_path):
    recipe = load_recipe("recipe-cpu")
    moe = recipe["model"]["moe"]
    assert active_ffn_width(moe) == moe["top_k"] * moe["expert_dim"] + moe.get("num_shared_experts", 0) * (
        moe.get("shared_expert_dim") or moe["expert_dim"]
    )
    cfgs = model_configs(recipe, tmp_path, vocab_size=300)
    m, d = (from_dict(Config, cfgs[w]).model for w in ("moe", "dense"))
    assert m.vocab_size == d.vocab_size == 300 and not d.moe_layer_ids() and m.moe_layer_ids()
    router = len(m.moe_layer_ids()) * m.d_model * m.moe.num_experts
    gate = len(m.moe_layer_ids()) * m.d_model * m.moe.shared_expert_gate
    assert count_params(m).active - router - gate == count_params(d).active  # same SwiGLU FLOPs per token
    assert count_params(m).total > 2 * count_params(d).total  # ... with the MoE's extra capacity
    assert cfgs["moe"]["train"] == cfgs["dense"]["train"]  # same optimizer, schedule, batch


def test_recipe_and_corpus_errors(tmp_path):
    with pytest.raises(UserError, match="expected an MoE config"):
        load_recipe("tiny-dense")
    with pytest.raises(UserError, match="no such file and no such preset"):
        load_recipe("no-such-recipe")
    with pytest.raises(UserError, match="expected one of shakespeare, stdlib, domains or file:PATH"):
        prepare_corpus("wikipedia", tmp_path)
    with pytest.raises(UserError, match="no such file"):
        prepare_corpus(f"file:{tmp_path / 'missing.txt'}", tmp_path)


def test_routing_health_reads_the_last_logged_routing():
    recs = [
        {"step": 10, "moe/0/load_cv": 0.5, "moe/0/dead": 2, "moe/1/load_cv": 0.4, "moe/1/dead": 0},
        {"step": 20, "moe/0/load_cv": 0.1, "moe/0/dead": 0, "moe/1/load_cv": 0.3, "moe/1/dead": 1},
        {"step": 20, "val/bpb": 2.0},
    ]
    assert routing_health(recs) == {"dead_per_layer": [0, 1], "load_cv_per_layer": [0.1, 0.3], "at_step": 20}
    assert routing_health([{"step": 1, "val/bpb": 2.0}]) == {}


def test_summary_pairs_seeds():
    runs = [
        {"corpus": "a", "model": "moe", "seed": 0, "final_bpb": 2.0},
        {"corpus": "a", "model": "dense", "seed": 0, "final_bpb": 2.1},
        {"corpus": "a", "model": "moe", "seed": 1, "final_bpb": 2.3},
        {"corpus": "a", "model": "dense", "seed": 1, "final_bpb": 2.2},
        {"corpus": "a", "model": "dense", "seed": 2, "final_bpb": 9.9},  # no MoE partner: not in the difference
    ]
    s = summarise(runs)["a"]
    assert s["models"]["moe"] == pytest.approx({"mean": 2.15, "min": 2.0, "max": 2.3, "n": 2})
    assert s["models"]["dense"]["n"] == 3
    assert s["moe_minus_dense"] == pytest.approx({"mean": 0.0, "min": -0.1, "max": 0.1, "n": 2})
    assert "moe_minus_hf" not in s


@pytest.mark.slow
def test_study_equal_tokens_with_sweep_seeds_and_reference(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"Speaker {i}:\nline {i} of the play, and more words.\n\n" for i in range(400)))
    out, plot = tmp_path / "quality.json", tmp_path / "quality.png"
    args = ["bench", "quality", "--data", str(text), "--tokens", "1600", "--seeds", "0", "1", "--evals", "2"]
    args += ["--lrs", "1e-3", "1e-2", "--sweep-tokens", "1280", "--concurrent", "--work-dir", str(tmp_path / "w")]
    # a recipe with a shared expert: transformers' reference is then Qwen2-MoE (Mixtral has none)
    recipe = load_recipe("recipe-cpu")
    recipe["model"]["moe"].update(
        num_experts=4,
        top_k=2,
        router="softmax_topk",
        router_bias=False,
        bias_update_rate=0.0,
        load_balance_coef=0.01,
        num_shared_experts=1,
        shared_expert_dim=32,
        shared_expert_gate=True,
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    args += ["--json", str(out), "--plot", str(plot), "--recipe", str(tmp_path / "recipe.yaml")]
    assert main(args + [a for s in MICRO for a in ("--set", s)]) == 0
    res = json.loads(out.read_text())
    assert {(s["model"], s["lr"]) for s in res["sweep"]} == {
        (m, lr) for m in ("moe", "dense", "hf") for lr in (1e-3, 1e-2)
    }
    for m in ("moe", "dense", "hf"):  # each model keeps the LR its own sweep runs liked best
        mine = [s for s in res["sweep"] if s["model"] == m]
        assert res["lr"][m] == min(mine, key=lambda s: s["final_bpb"])["lr"]
    assert {(r["model"], r["seed"]) for r in res["runs"]} == {(m, s) for m in ("moe", "dense", "hf") for s in (0, 1)}
    for r in res["runs"]:
        assert r["lr"] == res["lr"][r["model"]] and r["corpus"].startswith("file:")
        assert r["steps_done"] == r["steps_planned"] == 25 and r["tokens"] == 25 * 64  # equal tokens: 1600 / (2 x 32)
        assert r["curve"] and all(c["val/bpb"] > 0 for c in r["curve"]) and r["final_bpb"] == r["curve"][-1]["val/bpb"]
    assert all("Qwen2MoeForCausalLM" in r["impl"] for r in res["runs"] if r["model"] == "hf")  # a shared expert
    moe = [r for r in res["runs"] if r["model"] == "moe"]
    assert all(len(r["health"]["load_cv_per_layer"]) == 2 for r in moe)  # routing at the end, per MoE layer
    s = next(iter(res["summary"].values()))
    by = {(r["model"], r["seed"]): r["final_bpb"] for r in res["runs"]}
    assert s["moe_minus_dense"]["mean"] == pytest.approx(
        ((by["moe", 0] - by["dense", 0]) + (by["moe", 1] - by["dense", 1])) / 2
    )
    assert plot.stat().st_size > 1000
    assert "MoE - dense" in capsys.readouterr().out

    # a later study takes the same sweep's LRs without sweeping again
    again = tmp_path / "again.json"
    args2 = [a if a != str(out) else str(again) for a in args if a not in ("--lrs", "1e-3", "1e-2")]
    args2 = [*args2, "--sweep-from", str(out), "--models", "moe", "dense"]
    args2[args2.index("--seeds") + 1 : args2.index("--seeds") + 3] = ["0"]
    assert main(args2 + [a for s in MICRO for a in ("--set", s)]) == 0
    res2 = json.loads(again.read_text())
    assert res2["sweep_from"] == str(out) and res2["lr"] == {m: res["lr"][m] for m in ("moe", "dense")}
    assert [s for s in res2["sweep"]] == [s for s in res["sweep"] if s["model"] != "hf"]
    assert "[sweep" not in capsys.readouterr().out  # nothing was swept
    assert {(r["model"], r["seed"], r["lr"]) for r in res2["runs"]} == {(m, 0, res["lr"][m]) for m in ("moe", "dense")}
    # an earlier sweep of another study is refused in one line, naming the field
    assert main([*args2, "--dtype", "bfloat16"] + [a for s in MICRO for a in ("--set", s)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moelab bench: error: --sweep-from {out}: field 'dtype' is 'float32', this study has 'bfloat16'"
    assert main([*args2, "--lrs", "1e-3"]) == 2
    assert "give one" in capsys.readouterr().err


@pytest.mark.slow
def test_study_equal_wall_clock_budgets_seconds_of_training(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"Speaker {i}:\nline {i} of the play.\n\n" for i in range(300)))
    out = tmp_path / "quality.json"
    args = ["bench", "quality", "--data", str(text), "--minutes", "0.05", "--seeds", "0", "--models", "moe", "dense"]
    args += ["--evals", "2", "--threads", "1", "--work-dir", str(tmp_path / "w"), "--json", str(out)]
    args += ["--plot", str(tmp_path / "q.png")]
    assert main(args + [a for s in MICRO for a in ("--set", s)]) == 0
    res = json.loads(out.read_text())
    assert res["budget"] == {"kind": "minutes", "value": 0.05} and res["sweep"] == []
    for r in res["runs"]:
        assert r["steps_planned"] >= 20 and 1 <= r["steps_done"] <= 3 * r["steps_planned"]
        if r["steps_done"] < 3 * r["steps_planned"]:  # stopped by the budget, not by the step cap
            assert r["curve"][-1]["elapsed_s"] >= 0.05 * 60
        assert r["curve"][-1]["elapsed_s"] <= 0.05 * 60 + 5  # the budget (+ the last step)


@pytest.mark.parametrize("flag", ["--minutes", "--tokens", "--sweep-tokens"])
def test_study_refuses_a_non_positive_budget_up_front(flag, tmp_path, capsys):
    args = ["bench", "quality", flag, "0", "--work-dir", str(tmp_path / "w"), "--json", str(tmp_path / "q.json")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"moelab bench: error: {flag}: expected > 0, got 0"
    assert not (tmp_path / "w").exists()  # refused before any corpus is prepared


def test_sweep_from_needs_a_recorded_sweep(tmp_path, capsys):
    base = ["bench", "quality", "--work-dir", str(tmp_path / "w"), "--json", str(tmp_path / "q.json")]
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i} of the play.\n\n" for i in range(200)))
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"recipe": "recipe-cpu", "dtype": "float32", "sweep": []}))
    assert main([*base, "--data", str(text), "--sweep-from", str(earlier)]) == 2
    assert capsys.readouterr().err.strip().endswith("no LR sweep recorded (field 'sweep' is empty or missing)")
    earlier.write_text(json.dumps({"recipe": "recipe-cpu", "dtype": "float32", "sweep": [{"lr": 1e-3}]}))
    assert main([*base, "--data", str(text), "--sweep-from", str(earlier)]) == 2
    assert "field 'sweep': expected a list of {model, lr, final_bpb} records" in capsys.readouterr().err
    assert main([*base, "--data", str(text), "--sweep-from", str(tmp_path / "missing.json")]) == 2
    assert "cannot read a study JSON" in capsys.readouterr().err
