"""Changing the number of experts of a built model: growing (split/duplicate) for training, pruning
and merging for inference. `moelab grow RUN OUT --experts N` and `schedule.grow_at` use it.

Growing E -> E' (E < E' <= 2E): new expert j copies expert src[j] = j - E (weights plus Gaussian
noise of `noise` x each tensor's std), its router row copies the parent's, and the pair gets opposite
offsets +-`noise` * std * r along a random direction r, so tokens split between the halves by the sign
of r.x and the two share the parent's load.

Why k doubles for a while: a bias-free gate cannot lower a copy's logit by log 2 for every token, so
two identical copies tie and a top-k router picks *both* halves of a token's best expert, dropping its
second choice: top-2 becomes top-1 and the loss jumps. Routing the grown model with k' = k * E'/E
right after growing picks every copy pair together and reproduces the old function exactly (softmax
weights of duplicates, renormalised or not, sum to the parent's), so the loss is continuous; training
then anneals k' back to k over `schedule.grow_anneal_steps` (FLOPs follow the annealed k).

Optimizer state: surviving parameters keep theirs; a new expert (and router row) starts from a copy of
its parent's AdamW moments, because fresh zero moments with a bias correction already at ~1 would make
its first update (1 - beta1) / sqrt(1 - beta2) ~ 3 lr per element (0.1 g / sqrt(0.001 g^2) at the default
betas), where a settled update is about lr at most.
"""

from __future__ import annotations

import math

import torch

from moelab.errors import UserError

EXPERT_PARAMS = ("experts.gate_up", "experts.down", "router.weight", "router.noise_weight", "router.bias")


def check_growable(model, new_e: int) -> int:
    """The current number of experts; UserError (one line) when `model` cannot grow to `new_e`."""
    layers = model.moe_layers
    if not layers:
        raise UserError("grow: the model has no MoE layers")
    cfg = next(iter(layers.values())).cfg
    e = cfg.num_experts
    if cfg.router in ("hierarchical", "expert_choice"):
        raise UserError(f"grow: router {cfg.router!r} is not supported (groups / expert choice change meaning)")
    if any(
        getattr(layer.experts, "lora", None) is not None or not hasattr(layer.experts, "gate_up")
        for layer in layers.values()
    ):
        raise UserError("grow: experts must be plain (no LoRA adapters, expert parallel or offload)")
    if not e < new_e <= 2 * e:
        raise UserError(f"grow: --experts must be in ({e}, {2 * e}] to grow a {e}-expert model, got {new_e}")
    return e


def _rows(t: torch.Tensor, e: int, src: torch.Tensor) -> torch.Tensor:
    """Rows 0..E-1 (real experts), copies of rows `src`, then any rows past E (null experts), twice when
    the real experts double: duplicates everywhere keep every softmax ratio, so 2k is exact."""
    tail = [t[e:], t[e:]] if src.numel() == e else [t[e:]]
    return torch.cat([t[:e], t[:e][src], *tail], dim=0)


def _mapped(name: str) -> bool:
    return any(name.endswith(p) for p in EXPERT_PARAMS)


