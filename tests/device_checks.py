"""`assert_on_device`: every parameter and buffer of a module sits on the requested device. The tests of
the trainer, the generation engine and the analysis call it on the models those build (tests/*/test_*_device.py),
on the CPU through code paths that need no GPU, and on CUDA in tests/test_cuda.py."""

import torch

from moelab.device import misplaced


def assert_on_device(module: torch.nn.Module, device) -> None:
    bad = misplaced(module, torch.device(device))
    assert not bad, f"{len(bad)} tensors not on {device}: {bad[:5]}"


def tiny_checkpoint(root, seed: int = 0, vocab_size: int = 260):
    """A checkpoint directory of a random tiny MoE with a byte tokenizer (generate/serve/analyze load it)."""
    from moelab.checkpoint import save_checkpoint
    from moelab.config import Config, ModelConfig, MoEConfig
    from moelab.model import Transformer
    from moelab.tokenizer import ByteTokenizer

    cfg = Config(
        model=ModelConfig(
            vocab_size=vocab_size,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=64,
            max_seq_len=64,
            moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32),
        )
    )
    cfg.data.seq_len = 32
    ByteTokenizer().save(root / "tok")
    torch.manual_seed(seed)
    return save_checkpoint(root / "ckpt", Transformer(cfg.model), cfg, root / "tok")
