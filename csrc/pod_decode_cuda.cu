// PoD decode attention on CUDA: one query token per request (see pod_decode.cuh for the
// math, which this file only schedules). Self-contained: no torch headers, so it builds
// with plain nvcc; a torch binding can wrap layershare_pod_decode later.
//
// Kernel 1, grid (num_splits, num_kv_heads, num_reqs), kSplitThreads threads: both
// branches of one (request, kv head) over one chunk of the context, partials to the
// workspace. Kernel 2, grid (num_heads, num_reqs): log-sum-exp merge of the splits and
// the gate, fp32 output.

#include <cuda_runtime.h>

#include "pod_decode.cuh"

namespace layershare {
namespace {

// The GPU side of blk.run(): every thread runs the phase, then a barrier.
struct DeviceBlock {
  int nthreads;
  template <typename F>
  __device__ __forceinline__ void run(F&& phase) const {
    phase(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
};

template <typename T>
__global__ void __launch_bounds__(kSplitThreads)
    pod_split_kernel(DecodeParams p, Paged<T> k_prox, Paged<T> v, Paged<T> k_distant) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int G = p.num_heads / p.num_kv_heads;
  const SplitSmem sh = carve_split_smem(smem, G, p.head_dim, p.head_dim_v);
  const DeviceBlock blk{static_cast<int>(blockDim.x)};
  pod_decode_split<T>(blk, p, k_prox, v, k_distant, sh, blockIdx.z, blockIdx.y, blockIdx.x);
}

__global__ void pod_merge_kernel(DecodeParams p) {
  const DeviceBlock blk{static_cast<int>(blockDim.x)};
  pod_decode_merge(blk, p, blockIdx.y, blockIdx.x);
}

// Raises the kernel's dynamic shared memory limit when a call needs more than 48 KiB
// (the default); remembered per instantiation so steady-state launches skip it.
// Returns 0, LAYERSHARE_TOO_MUCH_SHARED, or a CUDA error.
template <typename T>
int allow_shared(size_t bytes) {
  static size_t allowed = 48 * 1024;
  if (bytes <= allowed) return LAYERSHARE_OK;
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (bytes > static_cast<size_t>(optin)) return LAYERSHARE_TOO_MUCH_SHARED;
  err = cudaFuncSetAttribute(pod_split_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes));
  if (err == cudaSuccess) allowed = bytes;
  return static_cast<int>(err);
}

template <typename T>
int launch(const DecodeParams& p, const LayersharePagedPart& k_prox, const LayersharePagedPart& v,
           const LayersharePagedPart* k_distant, cudaStream_t stream) {
  const int G = p.num_heads / p.num_kv_heads;
  const size_t smem = split_smem_bytes(G, p.head_dim, p.head_dim_v);
  const int status = allow_shared<T>(smem);
  if (status != LAYERSHARE_OK) {
    cudaGetLastError();  // a failed query must not surface at a later launch's check
    return status;
  }
  // A leader has no distant keys: its distant ranges are empty, the struct is never read.
  const Paged<T> kd = p.has_distant ? make_paged<T>(*k_distant) : Paged<T>{};
  const dim3 split_grid(p.num_splits, p.num_kv_heads, p.num_reqs);
  pod_split_kernel<T><<<split_grid, kSplitThreads, smem, stream>>>(
      p, make_paged<T>(k_prox), make_paged<T>(v), kd);
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
// LAYERSHARE_F32/BF16/F16); k_distant NULL (or its data NULL) = a leader or
// full-attention layer, which attends the proximal set alone (pass sink = 0 and a huge
// recent for plain causal attention). gate_tau <= 0 turns the gate skip off. workspace:
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
                          const LayersharePagedPart* k_distant, int cache_dtype,
                          const int32_t* seq_lens, int num_reqs, int num_heads, int num_kv_heads,
                          int head_dim, int head_dim_v, float scale, int64_t sink,
                          int64_t recent, float gate_tau, int num_splits, void* workspace,
                          size_t workspace_size, void* stream) {
  using namespace layershare;
  const bool has_distant = k_distant && k_distant->data;
  const DecodeParams p = make_params(
      out, out_stride_req, out_stride_head, q, q_stride_req, q_stride_head, q_distant,
      qd_stride_req, qd_stride_head, has_distant, seq_lens, num_reqs, num_heads, num_kv_heads,
      head_dim, head_dim_v, scale, sink, recent, gate_tau, num_splits, workspace);
  const int status = check_args(p, cache_dtype, workspace_size, k_prox, v, k_distant);
  if (status != LAYERSHARE_OK) return status;
  if (num_reqs == 0) return LAYERSHARE_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (cache_dtype) {
    case LAYERSHARE_F32:
      return launch<float>(p, *k_prox, *v, k_distant, s);
    case LAYERSHARE_BF16:
      return launch<bf16>(p, *k_prox, *v, k_distant, s);
    default:
      return launch<fp16>(p, *k_prox, *v, k_distant, s);
  }
}

}  // extern "C"
