"""Routing record (generation) and replay (model forward): a replayed forward reproduces the
rollout, a forced routing is honoured exactly, a wrong routing is one clear error."""

import pytest
import torch

from moelab.errors import UserError
from moelab.infer.generate import generate
from moelab.model.moe import decode_ids

ROUTERS = [
    dict(router="softmax_topk"),
    dict(router="topk_softmax"),
    dict(router="sigmoid", router_bias=True),
    dict(router="noisy_topk"),
    dict(router="gumbel"),
    dict(router="expert_choice"),
    dict(router="softmax_topk", eval_capacity_factor=0.6),
]
PROMPTS = ["12+7=", "hello there", "z"]


def replay_batch(outs):
    """Right-padded ids, routing [B, S, L, K] for prompt + completion (the last token's routing is never
    recorded: it was not fed to the model; that position's logits are not compared)."""
    seqs = [o.prompt_ids + o.token_ids for o in outs]
    s = max(len(q) for q in seqs)
    idx = torch.zeros(len(seqs), s, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.long)
    r0 = outs[0].routing
    routing = torch.zeros(len(seqs), s, *r0.shape[1:], dtype=torch.long)
    for i, (q, o) in enumerate(zip(seqs, outs, strict=True)):
        idx[i, : len(q)] = torch.tensor(q)
        mask[i, : len(q)] = 1
        routing[i, : o.routing.shape[0]] = o.routing
    return idx, mask, routing


@pytest.mark.parametrize("moe", ROUTERS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_replayed_forward_equals_rollout_logits(make_model, tokenizer, moe):
    model = make_model(**moe)
    outs = generate(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0, return_routing=True, return_logits=True)
    idx, mask, routing = replay_batch(outs)
    with torch.no_grad():
        logits = model(idx, mask=mask, routing=routing).logits
    for i, o in enumerate(outs):
        p, n = len(o.prompt_ids), len(o.token_ids)
        torch.testing.assert_close(logits[i, p - 1 : p - 1 + n], o.logits, rtol=1e-4, atol=1e-4)
    if "eval_capacity_factor" in moe:  # the rollout dropped some assignments; replay drops the same
        assert any(bool((o.routing < 0).any()) for o in outs)


@pytest.mark.parametrize("backend", ["reference", "cpu_buckets", "grouped_mm"])
def test_forced_routing_is_honoured_exactly(make_model, backend):
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    model = make_model(expert_backend=backend)
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (2, 9))
    layers = list(model.moe_layers.values())
    for layer in layers:
        layer.record_routing = True
    xs, forced = _lowest_routing(model, idx)  # the experts each router ranks last: never its choice
    with torch.no_grad():
        model(idx, routing=forced)
    for j, m in enumerate(layers):
        z = m.router.logits(xs[j])
        assert torch.equal(m.recorded.ids.view(2, 9, -1), forced[:, :, j])  # used = forced, exactly
        torch.testing.assert_close(m.recorded.weights, m.router.replay_weights(z, forced[:, :, j].reshape(-1, 2))[0])
        top = z.topk(2).indices.sort(-1).values
        assert torch.equal(m.recorded.natural.sort(-1).values, top)  # what it would have chosen...
        assert not bool((top == forced[:, :, j].reshape(-1, 2).sort(-1).values).all(-1).any())  # ...differs


def _lowest_routing(model, idx):
    """Force each layer to its router's two lowest-ranked experts. Layer j's input depends on the routing
    of the layers before it, so it is found layer by layer. -> (inputs [T, D] per layer, routing)."""
    layers = list(model.moe_layers.values())
    xs = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: xs.append(args[0].reshape(-1, args[0].shape[-1]))) for m in layers
    ]
    ids = torch.zeros(*idx.shape, len(layers), 2, dtype=torch.long)
    try:
        with torch.no_grad():
            for j, lay in enumerate(layers):
                xs.clear()
                model(idx, routing=ids) if j else model(idx)
                ids[:, :, j] = lay.router.logits(xs[j]).topk(2, largest=False).indices.view(*idx.shape, 2)
            xs.clear()
            model(idx, routing=ids)
    finally:
        for h in hooks:
            h.remove()
    return list(xs), ids


def test_fixed_vs_recomputed_weights(make_model):
    model = make_model().train()
    idx = torch.randint(0, 256, (2, 8))
    routing = torch.randint(0, 4, (2, 8, 2, 1)).expand(-1, -1, -1, 2).clone()
    routing[..., 1] = (routing[..., 0] + 1) % 4
    weights = torch.full(routing.shape, 0.5)
    model.zero_grad()
    model(idx, idx, routing=routing).ce_loss.backward()
    router = next(iter(model.moe_layers.values())).router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0  # recomputed: learns
    model.zero_grad()
    model.cfg.moe.aux_loss_coef = 0.0
    out = model(idx, idx, routing=routing, routing_weights=weights)
    out.ce_loss.backward()
    assert router.weight.grad is None or router.weight.grad.abs().sum() == 0  # fixed: no CE gradient


def test_dropped_assignment_encoding():
    ids, keep = decode_ids(torch.tensor([[0, -1 - 3], [2, 1]]))
    assert ids.tolist() == [[0, 3], [2, 1]] and keep.tolist() == [[True, False], [True, True]]


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.zeros(2, 8, 2, dtype=torch.long), "shape"),
        (torch.zeros(2, 7, 2, 2, dtype=torch.long), "shape"),
        (torch.zeros(2, 8, 3, 2, dtype=torch.long), "moe_layers=2"),
        (torch.zeros(2, 8, 2, 9, dtype=torch.long), "k in 1..4"),
        (torch.zeros(2, 8, 2, 2), "integer"),
        (torch.full((2, 8, 2, 2), 4), r"\[0, 4\)"),
    ],
)
def test_wrong_routing_is_one_clear_error(make_model, bad, match):
    model = make_model()
    with pytest.raises(UserError, match=match) as e:
        model(torch.zeros(2, 8, dtype=torch.long), routing=bad)
    assert "\n" not in str(e.value)
