// PoD follower decode: the per-split math, shared by the CUDA kernels
// (pod_decode_cuda.cu) and the host test (pod_decode_host_test.cpp).
//
// One query token per request, at position i = seq_len - 1 (method.md):
//   proximal  P = [0, min(n_s, i+1)) U [max(n_s, i-n_r+1), i]   s = scale q . k_prox[j]
//   distant   D = [n_s, i-n_r]                                  s = scale q_distant . k_distant[j]
// (or, share `scores`, s = log(term) + t from the leader's shared scores, no keys read);
// both branches weight the layer's own values v[j]; per branch an online softmax gives
// (o, lse); g = sigmoid(lse_P - lse_D) (1 when D is empty), g = 1 where tau > 0 and
// g >= tau (gate skip), o = g o_P + (1-g) o_D. A leader (no k_distant) is the P branch
// alone; its caller passes n_s = 0, n_r = huge, which makes P every j <= i.
//
// Work split: the context [0, seq_len) is cut into num_splits equal chunks; one CUDA
// block per (request, kv head, split) runs both branches over its chunk for up to
// kMaxHeads query heads of that kv head (each key/value row is loaded once and used for
// all of them; a wider group takes several blocks), and writes per branch a partial
// (m, l, acc) to a workspace; a merge step combines the splits by log-sum-exp and
// applies the gate.
//
// Inside a split block the rows of the chunk go to row groups of LANES lanes (16 for
// head dims up to 128, so a warp holds two groups; 32 up to 256), kRows at a time; each
// group keeps its own online softmax in registers: a lane holds kChannels channels of
// every row, query and accumulator (a 16-byte load of a bf16 row), and a logit is the
// group's sum of its lanes' partial dot products (a butterfly of shuffles). At the end
// the groups' states meet in shared memory and one phase combines them.
//
// The code is written so that the host can run the kernel's exact arithmetic: a row
// group's work is lane-parallel sections, `grp.each(f)`, whose lanes touch only their
// own state (`Lanes<S>`: registers on the GPU, one S per lane on the host), between
// collective steps (`grp.all_sum`); a block's work is phases between barriers,
// `blk.run(f)` (every thread runs f(threadIdx.x), then __syncthreads()) and
// `blk.groups<LANES>(f)` (every row group runs f, then a barrier). The host runs lanes,
// threads and groups one after another, forward or in reverse, so a lane or thread that
// reads another's data inside a section shows up as a difference between the orders.

#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define LS_HD __host__ __device__ __forceinline__
#define LS_UNROLL _Pragma("unroll")
#else
#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#define LS_HD inline
#define LS_UNROLL
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

// A leader's shared decode scores (vllm_layershare/attention/paged.py SharedScores, as
// triton_paged._shared_at reads them): float32 cells [pages, kv heads, cell floats]; for
// query head g of kv head h's group, the term e^(scale s_n - t) of position n sits in
// page block_table[n / block_size], cell h, at g * block_size + n % block_size in the
// cache dtype, and t, the log-sum-exp of n's tile of `tile` positions (tiles start at
// multiples of it), is the float at lse_first + (start % block_size) / tile * G + g in
// the cell of the page of the tile's start. block_size and tile: powers of two.
typedef struct LayershareSharedScores {
  const void* cells;           // float32 cells
  int64_t stride_page;         // floats between pages
  int64_t stride_head;         // floats between kv heads
  int64_t lse_first;           // float of a cell where the tiles' t begin
  const int32_t* block_table;  // [num_reqs, >= pages of the request], int32
  int64_t table_stride;        // elements between block-table rows
  int32_t block_size;          // tokens per page
  int32_t tile;                // positions per tile of the leader's pass
} LayershareSharedScores;

// Cache dtypes (k_prox, v and k_distant share one).
enum { LAYERSHARE_F32 = 0, LAYERSHARE_BF16 = 1, LAYERSHARE_F16 = 2 };

// Error codes returned by the launchers (a CUDA error is returned as its positive code).
enum {
  LAYERSHARE_OK = 0,
  LAYERSHARE_BAD_ARGS = -1,
  LAYERSHARE_BAD_DTYPE = -2,
  LAYERSHARE_SMALL_WORKSPACE = -3,
};

}  // extern "C"

