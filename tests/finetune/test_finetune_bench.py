"""`moelab bench finetune`: the generated task keeps test and validation items out of every chat the
base or the fine-tunes see, exact match scores what it says, the multi-seed bench runs end to end in a
CI-sized form, and `--memory` counts optimizer state and gradients of each mode in a process of its own."""

import json
import random
from types import SimpleNamespace

import pytest
import torch
import yaml

from moelab.cli import main
from moelab.data.chat_template import ChatEncoder, ChatTemplate
from moelab.finetune.bench_task import (
    FAMILIES,
    exact_match,
    make_task,
    plain_exact_match,
    pretrain_ids,
    routing_changed,
    routing_ids,
    statement,
)
from moelab.tokenizer import EOD, ByteTokenizer

ENC = ChatEncoder(ByteTokenizer([EOD, *ChatTemplate().specials]), ChatTemplate())


def test_task_splits_are_disjoint_and_only_train_items_are_ever_chats():
    task = make_task(3, n_test=30, n_val=12, n_train=18)
    assert [len(x) for x in (task.test, task.val, task.train)] == [30, 12, 18]
    qs = [{it.question for it in split} for split in (task.test, task.val, task.train)]
    assert not (qs[0] & qs[1] or qs[0] & qs[2] or qs[1] & qs[2])
    for split, n in ((task.test, 10), (task.val, 4), (task.train, 6)):
        assert [sum(it.family == f for it in split) for f in FAMILIES] == [n] * 3
    assert all(it.answer == it.question.split(": ")[1][::-1] for it in task.test if it.family == "reverse")
    assert make_task(3, 30, 12, 18).test == task.test and make_task(4, 30, 12, 18).test != task.test

    ids = pretrain_ids(task, ENC, random.Random(0), repeats=2, n_chat=2)
    tok = ENC.tok
    text = tok.decode([t for t in ids if t < 256])
    for it in task.seen:  # every item stated twice in each prose form
        assert text.count(f"{it.question} {it.answer}.\n") == 2 and text.count(statement(it) + "\n") >= 2
    # chats: exactly the first 2 train items per family, each twice; never a test or validation item
    user = ENC.role_id["user"]
    starts = [i for i, t in enumerate(ids) if t == user]
    chat_qs = [tok.decode(ids[i + 1 : ids.index(ENC.end_id, i)]) for i in starts]
    want = {it.question for f in FAMILIES for it in [i for i in task.train if i.family == f][:2]}
    assert set(chat_qs) == want and len(chat_qs) == 2 * len(want)


class Oracle:
    """A stand-in model whose greedy continuation of each known prompt is a fixed token string."""

    def __init__(self, continuations: dict[tuple, list[int]], vocab: int):
        self.cont, self.vocab = continuations, vocab

    def eval(self):
        return self

    def __call__(self, ids):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        for r, row in enumerate(ids.tolist()):
            for n in range(len(row), 0, -1):
                if tuple(row[:n]) in self.cont:
                    logits[r, -1, self.cont[tuple(row[:n])][len(row) - n]] = 1.0
                    break
        return SimpleNamespace(logits=logits)


def test_exact_match_needs_the_answer_then_end_of_turn():
    task = make_task(0, n_test=6, n_val=3, n_train=3)
    tok = ENC.tok
    cont = {}
    for i, it in enumerate(task.test):
        ans = tok.encode(it.answer)
        # arith: right, run-on (no end of turn); reverse: right, wrong first token; fact: run-on, wrong
        kind = ("right", "run-on", "right", "wrong", "run-on", "wrong")[i]
        gen = {"right": [*ans, ENC.end_id], "run-on": [*ans, ans[0]], "wrong": [ans[0] + 1, *ans]}[kind]
        cont[tuple(ENC.prompt([{"role": "user", "content": it.question}]))] = gen + [0] * 4
        cont[tuple(tok.encode(f"{it.question} "))] = [*ans, ord("."), 0, 0, 0]
    model = Oracle(cont, tok.vocab_size)
    em = exact_match(model, ENC, task.test)
    assert em == {"arith": 0.5, "reverse": 0.5, "fact": 0.0, "all": pytest.approx(1 / 3)}
    assert plain_exact_match(model, tok, task.test)["all"] == 1.0


def test_routing_changed_counts_tokens_whose_expert_set_moved():
    from moelab.config import ModelConfig, MoEConfig
    from moelab.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=64)
    cfg.moe = MoEConfig(num_experts=4, top_k=2, expert_dim=32)
    model = Transformer(cfg)
    items = make_task(0, n_test=6, n_val=3, n_train=3).test
    base = routing_ids(model, ENC, items)
    n_tokens = [len(ENC.prompt([{"role": "user", "content": it.question}]) + ENC.tok.encode(it.answer)) for it in items]
    assert [r[0].shape for r in base] == [(n, 2) for n in n_tokens] and len(base[0]) == 2
    assert routing_changed(base, routing_ids(model, ENC, items)) == 0.0
    # swapping the order of a layer's top-2 is no change; a new expert in the set is one
    moved = [{i: ids.flip(-1).sort(-1).values for i, ids in r.items()} for r in base]
    assert routing_changed(base, moved) == 0.0
    moved = [{i: ids.clone() for i, ids in r.items()} for r in base]
    row = moved[0][0][0]
    row[0] = next(e for e in range(4) if e not in row.tolist())
    assert routing_changed(base, moved) == pytest.approx(1 / (2 * sum(n_tokens)))
    with torch.no_grad():  # the first layer's gate reversed: most decisions move
        model.moe_layers[0].router.weight.neg_()
    assert routing_changed(base, routing_ids(model, ENC, items)) > 0.3


