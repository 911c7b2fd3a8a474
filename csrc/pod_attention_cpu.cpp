// Paged PoD attention for CPUs: both branches of method.md in one pass, no gathers.
//
// For a query at position p of a follower layer (leader: sink = 0, recent = inf,
// no distant cache):
//   proximal  P = [0, min(sink, p+1)) U [max(sink, p-recent+1), p]  own q, own K
//   distant   D = [sink, p-recent]                                 q_dist, leader K
// Each branch keeps its own online softmax (max m, sum l, accumulator over own V);
// the branches merge by log-sum-exp: g = l_P e^{m_P} / (l_P e^{m_P} + l_D e^{m_D}),
// o = g o_P + (1-g) o_D, with o = o_P where g >= tau (gate skip, tau > 0).
// With an estimated distant mass, g = sigmoid(lse_P - log M), where M is the
// follower's own query against the mean key of each whole distant block of S tokens
// (times S) plus its exact keys elsewhere in D (vllm_layershare/attention/mass.py).
// One task per (tile of up to 16 query tokens of one sequence, KV head): the tile's
// query vectors (tokens x the G heads sharing the KV head) read each key and value once.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int kChunk = 64;  // keys scored together before one rescale
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(double x) { return static_cast<float>(x); }

// One layer's paged cache restricted to some channels: [blocks, heads, tokens, C].
template <typename T>
struct Paged {
  const T* data = nullptr;
  int64_t s_block = 0, s_head = 0, s_token = 0;
  const int64_t* table = nullptr;  // [rows, table_width]
  int64_t table_width = 0, block_size = 1;

  const T* at(int64_t row, int64_t head, int64_t pos) const {
    int64_t block = table[row * table_width + pos / block_size];
    return data + block * s_block + head * s_head + (pos % block_size) * s_token;
  }
  // Tokens from pos to the end of its block.
  int64_t run_length(int64_t pos) const { return block_size - pos % block_size; }
};

// Walks one sequence's token rows of a paged cache in position order: a table lookup
// only where a block starts, no division per token.
template <typename T>
struct RowCursor {
  const Paged<T>& paged;
  int64_t row, head;
  const T* ptr = nullptr;
  int64_t left = 0;
  RowCursor(const Paged<T>& p, int64_t r, int64_t h) : paged(p), row(r), head(h) {}
  // The row of `pos`, which must be one past the previous call's (or any, first).
  const T* next(int64_t pos) {
    if (left == 0) {
      ptr = paged.at(row, head, pos);
      left = paged.run_length(pos);
    }
    const T* out = ptr;
    ptr += paged.s_token;
    --left;
    return out;
  }
};

template <typename T>
Paged<T> make_paged(const at::Tensor& cache, const at::Tensor& table, int64_t block_size) {
  TORCH_CHECK(cache.dim() == 4 && cache.stride(3) == 1, "cache must be [B,H,N,C], C dense");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.is_contiguous(), "int64 block table");
  Paged<T> p;
  p.data = cache.data_ptr<T>();
  p.s_block = cache.stride(0);
  p.s_head = cache.stride(1);
  p.s_token = cache.stride(2);
  p.table = table.data_ptr<int64_t>();
  p.table_width = table.size(1);
  p.block_size = block_size;
  return p;
}

// exp for x <= 0 (arguments here are logit - running max): 2^(x log2 e) with a
// degree-6 polynomial on [-1/2, 1/2]; relative error ~2e-7, and it vectorizes.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504f;
  const float whole = std::floor(t + 0.5f);
  const float f = t - whole;  // in [-0.5, 0.5]: Taylor terms of 2^f up to f^6
  const float poly =
      1.0f + f * (0.693147181f + f * (0.240226507f + f * (0.0555041087f +
                  f * (0.00961812911f + f * (0.00133335581f + f * 0.000154035304f)))));
  const int32_t bits = (static_cast<int32_t>(whole) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return poly * scale;
}