namespace layershare {

constexpr int kSplitThreads = 128;  // threads of one split block
constexpr int kChannels = 8;        // channels a lane holds of each row, query, output
constexpr int kRows = 2;            // rows a row group has in flight per step
constexpr int kMaxHeads = 8;        // query heads one split block serves
constexpr int kMaxChannels = 32 * kChannels;  // head dims the lanes cover: 256
constexpr float kStaleMax = 8.f;    // nats a row may pass the running maximum by
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
  int32_t block_size;
  int32_t shift;  // log2(block_size) for a power of two (vLLM's pages), else -1

  // Element offset of the row of token `pos` (< 2^31): the page walk, one table read;
  // a power-of-two page size takes a shift and a mask, not a division.
  LS_HD int64_t offset(int b, int head, int32_t pos) const {
    const int32_t page = shift >= 0 ? pos >> shift : pos / block_size;
    const int32_t slot = shift >= 0 ? pos & (block_size - 1) : pos % block_size;
    const int64_t block = table[b * table_stride + page];
    return block * s_block + head * s_head + slot * s_slot;
  }
};

inline int32_t log2_if_power_of_two(int32_t n) {
  if (n <= 0 || (n & (n - 1)) != 0) return -1;
  int32_t shift = 0;
  while ((1 << shift) < n) ++shift;
  return shift;
}

template <typename T>
inline Paged<T> make_paged(const LayersharePagedPart& p) {
  return {static_cast<const T*>(p.data), p.stride_block, p.stride_head, p.stride_slot,
          p.block_table, p.table_stride, p.block_size, log2_if_power_of_two(p.block_size)};
}

// One position's shared scores: query head g's term at term[g * stride], its tile's
// log-sum-exp at lse[g].
template <typename T>
struct ScoreRow {
  const T* term;
  const float* lse;
  int32_t stride;

  // The leader's scale s_n for query head g of the group: log(term) + t (-inf where
  // the term is 0).
  LS_HD float logit(int g) const {
    const float x = to_float(term[g * stride]);
    return x > 0.f ? logf(x) + lse[g] : kNegInf;
  }
};

// A shared-scores cache with the terms' element type (every size a power of two).
template <typename T>
struct Scores {
  const T* terms;     // the cells seen as T
  const float* lse;   // the cells as floats
  int64_t s_page, s_head;  // floats
  int64_t lse_first;
  const int32_t* table;
  int64_t table_stride;
  int32_t page_shift, tile;

  // Position pos of request b, kv head kvh's group of G from query head first_head on:
  // the page walks for its term and its tile's log-sum-exp, once for all heads.
  LS_HD ScoreRow<T> row(int b, int kvh, int G, int first_head, int32_t pos) const {
    constexpr int per_float = 4 / static_cast<int>(sizeof(T));
    const int32_t size = 1 << page_shift, start = pos & ~(tile - 1);
    const int32_t* pages = table + b * table_stride;
    const int64_t cell = static_cast<int64_t>(pages[pos >> page_shift]) * s_page + kvh * s_head;
    const int64_t first =
        static_cast<int64_t>(pages[start >> page_shift]) * s_page + kvh * s_head;
    return {terms + cell * per_float + first_head * size + (pos & (size - 1)),
            lse + first + lse_first + (start & (size - 1)) / tile * G + first_head, size};
  }
};

