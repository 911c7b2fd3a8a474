"""`make demo`: serve SmolLM2-135M-Instruct with the layershare backend and talk to it.

Uses the model `make model` converted into models/ (no model hub needed), starts
`vllm serve ... --attention-backend layershare` on 127.0.0.1 with the groups-of-three
grouping, sends one chat request, prints the answer and the KV saving vLLM planned,
and stops the server.
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
from vllm_layershare.tools.smollm2 import build_smollm2

ROOT = Path(__file__).resolve().parents[2]
MAX_LEN = 8192
QUESTION = "What is the capital of France? Answer in one sentence."


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
    model = build_smollm2()
    grouping = ROOT / "configs" / "smollm2-135m-groups3.yaml"
    port = free_port()
    log = ROOT / "models" / "demo-server.log"
    cmd = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--attention-backend", "layershare",
        "--additional-config", json.dumps({"layershare": {"config": str(grouping)}}),
        "--max-model-len", str(MAX_LEN), "--max-num-batched-tokens", "512",
        "--block-size", "32", "--dtype", "bfloat16",
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
        reply = requests.post(f"{url}/v1/chat/completions", timeout=300, json={
            "model": name, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 48, "temperature": 0,
        }).json()
        print(f"\nQ: {QUESTION}\nA: {reply['choices'][0]['message']['content'].strip()}")
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
    config = load_config(grouping)
    print(f"(followers share distant-token scores only past {config.proximal_tokens} tokens "
          "of context; shorter chats are answered exactly as by the stock backend)")
    print(f"server log: {log}")


if __name__ == "__main__":
    main()
