// PoD follower decode: the per-split math, shared by the CUDA kernels
// (pod_decode_cuda.cu) and the host test (pod_decode_host_test.cpp).
//
// One query token per request, at position i = seq_len - 1 (method.md):
//   proximal  P = [0, min(n_s, i+1)) U [max(n_s, i-n_r+1), i]   s = scale q . k_prox[j]
//   distant   D = [n_s, i-n_r]                                  s = scale q_distant . k_distant[j]
// both branches weight the layer's own values v[j]; per branch an online softmax gives
// (o, lse); g = sigmoid(lse_P - lse_D) (1 when D is empty), g = 1 where tau > 0 and
// g >= tau (gate skip), o = g o_P + (1-g) o_D. A leader (no k_distant) is the P branch
// alone; its caller passes n_s = 0, n_r = huge, which makes P every j <= i.
//
// Work split: the context [0, seq_len) is cut into num_splits equal chunks; one CUDA
// block per (request, kv head, split) runs both branches over its chunk for the G query
// heads of that kv head (each key/value row is loaded once and used G times), and writes
// per branch a partial (m, l, acc) to a workspace; a merge step combines the splits by
// log-sum-exp and applies the gate.
//
// Everything a block does is written as phases between barriers, `blk.run(f)`: on the
// GPU every thread runs f(threadIdx.x) then __syncthreads(); on the host the test runs
// f(t) for every emulated thread t, in forward or reverse order. Phases keep no state
// in registers across barriers (all of it is in the block's shared memory), so the host
// emulation is the kernel's exact schedule up to the order of threads inside a phase,
// and a race inside a phase shows up as a difference between the two orders.

#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define LS_HD __host__ __device__ __forceinline__
#else
#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#define LS_HD inline
#endif

extern "C" {

// One paged part of a layer's cache: entries of token `pos` of request `b` for kv head
// `h` start at data + block_table[b * table_stride + pos / block_size] * stride_block
// + h * stride_head + (pos % block_size) * stride_slot; channels are dense (stride 1).
typedef struct LayersharePagedPart {
  const void* data;            // cache base, already offset to the first channel (lo)
  int64_t stride_block;        // elements between cache blocks
  int64_t stride_head;         // elements between kv heads
  int64_t stride_slot;         // elements between token slots of one block
  const int32_t* block_table;  // [num_reqs, >= blocks of the request], int32
  int64_t table_stride;        // elements between block-table rows
  int32_t block_size;          // tokens per cache block
} LayersharePagedPart;

// Cache dtypes (k_prox, v and k_distant share one).
enum { LAYERSHARE_F32 = 0, LAYERSHARE_BF16 = 1, LAYERSHARE_F16 = 2 };

// Error codes returned by the launchers (a CUDA error is returned as its positive code).
enum {
  LAYERSHARE_OK = 0,
  LAYERSHARE_BAD_ARGS = -1,
  LAYERSHARE_BAD_DTYPE = -2,
  LAYERSHARE_SMALL_WORKSPACE = -3,
  LAYERSHARE_TOO_MUCH_SHARED = -4,
};

}  // extern "C"

namespace layershare {

constexpr int kTile = 32;           // key positions staged in shared memory at once
constexpr int kSplitThreads = 128;  // threads of one split block on the GPU
constexpr float kNegInf = -INFINITY;

// Storage-only 16-bit types: only converted to float, so host and device agree.
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

LS_HD float bits_as_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

LS_HD float to_float(float x) { return x; }
LS_HD float to_float(bf16 x) { return bits_as_float(static_cast<uint32_t>(x.bits) << 16); }
LS_HD float to_float(fp16 x) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(x.bits));
#else
  // IEEE half -> float by fields; subnormal halves are mant * 2^-24, exactly a float.
  const uint32_t sign = static_cast<uint32_t>(x.bits >> 15) << 31;
  const uint32_t exp = (x.bits >> 10) & 0x1f, mant = x.bits & 0x3ff;
  if (exp == 0) {
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_as_float(sign | 0x7f800000u | (mant << 13));
  return bits_as_float(sign | ((exp + 112) << 23) | (mant << 13));
#endif
}

// Half-open token range [begin, end); empty when end <= begin.
struct Range {
  int64_t begin, end;
};

LS_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
LS_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
LS_HD Range intersect(Range a, Range b) { return {max64(a.begin, b.begin), min64(a.end, b.end)}; }

// The token ranges a query at position i reads (method.md "Definitions").
struct PodRanges {
  Range sinks, window, distant;
};

