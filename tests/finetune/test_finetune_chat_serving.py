"""Chat data preparation (template, loss mask, bad records) and serving: /v1/chat/completions through
the official openai client, with two LoRA adapters over one base in one continuous batch."""

import dataclasses
import json

import openai
import pytest
import torch

from moelab.checkpoint import atomic_dir, load_model, save_checkpoint, write_model
from moelab.config import Config, DataConfig, ModelConfig, MoEConfig
from moelab.data.chat import load_split, prepare_chat
from moelab.data.chat_template import ChatEncoder, ChatTemplate
from moelab.errors import UserError
from moelab.finetune.adapters import fingerprint
from moelab.finetune.lora import apply_finetune, trainable_names
from moelab.finetune.serving import stack_adapters
from moelab.infer.scheduler import Engine
from moelab.model import Transformer
from moelab.tokenizer import EOD, ByteTokenizer
from tests.infer.conftest import serving


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok = ByteTokenizer([EOD, *ChatTemplate().specials])
    tok.save(d)
    ChatTemplate().save(d)
    return d


def test_prepare_chat_masks_only_assistant_tokens_and_counts_bad_records(chat_tok, tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    good = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ]
    }
    lines = [
        json.dumps(good),
        json.dumps({"prompt": "2+2=", "completion": "4"}),
        "not json",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"prompt": "x" * 100, "completion": "y"}),
    ]
    src.write_text("\n".join(lines) + "\n")
    meta = prepare_chat([str(src)], str(chat_tok), tmp_path / "data", seq_len=32, val_fraction=0.0)
    assert meta["bad_records"] == 3 and meta["splits"]["train"]["rows"] == 2
    err = capsys.readouterr().err
    assert err.count("skipped") == 3 and f"{src}:3" in err and "robot" in err
    ids, mask, _ = load_split(tmp_path / "data", "train")
    enc = ChatEncoder(ByteTokenizer([EOD, *ChatTemplate().specials]), ChatTemplate())
    row = list(ids[0])
    trained = [t for t, m in zip(row, mask[0], strict=True) if m]
    assert trained == [*b"yo", enc.end_id]  # assistant content + end of turn, nothing else
    assert row[0] == enc.role_id["system"]
    with pytest.raises(UserError, match=":3: "):
        prepare_chat([str(src)], str(chat_tok), tmp_path / "d2", seq_len=32, strict=True)
    with pytest.raises(UserError, match="no special tokens"):
        prepare_chat([str(src)], "byte", tmp_path / "d3", seq_len=32)


def _cfg():
    moe = MoEConfig(num_experts=4, top_k=2, expert_dim=32)
    return Config(
        model=ModelConfig(
            vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=96, moe=moe
        ),
        data=DataConfig(seq_len=64),
    )


@pytest.fixture(scope="module")
def base_and_adapters(chat_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    cfg = _cfg()
    base = save_checkpoint(root / "base", Transformer(cfg.model), cfg, chat_tok)
    runs = {}
    for i, (name, targets, rank) in enumerate([("alpha", ["attn", "experts"], 4), ("beta", ["experts"], 2)]):
        model, _, _ = load_model(base)
        ft = dataclasses.replace(cfg.finetune, mode="lora", base=str(base), base_fingerprint=fingerprint(base))
        ft.lora = dataclasses.replace(ft.lora, rank=rank, targets=targets)
        apply_finetune(model, ft)
        torch.manual_seed(10 + i)
        weights = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                weights[n] = torch.randn_like(p) * 0.3
        assert set(weights) == set(trainable_names(model))
        acfg = dataclasses.replace(cfg, finetune=ft)
        runs[name] = atomic_dir(
            root / name, lambda tmp, m=model, c=acfg, w=weights: write_model(tmp, m, c, chat_tok, weights=w)
        )
    return base, runs


def test_stacked_adapters_equal_each_merged_adapter(base_and_adapters):
    base, runs = base_and_adapters
    model, _, _ = load_model(base)
    select, slots = stack_adapters(model, base, {k: str(v) for k, v in runs.items()})
    x = torch.randint(0, 256, (3, 12))
    select.batch = torch.tensor([slots["alpha"], 0, slots["beta"]])
    with torch.no_grad():
        mixed = model(x).logits
        expect = [
            load_model(runs["alpha"])[0](x[:1]).logits,
            load_model(base)[0](x[1:2]).logits,
            load_model(runs["beta"])[0](x[2:]).logits,
        ]
    torch.testing.assert_close(mixed, torch.cat(expect), atol=1e-4, rtol=1e-4)


def test_openai_chat_with_two_adapters(base_and_adapters):
    base, runs = base_and_adapters
    model, _, _ = load_model(base)
    select, slots = stack_adapters(model, base, {k: str(v) for k, v in runs.items()})
    tok = ByteTokenizer([EOD, *ChatTemplate().specials])
    engine = Engine(model, tok, max_batch=4)
    engine.adapter_select = select
    import moelab.infer.server as srv
    from moelab.infer.server import bind_socket, create_app, make_server  # noqa: F401

    real = srv.create_app
    srv.create_app = lambda e, n, **kw: real(e, n, adapters=slots, **kw)
    try:
        with serving(engine, model_name="base") as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
            msgs = [{"role": "user", "content": "hello"}]
            outs = {}
            for name in ("base", "alpha", "beta"):
                r = client.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0)
                assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
                outs[name] = r.choices[0].message.content
                stream = client.chat.completions.create(
                    model=name, messages=msgs, max_tokens=8, temperature=0, stream=True
                )
                text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                assert text == outs[name]
            assert len(set(outs.values())) >= 2  # the adapters change the model
            r = client.chat.completions.create(
                model="alpha", messages=msgs, max_tokens=6, temperature=0.8, top_p=0.9, n=3, seed=1, stop=["zz"]
            )
            assert len(r.choices) == 3
            assert [m.id for m in client.models.list().data] == ["base", "alpha", "beta"]
            for kwargs, status in [
                ({"model": "nope"}, 404),
                ({"messages": []}, 400),
                ({"messages": [{"role": "wizard", "content": "x"}]}, 400),
                ({"max_tokens": 10_000}, 400),
                ({"temperature": 5}, 400),
            ]:
                args = {"model": "alpha", "messages": msgs, "max_tokens": 4, **kwargs}
                with pytest.raises(openai.APIStatusError) as info:
                    client.chat.completions.create(**args)
                assert info.value.status_code == status
                assert info.value.body.get("message") or info.value.body.get("error")
    finally:
        srv.create_app = real