// Dot product of two float rows (decode scores: few queries, so one row at a time).
#if defined(__AVX512F__)
inline float dot(const float* a, const float* b, int n) {
  __m512 acc = _mm512_setzero_ps();
  int d = 0;
  for (; d + 16 <= n; d += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}
#else
inline float dot(const float* a, const float* b, int n) {
  float lanes[8] = {0.f};
  int d = 0;
  for (; d + 8 <= n; d += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += a[d + l] * b[d + l];
  for (; d < n; ++d) lanes[d % 8] += a[d] * b[d];
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
         ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}
#endif

// Online-softmax state of a tile's query vectors (tokens x heads) over one branch.
struct Branch {
  int n, dim_v;
  std::vector<float> m, l, acc;
  Branch(int rows, int dv) : n(rows), dim_v(dv), m(rows, kNegInf), l(rows, 0.f), acc(rows * dv, 0.f) {}
};

constexpr int kLanes = 16;    // floats per vector register (AVX-512); loops are written in these
constexpr int kWideTile = 8;  // from this many query vectors, score keys column-wise
constexpr int kKeyBlock = 4;  // keys scored together in the wide path

// The query vectors of one tile: `n` rows of `dim`, also transposed ([dim][npad]).
struct TileQueries {
  int n = 0, npad = 0, dim = 0;
  std::vector<float> rows, cols;
  std::vector<int64_t> pos;  // position of each query vector; -1 for padding lanes
  // When every query value is exactly a bf16 (bf16 models): the rows as bf16 bits
  // ([n][dim]), and for wide tiles [dim/2][npad] pairs for the AVX-512 bf16
  // dot-product instruction; otherwise empty.
  std::vector<uint16_t> bf16_rows;
  std::vector<uint32_t> bf16_pairs;
};

// Fill tq.bf16_rows if the queries are exactly representable in bf16 (bf16 models),
// and for wide tiles their column pairs tq.bf16_pairs; both stay empty otherwise.
inline void pack_bf16(TileQueries& tq) {
#if defined(__AVX512BF16__)
  std::vector<uint16_t> rows(tq.rows.size());
  for (size_t k = 0; k < rows.size(); ++k) {
    uint32_t bits;
    std::memcpy(&bits, &tq.rows[k], sizeof(bits));
    if (bits & 0xFFFFu) return;  // not a bf16 value: keep the fp32 paths
    rows[k] = static_cast<uint16_t>(bits >> 16);
  }
  tq.bf16_rows = std::move(rows);
  if (tq.n < kWideTile || tq.dim % 2 != 0) return;
  const int pairs = tq.dim / 2;
  tq.bf16_pairs.assign(static_cast<size_t>(pairs) * tq.npad, 0u);
  for (int i = 0; i < tq.n; ++i)
    for (int p = 0; p < pairs; ++p) {
      const uint16_t* q = tq.bf16_rows.data() + static_cast<size_t>(i) * tq.dim + 2 * p;
      tq.bf16_pairs[static_cast<size_t>(p) * tq.npad + i] = q[0] | (static_cast<uint32_t>(q[1]) << 16);
    }
#else
  (void)tq;
#endif
}

// Visible chunk offsets j of a query at position p, for keys start..: proximal
// j <= hi and (j <= sink_hi or j >= window_lo); distant j <= hi. int32, clamped.
struct Bounds {
  int32_t hi, sink_hi, window_lo;
};

inline Bounds bounds_for(int64_t p, int64_t start, bool proximal, int64_t sink,
                         int64_t recent) {
  const auto clamp = [](int64_t x) {
    return static_cast<int32_t>(std::max<int64_t>(-1, std::min<int64_t>(x, kChunk)));
  };
  if (p < 0) return {-1, -1, kChunk};
  if (!proximal) return {clamp(p - recent - start), kChunk, 0};
  return {clamp(p - start), clamp(sink - 1 - start), clamp(p - recent + 1 - start)};
}

// Cache rows converted to float, packed at their own width rounded up to a cache line
// and aligned to one. (A fixed [64][256] array puts rows 1 KB apart, on a few L1 sets
// that evict each other.) One row of slack: the 64-channel loops may read past a
// short last row.
struct RowBuffer {
  std::vector<float> storage;
  float* base;
  int width;
  RowBuffer(int rows, int w) : storage(static_cast<size_t>(rows + 1) * ((w + 15) / 16 * 16) + 80, 0.f),
                               width((w + 15) / 16 * 16) {
    const auto addr = reinterpret_cast<uintptr_t>(storage.data());
    base = storage.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
  float* operator[](int j) { return base + static_cast<size_t>(j) * width; }
  const float* operator[](int j) const { return base + static_cast<size_t>(j) * width; }
};

// acc = acc * rescale + sum_j p[j * stride] v_j over n keys, 64 channels at a time
// in registers, even and odd keys in two independent chains.
inline void accumulate_values(float* acc, int Dv, float rescale, const float* p, int stride,
                              const RowBuffer& vbuf, int n) {
  for (int d0 = 0; d0 < Dv; d0 += 64) {
    // Full 64-channel slices (the usual head sizes) take the branch-free loops.
    const bool full = Dv - d0 >= 64;
    float a[64], b[64];
    if (full) {
      for (int l = 0; l < 64; ++l) a[l] = acc[d0 + l] * rescale;
    } else {
      for (int l = 0; l < 64; ++l) a[l] = d0 + l < Dv ? acc[d0 + l] * rescale : 0.f;
    }
    for (int l = 0; l < 64; ++l) b[l] = 0.f;
    int j = 0;
    for (; j + 1 < n; j += 2) {
      const float p0 = p[j * stride], p1 = p[(j + 1) * stride];
      const float* v0 = vbuf[j] + d0;
      const float* v1 = vbuf[j + 1] + d0;
      for (int l = 0; l < 64; ++l) {
        a[l] += p0 * v0[l];
        b[l] += p1 * v1[l];
      }
    }
    if (j < n) {
      const float p0 = p[j * stride];
      for (int l = 0; l < 64; ++l) a[l] += p0 * vbuf[j][d0 + l];
    }
    if (full) {
      for (int l = 0; l < 64; ++l) acc[d0 + l] = a[l] + b[l];
    } else {
      for (int l = 0; d0 + l < Dv; ++l) acc[d0 + l] = a[l] + b[l];
    }
  }
}

#if defined(__AVX512F__)
// 16 bf16 -> 16 floats (a bf16 is the top half of a float).
inline __m512 load_bf16x16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Rows r < R of acc (width Dv), channels d0 .. d0 + 16 VECS: acc = acc * rescale[r] +
// sum_j w[j * key_stride + r * row_stride] value(j, channel). R and VECS are constants
// so that the R x VECS accumulators stay in registers (each value vector feeds R FMAs).
template <int R, int VECS, typename Value>
__attribute__((always_inline)) inline void weighted_values_block(
    float* acc, int Dv, int d0, const float* rescale, const float* w, int key_stride,
    int row_stride, int n, const Value& value) {
  __m512 a[R][VECS];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < VECS; ++c)
      a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * Dv + d0 + 16 * c),
                              _mm512_set1_ps(rescale[r]));
  for (int j = 0; j < n; ++j) {
    __m512 v[VECS];
    for (int c = 0; c < VECS; ++c) v[c] = value(j, d0 + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 wr = _mm512_set1_ps(w[j * key_stride + r * row_stride]);
      for (int c = 0; c < VECS; ++c) a[r][c] = _mm512_fmadd_ps(wr, v[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < VECS; ++c) _mm512_storeu_ps(acc + r * Dv + d0 + 16 * c, a[r][c]);
}

template <int R, typename Value>
inline void weighted_values_rows(float* acc, int Dv, const float* rescale, const float* w,
                                 int key_stride, int row_stride, int n, const Value& value) {
  int d0 = 0;
  for (; d0 + 64 <= Dv; d0 += 64)
    weighted_values_block<R, 4>(acc, Dv, d0, rescale, w, key_stride, row_stride, n, value);
  for (; d0 < Dv; d0 += 16)
    weighted_values_block<R, 1>(acc, Dv, d0, rescale, w, key_stride, row_stride, n, value);
}

// All `rows` rows of acc (Dv a multiple of 16), four at a time.
template <typename Value>
void weighted_values(float* acc, int rows, int Dv, const float* rescale, const float* w,
                     int key_stride, int row_stride, int n, const Value& value) {
  int r = 0;
  for (; r + 4 <= rows; r += 4)
    weighted_values_rows<4>(acc + static_cast<size_t>(r) * Dv, Dv, rescale + r,
                            w + r * row_stride, key_stride, row_stride, n, value);
  float* a = acc + static_cast<size_t>(r) * Dv;
  const float* wr = w + r * row_stride;
  switch (rows - r) {
    case 3: weighted_values_rows<3>(a, Dv, rescale + r, wr, key_stride, row_stride, n, value); break;
    case 2: weighted_values_rows<2>(a, Dv, rescale + r, wr, key_stride, row_stride, n, value); break;
    case 1: weighted_values_rows<1>(a, Dv, rescale + r, wr, key_stride, row_stride, n, value); break;
    default: break;
  }
}
#endif

// Keys and values of positions start..start+n-1 into float rows.
template <typename T>
void load_chunk(const Paged<T>& keys, const Paged<T>& values, int64_t row, int64_t kv_head,
                int64_t start, int n, int D, int Dv, RowBuffer& kbuf, RowBuffer& vbuf,
                const T** key_rows = nullptr, bool convert_keys = true) {
  RowCursor<T> kc(keys, row, kv_head), vc(values, row, kv_head);
  for (int j = 0; j < n; ++j) {
    const T* k = kc.next(start + j);
    const T* v = vc.next(start + j);
    if (key_rows != nullptr) key_rows[j] = k;
    if (convert_keys)
      for (int d = 0; d < D; ++d) kbuf[j][d] = to_float(k[d]);
    for (int d = 0; d < Dv; ++d) vbuf[j][d] = to_float(v[d]);
  }
}

// Wide-path scores in fp32: lg[j][i] = scale * q_i . k_j, four keys at a time (four
// independent accumulator chains per vector of query lanes).
inline void score_fp32(const TileQueries& tq, const RowBuffer& kbuf, int n, int Np, int D,
                       float scale, float* lg) {
  for (int i0 = 0; i0 < Np; i0 += kLanes) {
    for (int j = 0; j < n; j += kKeyBlock) {
      float a0[kLanes] = {0.f}, a1[kLanes] = {0.f}, a2[kLanes] = {0.f}, a3[kLanes] = {0.f};
      for (int d = 0; d < D; ++d) {
        const float* qd = tq.cols.data() + static_cast<size_t>(d) * Np + i0;
        const float k0 = kbuf[j][d], k1 = kbuf[j + 1][d];
        const float k2 = kbuf[j + 2][d], k3 = kbuf[j + 3][d];
        for (int l = 0; l < kLanes; ++l) {
          a0[l] += qd[l] * k0;
          a1[l] += qd[l] * k1;
          a2[l] += qd[l] * k2;
          a3[l] += qd[l] * k3;
        }
      }
      float* out = lg + static_cast<size_t>(j) * Np + i0;
      for (int l = 0; l < kLanes; ++l) {
        out[l] = a0[l] * scale;
        out[Np + l] = a1[l] * scale;
        out[2 * Np + l] = a2[l] * scale;
        out[3 * Np + l] = a3[l] * scale;
      }
    }
  }
}

// Wide-path scores with the AVX-512 bf16 dot product: lanes are 16 query vectors,
// each step multiplies one pair of channels of 4 keys. Exact products of bf16 inputs,
// fp32 sums. Returns false (caller scores in fp32) when it does not apply.
template <typename T>
bool score_bf16(const TileQueries& tq, const T* const* key_rows, int n, int Np, int D,
                float scale, float* lg) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (tq.bf16_pairs.empty()) return false;
    const int pairs = D / 2;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int i0 = 0; i0 < Np; i0 += kLanes) {
      for (int j = 0; j < n; j += 4) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        const auto* k0 = reinterpret_cast<const uint32_t*>(key_rows[j]);
        const auto* k1 = reinterpret_cast<const uint32_t*>(key_rows[j + 1]);
        const auto* k2 = reinterpret_cast<const uint32_t*>(key_rows[j + 2]);
        const auto* k3 = reinterpret_cast<const uint32_t*>(key_rows[j + 3]);
        for (int p = 0; p < pairs; ++p) {
          const __m512bh q = (__m512bh)_mm512_loadu_si512(
              tq.bf16_pairs.data() + static_cast<size_t>(p) * Np + i0);
          a0 = _mm512_dpbf16_ps(a0, q, (__m512bh)_mm512_set1_epi32(static_cast<int>(k0[p])));
          a1 = _mm512_dpbf16_ps(a1, q, (__m512bh)_mm512_set1_epi32(static_cast<int>(k1[p])));
          a2 = _mm512_dpbf16_ps(a2, q, (__m512bh)_mm512_set1_epi32(static_cast<int>(k2[p])));
          a3 = _mm512_dpbf16_ps(a3, q, (__m512bh)_mm512_set1_epi32(static_cast<int>(k3[p])));
        }
        float* out = lg + static_cast<size_t>(j) * Np + i0;
        _mm512_storeu_ps(out, _mm512_mul_ps(a0, vscale));
        _mm512_storeu_ps(out + Np, _mm512_mul_ps(a1, vscale));
        _mm512_storeu_ps(out + 2 * Np, _mm512_mul_ps(a2, vscale));
        _mm512_storeu_ps(out + 3 * Np, _mm512_mul_ps(a3, vscale));
      }
    }
    return true;
  }
