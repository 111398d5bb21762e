"""A model's routing on a token stream (`RoutingTrace`) and its summary (the analysis.json dict).

Legend: N tokens traced, K experts per token, E experts, M sources (domains).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moelab.analysis import dynamic, stats


@dataclass
class LayerTrace:
    topk_ids: torch.Tensor  # [N, K] the router's choices, column 0 = first choice
    keep: torch.Tensor | None  # [N, K] kept by capacity, None = all kept
    entropy_nats: float  # mean per-token router entropy (RoutingStats.entropy, token-weighted over batches)


@dataclass
class RoutingTrace:
    token_ids: torch.Tensor  # [N] the input token at each traced position
    num_experts: int
    top_k: int
    layers: dict[int, LayerTrace]
    domain_ids: torch.Tensor | None = None  # [N] index into domain_names
    domain_names: list[str] = field(default_factory=list)
    vocab_size: int = 0
    num_groups: int = 1  # hierarchical routers: groups of consecutive experts
    task_ids: torch.Tensor | None = None  # [N] multi-task runs: each token's task id


def _tolist(x):
    return x.tolist() if isinstance(x, torch.Tensor) else x


def summarise(
    trace: RoutingTrace,
    decode: Callable[[int], str] | None = None,
    top_n: int = 10,
    min_count: int = 5,
    untrained: RoutingTrace | None = None,
) -> dict:
    """Everything analysis.json holds about a trace: per-layer balance, co-activation, routing per
    source, I(source; expert) with two chance levels (`mi_chance`: sources shuffled; `mi_token_null`:
    shuffled among occurrences of the same token, the one to read specialisation against, see
    `stats.token_conditioned_mutual_information`) and, given `untrained` (the same tokens through a
    freshly initialised model), the MI routing by token identity alone gives (`mi_untrained`); top
    tokens per expert, and layer-to-layer predictability. `decode(token_id) -> text` labels the top tokens."""
    e = trace.num_experts
    n = int(trace.token_ids.numel())
    m = len(trace.domain_names)
    dom = trace.domain_ids
    out: dict = {"tokens": n, "num_experts": e, "top_k": trace.top_k, "domains": [], "layers": [], "transitions": []}
    if dom is not None and m:
        dcount = torch.bincount(dom.long(), minlength=m)
        out["domains"] = [{"name": name, "tokens": int(c)} for name, c in zip(trace.domain_names, dcount, strict=False)]
        out["domain_entropy"] = stats.entropy_bits(dcount)
    vocab = max(trace.vocab_size, int(trace.token_ids.max()) + 1 if n else 0)
    for layer, lt in sorted(trace.layers.items()):
        b = stats.layer_balance(lt.topk_ids, e, lt.keep)
        rec = {"layer": layer, **{k: _tolist(v) for k, v in b.items()}}
        rec["router_entropy_nats"] = lt.entropy_nats
        rec["max_router_entropy_nats"] = math.log(e)
        rec["coactivation"] = stats.coactivation(lt.topk_ids, e, lt.keep).tolist()
        rec.update(dynamic.layer_stats(lt, trace))  # experts per token, groups, tasks
        if dom is not None and m:
            joint = stats.domain_expert_counts(lt.topk_ids, dom, m, e, lt.keep)
            rec["domain_distribution"] = stats.row_distribution(joint).tolist()
            rec["mutual_information"] = stats.mutual_information(joint)
            rec["mi_chance"] = stats.shuffled_mutual_information(lt.topk_ids, dom, m, e, lt.keep)
            rec["mi_token_null"] = stats.token_conditioned_mutual_information(
                lt.topk_ids, dom, trace.token_ids, m, e, lt.keep
            )
            rec["mi_above_token_null"] = max(0.0, rec["mutual_information"] - rec["mi_token_null"])
            if untrained is not None and layer in untrained.layers:
                u = untrained.layers[layer]
                joint_u = stats.domain_expert_counts(u.topk_ids, dom, m, e, u.keep)
                rec["mi_untrained"] = stats.mutual_information(joint_u)
            h = out["domain_entropy"]
            rec["mi_normalised"] = rec["mutual_information"] / h if h > 0 else 0.0
        top = stats.top_tokens(
            stats.token_expert_counts(trace.token_ids, lt.topk_ids, vocab, e, lt.keep), top_n, min_count
        )
        if decode is not None:
            for lists in top.values():
                for entries in lists:
                    for t in entries:
                        t["text"] = decode(t["id"])
        rec["top_tokens"] = top
        out["layers"].append(rec)
    ids = sorted(trace.layers)
    for a, b in zip(ids, ids[1:], strict=False):
        t = stats.transition_stats(trace.layers[a].topk_ids[:, 0], trace.layers[b].topk_ids[:, 0], e)
        out["transitions"].append({"from": a, "to": b, "matrix": t.pop("transition").tolist(), **t})
    return out


def format_summary(analysis: dict) -> str:
    """A compact terminal table: one line per MoE layer, then specialisation."""
    e = analysis["num_experts"]
    lines = [f"routing on {analysis['tokens']:,} held-out tokens, {e} experts, top-{analysis['top_k']}"]
    has_mi = len(analysis.get("domains", [])) > 1
    head = (
        f"  {'layer':>5} {'load CV':>7} {'max util':>8} {'min util':>8} {'dead':>5} {'load H/max':>10} "
        f"{'router H':>8} {'dropped':>7}"
    )
    if has_mi:
        head += f" {'I(src;exp)':>10} {'chance':>7} {'tok-null':>8} {'untrained':>9}"
    lines.append(head)
    for lay in analysis["layers"]:
        row = (
            f"  {lay['layer']:>5} {lay['load_cv']:>7.3f} {lay['max_utilisation']:>8.2f} "
            f"{lay['min_utilisation']:>8.2f} {len(lay['dead']):>5} "
            f"{lay['load_entropy'] / lay['max_load_entropy']:>10.3f} "
            f"{lay['router_entropy_nats']:>8.3f} {lay['dropped_fraction']:>7.3f}"
        )
        if has_mi:
            row += f" {lay['mutual_information']:>10.4f} {lay['mi_chance']:>7.4f}"
            row += (
                " "
                + "".join(
                    f" {lay[k]:>{w}.4f}" if lay.get(k) is not None else f" {'-':>{w}}"
                    for k, w in (("mi_token_null", 8), ("mi_untrained", 9))
                )[1:]
            )
        lines.append(row)
    if has_mi:
        lines.append(
            f"  sources: {len(analysis['domains'])}, H(source) = {analysis['domain_entropy']:.3f} bits "
            "(I(src;exp) = H(source) would mean perfect specialisation); read I(src;exp) against tok-null "
            "(sources shuffled among occurrences of the same token): experts follow token identity even "
            "untrained"
        )
    lines += dynamic.format_lines(analysis)
    for t in analysis.get("transitions", []):
        lines.append(
            f"  layer {t['from']} -> {t['to']}: next first-choice expert predicted with "
            f"{100 * t['accuracy']:.1f}% accuracy (majority baseline {100 * t['baseline']:.1f}%), "
            f"H(next | this) = {t['cond_entropy']:.2f} of {t['entropy']:.2f} bits"
        )
    return "\n".join(lines)
