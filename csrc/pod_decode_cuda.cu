// PoD decode attention on CUDA: one query token per request (see pod_decode.cuh for the
// math, which this file only schedules). Self-contained: no torch headers, so it builds
// with plain nvcc; vllm_layershare/attention/cuda_decode.py calls it through ctypes.
//
// Kernel 1, grid (num_splits, num_kv_heads * slices, num_reqs), kSplitThreads threads:
// both branches of one (request, kv head, up to kMaxHeads query heads) over one chunk of
// the context, each row group of lanes over its own rows, partials to the workspace. Kernel 2, grid
// (num_heads, num_reqs): log-sum-exp merge of the splits and the gate, fp32 output.

#include <cuda_runtime.h>

#include "pod_decode.cuh"

namespace layershare {
namespace {

// The GPU side of a row group of LANES lanes (a warp, or half of one): a lane's state is
// its registers, sums are shuffles among the group's lanes.
template <int LANES>
struct DeviceGroup {
  static constexpr int kLanes = LANES;
  int id;  // row group index in the block

  template <typename S>
  struct Lanes {
    S one;
    __device__ __forceinline__ S& operator[](int) { return one; }
  };

  template <typename F>
  __device__ __forceinline__ void each(F&& section) const {
    section(static_cast<int>(threadIdx.x) % LANES);
  }

  // N floats at field(state) summed over the group's lanes, the sum left in every lane.
  // The mask names the group alone: the two halves of a warp may run different rows.
  template <int N, typename S, typename F>
  __device__ __forceinline__ void all_sum(Lanes<S>& lanes, F field) const {
    const unsigned mask = LANES == 32 ? 0xffffffffu : 0xffffu << (threadIdx.x & 16);
    float* x = field(lanes.one);
    LS_UNROLL
    for (int i = 0; i < N; ++i) {
      float v = x[i];
      LS_UNROLL
      for (int offset = LANES / 2; offset > 0; offset /= 2)
        v += __shfl_xor_sync(mask, v, offset);
      x[i] = v;
    }
  }
};

// The GPU side of blk.run() and blk.groups(): every thread (row group) runs the phase,
// then a barrier.
struct DeviceBlock {
  int nthreads;

  template <typename F>
  __device__ __forceinline__ void run(F&& phase) const {
    phase(static_cast<int>(threadIdx.x));
    __syncthreads();
  }