#endif
  (void)tq; (void)key_rows; (void)n; (void)Np; (void)D; (void)scale; (void)lg;
  return false;
}

// Many query vectors (prefill tiles): logits key-major ([key][query]) so that
// scoring, masking and softmax vectorize over queries.
template <typename T>
void attend_range_wide(Branch& st, const TileQueries& tq, const Paged<T>& keys,
                       const Paged<T>& values, int64_t row, int64_t kv_head, int64_t first,
                       int64_t last, bool proximal, int64_t sink, int64_t recent,
                       float scale) {
  const int N = tq.n, Np = tq.npad, D = tq.dim, Dv = st.dim_v;
  std::vector<float> lg(static_cast<size_t>(kChunk + kKeyBlock) * Np);
  std::vector<float> m_new(Np), rescale(Np), row_sum(Np);
  std::vector<int32_t> hi(Np), sink_hi(Np), window_lo(Np);
  RowBuffer kbuf(kChunk + kKeyBlock, D);  // rows past a short chunk: scored, ignored
  // bf16 scores read the cache's keys directly; kbuf is only for the fp32 scores.
  const bool bf16_scores = std::is_same_v<T, c10::BFloat16> && !tq.bf16_pairs.empty();
  RowBuffer vbuf(kChunk, Dv);
  for (int64_t start = first; start <= last;) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, last - start + 1));
    const T* key_rows[kChunk + kKeyBlock];
    load_chunk(keys, values, row, kv_head, start, n, D, Dv, kbuf, vbuf, key_rows, !bf16_scores);
    for (int j = n; j < n + kKeyBlock; ++j) key_rows[j] = key_rows[0];  // scored, ignored
    if (!score_bf16(tq, key_rows, n, Np, D, scale, lg.data()))
      score_fp32(tq, kbuf, n, Np, D, scale, lg.data());
    for (int i = 0; i < Np; ++i) {
      const Bounds b = bounds_for(tq.pos[i], start, proximal, sink, recent);
      hi[i] = b.hi;
      sink_hi[i] = b.sink_hi;
      window_lo[i] = b.window_lo;
      m_new[i] = st.m[i];
    }
    for (int j = 0; j < n; ++j) {
      float* row_lg = lg.data() + static_cast<size_t>(j) * Np;
      for (int i = 0; i < Np; ++i) {
        const bool visible = j <= hi[i] && (j <= sink_hi[i] || j >= window_lo[i]);
        row_lg[i] = visible ? row_lg[i] : kNegInf;
        m_new[i] = std::max(m_new[i], row_lg[i]);
      }
    }
    for (int i = 0; i < Np; ++i) {
      const float m_old = st.m[i];
      rescale[i] = m_old == kNegInf ? 0.f : exp_nonpositive(m_old - m_new[i]);
    }
    std::fill(row_sum.begin(), row_sum.end(), 0.f);
    for (int j = 0; j < n; ++j) {
      float* row_lg = lg.data() + static_cast<size_t>(j) * Np;
      for (int i = 0; i < Np; ++i) {
        const float e = exp_nonpositive(row_lg[i] - m_new[i]);
        row_lg[i] = row_lg[i] == kNegInf ? 0.f : e;
        row_sum[i] += row_lg[i];  // summed across queries' lanes, not along a chain
      }
    }
    for (int i = 0; i < Np; ++i) {
      st.l[i] = st.l[i] * rescale[i] + row_sum[i];
      st.m[i] = m_new[i];
    }
