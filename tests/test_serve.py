"""`vllm serve --attention-backend layershare` on 127.0.0.1: the OpenAI-compatible API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import write_grouping

from vllm_layershare.tools.demo import free_port, wait_healthy

MAX_LEN = 512


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """A real `vllm serve` process with the layershare backend; yields (url, log path)."""
    tmp = tmp_path_factory.mktemp("serve")
    grouping = write_grouping(tmp / "g.yaml", recent_tokens=32)
    port = free_port()
    log_path = tmp / "server.log"
    vllm = Path(sys.executable).parent / "vllm"
    cmd = [
        str(vllm), "serve", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
        "--attention-backend", "layershare", "--dtype", "float32",
        "--max-model-len", str(MAX_LEN), "--block-size", "32",
        "--additional-config", json.dumps({"layershare": {"config": str(grouping)}}),
    ]  # no --enforce-eager: the model compiled, as users run it
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real, multi-process server
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, log_path, limit=240)
            yield url, log_path
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def model_name(url: str) -> str:
    return requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def test_completion_and_chat(server):
    url, log_path = server
    name = model_name(url)
    r = requests.post(f"{url}/v1/completions", timeout=60, json={
        "model": name, "prompt": "the quick brown fox " * 20, "max_tokens": 16,
        "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16
    r = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": name, "messages": [{"role": "user", "content": "hello " * 30}],
        "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    log = log_path.read_text()
    assert "layershare: 2 groups" in log  # start-up plan line
    assert "layershare: attention impl running in this process" in log  # engine ran our code


def test_streaming(server):
    url, _ = server
    with requests.post(f"{url}/v1/chat/completions", timeout=60, stream=True, json={
        "model": model_name(url), "messages": [{"role": "user", "content": "stream " * 40}],
        "max_tokens": 12, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines(decode_unicode=True)
                  if line and line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) > 1


def test_too_long_prompt_is_a_clear_4xx_and_server_keeps_serving(server):
    url, _ = server
    r = requests.post(f"{url}/v1/completions", timeout=60, json={
        "model": model_name(url), "prompt": "x " * (MAX_LEN * 2), "max_tokens": 4})
    assert 400 <= r.status_code < 500
    assert "context length" in r.text or "maximum" in r.text
    assert requests.get(f"{url}/health", timeout=5).ok
    r = requests.post(f"{url}/v1/completions", timeout=60, json={
        "model": model_name(url), "prompt": "still here", "max_tokens": 4})
    assert r.status_code == 200


def test_concurrent_requests(server):
    url, _ = server
    name = model_name(url)

    def ask(i: int) -> int:
        r = requests.post(f"{url}/v1/completions", timeout=120, json={
            "model": name, "prompt": f"r{i} " * (10 + 15 * i), "max_tokens": 20,
            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert list(pool.map(ask, range(6))) == [20] * 6


@pytest.mark.parametrize("case", ["grouping", "kernels", "launch_shapes"])
def test_bad_setting_stops_serve_with_one_message(tiny_model, tmp_path, case):
    """`vllm serve` with a wrong grouping file, or a wrong value in one of the backend's
    variables: one clear error line, no traceback, exit code 1."""
    good = write_grouping(tmp_path / "good.yaml")
    bad = write_grouping(tmp_path / "bad.yaml", share="values")
    grouping, env, message = {
        "grouping": (bad, {}, f"layershare config {bad}: key 'share' must be one of scores, "
                              "keys"),
        "kernels": (good, {"VLLM_LAYERSHARE_KERNELS": "cuda"},
                    "VLLM_LAYERSHARE_KERNELS='cuda': expected one of native, triton"),
        "launch_shapes": (good, {"VLLM_LAYERSHARE_KERNELS": "triton", "TRITON_INTERPRET": "1",
                                 "VLLM_LAYERSHARE_TRITON_CONFIG": '{"decode_warps": 3}'},
                          "VLLM_LAYERSHARE_TRITON_CONFIG: TritonConfig.decode_warps must be a "
                          "power of two <= 32, not 3"),
    }[case]
    vllm = Path(sys.executable).parent / "vllm"
    proc = subprocess.run(
        [str(vllm), "serve", str(tiny_model), "--attention-backend", "layershare",
         "--max-model-len", "256", "--additional-config",
         json.dumps({"layershare": {"config": str(grouping)}})],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert message in output, output[-3000:]