LS_HD PodRanges pod_ranges(int64_t i, int64_t sink, int64_t recent, bool has_distant) {
  PodRanges r;
  r.sinks = {0, min64(sink, i + 1)};
  r.window = {max64(sink, i - recent + 1), i + 1};  // starts at or after the sinks' end
  // Without the leader's keys there is no distant branch (a leader: all of it is P).
  r.distant = has_distant ? Range{sink, i - recent + 1} : Range{0, 0};
  return r;
}

// Chunk `split` of the context [0, len): equal chunks, trailing ones may be empty.
LS_HD Range split_chunk(int64_t len, int num_splits, int split) {
  const int64_t chunk = (len + num_splits - 1) / num_splits;
  return {min64(len, split * chunk), min64(len, (split + 1) * chunk)};
}

// A paged part with its element type.
template <typename T>
struct Paged {
  const T* data;
  int64_t s_block, s_head, s_slot;
  const int32_t* table;
  int64_t table_stride;
  int64_t block_size;

  // Element offset of the row of token `pos`: the page walk, one table read per token.
  LS_HD int64_t offset(int b, int head, int64_t pos) const {
    const int64_t block = table[b * table_stride + pos / block_size];
    return block * s_block + head * s_head + (pos % block_size) * s_slot;
  }
};

template <typename T>
inline Paged<T> make_paged(const LayersharePagedPart& p) {
  return {static_cast<const T*>(p.data), p.stride_block, p.stride_head, p.stride_slot,
          p.block_table, p.table_stride, p.block_size};
}

// The launcher's arguments that every block reads.
struct DecodeParams {
  float* out;
  int64_t out_s_req, out_s_head;
  const float* q;
  int64_t q_s_req, q_s_head;
  const float* qd;  // q_distant; unused without a distant branch
  int64_t qd_s_req, qd_s_head;
  const int32_t* seq_lens;
  int num_reqs, num_heads, num_kv_heads, head_dim, head_dim_v;
  float scale;
  int64_t sink, recent;
  float gate_tau;
  int num_splits;
  bool has_distant;
  float* workspace;
};

// Workspace: per (request, query head, split, branch) a partial accumulator acc[Dv]
// (unnormalised sum of p_j v_j), its running max m and its sum l.
struct Workspace {
  float* base;
  int num_reqs, num_heads, num_splits, head_dim_v;

  LS_HD size_t slots() const { return static_cast<size_t>(num_reqs) * num_heads * num_splits * 2; }
  LS_HD size_t slot(int b, int h, int split, int branch) const {
    return ((static_cast<size_t>(b) * num_heads + h) * num_splits + split) * 2 + branch;
  }
  LS_HD float* acc(int b, int h, int split, int branch) const {
    return base + slot(b, h, split, branch) * head_dim_v;
  }
  LS_HD float* m(int b, int h, int split, int branch) const {
    return base + slots() * head_dim_v + slot(b, h, split, branch);
  }
  LS_HD float* l(int b, int h, int split, int branch) const {
    return base + slots() * (head_dim_v + 1) + slot(b, h, split, branch);
  }
};

LS_HD size_t workspace_bytes(int num_reqs, int num_heads, int head_dim_v, int num_splits) {
  return sizeof(float) * static_cast<size_t>(num_reqs) * num_heads * num_splits * 2 *
         (head_dim_v + 2);
}

LS_HD Workspace workspace_of(const DecodeParams& p) {
  return {p.workspace, p.num_reqs, p.num_heads, p.num_splits, p.head_dim_v};
}

// Shared memory of one split block: the G queries of both branches, one tile of keys
// and values as fp32, the tile's logits, and the running softmax state of each head.
struct SplitSmem {
  int64_t* k_row;  // [kTile] element offsets of the tile's key rows
  int64_t* v_row;  // [kTile] element offsets of the tile's value rows
  float* q;        // [G][D] this layer's queries, pre-scaled
  float* qd;       // [G][D] distant queries, pre-scaled
  float* k;        // [kTile][D + 1] (+1: consecutive rows fall in different banks)
  float* v;        // [kTile][Dv]
  float* s;        // [G][kTile] logits, then probabilities
  float* acc;      // [G][Dv]
  float* m;        // [G] running max
  float* l;        // [G] running sum of exp(s - m)
  float* corr;     // [G] this tile's rescale of acc: exp(m_old - m_new)
};

LS_HD size_t split_smem_floats(int G, int D, int Dv) {
  return static_cast<size_t>(2) * G * D + kTile * (D + 1) + kTile * Dv + G * kTile + G * Dv + 3 * G;
}