#if defined(__AVX512F__)
    if (Dv % 16 == 0) {
      weighted_values(st.acc.data(), Np, Dv, rescale.data(), lg.data(), Np, 1, n,
                      [&](int j, int d) { return _mm512_loadu_ps(vbuf[j] + d); });
      start += n;
      continue;
    }
#endif
    for (int i = 0; i < N; ++i)
      accumulate_values(st.acc.data() + static_cast<size_t>(i) * Dv, Dv, rescale[i],
                        lg.data() + i, Np, vbuf, n);
    start += n;
  }
}

// Few query vectors (decode): logits kept per query ([query][key]) so that masking,
// softmax and sums run along contiguous keys; scores by row dot products.
template <typename T>
void attend_range_narrow(Branch& st, const TileQueries& tq, const Paged<T>& keys,
                         const Paged<T>& values, int64_t row, int64_t kv_head, int64_t first,
                         int64_t last, bool proximal, int64_t sink, int64_t recent,
                         float scale) {
  const int N = tq.n, D = tq.dim, Dv = st.dim_v;
  float lg[kWideTile][kChunk];
  RowBuffer kbuf(kChunk, D), vbuf(kChunk, Dv);
  for (int64_t start = first; start <= last;) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, last - start + 1));
    load_chunk(keys, values, row, kv_head, start, n, D, Dv, kbuf, vbuf);
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < N; ++i)
        lg[i][j] = dot(tq.rows.data() + static_cast<size_t>(i) * D, kbuf[j], D) * scale;
    for (int i = 0; i < N; ++i) {
      float* li = lg[i];
      const Bounds b = bounds_for(tq.pos[i], start, proximal, sink, recent);
      for (int j = 0; j < kChunk; ++j) {
        const bool visible = j < n && j <= b.hi && (j <= b.sink_hi || j >= b.window_lo);
        li[j] = visible ? li[j] : kNegInf;
      }
      float lanes[kLanes];
      for (int l = 0; l < kLanes; ++l) lanes[l] = li[l];
      for (int j = kLanes; j < kChunk; j += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] = std::max(lanes[l], li[j + l]);
      float block_max = kNegInf;
      for (int l = 0; l < kLanes; ++l) block_max = std::max(block_max, lanes[l]);
      if (block_max == kNegInf) continue;
      const float m_new = std::max(st.m[i], block_max);
      const float rescale = st.m[i] == kNegInf ? 0.f : exp_nonpositive(st.m[i] - m_new);
      for (int j = 0; j < kChunk; ++j) {
        const float e = exp_nonpositive(li[j] - m_new);
        li[j] = li[j] == kNegInf ? 0.f : e;
      }
      for (int l = 0; l < kLanes; ++l) lanes[l] = li[l];
      for (int j = kLanes; j < kChunk; j += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += li[j + l];
      float sum = 0.f;
      for (int l = 0; l < kLanes; ++l) sum += lanes[l];
      st.l[i] = st.l[i] * rescale + sum;
      st.m[i] = m_new;
      accumulate_values(st.acc.data() + static_cast<size_t>(i) * Dv, Dv, rescale, li, 1, vbuf, n);
    }
    start += n;
  }
}

