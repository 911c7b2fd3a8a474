// Host build of the CUDA decode kernel's schedule, for tests/test_cuda_kernel.py (ctypes).
//
// It runs pod_decode.cuh's block functions, the ones pod_decode_cuda.cu launches, for
// every split block and every merge block, emulating the GPU: a row group's
// lane-parallel sections run lane 0..LANES-1 (or in reverse), its shuffle sums are the
// same butterfly over the lanes' copies of the state, the row groups of a block run one
// after another (or in reverse), and each block phase runs for thread 0..threads-1 (or
// in reverse), which is what the barrier after it guarantees on the GPU. Build: g++ -O2
// -std=c++17 -shared -fPIC pod_decode_host_test.cpp -o libpod_decode_host.so

#include <array>
#include <vector>

#include "pod_decode.cuh"

namespace {

using namespace layershare;

// The host side of a row group: one copy of the lane state per lane.
template <int LANES>
struct HostGroup {
  static constexpr int kLanes = LANES;
  int id;
  bool reverse;

  template <typename S>
  using Lanes = std::array<S, LANES>;

  template <typename F>
  void each(F&& section) const {
    for (int t = 0; t < LANES; ++t) section(reverse ? LANES - 1 - t : t);
  }

  // The GPU's xor butterfly: at each step lane l adds lane l ^ offset's value.
  template <int N, typename S, typename F>
  void all_sum(Lanes<S>& lanes, F field) const {
    for (int i = 0; i < N; ++i) {
      std::array<float, LANES> v, next;
      for (int l = 0; l < LANES; ++l) v[l] = field(lanes[l])[i];
      for (int offset = LANES / 2; offset > 0; offset /= 2) {
        for (int l = 0; l < LANES; ++l) next[l] = v[l] + v[l ^ offset];
        v = next;
      }
      for (int l = 0; l < LANES; ++l) field(lanes[l])[i] = v[l];
    }
  }
};

// The host side of blk.run() and blk.groups(): threads or row groups one after another.
struct HostBlock {
  int nthreads;
  bool reverse;

  template <typename F>
  void run(F&& phase) const {
    for (int t = 0; t < nthreads; ++t) phase(reverse ? nthreads - 1 - t : t);
  }

  template <int LANES, typename F>
  void groups(F&& phase) const {
    constexpr int kGroups = kSplitThreads / LANES;
    for (int w = 0; w < kGroups; ++w)
      phase(HostGroup<LANES>{reverse ? kGroups - 1 - w : w, reverse});
  }
};

template <typename T>
void run_all(const DecodeParams& p, const LayersharePagedPart& k_prox, const LayersharePagedPart& v,
             const LayersharePagedPart* k_distant, const LayershareSharedScores* shared,
             int threads, bool reverse, int* variant_out) {
  const Variant variant = variant_of<T>(p, k_prox, v, k_distant);
  if (variant_out) {
    variant_out[0] = variant.heads;
    variant_out[1] = variant.lanes;
    variant_out[2] = variant.vec;
    variant_out[3] = variant.slices;
  }
  const int groups = kSplitThreads / variant.lanes;
  std::vector<float> smem(split_smem_bytes(groups, variant.heads, p.head_dim_v) / sizeof(float));
  const GroupStates gs = carve_group_states(smem.data(), groups, variant.heads, p.head_dim_v);
  const Paged<T> kd = p.reads_keys() ? make_paged<T>(*k_distant) : Paged<T>{};
  const Scores<T> sc = p.reads_scores ? make_scores<T>(*shared) : Scores<T>{};
  const HostBlock blk{threads, reverse};
  dispatch(variant, [&](auto shape) {
    using Sh = decltype(shape);
    // Same block order as the grid's linear order; blocks are independent anyway.
    for (int b = 0; b < p.num_reqs; ++b)
      for (int y = 0; y < p.num_kv_heads * variant.slices; ++y)
        for (int split = 0; split < p.num_splits; ++split)
          pod_decode_split<T, Sh::vec, Sh::heads, Sh::lanes>(
              blk, p, make_paged<T>(k_prox), make_paged<T>(v), kd, sc, gs, b,
              head_slice(p, Sh::heads, y), split);
    return 0;
  });
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
// block phase and `reverse` != 0 to run each section's lanes, each block's row groups
// and each phase's threads last to first, instead of a stream; variant_out (may be
// NULL) receives the split kernel's variant: heads per block, lanes per row, 16-byte
// loads, blocks per kv head.
int layershare_pod_decode_host(float* out, int64_t out_stride_req, int64_t out_stride_head,
                               const float* q, int64_t q_stride_req, int64_t q_stride_head,
                               const float* q_distant, int64_t qd_stride_req,
                               int64_t qd_stride_head, const LayersharePagedPart* k_prox,
                               const LayersharePagedPart* v, const LayersharePagedPart* k_distant,
                               const LayershareSharedScores* shared, int cache_dtype,
                               const int32_t* seq_lens, int num_reqs, int num_heads,
                               int num_kv_heads, int head_dim, int head_dim_v,
                               float scale, int64_t sink, int64_t recent, float gate_tau,
                               int num_splits, void* workspace, size_t workspace_size,
                               int threads, int reverse, int* variant_out) {
  const DecodeParams p = make_params(
      out, out_stride_req, out_stride_head, q, q_stride_req, q_stride_head, q_distant,
      qd_stride_req, qd_stride_head, k_distant, shared, seq_lens, num_reqs, num_heads,
      num_kv_heads, head_dim, head_dim_v, scale, sink, recent, gate_tau, num_splits, workspace);
  const int status = check_args(p, cache_dtype, workspace_size, k_prox, v, k_distant, shared);
  if (status != LAYERSHARE_OK) return status;
  if (threads <= 0) return LAYERSHARE_BAD_ARGS;
  switch (cache_dtype) {
    case LAYERSHARE_F32:
      run_all<float>(p, *k_prox, *v, k_distant, shared, threads, reverse != 0, variant_out);
      break;
    case LAYERSHARE_BF16:
      run_all<bf16>(p, *k_prox, *v, k_distant, shared, threads, reverse != 0, variant_out);
      break;
    default:
      run_all<fp16>(p, *k_prox, *v, k_distant, shared, threads, reverse != 0, variant_out);
  }
  return LAYERSHARE_OK;
}

}  // extern "C"
