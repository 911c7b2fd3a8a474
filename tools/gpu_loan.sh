#!/usr/bin/env bash
# One short device loan (about 5 minutes on an H200, of the 15 a session is lent), on a
# bare GPU machine: PyTorch, Triton, nvcc and pytest, no vLLM, no install, maybe no make
# (hence a script; `make gpu-loan` runs it too). From the repository root:
#   bash tools/gpu_loan.sh 2>&1 | tee $OUT/loan.log
# 1. the Triton tests compiled, not interpreted, and csrc's CUDA kernel built and tested;
# 2. the kernel table at 4K-128K (prefill rows and csrc's CUDA decode included), and the
#    CUDA columns again with the split kernel's registers capped for 4 blocks per SM;
# 3. the decode shapes not yet timed on the GPU alone swept against the defaults (the
#    fastest, programs per SM apart for followers reading shared scores, to $SWEPT: named
#    as this GPU's tuned file, vllm_layershare/attention/tuned/, should it be kept), the
#    decode rows again with those (a follower's decode at 32K x 16 is near the issue's
#    limit: docs/benchmarks.md);
# 4. whole decode steps, eager (host-bound at small batches) and replayed, and the host
#    time of one eager decode call, with the merge kernel and with the merge fused.
# A failing step does not stop the later ones (their timings still inform); the script
# exits non-zero if any failed.
set -uo pipefail
PY=${PY:-python3}
SHAPES='[{}, {"decode_block_n": 64}, {"programs_per_sm": 16}, {"programs_per_sm": 8},
         {"whole_waves": true}, {"whole_waves": true, "programs_per_sm": 16},
         {"fused_merge": true}, {"fused_merge": true, "merge_splits": 8}]'
FUSED='{"fused_merge": true}'
export PYTHONPATH=. PYTHONUNBUFFERED=1
failed=()

step() {  # run one step, note it if it fails
    echo "== $*"
    "$@" || failed+=("$*")
}

bench() { "$PY" benchmarks/kernels.py "$@"; }

"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'needs a GPU')" \
    || exit 1
TUNED=$("$PY" -c "import torch; from vllm_layershare.attention.tuning import tuned_file_name
print(tuned_file_name(torch.cuda.get_device_name()))") || exit 1
SWEPT=${SWEPT:-${OUT:-/tmp}/$TUNED}  # under the device tool's $OUT: it comes back
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
step "$PY" -m pytest -q "${xdist[@]}" tests/test_attention.py tests/test_cuda_kernel.py \
    -k "triton or leaders_scores or cuda"
step bench --repeats 10 --contexts 4096 32768 131072 --batches 16 64
step bench --repeats 10 --contexts 32768 --batches 16 64 --cuda-define LAYERSHARE_MIN_BLOCKS=4
step bench --sweep "$SWEPT" --rounds 2 --repeats 10 --shapes "$SHAPES"
step bench --no-cuda --repeats 10 --contexts 32768 131072 --batches 16 64 --config "$SWEPT"
step bench --steps --repeats 10
step bench --steps --repeats 10 --config "$FUSED"
step "$PY" benchmarks/host_overhead.py --calls 1000
step "$PY" benchmarks/host_overhead.py --calls 1000 --config "$FUSED"
if ((${#failed[@]})); then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