#if defined(__AVX512BF16__)

// exp_nonpositive on 16 lanes; scalef applies 2^whole without integer tricks.
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, whole);
  __m512 poly = _mm512_set1_ps(0.000154035304f);
  for (float c : {0.00133335581f, 0.00961812911f, 0.0555041087f, 0.240226507f, 0.693147181f,
                  1.0f})
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(poly, whole);
}

// Lane j of the result is the sum of the 16 lanes of v[j]: a transposing add tree,
// three shuffles and an add per input instead of one horizontal sum each.
inline __m512 transpose_sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)  // 128-bit lane: v2k, v2k+1, v2k, v2k+1 partial sums
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                         _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // 128-bit lane: v4k .. v4k+3
    const __m512d x = _mm512_castps_pd(a[2 * k]), y = _mm512_castps_pd(a[2 * k + 1]);
    b[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int k = 0; k < 2; ++k)  // 128-bit lanes: b2k (twice), b2k+1 (twice), half summed
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                       _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

constexpr int kNarrowKeys = 64;  // keys per online-softmax step of the bf16 decode path
constexpr int kNarrowVecs = kNarrowKeys / kLanes;

// Decode path for bf16 caches whose head sizes are multiples of 32 (keys) and 16
// (values), with bf16-exact queries: bf16 dot products, logits 16 keys to a vector,
// one online-softmax step per 64 keys, values read as bf16 once per step for all
// query vectors. False if it does not apply.
template <typename T>
bool attend_range_narrow_bf16(Branch& st, const TileQueries& tq, const Paged<T>& keys,
                              const Paged<T>& values, int64_t row, int64_t kv_head,
                              int64_t first, int64_t last, bool proximal, int64_t sink,
                              int64_t recent, float scale) {
  if constexpr (!std::is_same_v<T, c10::BFloat16>) {
    return false;
  } else {
    const int N = tq.n, D = tq.dim, Dv = st.dim_v;
    if (tq.bf16_rows.empty() || D % 32 != 0 || Dv % 16 != 0) return false;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 vscale = _mm512_set1_ps(scale);
    alignas(64) float weights[kWideTile][kNarrowKeys];
    float rescale[kWideTile];
    RowCursor<T> kc(keys, row, kv_head), vc(values, row, kv_head);
    for (int64_t start = first; start <= last; start += kNarrowKeys) {
      const int n = static_cast<int>(std::min<int64_t>(kNarrowKeys, last - start + 1));
      const int vecs = (n + kLanes - 1) / kLanes;
      const T* krow[kNarrowKeys];
      const T* vrow[kNarrowKeys];
      for (int j = 0; j < vecs * kLanes; ++j) {
        if (j >= n) {  // lanes past the range: scored from a real key, then masked
          krow[j] = krow[0];
          vrow[j] = vrow[0];
          continue;
        }
        krow[j] = kc.next(start + j);
        vrow[j] = vc.next(start + j);
      }
      for (int i = 0; i < N; ++i) {
        __m512bh q[8];  // D <= 256
        for (int c = 0; c < D / 32; ++c)
          q[c] = (__m512bh)_mm512_loadu_si512(tq.bf16_rows.data() + static_cast<size_t>(i) * D + 32 * c);
        const Bounds b = bounds_for(tq.pos[i], start, proximal, sink, recent);
        __m512 logits[kNarrowVecs];
        __mmask16 visible[kNarrowVecs];
        float block_max = kNegInf;
        for (int u = 0; u < vecs; ++u) {
          __m512 parts[kLanes];
          for (int j = 0; j < kLanes; ++j) {
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < D / 32; ++c)
              acc = _mm512_dpbf16_ps(acc, q[c],
                                     (__m512bh)_mm512_loadu_si512(krow[u * kLanes + j] + 32 * c));
            parts[j] = acc;
          }
          const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(u * kLanes));
          visible[u] = _mm512_cmplt_epi32_mask(key, _mm512_set1_epi32(n)) &
                       _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(b.hi)) &
                       (_mm512_cmple_epi32_mask(key, _mm512_set1_epi32(b.sink_hi)) |
                        _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(b.window_lo)));
          logits[u] = _mm512_mul_ps(transpose_sum16(parts), vscale);
          if (visible[u])
            block_max = std::max(block_max, _mm512_mask_reduce_max_ps(visible[u], logits[u]));
        }
        rescale[i] = 1.f;
        if (block_max == kNegInf) {  // nothing visible to this query vector here
          for (int u = 0; u < vecs; ++u) _mm512_store_ps(weights[i] + u * kLanes, _mm512_setzero_ps());
          continue;
        }
        const float m_new = std::max(st.m[i], block_max);
        rescale[i] = st.m[i] == kNegInf ? 0.f : exp_nonpositive(st.m[i] - m_new);
        __m512 sum = _mm512_setzero_ps();
        for (int u = 0; u < vecs; ++u) {
          const __m512 e = _mm512_maskz_mov_ps(
              visible[u], exp_nonpositive16(_mm512_sub_ps(logits[u], _mm512_set1_ps(m_new))));
          _mm512_store_ps(weights[i] + u * kLanes, e);
          sum = _mm512_add_ps(sum, e);
        }
        st.l[i] = st.l[i] * rescale[i] + _mm512_reduce_add_ps(sum);
        st.m[i] = m_new;
      }
      weighted_values(st.acc.data(), N, Dv, rescale, &weights[0][0], 1, kNarrowKeys, n,
                      [&](int j, int d) { return load_bf16x16(vrow[j] + d); });
    }
    return true;
  }
}
#else
template <typename T>
bool attend_range_narrow_bf16(Branch&, const TileQueries&, const Paged<T>&, const Paged<T>&,
                              int64_t, int64_t, int64_t, int64_t, bool, int64_t, int64_t, float) {
  return false;
}
#endif