@torch.no_grad()
def grow_model(
    model,
    new_e: int,
    noise: float = 0.01,
    seed: int = 0,
    router_noise: float | None = None,
    split_noise: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Grow every MoE layer in place to `new_e` experts; returns {param name: src index} for the
    parameters whose leading dim grew (optimizer state follows the same map). `router_noise` (None =
    `noise`) sizes the opposite router-row offsets alone: a larger one sends the halves of a split
    expert different tokens sooner, so their weights can diverge (BENCHMARKS.md measures it).
    `split_noise` adds *opposite* noise to the two halves' expert weights (parent - z, copy + z, z of
    split_noise x each tensor's std): the pair's mean stays the parent, so at 2k the function changes
    only to second order in z, while the halves now compute different things and get different
    gradients -- copies that compute the same thing get the same gradient and never separate."""
    e = check_growable(model, new_e)
    gen = torch.Generator().manual_seed(seed)
    src = torch.arange(new_e - e) % e
    grown: dict[str, torch.Tensor] = {}
    for li, layer in model.moe_layers.items():
        for name, p in list(layer.named_parameters()) + list(layer.named_buffers()):
            if not _mapped(name):
                continue
            new = _rows(p.data, e, src.to(p.device)).clone()
            if p.is_floating_point() and noise > 0 and name != "router.bias":
                std = float(p.data[:e].float().std()) or 1.0
                scale = router_noise if name == "router.weight" and router_noise is not None else noise
                z = torch.randn(new[e:new_e].shape, generator=gen).to(new) * scale * std
                if name == "router.weight":  # opposite offsets: the halves split the tokens
                    new[src.to(p.device)] -= z
                new[e:new_e] += z
            # drawn only when set, so runs without split noise keep their old random stream
            if split_noise > 0 and name in ("experts.gate_up", "experts.down"):
                std = float(p.data[:e].float().std()) or 1.0
                z = torch.randn(new[e:new_e].shape, generator=gen).to(new) * split_noise * std
                new[src.to(p.device)] -= z
                new[e:new_e] += z
            mod, attr = _owner(layer, name)
            if isinstance(p, torch.nn.Parameter):
                setattr(mod, attr, torch.nn.Parameter(new, requires_grad=p.requires_grad))
                grown[f"layers.{li}.ffn.{name}"] = src
            else:
                mod._buffers[attr] = new
        layer.router.num_experts = new_e
        if hasattr(layer.router, "num_real"):
            layer.router.num_real = new_e
    cfg = next(iter(model.moe_layers.values())).cfg  # shared config object: changed once, after every layer
    cfg.num_experts = new_e
    if new_e == 2 * e:
        cfg.num_null_experts *= 2
    return grown


def _owner(root, name: str):
    *path, attr = name.split(".")
    mod = root
    for part in path:
        mod = getattr(mod, part)
    return mod, attr


def grow_optimizer_state(optim_state: dict, grown: dict[str, torch.Tensor], old_e: int) -> dict:
    """`state.optimizer_state` layout (keyed by name) -> the same with every grown parameter's
    per-element moments extended by copies of the parents' (module docstring)."""
    out = {"param_groups": optim_state["param_groups"], "state": {}}
    for name, st in optim_state["state"].items():
        if name in grown:
            st = {
                k: (
                    _rows(v, old_e, grown[name].to(v.device)).clone()
                    if isinstance(v, torch.Tensor) and v.dim() > 0
                    else v
                )
                for k, v in st.items()
            }
        out["state"][name] = st
    return out


def anneal_top_k(step: int, k: int, factor: float, grow_steps: list[int], anneal: int) -> int:
    """Experts per token at `step` after growing at `grow_steps` by `factor` each: k * factor at the
    growth step, back to k linearly over `anneal` steps (0 = straight back to k)."""
    kk = k
    for s in sorted(grow_steps):
        if s <= step < s + anneal:
            kk = max(kk, math.floor(k * factor - (k * factor - k) * (step - s) / anneal + 0.5))
    return kk


# ----------------------------------------------------------------------------------------------------
# Inference: fewer experts


@torch.no_grad()
def shrink_model(model, new_e: int, usage: dict[int, torch.Tensor], method: str = "prune") -> dict[int, list]:
    """Every MoE layer to `new_e` experts. `prune`: keep the `new_e` most used (usage [E] per layer).
    `merge`: repeatedly merge the least used expert into its most similar one (weight cosine), a
    usage-weighted average of weights and router rows. Returns {layer: kept / merged groups}."""
    layers = model.moe_layers
    cfg = next(iter(layers.values())).cfg
    e = cfg.num_experts
    if not 1 <= new_e < e or new_e < cfg.top_k:
        raise UserError(f"grow: to shrink, --experts must be in [max(1, top_k={cfg.top_k}), {e}), got {new_e}")
    if cfg.router in ("hierarchical", "expert_choice"):
        raise UserError(f"grow: router {cfg.router!r} is not supported")
    if method not in ("prune", "merge"):
        raise UserError(f"grow: --shrink must be prune or merge, got {method!r}")
    report = {}
    for li, layer in layers.items():
        u = usage[li].double().cpu() + 1e-9
        groups = [[i] for i in range(e)]
        if method == "prune":
            keep = sorted(torch.argsort(-u)[:new_e].tolist())
            groups = [[i] for i in keep]
        else:
            w = torch.cat([layer.experts.gate_up.reshape(e, -1), layer.experts.down.reshape(e, -1)], 1).float()
            w = torch.nn.functional.normalize(w, dim=1)
            sim = w @ w.t()
            while len(groups) > new_e:
                gu = torch.tensor([float(u[g].sum()) for g in groups])
                a = int(torch.argmin(gu))  # least used group
                heads = torch.tensor([g[0] for g in groups])
                s = sim[groups[a][0], heads].clone()
                s[a] = -2.0
                b = int(torch.argmax(s))
                groups[b] = groups[b] + groups[a]
                del groups[a]
        report[li] = groups
        for name, p in list(layer.named_parameters()) + list(layer.named_buffers()):
            if not _mapped(name):
                continue
            rows = []
            for g in groups:
                wts = (u[g] / u[g].sum()).to(p.data)
                shape = (-1,) + (1,) * (p.dim() - 1)
                rows.append((p.data[g] * wts.view(shape)).sum(0) if p.is_floating_point() else p.data[g[0]])
            new = torch.cat([torch.stack(rows), p.data[e:]], 0)
            mod, attr = _owner(layer, name)
            if isinstance(p, torch.nn.Parameter):
                setattr(mod, attr, torch.nn.Parameter(new, requires_grad=p.requires_grad))
            else:
                mod._buffers[attr] = new
        layer.router.num_experts = new_e
        if hasattr(layer.router, "num_real"):
            layer.router.num_real = new_e
    cfg.num_experts = new_e
    return report


def with_experts(cfg, num_experts: int, num_null_experts: int):
    """A copy of a run config with the expert counts set (the live ones change as the run grows)."""
    import copy

    out = copy.deepcopy(cfg)
    out.model.moe.num_experts, out.model.moe.num_null_experts = num_experts, num_null_experts
    return out


def grow_trainer(self, measure: bool = True) -> None:
    """The trainer (`self`) doubles every MoE layer's experts mid-run and rebuilds its optimizer with the
    state carried over; with `measure`, the val loss right before and after (at 2k) goes into the next
    metrics record."""
    from moelab.train import state
    from moelab.train.optim import build_optimizer

    if self.par.distributed or self.finetune.adapter_only:
        raise UserError("schedule.grow_at: growing experts needs a single-process, full-weight run")
    before = self._evaluate().get("val/loss") if measure else None
    e = self.cfg.model.moe.num_experts
    optim = state.optimizer_state(self.optimizer)
    sched = self.cfg.schedule
    grown = grow_model(
        self.model,
        2 * e,
        sched.grow_noise,
        self.cfg.train.seed + self.step,
        sched.grow_router_noise,
        sched.grow_split_noise,
    )
    self.optimizer = build_optimizer(self.model, self.cfg.train)
    self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
    state.load_optimizer_state(self.optimizer, grow_optimizer_state(optim, grown, e))
    self.step_flops.clear()  # router sizes changed
    if measure:
        self.model.set_router_attr("top_k", 2 * self.cfg.model.moe.top_k)
        after = self._evaluate().get("val/loss")
        self.grow_record = {"grow/experts": 2 * e, "grow/val_loss_before": before, "grow/val_loss_after": after}
        self.grow_record["grow/rel_change"] = (after - before) / before if before and after is not None else None