  template <int LANES, typename F>
  __device__ __forceinline__ void groups(F&& phase) const {
    phase(DeviceGroup<LANES>{static_cast<int>(threadIdx.x) / LANES});
    __syncthreads();
  }
};

// Split blocks a multiprocessor must be able to hold at once: ptxas caps the registers
// to fit. 1 leaves them free (Llama-3-8B's variant takes 164 on sm_90: 3 blocks); 4 caps
// them at 128 with a few spills. A build flag (-DLAYERSHARE_MIN_BLOCKS=4) until a GPU
// shows which is faster (benchmarks/kernels.py --cuda-define).
#ifndef LAYERSHARE_MIN_BLOCKS
#define LAYERSHARE_MIN_BLOCKS 1
#endif

template <typename T, bool VEC, int HEADS, int LANES>
__global__ void __launch_bounds__(kSplitThreads, LAYERSHARE_MIN_BLOCKS)
    pod_split_kernel(DecodeParams p, Paged<T> k_prox, Paged<T> v, Paged<T> k_distant,
                     Scores<T> scores) {
  extern __shared__ __align__(16) unsigned char smem[];
  const GroupStates gs =
      carve_group_states(smem, kSplitThreads / LANES, HEADS, p.head_dim_v);
  const DeviceBlock blk{static_cast<int>(blockDim.x)};
  pod_decode_split<T, VEC, HEADS, LANES>(blk, p, k_prox, v, k_distant, scores, gs, blockIdx.z,
                                         head_slice(p, HEADS, blockIdx.y), blockIdx.x);
}

__global__ void pod_merge_kernel(DecodeParams p) {
  const DeviceBlock blk{static_cast<int>(blockDim.x)};
  pod_decode_merge(blk, p, blockIdx.y, blockIdx.x);
}

template <typename T>
int launch(const DecodeParams& p, const LayersharePagedPart& k_prox, const LayersharePagedPart& v,
           const LayersharePagedPart* k_distant, const LayershareSharedScores* shared,
           cudaStream_t stream) {
  const Variant variant = variant_of<T>(p, k_prox, v, k_distant);
  // A leader has no distant keys: its distant ranges are empty, the struct is never read.
  const Paged<T> kd = p.reads_keys() ? make_paged<T>(*k_distant) : Paged<T>{};
  const Scores<T> sc = p.reads_scores ? make_scores<T>(*shared) : Scores<T>{};
  const dim3 grid(p.num_splits, p.num_kv_heads * variant.slices, p.num_reqs);
  // At most 8 groups x 8 heads x 130 floats (or 4 x 8 x 258): 33 KB, under the default 48.
  const size_t smem =
      split_smem_bytes(kSplitThreads / variant.lanes, variant.heads, p.head_dim_v);
  dispatch(variant, [&](auto shape) {
    using Sh = decltype(shape);
    pod_split_kernel<T, Sh::vec, Sh::heads, Sh::lanes><<<grid, kSplitThreads, smem, stream>>>(
        p, make_paged<T>(k_prox), make_paged<T>(v), kd, sc);
    return 0;
  });
  // Threads over channels of one head: a warp-rounded Dv, at most 256.
  const int merge_threads = p.head_dim_v >= 256 ? 256 : (p.head_dim_v + 31) / 32 * 32;
  pod_merge_kernel<<<dim3(p.num_heads, p.num_reqs), merge_threads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace layershare

extern "C" {

// Bytes of workspace one call needs: per (request, head, split, branch) Dv + 2 floats.
size_t layershare_pod_decode_workspace_bytes(int num_reqs, int num_heads, int head_dim_v,
                                             int num_splits) {
  return layershare::workspace_bytes(num_reqs, num_heads, head_dim_v, num_splits);
}

// PoD decode attention of num_reqs requests, one query token each, at position
// seq_lens[b] - 1, written to out[b, h, :Dv] (float32). q and q_distant are float32
// [num_reqs, num_heads, head_dim] with dense channels (q_distant may alias q; ignored
// without k_distant). k_prox, v, k_distant: paged parts in one cache dtype (`cache_dtype`,
// LAYERSHARE_F32/BF16/F16), head dims up to 256, read 16 bytes at a time where their
// base and strides allow. The distant branch weighs the layer's values by q_distant .
// k_distant, or, where `shared` is given (its cells not NULL; k_distant then NULL), by
// the leader's shared scores of this step (share `scores`: no keys read); both NULL = a
// leader or full-attention layer, which attends the proximal set alone (pass sink = 0
// and a huge recent for plain causal attention). gate_tau <= 0 turns the gate skip off. workspace:
// device memory of at least layershare_pod_decode_workspace_bytes(num_reqs, num_heads,
// head_dim_v, num_splits) bytes; nothing else is allocated, so the call can be captured
// in a CUDA graph (the part structs are read on the host at launch; every pointer in
// them and every other pointer is device memory). stream: a cudaStream_t (NULL: the
// default stream). Returns 0, a negative LAYERSHARE_* code for bad arguments, or the
// launch's cudaError_t.
int layershare_pod_decode(float* out, int64_t out_stride_req, int64_t out_stride_head,
                          const float* q, int64_t q_stride_req, int64_t q_stride_head,
                          const float* q_distant, int64_t qd_stride_req, int64_t qd_stride_head,
                          const LayersharePagedPart* k_prox, const LayersharePagedPart* v,
                          const LayersharePagedPart* k_distant,
                          const LayershareSharedScores* shared, int cache_dtype,
                          const int32_t* seq_lens, int num_reqs, int num_heads, int num_kv_heads,
                          int head_dim, int head_dim_v, float scale, int64_t sink,
                          int64_t recent, float gate_tau, int num_splits, void* workspace,
                          size_t workspace_size, void* stream) {
  using namespace layershare;
  const DecodeParams p = make_params(
      out, out_stride_req, out_stride_head, q, q_stride_req, q_stride_head, q_distant,
      qd_stride_req, qd_stride_head, k_distant, shared, seq_lens, num_reqs, num_heads,
      num_kv_heads, head_dim, head_dim_v, scale, sink, recent, gate_tau, num_splits, workspace);
  const int status = check_args(p, cache_dtype, workspace_size, k_prox, v, k_distant, shared);
  if (status != LAYERSHARE_OK) return status;
  if (num_reqs == 0) return LAYERSHARE_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (cache_dtype) {
    case LAYERSHARE_F32:
      return launch<float>(p, *k_prox, *v, k_distant, shared, s);
    case LAYERSHARE_BF16:
      return launch<bf16>(p, *k_prox, *v, k_distant, shared, s);
    default:
      return launch<fp16>(p, *k_prox, *v, k_distant, shared, s);
  }
}

}  // extern "C"