// Add keys [first, last] of one branch to its state (see bounds_for for visibility).
template <typename T>
void attend_range(Branch& st, const TileQueries& tq, const Paged<T>& keys, const Paged<T>& values,
                  int64_t row, int64_t kv_head, int64_t first, int64_t last, bool proximal,
                  int64_t sink, int64_t recent, float scale) {
  if (tq.n < kWideTile && attend_range_narrow_bf16(st, tq, keys, values, row, kv_head, first,
                                                   last, proximal, sink, recent, scale))
    return;
  if (tq.n < kWideTile)
    attend_range_narrow(st, tq, keys, values, row, kv_head, first, last, proximal, sink, recent,
                        scale);
  else
    attend_range_wide(st, tq, keys, values, row, kv_head, first, last, proximal, sink, recent,
                      scale);
}

// Running log-sum-exp of one query vector's terms.
struct LogSumExp {
  float m = kNegInf, l = 0.f;
  void add(float x) {
    if (x > m) {
      l = l * std::exp(m - x) + 1.f;
      m = x;
    } else {
      l += std::exp(x - m);
    }
  }
  float value() const { return l > 0.f ? m + std::log(l) : kNegInf; }
};

// log M of each query vector of a tile (the follower's own queries): whole distant
// summary blocks b in [low, high) by their mean key (+ log_w of the row's query head:
// log S and its calibrated offset), the other distant positions [sink, p - recent] by
// their exact keys, which the key window still holds. Row i is head kv_head * G + i % G.
template <typename T>
std::vector<float> estimated_log_mass(const TileQueries& tq, const Paged<T>& keys,
                                      const Paged<T>& summary, int64_t S, const float* log_w,
                                      int64_t G, int64_t row, int64_t kv_head, int64_t sink,
                                      int64_t recent, float scale) {
  const int D = tq.dim;
  const int64_t low = (sink + S - 1) / S;  // first block wholly at or after the sinks
  std::vector<LogSumExp> acc(tq.n);
  std::vector<int64_t> end(tq.n), high(tq.n);  // distant [sink, end), whole blocks [low, high)
  int64_t max_end = sink, max_high = low, min_high = INT64_MAX;
  for (int i = 0; i < tq.n; ++i) {
    end[i] = std::max(sink, tq.pos[i] - recent + 1);
    high[i] = std::max(low, end[i] / S);
    max_end = std::max(max_end, end[i]);
    max_high = std::max(max_high, high[i]);
    min_high = std::min(min_high, high[i]);
  }
  std::vector<float> k(D);
  auto row_of = [&](const T* src) {
    for (int d = 0; d < D; ++d) k[d] = to_float(src[d]);
    return k.data();
  };
  const float* head_w = log_w + kv_head * G;
  for (int64_t b = low; b < max_high; ++b) {
    const float* kbar = row_of(summary.at(row, kv_head, b));
    for (int i = 0; i < tq.n; ++i)
      if (b < high[i])
        acc[i].add(scale * dot(tq.rows.data() + static_cast<size_t>(i) * D, kbar, D) +
                   head_w[i % G]);
  }
  auto exact = [&](int64_t from, int64_t to) {
    for (int64_t j = from; j < to; ++j) {
      const float* kj = row_of(keys.at(row, kv_head, j));
      for (int i = 0; i < tq.n; ++i)
        if (j < end[i] && (j < low * S || j >= high[i] * S))
          acc[i].add(scale * dot(tq.rows.data() + static_cast<size_t>(i) * D, kj, D));
    }
  };
  exact(sink, std::min(low * S, max_end));
  exact(std::max(min_high, low) * S, max_end);
  std::vector<float> out(tq.n);
  for (int i = 0; i < tq.n; ++i) out[i] = acc[i].value();
  return out;
}