@pytest.mark.slow
def test_bench_finetune_runs_several_seeds_and_compares_each_with_its_base(tmp_path, capsys):
    out = tmp_path / "ft.json"
    args = ["bench", "finetune", "--seeds", "0,1", "--base-steps", "4", "--steps", "5", "--eval-every", "2"]
    args += ["--held-out", "6", "--val", "3", "--train-items", "6", "--repeats", "1", "--out", str(out)]
    args += ["--full-lrs", "1e-3", "--lora-lrs", "1e-3", "--router-lrs", "1e-2,1e-1", "--experts", "16", "--top-k", "4"]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["model"]["moe"] == {"num_experts": 16, "top_k": 4, "expert_dim": 64}
    assert [s["seed"] for s in res["seeds"]] == [0, 1]
    for s in res["seeds"]:
        assert set(s["base"]["test_em"]) == {*FAMILIES, "all"}
        tried = s["router_only"]["tried"]
        assert [t["lr"] for t in tried] == [1e-2, 1e-1] and len(s["full"]["tried"]) == 1
        for v in ("full", "lora_experts", "router_only"):
            # validation every 2 steps and at the end; each rate keeps its best point by the validation rule
            for t in s[v]["tried"]:
                assert [c["step"] for c in t["curve"]] == [2, 4, 5]
                top = max(t["curve"], key=lambda c: (c["val_em"], -c["val_loss"]))
                assert (t["step"], t["val_loss"]) == (top["step"], top["val_loss"])
                assert 0.0 <= t["routing_changed"] <= 1.0
            # the variant: the best of every rate's point and the base (step 0), never by the test items
            base = {**s["base"], "lr": None, "step": 0}
            best = max([base, *s[v]["tried"]], key=lambda t: (t["val_em"]["all"], -t["val_loss"]))
            assert (s[v]["lr"], s[v]["step"], s[v]["test_em"]) == (best["lr"], best["step"], best["test_em"])
            if s[v]["step"] == 0:
                assert s[v]["test_em"] == s["base"]["test_em"] and s[v]["routing_changed"] == 0.0
        fracs = [s[v]["trainable_frac"] for v in ("full", "lora_experts", "router_only")]
        assert fracs[0] == 1.0 > fracs[1] > fracs[2]
    summ = res["summary"]
    for v in ("full", "lora_experts", "router_only"):
        assert 0 <= summ[v]["seeds_above_base"] <= 2 and set(summ[v]["gain_over_base"]) == {"mean", "std", "min", "max"}
    assert "seeds>base" in capsys.readouterr().out
    assert main([*args[:2], "--lora-lrs", "fast"]) == 2
    assert "--lora-lrs: expected comma-separated positive numbers, got 'fast'" in capsys.readouterr().err
    assert main([*args[:2], "--eval-every", "-1"]) == 2
    assert "--eval-every: expected >= 0" in capsys.readouterr().err
    assert main([*args[:2], "--experts", "24"]) == 2
    assert "--experts/--top-k: expected a divisor of 1024" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_finetune_memory_counts_state_and_grads_per_mode(tmp_path, capsys):
    cfg = tmp_path / "micro.yaml"
    model = {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64}
    model["moe"] = {"num_experts": 4, "top_k": 2, "expert_dim": 32}
    cfg.write_text(yaml.safe_dump({"model": {**model, "max_seq_len": 32}, "data": {"seq_len": 16}}))
    out = tmp_path / "mem.json"
    args = ["bench", "finetune", "--memory", "--preset", str(cfg), "--batch-size", "2", "--seq-len", "16"]
    assert main([*args, "--mem-steps", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["modes"]
    full, lora, router = res["full"], res["lora_r8_attn_experts"], res["router_only"]
    assert full["trainable_params"] == full["total_params"] > lora["trainable_params"] > router["trainable_params"]
    for r in res.values():
        # AdamW: exp_avg + exp_avg_sq in fp32 per trainable element, plus a one-element step per tensor
        assert 8 * r["trainable_params"] <= r["optimizer_state_bytes"] <= 8 * r["trainable_params"] + 4096
        assert r["grad_bytes"] == 4 * r["trainable_params"]
        assert r["peak_rss_bytes"] >= r["rss_after_model_bytes"] > 0 and r["tokens_per_cpu_s"] > 0
    assert lora["optimizer_vs_full"] < 1 and "LoRA trains" in capsys.readouterr().out
