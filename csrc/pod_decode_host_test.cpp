// Host build of the CUDA decode kernel's schedule, for tests/test_cuda_kernel.py (ctypes).
//
// It runs pod_decode.cuh's block functions, the ones pod_decode_cuda.cu launches, for
// every (request, kv head, split) block and every merge block, emulating a block of
// `threads` threads: each phase runs for thread 0..threads-1 (or in reverse order), which
// is what the barrier after it guarantees on the GPU. Build: g++ -O2 -std=c++17 -shared
// -fPIC pod_decode_host_test.cpp -o libpod_decode_host.so

#include <vector>

#include "pod_decode.cuh"

namespace {

using namespace layershare;

// The host side of blk.run(): the emulated threads one after another.
struct HostBlock {
  int nthreads;
  bool reverse;
  template <typename F>
  void run(F&& phase) const {
    for (int t = 0; t < nthreads; ++t) phase(reverse ? nthreads - 1 - t : t);
  }
};

template <typename T>
void run_all(const DecodeParams& p, const LayersharePagedPart& k_prox, const LayersharePagedPart& v,
             const LayersharePagedPart* k_distant, int threads, bool reverse) {
  const int G = p.num_heads / p.num_kv_heads;
  // Bytes as the kernel's dynamic shared memory, in 8-byte units for its alignment.
  std::vector<int64_t> smem((split_smem_bytes(G, p.head_dim, p.head_dim_v) + 7) / 8);
  const SplitSmem sh = carve_split_smem(smem.data(), G, p.head_dim, p.head_dim_v);
  const Paged<T> kd = p.has_distant ? make_paged<T>(*k_distant) : Paged<T>{};
  const HostBlock blk{threads, reverse};
  // Same block order as the grid's linear order; blocks are independent anyway.
  for (int b = 0; b < p.num_reqs; ++b)
    for (int kvh = 0; kvh < p.num_kv_heads; ++kvh)
      for (int split = 0; split < p.num_splits; ++split)
        pod_decode_split<T>(blk, p, make_paged<T>(k_prox), make_paged<T>(v), kd, sh, b, kvh,
                            split);
  for (int b = 0; b < p.num_reqs; ++b)
    for (int h = 0; h < p.num_heads; ++h) pod_decode_merge(blk, p, b, h);
}

}  // namespace

extern "C" {

size_t layershare_pod_decode_workspace_bytes(int num_reqs, int num_heads, int head_dim_v,
                                             int num_splits) {
  return layershare::workspace_bytes(num_reqs, num_heads, head_dim_v, num_splits);
}

// layershare_pod_decode's arguments, with host pointers, `threads` emulated threads per
// block and `reverse` != 0 to run each phase's threads last to first, instead of a stream.
int layershare_pod_decode_host(float* out, int64_t out_stride_req, int64_t out_stride_head,
                               const float* q, int64_t q_stride_req, int64_t q_stride_head,
                               const float* q_distant, int64_t qd_stride_req,
                               int64_t qd_stride_head, const LayersharePagedPart* k_prox,
                               const LayersharePagedPart* v, const LayersharePagedPart* k_distant,
                               int cache_dtype, const int32_t* seq_lens, int num_reqs,
                               int num_heads, int num_kv_heads, int head_dim, int head_dim_v,
                               float scale, int64_t sink, int64_t recent, float gate_tau,
                               int num_splits, void* workspace, size_t workspace_size,
                               int threads, int reverse) {
  const bool has_distant = k_distant && k_distant->data;
  const DecodeParams p = make_params(
      out, out_stride_req, out_stride_head, q, q_stride_req, q_stride_head, q_distant,
      qd_stride_req, qd_stride_head, has_distant, seq_lens, num_reqs, num_heads, num_kv_heads,
      head_dim, head_dim_v, scale, sink, recent, gate_tau, num_splits, workspace);
  const int status = check_args(p, cache_dtype, workspace_size, k_prox, v, k_distant);
  if (status != LAYERSHARE_OK) return status;
  if (threads <= 0) return LAYERSHARE_BAD_ARGS;
  switch (cache_dtype) {
    case LAYERSHARE_F32:
      run_all<float>(p, *k_prox, *v, k_distant, threads, reverse != 0);
      break;
    case LAYERSHARE_BF16:
      run_all<bf16>(p, *k_prox, *v, k_distant, threads, reverse != 0);
      break;
    default:
      run_all<fp16>(p, *k_prox, *v, k_distant, threads, reverse != 0);
  }
  return LAYERSHARE_OK;
}

}  // extern "C"