constexpr int64_t kTileTokens = 16;  // query tokens of one sequence scored together

struct Task {
  int64_t row, token_begin, token_end, kv_head;
};

template <typename T>
void run(at::Tensor& out, const at::Tensor& q, const at::Tensor& q_dist, const at::Tensor& k_prox,
         const at::Tensor& k_prox_table, int64_t k_prox_bs, const at::Tensor& v,
         const at::Tensor& v_table, int64_t v_bs, const c10::optional<at::Tensor>& k_dist,
         const c10::optional<at::Tensor>& k_dist_table, int64_t k_dist_bs,
         const at::Tensor& query_start_loc, const at::Tensor& seq_lens, double scale,
         int64_t sink, int64_t recent, double tau, const c10::optional<at::Tensor>& summary,
         const c10::optional<at::Tensor>& summary_table, int64_t summary_states,
         int64_t summary_tokens, const c10::optional<at::Tensor>& summary_log_weight) {
  const int64_t H = q.size(1), D = q.size(2), Dv = out.size(2);
  const int64_t Hkv = k_prox.size(1), G = H / Hkv;
  TORCH_CHECK(D <= 256 && Dv <= 256, "head size <= 256");
  const Paged<T> kp = make_paged<T>(k_prox, k_prox_table, k_prox_bs);
  const Paged<T> vv = make_paged<T>(v, v_table, v_bs);
  const bool has_distant = k_dist.has_value();
  Paged<T> kd;
  if (has_distant) kd = make_paged<T>(*k_dist, *k_dist_table, k_dist_bs);
  float* op = out.data_ptr<float>();
  // Summary block b of a row is state b % states of page table[b / states]: a paged
  // cache indexed by block. With it, the follower's own estimated mass replaces lse_D.
  const bool estimated = summary.has_value();
  Paged<T> sp;
  if (estimated) sp = make_paged<T>(*summary, *summary_table, summary_states);
  const float* log_w = estimated ? summary_log_weight->data_ptr<float>() : nullptr;
  const int64_t rows = seq_lens.size(0);
  const int64_t* qsl = query_start_loc.data_ptr<int64_t>();
  const int64_t* sl = seq_lens.data_ptr<int64_t>();
  std::vector<Task> tasks;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = qsl[r]; t < qsl[r + 1]; t += kTileTokens)
      for (int64_t g = 0; g < Hkv; ++g)
        tasks.push_back({r, t, std::min(t + kTileTokens, qsl[r + 1]), g});
  // Longest first, handed out one at a time: causal tiles differ in cost, and a static
  // split of the task list would leave a thread idle.
  const auto cost = [&](const Task& t) {
    return (t.token_end - t.token_begin) * (sl[t.row] - (qsl[t.row + 1] - t.token_end));
  };
  std::stable_sort(tasks.begin(), tasks.end(),
                   [&](const Task& a, const Task& b) { return cost(a) > cost(b); });
  std::atomic<int64_t> next_task{0};
  const int64_t o_tok = out.stride(0), o_head = out.stride(1);
  const float fscale = static_cast<float>(scale);

  // Each query tensor with its own strides: the leader's queries come from another layer.
  auto load = [&](const at::Tensor& queries, const Task& task, int64_t first_pos) {
    const float* base = queries.data_ptr<float>();
    const int64_t tok_stride = queries.stride(0), head_stride = queries.stride(1);
    TileQueries tq;
    tq.n = static_cast<int>((task.token_end - task.token_begin) * G);
    tq.npad = (tq.n + kLanes - 1) / kLanes * kLanes;
    tq.dim = static_cast<int>(D);
    tq.rows.assign(static_cast<size_t>(tq.n) * D, 0.f);
    tq.cols.assign(static_cast<size_t>(tq.npad) * D, 0.f);
    tq.pos.assign(tq.npad, -1);
    int i = 0;
    for (int64_t t = task.token_begin; t < task.token_end; ++t)
      for (int64_t h = 0; h < G; ++h, ++i) {
        const float* src = base + t * tok_stride + (task.kv_head * G + h) * head_stride;
        for (int64_t d = 0; d < D; ++d) {
          tq.rows[i * D + d] = src[d];
          tq.cols[d * tq.npad + i] = src[d];
        }
        tq.pos[i] = first_pos + (t - task.token_begin);
      }
    pack_bf16(tq);
    return tq;
  };

  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks.size());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t idx = next_task++; idx < static_cast<int64_t>(tasks.size()); idx = next_task++) {
      const Task& task = tasks[idx];
      const int64_t row = task.row, g = task.kv_head;
      const int64_t p0 = sl[row] - (qsl[row + 1] - task.token_begin);
      const int64_t p1 = p0 + (task.token_end - task.token_begin) - 1;
      const TileQueries tq = load(q, task, p0);
      Branch prox(tq.npad, static_cast<int>(Dv));  // padding rows stay empty
      const int64_t sinks_end = std::min(sink, p1 + 1);
      const int64_t window_start = std::max(sink, p0 - recent + 1);
      if (sinks_end > 0)
        attend_range(prox, tq, kp, vv, row, g, 0, std::min(sinks_end, window_start) - 1, true,
                     sink, recent, fscale);
      attend_range(prox, tq, kp, vv, row, g, window_start, p1, true, sink, recent, fscale);
      Branch dist(tq.npad, static_cast<int>(Dv));
      std::vector<float> log_mass;
      if (has_distant && p1 - recent >= sink) {
        const TileQueries tqd = load(q_dist, task, p0);
        attend_range(dist, tqd, kd, vv, row, g, sink, p1 - recent, false, sink, recent, fscale);
        if (estimated)
          log_mass = estimated_log_mass(tq, kp, sp, summary_tokens, log_w, G, row, g, sink,
                                        recent, fscale);
      }
      for (int i = 0; i < tq.n; ++i) {
        const int64_t t = task.token_begin + i / G, h = g * G + i % G;
        float* o = op + t * o_tok + h * o_head;
        float gate = 1.f;
        if (dist.l[i] > 0.f) {
          // g = sigmoid(lse_P - lse_D), lse = m + log l
          const float lse_d = estimated ? log_mass[i] : dist.m[i] + std::log(dist.l[i]);
          const float diff = (prox.m[i] + std::log(prox.l[i])) - lse_d;
          gate = 1.f / (1.f + std::exp(-diff));
          if (tau > 0 && gate >= tau) gate = 1.f;
        }
        const float wp = gate / prox.l[i];
        const float wd = gate < 1.f ? (1.f - gate) / dist.l[i] : 0.f;
        const float* ap = prox.acc.data() + static_cast<size_t>(i) * Dv;
        const float* ad = dist.acc.data() + static_cast<size_t>(i) * Dv;
        for (int64_t d = 0; d < Dv; ++d) o[d] = wp * ap[d] + wd * ad[d];
      }
    }
  });
}

}  // namespace

