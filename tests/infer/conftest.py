"""Shared fixtures for the inference tests: a tiny random MoE, a byte-level stand-in tokenizer, a live server."""

import contextlib
import threading
import time

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model import Transformer


class BytesTokenizer:
    """Bytes 0..255 are tokens; 256 ends a document. Enough to exercise detokenization (multi-byte
    UTF-8 characters span tokens) without depending on a trained tokenizer."""

    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_model(seed: int = 0, **moe) -> Transformer:
    torch.manual_seed(seed)
    moe_cfg = MoEConfig(num_experts=4, top_k=2, expert_dim=32, **moe)
    cfg = ModelConfig(
        vocab_size=257, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=96, moe=moe_cfg
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than init: routing and sampling decisions are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return BytesTokenizer()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def make_model():
    return tiny_model


@contextlib.contextmanager
def serving(engine, model_name="tiny", api_key=None, max_queue=256, **app_kw):
    """A live uvicorn server on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    from moelab.infer.server import bind_socket, create_app, make_server

    sock = bind_socket("127.0.0.1", 0)
    server = make_server(create_app(engine, model_name, api_key=api_key, max_queue=max_queue, **app_kw), sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
        assert not thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="session")
def serve():
    return serving
