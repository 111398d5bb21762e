"""The server's opt-in routing extension: `"return_routing": true` on a --record-routing server."""

import torch
from fastapi.testclient import TestClient

from moelab.infer.generate import generate
from moelab.infer.scheduler import Engine
from moelab.infer.server import create_app


def _post(engine, *bodies):
    with TestClient(create_app(engine, "tiny")) as client:  # the app's lifespan closes the engine on exit
        out = [client.post("/v1/completions", json={"model": "tiny", **b}) for b in bodies]
    return out if len(out) > 1 else out[0]


def test_return_routing_matches_generate(make_model, tokenizer):
    model = make_model()
    engine = Engine(model, tokenizer, max_batch=2, record_routing=True)
    r, plain = _post(
        engine,
        {"prompt": "12+7=", "max_tokens": 5, "temperature": 0, "return_routing": True},
        {"prompt": "a", "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["moelab_routing"]
    ref = generate(model, tokenizer, ["12+7="], max_new_tokens=5, temperature=0, return_routing=True)[0]
    assert torch.equal(torch.tensor(got["ids"]), ref.routing)
    assert "moelab_routing" not in plain.json()["choices"][0]


def test_return_routing_needs_the_server_flag_and_no_streaming(make_model, tokenizer):
    plain = Engine(make_model(), tokenizer, max_batch=2)
    r = _post(plain, {"prompt": "a", "max_tokens": 2, "return_routing": True})
    assert r.status_code == 400 and "--record-routing" in r.json()["error"]["message"]
    rec = Engine(make_model(), tokenizer, max_batch=2, record_routing=True)
    r = _post(rec, {"prompt": "a", "max_tokens": 2, "return_routing": True, "stream": True})
    assert r.status_code == 400 and "streaming" in r.json()["error"]["message"]