// out [T, H, Dv] float32; q, q_dist [T, H, D] float32; caches as channel-sliced views;
// summary [pages, Hkv, states, D] with its table and log weights [H] (log S + offset):
// estimated mass (else the leader's).
void pod_attention(at::Tensor out, at::Tensor q, at::Tensor q_dist, at::Tensor k_prox,
                   at::Tensor k_prox_table, int64_t k_prox_bs, at::Tensor v, at::Tensor v_table,
                   int64_t v_bs, c10::optional<at::Tensor> k_dist,
                   c10::optional<at::Tensor> k_dist_table, int64_t k_dist_bs,
                   at::Tensor query_start_loc, at::Tensor seq_lens, double scale, int64_t sink,
                   int64_t recent, double tau, c10::optional<at::Tensor> summary,
                   c10::optional<at::Tensor> summary_table, int64_t summary_states,
                   int64_t summary_tokens, c10::optional<at::Tensor> summary_log_weight) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && q.scalar_type() == at::kFloat, "float32 q/out");
  TORCH_CHECK(!summary.has_value() || (summary->scalar_type() == v.scalar_type() &&
                                       summary_table.has_value() && k_dist.has_value()),
              "summaries: the caches' dtype, with a table, for a follower");
  TORCH_CHECK(!summary.has_value() ||
                  (summary_log_weight.has_value() &&
                   summary_log_weight->scalar_type() == at::kFloat &&
                   summary_log_weight->is_contiguous() && summary_log_weight->numel() == q.size(1)),
              "summaries: float32 log weights, one per query head");
  TORCH_CHECK(q.stride(2) == 1 && q_dist.stride(2) == 1 && out.stride(2) == 1, "dense head dim");
  TORCH_CHECK(q_dist.sizes() == q.sizes() && q_dist.scalar_type() == at::kFloat,
              "q_dist: float32, q's shape");
  TORCH_CHECK(k_prox.scalar_type() == v.scalar_type(), "caches share a dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "pod_attention", [&] {
    run<scalar_t>(out, q, q_dist, k_prox, k_prox_table, k_prox_bs, v, v_table, v_bs, k_dist,
                  k_dist_table, k_dist_bs, query_start_loc, seq_lens, scale, sink, recent, tau,
                  summary, summary_table, summary_states, summary_tokens, summary_log_weight);
  });
}

// cache[block, :, offset, :] = data[t] for slot = block * block_size + offset of each
// token t; slots < 0 (padding) are skipped. cache [B,H,N,C] (C dense), data [T,H,C].
void write_slots(at::Tensor cache, at::Tensor slots, int64_t block_size, at::Tensor data) {
  TORCH_CHECK(cache.scalar_type() == data.scalar_type(), "cache and data share a dtype");
  TORCH_CHECK(cache.stride(3) == 1 && data.stride(2) == 1, "dense channels");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "int64 slots");
  const int64_t tokens = slots.size(0), heads = data.size(1), width = data.size(2);
  const int64_t bytes = width * data.element_size();
  const int64_t* slot = slots.data_ptr<int64_t>();
  auto* dst = static_cast<char*>(cache.data_ptr());
  const auto* src = static_cast<const char*>(data.data_ptr());
  const int64_t es = data.element_size();
  for (int64_t t = 0; t < tokens; ++t) {
    if (slot[t] < 0) continue;
    const int64_t block = slot[t] / block_size, offset = slot[t] % block_size;
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(dst + (block * cache.stride(0) + h * cache.stride(1) + offset * cache.stride(2)) * es,
                  src + (t * data.stride(0) + h * data.stride(1)) * es, bytes);
  }
}

// Which vector paths this build has (it is compiled for the machine it runs on).
std::string vector_isa() {
#if defined(__AVX512BF16__)
  return "avx512-bf16";
#elif defined(__AVX512F__)
  return "avx512";
#else
  return "generic";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_isa", &vector_isa, "Vector paths compiled in: avx512-bf16, avx512 or generic");
  m.def("pod_attention", &pod_attention, "Paged PoD attention (CPU)");
  m.def("write_slots", &write_slots, "Store tokens' K or V into a paged cache (CPU)");
}