LS_HD size_t split_smem_bytes(int G, int D, int Dv) {
  return 2 * kTile * sizeof(int64_t) + split_smem_floats(G, D, Dv) * sizeof(float);
}

LS_HD SplitSmem carve_split_smem(void* base, int G, int D, int Dv) {
  SplitSmem sh;
  sh.k_row = static_cast<int64_t*>(base);  // 8-byte entries first keep them aligned
  sh.v_row = sh.k_row + kTile;
  sh.q = reinterpret_cast<float*>(sh.v_row + kTile);
  sh.qd = sh.q + G * D;
  sh.k = sh.qd + G * D;
  sh.v = sh.k + kTile * (D + 1);
  sh.s = sh.v + kTile * Dv;
  sh.acc = sh.s + G * kTile;
  sh.m = sh.acc + G * Dv;
  sh.l = sh.m + G;
  sh.corr = sh.l + G;
  return sh;
}

LS_HD float dot(const float* a, const float* b, int n) {
  float sum = 0.f;
  for (int c = 0; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

// One online-softmax step of one head over a tile's logits s[0..count): turns them into
// exp(s - m_new) in place, updates (m, l), and returns in corr the factor exp(m_old -
// m_new) by which the accumulator must be rescaled.
LS_HD void online_softmax_step(float& m, float& l, float& corr, float* s, int count) {
  float tile_max = kNegInf;
  for (int t = 0; t < count; ++t) tile_max = fmaxf(tile_max, s[t]);
  const float m_new = fmaxf(m, tile_max);
  if (m_new == kNegInf) {  // nothing seen yet and an empty tile: state stays empty
    corr = 1.f;
    for (int t = 0; t < count; ++t) s[t] = 0.f;
    return;
  }
  corr = expf(m - m_new);  // m = -inf (first tile) gives 0
  float sum = 0.f;
  for (int t = 0; t < count; ++t) {
    s[t] = expf(s[t] - m_new);
    sum += s[t];
  }
  l = l * corr + sum;
  m = m_new;
}

// acc * corr + sum_t p[t] v[t][d] for one channel d of one head.
LS_HD float accumulate_channel(float acc, float corr, const float* p, const float* v_col,
                               int Dv, int count) {
  acc *= corr;
  for (int t = 0; t < count; ++t) acc += p[t] * v_col[t * Dv];
  return acc;
}

// Runs one branch's online softmax over the positions `range` of request b, kv head
// kvh: the block's state (acc, m, l) in shared memory is updated, not reset.
template <typename T, typename Block>
LS_HD void attend_range(const Block& blk, const DecodeParams& p, const SplitSmem& sh,
                        const Paged<T>& keys, const Paged<T>& vals, const float* q_sh, int b,
                        int kvh, Range range) {
  const int n = blk.nthreads;
  const int G = p.num_heads / p.num_kv_heads, D = p.head_dim, Dv = p.head_dim_v;
  const int KS = D + 1;  // row stride of the staged keys
  for (int64_t t0 = range.begin; t0 < range.end; t0 += kTile) {
    const int nt = static_cast<int>(min64(kTile, range.end - t0));
    // Page walk: the row offsets of the tile's tokens, one block-table read each.
    blk.run([&](int tid) {
      for (int t = tid; t < nt; t += n) {
        sh.k_row[t] = keys.offset(b, kvh, t0 + t);
        sh.v_row[t] = vals.offset(b, kvh, t0 + t);
      }
    });
    // Stage keys and values as fp32; adjacent threads read adjacent channels (coalesced).
    blk.run([&](int tid) {
      for (int x = tid; x < nt * D; x += n)
        sh.k[(x / D) * KS + x % D] = to_float(keys.data[sh.k_row[x / D] + x % D]);
      for (int x = tid; x < nt * Dv; x += n)
        sh.v[x] = to_float(vals.data[sh.v_row[x / Dv] + x % Dv]);
    });
    // Logits of every (head, token) pair; padding tokens get -inf.
    blk.run([&](int tid) {
      for (int x = tid; x < G * kTile; x += n) {
        const int g = x / kTile, t = x % kTile;
        sh.s[x] = t < nt ? dot(q_sh + g * D, sh.k + t * KS, D) : kNegInf;
      }
    });
    blk.run([&](int tid) {
      for (int g = tid; g < G; g += n)
        online_softmax_step(sh.m[g], sh.l[g], sh.corr[g], sh.s + g * kTile, nt);
    });
    blk.run([&](int tid) {
      for (int x = tid; x < G * Dv; x += n) {
        const int g = x / Dv, d = x % Dv;
        sh.acc[x] = accumulate_channel(sh.acc[x], sh.corr[g], sh.s + g * kTile, sh.v + d, Dv, nt);
      }
    });
  }
}

// Writes the block's state as branch `branch` of split `split` and resets it.
template <typename Block>
LS_HD void flush_partial(const Block& blk, const DecodeParams& p, const SplitSmem& sh, int b,
                         int kvh, int split, int branch) {
  const int n = blk.nthreads;
  const int G = p.num_heads / p.num_kv_heads, Dv = p.head_dim_v;
  const Workspace ws = workspace_of(p);
  blk.run([&](int tid) {
    for (int x = tid; x < G * Dv; x += n) {
      ws.acc(b, kvh * G + x / Dv, split, branch)[x % Dv] = sh.acc[x];
      sh.acc[x] = 0.f;
    }
    for (int g = tid; g < G; g += n) {
      *ws.m(b, kvh * G + g, split, branch) = sh.m[g];
      *ws.l(b, kvh * G + g, split, branch) = sh.l[g];
      sh.m[g] = kNegInf;
      sh.l[g] = 0.f;
    }
  });
}

// The work of one block: both branches of request b, kv head kvh over chunk `split`.
template <typename T, typename Block>
LS_HD void pod_decode_split(const Block& blk, const DecodeParams& p, const Paged<T>& k_prox,
                            const Paged<T>& v, const Paged<T>& k_distant, const SplitSmem& sh,
                            int b, int kvh, int split) {
  const int n = blk.nthreads;
  const int G = p.num_heads / p.num_kv_heads, D = p.head_dim, Dv = p.head_dim_v;
  const int64_t len = max64(p.seq_lens[b], 0);  // 0: a padded batch entry, reads nothing
  const Range chunk = split_chunk(len, p.num_splits, split);
  const PodRanges r = pod_ranges(len - 1, p.sink, p.recent, p.has_distant);

  // Queries of the G heads (scale folded in) and an empty softmax state.
  blk.run([&](int tid) {
    for (int x = tid; x < G * D; x += n) {
      const int h = kvh * G + x / D, c = x % D;
      sh.q[x] = p.scale * p.q[b * p.q_s_req + h * p.q_s_head + c];
      if (p.has_distant) sh.qd[x] = p.scale * p.qd[b * p.qd_s_req + h * p.qd_s_head + c];
    }
    for (int x = tid; x < G * Dv; x += n) sh.acc[x] = 0.f;
    for (int g = tid; g < G; g += n) {
      sh.m[g] = kNegInf;
      sh.l[g] = 0.f;
    }
  });
  // Proximal branch: own keys over the sinks, then the recent window.
  attend_range(blk, p, sh, k_prox, v, sh.q, b, kvh, intersect(r.sinks, chunk));
  attend_range(blk, p, sh, k_prox, v, sh.q, b, kvh, intersect(r.window, chunk));
  flush_partial(blk, p, sh, b, kvh, split, 0);
  // Distant branch: the leader's keys, own values (empty for a leader).
  attend_range(blk, p, sh, k_distant, v, sh.qd, b, kvh, intersect(r.distant, chunk));
  flush_partial(blk, p, sh, b, kvh, split, 1);
}

// A branch's totals over the splits: M = max_s m_s and L = sum_s l_s exp(m_s - M), so
// lse = M + log L; L = 0 when the branch saw no token.
struct BranchTotal {
  float max, sum;
};

LS_HD BranchTotal combine_splits(const Workspace& ws, int b, int h, int branch) {
  BranchTotal t = {kNegInf, 0.f};
  for (int s = 0; s < ws.num_splits; ++s) t.max = fmaxf(t.max, *ws.m(b, h, s, branch));
  if (t.max == kNegInf) return t;
  for (int s = 0; s < ws.num_splits; ++s)
    t.sum += *ws.l(b, h, s, branch) * expf(*ws.m(b, h, s, branch) - t.max);
  return t;
}

// The gate g = sigmoid(lse_P - lse_D): 1 without distant tokens, 1 where tau > 0 and
// g >= tau (gate skip).
LS_HD float pod_gate(BranchTotal prox, BranchTotal dist, float tau) {
  if (dist.sum <= 0.f) return 1.f;
  if (prox.sum <= 0.f) return 0.f;
  const float lse_p = prox.max + logf(prox.sum), lse_d = dist.max + logf(dist.sum);
  float g = 1.f / (1.f + expf(lse_d - lse_p));
  if (tau > 0.f && g >= tau) g = 1.f;
  return g;
}

// Weight of split s's accumulator in a branch's normalised output: exp(m_s - M) / L.
LS_HD float split_weight(const Workspace& ws, BranchTotal t, int b, int h, int s, int branch) {
  if (t.sum <= 0.f) return 0.f;
  const float m = *ws.m(b, h, s, branch);
  return m == kNegInf ? 0.f : expf(m - t.max) / t.sum;
}

// Merge step of request b, query head h: o[d] = g o_P[d] + (1 - g) o_D[d], one phase,
// threads over channels (every thread recomputes the few per-split weights).
template <typename Block>
LS_HD void pod_decode_merge(const Block& blk, const DecodeParams& p, int b, int h) {
  const int n = blk.nthreads, Dv = p.head_dim_v;
  const Workspace ws = workspace_of(p);
  blk.run([&](int tid) {
    const BranchTotal prox = combine_splits(ws, b, h, 0), dist = combine_splits(ws, b, h, 1);
    const float g = pod_gate(prox, dist, p.gate_tau);
    float* o = p.out + b * p.out_s_req + h * p.out_s_head;
    for (int d = tid; d < Dv; d += n) {
      float op = 0.f, od = 0.f;
      for (int s = 0; s < ws.num_splits; ++s) {
        op += split_weight(ws, prox, b, h, s, 0) * ws.acc(b, h, s, 0)[d];
        if (g < 1.f) od += split_weight(ws, dist, b, h, s, 1) * ws.acc(b, h, s, 1)[d];
      }
      o[d] = g * op + (1.f - g) * od;
    }
  });
}

inline bool part_ok(const LayersharePagedPart* part) {
  return part && part->data && part->block_table && part->block_size > 0;
}

// Argument checks shared by the launchers (the CUDA one and the host test's); 0 when the
// call can run.
inline int check_args(const DecodeParams& p, int cache_dtype, size_t workspace_size,
                      const LayersharePagedPart* k_prox, const LayersharePagedPart* v,
                      const LayersharePagedPart* k_distant) {
  if (p.num_reqs < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 ||
      p.num_heads % p.num_kv_heads != 0 || p.head_dim <= 0 || p.head_dim_v <= 0 ||
      p.num_splits <= 0 || p.sink < 0 || p.recent < 0 || !p.out || !p.q || !p.seq_lens ||
      (p.has_distant && !p.qd))
    return LAYERSHARE_BAD_ARGS;
  if (!part_ok(k_prox) || !part_ok(v) || (p.has_distant && !part_ok(k_distant)))
    return LAYERSHARE_BAD_ARGS;
  if (p.num_kv_heads > 65535 || p.num_reqs > 65535) return LAYERSHARE_BAD_ARGS;  // grid y, z
  if (cache_dtype != LAYERSHARE_F32 && cache_dtype != LAYERSHARE_BF16 &&
      cache_dtype != LAYERSHARE_F16)
    return LAYERSHARE_BAD_DTYPE;
  if (workspace_size < workspace_bytes(p.num_reqs, p.num_heads, p.head_dim_v, p.num_splits) ||
      (p.num_reqs > 0 && !p.workspace))
    return LAYERSHARE_SMALL_WORKSPACE;
  return LAYERSHARE_OK;
}

// The launcher's flat arguments as DecodeParams (has_distant: k_distant given).
inline DecodeParams make_params(float* out, int64_t out_s_req, int64_t out_s_head, const float* q,
                                int64_t q_s_req, int64_t q_s_head, const float* q_distant,
                                int64_t qd_s_req, int64_t qd_s_head, bool has_distant,
                                const int32_t* seq_lens, int num_reqs, int num_heads,
                                int num_kv_heads, int head_dim, int head_dim_v, float scale,
                                int64_t sink, int64_t recent, float gate_tau, int num_splits,
                                void* workspace) {
  DecodeParams p;
  p.out = out;
  p.out_s_req = out_s_req;
  p.out_s_head = out_s_head;
  p.q = q;
  p.q_s_req = q_s_req;
  p.q_s_head = q_s_head;
  p.qd = q_distant;
  p.qd_s_req = qd_s_req;
  p.qd_s_head = qd_s_head;
  p.seq_lens = seq_lens;
  p.num_reqs = num_reqs;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.head_dim_v = head_dim_v;
  p.scale = scale;
  p.sink = sink;
  p.recent = recent;
  p.gate_tau = gate_tau;
  p.num_splits = num_splits;
  p.has_distant = has_distant;
  p.workspace = static_cast<float*>(workspace);
  return p;
}

}  // namespace layershare
