"""`make demo`: serve a small local model with the layershare backend and talk to it.

Builds a tiny random Llama (no model hub needed), starts `vllm serve ...
--attention-backend layershare` on 127.0.0.1, sends one chat request, prints the
answer and the KV saving vLLM planned, and stops the server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from vllm_layershare.config import load_config
from vllm_layershare.tools.tiny_model import build_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
MAX_LEN = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, limit: float = 300) -> None:
    """Poll /health until the server answers; RuntimeError with the log tail if it dies."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited early; last lines:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve did not become healthy; last lines:\n{log.read_text()[-3000:]}")


def main() -> None:
    model = build_tiny_llama(ROOT / "models" / "tiny-llama", num_layers=6)
    grouping = ROOT / "configs" / "tiny-llama.yaml"
    port = free_port()
    log = ROOT / "models" / "demo-server.log"
    cmd = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--attention-backend", "layershare",
        "--additional-config", json.dumps({"layershare": {"config": str(grouping)}}),
        "--max-model-len", str(MAX_LEN), "--max-num-batched-tokens", "256",
        "--block-size", "32", "--dtype", "float32", "--enforce-eager",
    ]
    print("$", " ".join(cmd))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc, log)
        except RuntimeError as exc:
            sys.exit(str(exc))
        name = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        question = "Tell me about long contexts. " * 12
        reply = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": name, "messages": [{"role": "user", "content": question}],
            "max_tokens": 32, "temperature": 0,
        }).json()
        print("\nanswer (a random tiny model, so the words are noise):")
        print(" ", repr(reply["choices"][0]["message"]["content"]))
        print("usage:", reply["usage"])
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log.read_text()
    plan = re.search(r"layershare: \d+ groups.*", text)
    capacity = re.search(r"KV cache size: .*", text)
    print("\n" + (plan.group(0) if plan else "(no layershare plan line found)"))
    print("vLLM planned:", capacity.group(0) if capacity else "(no capacity line found)")
    print(f"formula at {MAX_LEN} tokens: "
          f"{1 / load_config(grouping).kv_fraction(MAX_LEN):.2f}x tokens in the same memory")
    print(f"server log: {log}")


if __name__ == "__main__":
    main()
