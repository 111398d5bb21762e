"""Expert offload: same outputs as the resident model under every policy; policy logic and metrics."""

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.checkpoint import save_checkpoint
from moelab.config import Config, from_dict
from moelab.errors import UserError
from moelab.model import Transformer
from moelab.offload import LRU, HostLayers, KeepAll, MmapExpertStore, build_placement, load_offloaded

E = 8


def tiny_cfg(**model) -> Config:
    m = dict(
        vocab_size=300,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        max_seq_len=64,
        moe={"num_experts": E, "top_k": 2, "expert_dim": 16, "layers": [0, 2], "num_shared_experts": 1},
    )
    m.update(model)
    return from_dict(Config, {"model": m, "data": {"seq_len": 32}})


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    cfg = tiny_cfg(tie_embeddings=request.param)
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("ck") / "ck", model, cfg)
    return model, path


@pytest.mark.parametrize("spec", ["keep-all", "lru:3", "host-layers:1", "host-layers:1+lru:2"])
def test_offloaded_model_matches_resident_model(checkpoint, spec):
    model, path = checkpoint
    off, cfg, policy = load_offloaded(path, spec)
    x = torch.randint(0, cfg.model.vocab_size, (3, 17))
    with torch.no_grad():
        # fp32 rounding only: the resident experts run as bucketed bmm calls, the offloaded ones one mm per
        # expert, and MKL's summation order may differ between the two (bit-equal only on some runs)
        torch.testing.assert_close(off(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)
    assert not any(".experts." in n for n, _ in off.named_parameters())  # experts never became parameters
    m = policy.metrics
    assert m.misses > 0 and m.bytes_moved > 0 and m.stall_seconds > 0


def test_greedy_generation_is_unchanged(checkpoint):
    from moelab.infer.generate import generate
    from moelab.tokenizer import ByteTokenizer

    model, path = checkpoint
    off, _, policy = load_offloaded(path, "lru:2")
    tok = ByteTokenizer()
    want = generate(model, tok, ["to be or", "MoE"], max_new_tokens=12, temperature=0)
    assert generate(off, tok, ["to be or", "MoE"], max_new_tokens=12, temperature=0) == want
    assert policy.metrics.evictions > 0  # 2 slots for 2 x 8 experts: the cache really churned


@pytest.fixture(scope="module")
def store(checkpoint):
    return MmapExpertStore(checkpoint[1] / "model.safetensors")


def expert_bytes(store):
    gu, dn = store.read(0, 0)
    return gu.numel() * gu.element_size() + dn.numel() * dn.element_size()


def test_lru_hits_misses_evictions_bytes_by_hand(store):
    lru = LRU(store, capacity=2)
    for key in [(0, 0), (0, 1), (0, 0), (0, 2), (0, 1), (2, 1)]:
        lru.get(*key)
    # miss, miss, hit, miss (evicts (0,1)), miss (evicts (0,0)), miss (evicts (0,2))
    m = lru.metrics
    assert (m.hits, m.misses, m.evictions) == (1, 5, 3)
    assert m.bytes_moved == 5 * expert_bytes(store)
    assert lru.resident_bytes() == 2 * expert_bytes(store)
    gu, dn = lru.get(2, 1)
    want_gu, want_dn = store.read(2, 1)
    assert torch.equal(gu, want_gu) and torch.equal(dn, want_dn)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 2]), st.integers(0, E - 1)), min_size=1, max_size=60), st.integers(1, 6))
def test_lru_matches_a_reference_lru_and_serves_the_right_expert(store, accesses, capacity):
    lru = LRU(store, capacity)
    ref: OrderedDict = OrderedDict()
    hits = 0
    for key in accesses:
        if key in ref:
            hits += 1
            ref.move_to_end(key)
        else:
            ref[key] = True
            if len(ref) > capacity:
                ref.popitem(last=False)
        gu, _ = lru.get(*key)
        assert torch.equal(gu, store.read(*key)[0])
    assert lru.metrics.hits == hits and lru.metrics.misses == len(accesses) - hits
    assert len(lru.slots) <= capacity


def test_keep_all_and_host_layers_placement(store):
    keep = KeepAll(store)
    for _ in range(3):
        for e in range(E):
            keep.get(0, e)
    assert (keep.metrics.misses, keep.metrics.hits) == (E, 2 * E)
    host = HostLayers(store, 1, moe_layer_ids=[0, 2], inner=LRU(store, 1))
    for _ in range(2):
        host.get(0, 3)  # host layer: loaded once, then served in place (CPU), no bytes moved
        host.get(2, 3)  # device layer: the inner LRU
        host.get(2, 4)
    assert host.host_layers == {0}
    assert (host.metrics.misses, host.metrics.hits) == (1 + 4, 1)
    assert host.metrics.bytes_moved == 5 * expert_bytes(store)


@pytest.mark.parametrize("spec", ["lru", "lru:0", "lru:x", "fifo:3", "keep-all:2", "host-layers:-1"])
def test_bad_placement_specs_are_user_errors(store, spec):
    with pytest.raises(UserError, match="expert"):
        build_placement(spec, store, [0, 2])


def test_store_remaps_so_touched_pages_do_not_stay_resident(tmp_path):
    psutil = pytest.importorskip("psutil")
    from safetensors.torch import save_file

    n_layers = 6  # 6 x 16 MiB of experts, read through an 8 MiB remap window
    save_file(
        {f"layers.{i}.ffn.experts.gate_up": torch.randn(16, 256, 512) for i in range(n_layers)}
        | {f"layers.{i}.ffn.experts.down": torch.randn(16, 512, 256) for i in range(n_layers)},
        str(tmp_path / "w.safetensors"),
    )
    store = MmapExpertStore(tmp_path / "w.safetensors", remap_bytes=8 << 20)
    lru = LRU(store, capacity=2)
    proc = psutil.Process()
    before = proc.memory_info().rss
    for i in range(n_layers):
        for e in range(16):
            lru.get(i, e)
    grown = proc.memory_info().rss - before
    assert store.bytes_read == 96 << 20
    assert grown < 32 << 20, f"resident memory grew by {grown >> 20} MiB while reading 96 MiB of experts"
