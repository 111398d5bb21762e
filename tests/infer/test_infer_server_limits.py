"""Hostile requests: sizes checked before work, every error an OpenAI-shaped JSON body counted in /metrics."""

import json
import logging
import socket
import subprocess
import sys
import time

import httpx
import pytest

from moelab.errors import UserError
from moelab.infer.scheduler import Engine
from moelab.infer.server import create_app

LIMIT = 64 << 10


@pytest.fixture(scope="module")
def live(make_model, tokenizer, serve):
    engine = Engine(make_model(), tokenizer, max_batch=2)
    with serve(engine, max_queue=3, max_body_bytes=LIMIT) as url:
        yield url


def _post(url, content, headers=None):
    return httpx.post(
        f"{url}/v1/completions",
        content=content,
        timeout=30,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _count(url, status):
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.split("{")[0].endswith("_total") and f'"http_{status}"' in line
    )


def _error(r, status):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_body_over_the_limit_is_refused_before_it_is_read(live):
    before = _count(live, 413)
    big = json.dumps({"model": "tiny", "prompt": "x" * (2 * LIMIT)})
    assert _error(_post(live, big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: refused once it grows past the limit
        for _ in range(8):
            yield b" " * (LIMIT // 4)

    assert _error(_post(live, chunks()), 413)["code"] == "request_too_large"
    assert _count(live, 413) == before + 2


@pytest.mark.parametrize(
    "raw, param",
    [
        ('{"model": "tiny", "prompt": "ab\\ud800cd"}', "prompt"),  # a lone surrogate
        ('{"model": "tiny", "prompt": "ab", "stop": "\\udfff"}', "stop"),
        ('{"model": "tiny", "prompt": "ab", "seed": 1000000000000000000000000000000}', "seed"),
        ('{"model": "tiny", "prompt": "ab", "seed": 1' + "0" * 5000 + "}", None),  # past Python's int-parse limit
        ('{"model": "tiny", "prompt": ' + "[" * 20000 + "]" * 20000 + "}", None),
    ],
)
def test_malformed_requests_are_json_400s_counted_in_metrics(live, raw, param):
    before = _count(live, 400)
    assert _error(_post(live, raw), 400)["param"] == param
    assert _count(live, 400) == before + 1


def test_largest_seed_wraps_instead_of_failing_the_second_choice(live):
    r = _post(live, json.dumps({"model": "tiny", "prompt": "ab", "seed": 2**64 - 1, "n": 2, "max_tokens": 3}))
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_full_queue_says_when_to_retry_and_unknown_routes_are_counted(live):
    r = _post(live, json.dumps({"model": "tiny", "prompt": ["a", "b"], "n": 2}))
    assert _error(r, 429)["code"] == "queue_full" and r.headers["Retry-After"] == "1"
    before = _count(live, 404)
    _error(httpx.get(f"{live}/nope"), 404)
    assert _count(live, 404) == before + 1


def test_client_gone_mid_body_logs_no_traceback(live, caplog):
    host, port = live.removeprefix("http://").split(":")
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            s = socket.create_connection((host, int(port)))
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 5000\r\n\r\n{"model": '
            )
            time.sleep(0.1)
            s.close()
        time.sleep(0.5)
        assert httpx.get(f"{live}/health").json()["status"] == "ok"
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_empty_api_key_is_refused_at_start(make_model, tokenizer):
    with pytest.raises(UserError, match="--api-key: empty"):
        create_app(Engine(make_model(), tokenizer), "tiny", api_key="")
    p = subprocess.run(
        [sys.executable, "-m", "moelab", "serve", "no-such-run", "--api-key", ""],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--api-key: empty" in p.stderr, p.stderr