template <typename T>
inline Scores<T> make_scores(const LayershareSharedScores& sc) {
  return {static_cast<const T*>(sc.cells), static_cast<const float*>(sc.cells), sc.stride_page,
          sc.stride_head, sc.lse_first, sc.block_table, sc.table_stride,
          log2_if_power_of_two(sc.block_size), sc.tile};
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
  bool reads_scores;  // the distant branch weighs the leader's shared scores, no keys
  float* workspace;

  // The distant branch reads the leader's keys (k_distant, with q_distant).
  LS_HD bool reads_keys() const { return has_distant && !reads_scores; }
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

// Which split kernel a call runs: its template arguments, chosen at launch.
struct Variant {
  int heads;   // query heads per block: 1, 4 or 8 (registers grow with it)
  int lanes;   // lanes per row: 16 (head dims <= 128) or 32 (<= 256)
  bool vec;    // rows read 16 bytes at a time (every part aligned)
  int slices;  // blocks per kv head: ceil(G / heads)
};

inline Variant choose_variant(int G, int D, int Dv, bool vectorizable) {
  Variant v;
  v.heads = G == 1 ? 1 : G <= 4 ? 4 : kMaxHeads;
  v.lanes = (D > Dv ? D : Dv) <= 16 * kChannels ? 16 : 32;
  v.vec = vectorizable;
  v.slices = (G + v.heads - 1) / v.heads;
  return v;
}

// Channels one 16-byte load holds: 8 of a 16-bit cache, 4 of a float32 one.
template <typename T>
constexpr int kPackWidth = 16 / static_cast<int>(sizeof(T));

// A lane's channel j (of kChannels): kPackWidth adjacent channels per lane, the row
// group's lanes side by side, then the next LANES * kPackWidth channels.
template <typename T, int LANES>
LS_HD int lane_channel(int lane, int j) {
  constexpr int W = kPackWidth<T>;
  return (j / W) * (LANES * W) + lane * W + j % W;
}

// 16 bytes of one row as stored, aligned so that the GPU reads them in one load.
template <typename T>
struct alignas(16) Pack {
  T x[kPackWidth<T>];
};

// Rows of a part can be read a Pack at a time: aligned base, strides and widths.
template <typename T>
inline bool part_vectorizable(const LayersharePagedPart& p, int channels) {
  const int W = kPackWidth<T>;
  return reinterpret_cast<uintptr_t>(p.data) % 16 == 0 && p.stride_block % W == 0 &&
         p.stride_head % W == 0 && p.stride_slot % W == 0 && channels % W == 0;
}

// One lane's state in a row group's pass over rows; every array is indexed by
// constants only, so on the GPU all of it stays in registers.
template <typename T, int HEADS>
struct LaneState {
  static constexpr int kPacks = kChannels / kPackWidth<T>;
  float q[HEADS][kChannels];    // this lane's channels of the queries, scale folded in
  float acc[HEADS][kChannels];  // unnormalised sum of p v over this lane's channels
  float m[HEADS], l[HEADS];     // running max and sum (the same in every lane)
  float s[kRows][HEADS];        // the step's logits: partial dot products, then sums
  Pack<T> k[kRows][kPacks], v[kRows][kPacks];  // the step's rows, as stored
};

// Lane `lane`'s channels of a row with `n` channels; channels past n read as zero.
template <typename T, bool VEC, int LANES, int PACKS>
LS_HD void load_row(Pack<T> (&dst)[PACKS], const T* row, int lane, int n) {
  constexpr int W = kPackWidth<T>;
  LS_UNROLL
  for (int j = 0; j < PACKS; ++j) {
    const int c0 = lane_channel<T, LANES>(lane, j * W);
    if (VEC) {  // n % W == 0: a pack is all in or all out
      if (c0 < n)
        dst[j] = *reinterpret_cast<const Pack<T>*>(row + c0);
      else
        dst[j] = Pack<T>{};
    } else {
      LS_UNROLL
      for (int e = 0; e < W; ++e) dst[j].x[e] = c0 + e < n ? row[c0 + e] : T{};
    }
  }
}

template <typename T, int PACKS>
LS_HD void zero_row(Pack<T> (&dst)[PACKS]) {
  LS_UNROLL
  for (int j = 0; j < PACKS; ++j) dst[j] = Pack<T>{};
}

template <typename T, int PACKS>
LS_HD float channel_of(const Pack<T> (&row)[PACKS], int j) {
  return to_float(row[j / kPackWidth<T>].x[j % kPackWidth<T>]);
}

// The block's query heads: kv head kvh's heads [first, first + count).
struct HeadSlice {
  int kvh, first, count;
};

// Resets a lane's state and loads its channels of the slice's queries (from q, which is
// p.q or p.qd); absent heads get zero queries, their results are never stored.
template <typename T, int HEADS, int LANES>
LS_HD void start_pass(LaneState<T, HEADS>& st, const DecodeParams& p, const float* q,
                      int64_t s_req, int64_t s_head, int b, HeadSlice hs, int lane) {
  LS_UNROLL
  for (int g = 0; g < HEADS; ++g) {
    LS_UNROLL
    for (int j = 0; j < kChannels; ++j) {
      const int c = lane_channel<T, LANES>(lane, j);
      st.q[g][j] = g < hs.count && c < p.head_dim
                       ? p.scale * q[b * s_req + (hs.first + g) * s_head + c] : 0.f;
      st.acc[g][j] = 0.f;
    }
    st.m[g] = kNegInf;
    st.l[g] = 0.f;
  }
}

// One online-softmax step of every head over the step's rows (logits s, masked rows at
// -inf), adding p v to acc. The running maximum m lags: it moves only when a row passes
// it by more than kStaleMax (then acc and l are rescaled by exp(m_old - m_new)), so a
// term exp(s - m) stays below e^kStaleMax and most steps skip the rescale (a group's
// lanes agree on m, so the branch does not diverge); acc and l share m, so the result
// is the same.
template <typename T, int HEADS>
LS_HD void softmax_step(LaneState<T, HEADS>& st) {
  LS_UNROLL
  for (int g = 0; g < HEADS; ++g) {
    float step_max = kNegInf;
    LS_UNROLL
    for (int u = 0; u < kRows; ++u) step_max = fmaxf(step_max, st.s[u][g]);
    if (step_max == kNegInf) continue;  // every row masked: nothing to add
    if (step_max > st.m[g] + kStaleMax) {  // also the first rows seen (m = -inf)
      const float corr = expf(st.m[g] - step_max);  // 0 when m = -inf
      st.l[g] *= corr;
      LS_UNROLL
      for (int j = 0; j < kChannels; ++j) st.acc[g][j] *= corr;
      st.m[g] = step_max;
    }
    float p[kRows];
    LS_UNROLL
    for (int u = 0; u < kRows; ++u) {
      p[u] = expf(st.s[u][g] - st.m[g]);
      st.l[g] += p[u];
    }
    LS_UNROLL
    for (int j = 0; j < kChannels; ++j) {
      float a = st.acc[g][j];
      LS_UNROLL
      for (int u = 0; u < kRows; ++u) a += p[u] * channel_of(st.v[u], j);
      st.acc[g][j] = a;
    }
  }
}

// Calls step(first, rows) for each of a row group's steps over `range`: rows [first,
// first + rows), rows <= kRows, first = range.begin + (step * groups + group) * kRows.
template <typename Group, typename F>
LS_HD void group_steps(const Group& grp, Range range, F&& step) {
  constexpr int GROUPS = kSplitThreads / Group::kLanes;
  for (int64_t t0 = range.begin + grp.id * kRows; t0 < range.end; t0 += GROUPS * kRows)
    step(static_cast<int32_t>(t0), static_cast<int>(min64(kRows, range.end - t0)));
}

// Lane `lane`'s channels of rows [first, first + rows) of a part (n channels); the
// slots past `rows` get zeros, not garbage: p = 0 must not meet a NaN.
template <typename T, bool VEC, int LANES, int PACKS>
LS_HD void load_rows(Pack<T> (&dst)[kRows][PACKS], const Paged<T>& part, int b, int kvh,
                     int32_t first, int rows, int lane, int n) {
  LS_UNROLL
  for (int u = 0; u < kRows; ++u) {
    if (u < rows)
      load_row<T, VEC, LANES>(dst[u], part.data + part.offset(b, kvh, first + u), lane, n);
    else
      zero_row(dst[u]);
  }
}

// A row group's pass over its rows of `range` (group_steps); the state in `lanes` is
// updated, not reset.
template <typename T, bool VEC, int HEADS, typename Group, typename LanesT>
LS_HD void group_attend(const Group& grp, LanesT& lanes, const DecodeParams& p,
                        const Paged<T>& keys, const Paged<T>& vals, int b, int kvh, Range range) {
  using S = LaneState<T, HEADS>;
  constexpr int LANES = Group::kLanes;
  group_steps(grp, range, [&](int32_t first, int rows) {
    // Every row's loads first (they are in flight together), then the partial dots.
    grp.each([&](int lane) {
      S& st = lanes[lane];
      load_rows<T, VEC, LANES>(st.k, keys, b, kvh, first, rows, lane, p.head_dim);
      load_rows<T, VEC, LANES>(st.v, vals, b, kvh, first, rows, lane, p.head_dim_v);
      LS_UNROLL
      for (int u = 0; u < kRows; ++u) {
        LS_UNROLL
        for (int g = 0; g < HEADS; ++g) {
          float dot = 0.f;
          LS_UNROLL
          for (int j = 0; j < kChannels; ++j) dot += st.q[g][j] * channel_of(st.k[u], j);
          st.s[u][g] = dot;
        }
      }
    });
    grp.template all_sum<kRows * HEADS>(lanes, [](S& st) { return &st.s[0][0]; });
    grp.each([&](int lane) {
      S& st = lanes[lane];
      LS_UNROLL
      for (int u = 0; u < kRows; ++u) {
        LS_UNROLL
        for (int g = 0; g < HEADS; ++g) st.s[u][g] = u < rows ? st.s[u][g] : kNegInf;
      }
      softmax_step(st);
    });
  });
}

// A row group's pass over its rows of `range` with the leader's shared scores as the
// logits: no keys, no dot products, no sums across lanes (every lane reads the same
// scores); the values are the layer's own.
template <typename T, bool VEC, int HEADS, typename Group, typename LanesT>
LS_HD void group_scores(const Group& grp, LanesT& lanes, const DecodeParams& p,
                        const Scores<T>& sc, const Paged<T>& vals, int b, HeadSlice hs,
                        Range range) {
  using S = LaneState<T, HEADS>;
  const int G = p.num_heads / p.num_kv_heads, first_head = hs.first - hs.kvh * G;
  group_steps(grp, range, [&](int32_t first, int rows) {
    grp.each([&](int lane) {
      S& st = lanes[lane];
      load_rows<T, VEC, Group::kLanes>(st.v, vals, b, hs.kvh, first, rows, lane, p.head_dim_v);
      LS_UNROLL
      for (int u = 0; u < kRows; ++u) {
        if (u < rows) {
          const ScoreRow<T> row = sc.row(b, hs.kvh, G, first_head, first + u);
          LS_UNROLL
          for (int g = 0; g < HEADS; ++g) st.s[u][g] = g < hs.count ? row.logit(g) : kNegInf;
        } else {
          LS_UNROLL
          for (int g = 0; g < HEADS; ++g) st.s[u][g] = kNegInf;
        }
      }
      softmax_step(st);
    });
  });
}

// Shared memory of a split block: every row group's (acc, m, l) per head, to combine.
struct GroupStates {
  int groups;
  float* acc;  // [groups][HEADS][Dv]
  float* m;    // [groups][HEADS]
  float* l;    // [groups][HEADS]
};

LS_HD size_t split_smem_bytes(int groups, int heads, int Dv) {
  return sizeof(float) * static_cast<size_t>(groups) * heads * (Dv + 2);
}

LS_HD GroupStates carve_group_states(void* base, int groups, int heads, int Dv) {
  GroupStates w;
  w.groups = groups;
  w.acc = static_cast<float*>(base);
  w.m = w.acc + groups * heads * Dv;
  w.l = w.m + groups * heads;
  return w;
}

// A row group leaves its lanes' state in shared memory (m and l from lane 0: all agree).
template <typename T, int HEADS, typename Group, typename LanesT>
LS_HD void stash_group(const Group& grp, LanesT& lanes, const GroupStates& gs, int Dv) {
  grp.each([&](int lane) {
    LaneState<T, HEADS>& st = lanes[lane];
    LS_UNROLL
    for (int g = 0; g < HEADS; ++g) {
      float* acc = gs.acc + (grp.id * HEADS + g) * Dv;
      LS_UNROLL
      for (int j = 0; j < kChannels; ++j) {
        const int c = lane_channel<T, Group::kLanes>(lane, j);
        if (c < Dv) acc[c] = st.acc[g][j];
      }
      if (lane == 0) {
        gs.m[grp.id * HEADS + g] = st.m[g];
        gs.l[grp.id * HEADS + g] = st.l[g];
      }
    }
  });
}

// One phase: the row groups' states of each head combined by log-sum-exp into the
// workspace as branch `branch` of split `split`.
template <int HEADS, typename Block>
LS_HD void combine_groups(const Block& blk, const DecodeParams& p, const GroupStates& gs, int b,
                          HeadSlice hs, int split, int branch) {
  const int n = blk.nthreads, Dv = p.head_dim_v;
  const Workspace ws = workspace_of(p);
  blk.run([&](int tid) {
    for (int x = tid; x < hs.count * Dv; x += n) {
      const int g = x / Dv, d = x % Dv;
      float top = kNegInf;
      for (int w = 0; w < gs.groups; ++w) top = fmaxf(top, gs.m[w * HEADS + g]);
      float acc = 0.f, sum = 0.f;
      for (int w = 0; w < gs.groups; ++w) {
        const float m = gs.m[w * HEADS + g];
        if (m == kNegInf) continue;  // a group that saw no row
        const float weight = expf(m - top);
        acc += weight * gs.acc[(w * HEADS + g) * Dv + d];
        sum += weight * gs.l[w * HEADS + g];
      }
      ws.acc(b, hs.first + g, split, branch)[d] = acc;
      if (d == 0) {
        *ws.m(b, hs.first + g, split, branch) = top;
        *ws.l(b, hs.first + g, split, branch) = sum;
      }
    }
  });
}

// One branch of a block over the ranges `first` and then `second` (queries q), ending
// in the workspace: each row group's pass, then the groups combined.
template <typename T, bool VEC, int HEADS, int LANES, typename Block>
LS_HD void branch_pass(const Block& blk, const DecodeParams& p, const float* q, int64_t s_req,
                       int64_t s_head, const Paged<T>& keys, bool by_scores,
                       const Scores<T>& scores, const Paged<T>& vals, const GroupStates& gs,
                       int b, HeadSlice hs, Range first, Range second, int split, int branch) {
  blk.template groups<LANES>([&](const auto& grp) {
    typename std::remove_reference_t<decltype(grp)>::template Lanes<LaneState<T, HEADS>> lanes;
    grp.each([&](int lane) {
      start_pass<T, HEADS, LANES>(lanes[lane], p, q, s_req, s_head, b, hs, lane);
    });
    if (by_scores) {  // `second` is empty in a distant branch
      group_scores<T, VEC, HEADS>(grp, lanes, p, scores, vals, b, hs, first);
    } else {
      group_attend<T, VEC, HEADS>(grp, lanes, p, keys, vals, b, hs.kvh, first);
      group_attend<T, VEC, HEADS>(grp, lanes, p, keys, vals, b, hs.kvh, second);
    }
    stash_group<T, HEADS>(grp, lanes, gs, p.head_dim_v);
  });
  combine_groups<HEADS>(blk, p, gs, b, hs, split, branch);
}

// The work of one block: both branches of request b, heads `hs` over chunk `split`.
template <typename T, bool VEC, int HEADS, int LANES, typename Block>
LS_HD void pod_decode_split(const Block& blk, const DecodeParams& p, const Paged<T>& k_prox,
                            const Paged<T>& v, const Paged<T>& k_distant, const Scores<T>& sc,
                            const GroupStates& gs, int b, HeadSlice hs, int split) {
  const int64_t len = max64(p.seq_lens[b], 0);  // 0: a padded batch entry, reads nothing
  const Range chunk = split_chunk(len, p.num_splits, split);
  const PodRanges r = pod_ranges(len - 1, p.sink, p.recent, p.has_distant);
  const Range none = {0, 0};
  // Proximal branch: own keys over the sinks, then the recent window.
  branch_pass<T, VEC, HEADS, LANES>(blk, p, p.q, p.q_s_req, p.q_s_head, k_prox, false, sc, v,
                                    gs, b, hs, intersect(r.sinks, chunk),
                                    intersect(r.window, chunk), split, 0);
  // Distant branch: the leader's keys or its shared scores, own values (a leader has
  // none: empty, m = -inf).
  const bool d = p.reads_keys();
  branch_pass<T, VEC, HEADS, LANES>(blk, p, d ? p.qd : p.q, d ? p.qd_s_req : p.q_s_req,
                                    d ? p.qd_s_head : p.q_s_head, k_distant,
                                    p.reads_scores, sc, v, gs, b, hs,
                                    intersect(r.distant, chunk), none, split, 1);
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

// The split kernel's template arguments as types, for a generic launcher.
template <int HEADS, int LANES, bool VEC>
struct Shape {
  static constexpr int heads = HEADS, lanes = LANES;
  static constexpr bool vec = VEC;
};

template <int HEADS, bool VEC, typename F>
inline int dispatch_lanes(const Variant& v, F& f) {
  return v.lanes == 16 ? f(Shape<HEADS, 16, VEC>{}) : f(Shape<HEADS, 32, VEC>{});
}

template <bool VEC, typename F>
inline int dispatch_heads(const Variant& v, F& f) {
  if (v.heads == 1) return dispatch_lanes<1, VEC>(v, f);
  if (v.heads == 4) return dispatch_lanes<4, VEC>(v, f);
  return dispatch_lanes<kMaxHeads, VEC>(v, f);
}

// Calls f(Shape<...>{}) for the variant v: one instantiation per (heads, lanes, vec).
template <typename F>
inline int dispatch(const Variant& v, F&& f) {
  return v.vec ? dispatch_heads<true>(v, f) : dispatch_heads<false>(v, f);
}

// The query heads of split block row y (grid y = kv head * slices + slice).
LS_HD HeadSlice head_slice(const DecodeParams& p, int heads, int y) {
  const int G = p.num_heads / p.num_kv_heads, slices = (G + heads - 1) / heads;
  const int kvh = y / slices, first = (y % slices) * heads;
  return {kvh, kvh * G + first, G - first < heads ? G - first : heads};
}

// The variant a call runs: aligned parts are read 16 bytes at a time.
template <typename T>
inline Variant variant_of(const DecodeParams& p, const LayersharePagedPart& k_prox,
                          const LayersharePagedPart& v, const LayersharePagedPart* k_distant) {
  const bool vec = part_vectorizable<T>(k_prox, p.head_dim) &&
                   part_vectorizable<T>(v, p.head_dim_v) &&
                   (!p.reads_keys() || part_vectorizable<T>(*k_distant, p.head_dim));
  return choose_variant(p.num_heads / p.num_kv_heads, p.head_dim, p.head_dim_v, vec);
}

inline bool part_ok(const LayersharePagedPart* part) {
  return part && part->data && part->block_table && part->block_size > 0;
}

inline bool scores_ok(const LayershareSharedScores* sc) {
  return sc && sc->cells && sc->block_table && log2_if_power_of_two(sc->block_size) >= 0 &&
         log2_if_power_of_two(sc->tile) >= 0 && sc->lse_first >= 0;
}

// Argument checks shared by the launchers (the CUDA one and the host test's); 0 when the
// call can run.
inline int check_args(const DecodeParams& p, int cache_dtype, size_t workspace_size,
                      const LayersharePagedPart* k_prox, const LayersharePagedPart* v,
                      const LayersharePagedPart* k_distant, const LayershareSharedScores* sc) {
  const bool keys = p.reads_keys();
  if (p.num_reqs < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 ||
      p.num_heads % p.num_kv_heads != 0 || p.head_dim <= 0 || p.head_dim_v <= 0 ||
      p.num_splits <= 0 || p.sink < 0 || p.recent < 0 || !p.out || !p.q || !p.seq_lens ||
      (keys && !p.qd))
    return LAYERSHARE_BAD_ARGS;
  if (!part_ok(k_prox) || !part_ok(v) || (keys && !part_ok(k_distant)) ||
      (p.reads_scores && (!scores_ok(sc) || (k_distant && k_distant->data))))
    return LAYERSHARE_BAD_ARGS;  // the distant branch reads keys or scores, not both
  if (p.head_dim > kMaxChannels || p.head_dim_v > kMaxChannels) return LAYERSHARE_BAD_ARGS;
  const Variant v0 = choose_variant(p.num_heads / p.num_kv_heads, p.head_dim, p.head_dim_v, false);
  if (static_cast<int64_t>(p.num_kv_heads) * v0.slices > 65535 || p.num_reqs > 65535)
    return LAYERSHARE_BAD_ARGS;  // grid y, z
  if (cache_dtype != LAYERSHARE_F32 && cache_dtype != LAYERSHARE_BF16 &&
      cache_dtype != LAYERSHARE_F16)
    return LAYERSHARE_BAD_DTYPE;
  if (workspace_size < workspace_bytes(p.num_reqs, p.num_heads, p.head_dim_v, p.num_splits) ||
      (p.num_reqs > 0 && !p.workspace))
    return LAYERSHARE_SMALL_WORKSPACE;
  return LAYERSHARE_OK;
}

// The launcher's flat arguments as DecodeParams: the distant branch reads the shared
// scores where they are given (cells not NULL), else the leader's keys where k_distant
// is (data not NULL), else nothing (a leader).
inline DecodeParams make_params(float* out, int64_t out_s_req, int64_t out_s_head, const float* q,
                                int64_t q_s_req, int64_t q_s_head, const float* q_distant,
                                int64_t qd_s_req, int64_t qd_s_head,
                                const LayersharePagedPart* k_distant,
                                const LayershareSharedScores* shared, const int32_t* seq_lens,
                                int num_reqs, int num_heads, int num_kv_heads, int head_dim,
                                int head_dim_v, float scale, int64_t sink, int64_t recent,
                                float gate_tau, int num_splits, void* workspace) {
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
  p.reads_scores = shared && shared->cells;
  p.has_distant = (k_distant && k_distant->data) || p.reads_scores;
  p.workspace = static_cast<float*>(workspace);
  return p;
}

}  // namespace layershare
