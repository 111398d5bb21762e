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
from moelab.finetune.bench_task import FAMILIES, exact_match, make_task, plain_exact_match, pretrain_ids, statement
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


@pytest.mark.slow
def test_bench_finetune_runs_several_seeds_and_compares_each_with_its_base(tmp_path, capsys):
    out = tmp_path / "ft.json"
    args = ["bench", "finetune", "--seeds", "0,1", "--base-steps", "4", "--steps", "2", "--held-out", "6"]
    args += ["--val", "3", "--train-items", "6", "--repeats", "1", "--out", str(out)]
    args += ["--full-lrs", "1e-3", "--lora-lrs", "1e-3", "--router-lrs", "1e-2,1e-1"]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert [s["seed"] for s in res["seeds"]] == [0, 1]
    for s in res["seeds"]:
        assert set(s["base"]["test_em"]) == {*FAMILIES, "all"}
        tried = s["router_only"]["tried"]
        assert [t["lr"] for t in tried] == [1e-2, 1e-1] and len(s["full"]["tried"]) == 1
        best = max(tried, key=lambda t: (t["val_em"]["all"], -t["val_loss"]))  # never the test items
        assert s["router_only"]["lr"] == best["lr"] and s["router_only"]["test_em"] == best["test_em"]
        fracs = [s[v]["trainable_frac"] for v in ("full", "lora_experts", "router_only")]
        assert fracs[0] == 1.0 > fracs[1] > fracs[2]
    summ = res["summary"]
    for v in ("full", "lora_experts", "router_only"):
        assert 0 <= summ[v]["seeds_above_base"] <= 2 and set(summ[v]["gain_over_base"]) == {"mean", "std", "min", "max"}
    assert "seeds>base" in capsys.readouterr().out
    assert main([*args[:2], "--lora-lrs", "fast"]) == 2
    assert "--lora-lrs: expected comma-separated positive numbers, got 'fast'" in capsys.readouterr().err


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
