// Fused attention over one layer of a stacked KV cache, for XLA:CPU (an XLA FFI custom call): decode, and
// prefill through a blocked path.
//
// Why this exists: inside the decoder's `lax.scan`, XLA:CPU copies every layer's slice of the stacked cache
// before its dot products can read it, and the skinny (T * heads)-column products run far below memory
// bandwidth. This kernel reads the layer straight out of the stacked cache buffer (layer index as an
// operand), once, with an online softmax, split over slot ranges on XLA's intra-op thread pool. The
// pure-JAX formulation in llama.py stays the reference and the path on every other backend.
//
// Semantics (as `lacax.model.llama.attention`; float32 arithmetic, float32, bfloat16 or int8 storage):
//   a query (t, kv head j, group member g) at original position qp attends slot s of head j iff
//   pos[s, j] >= 0 and pos[s, j] <= qp and qp >= 0, with logits q . k / sqrt(hd); a query that sees no slot
//   gets the uniform distribution over all S slots (what the masked reference softmax gives).
//   rotate != 0: keys are stored before RoPE and rotated here at their slot index with the tables
//   cos/sin [S, hd] (rope_mode "slot"); rotate == 0: keys are used as stored.
//
// Operands: q [B, T, KV, G, hd] f32/bf16; k_all, v_all [L, B, S, KV, hd] f32/bf16; pos_all [L, B, S, KV] s32;
// query_pos [B, T] s32; layer [] s32; cos, sin [S, hd] f32 (ignored unless rotate), rows as
// `lacax.model.rope.rope_table` builds them: both halves of a row are equal, and only the first is read.
// Result: [B, T, KV, G, hd] in the cache's dtype. With bfloat16 the reference rounds the rotated keys and the
// probabilities to bfloat16 before their products. Where the CPU has AVX-512 BF16 and the queries and the cache
// are bfloat16, this kernel does too (the weights it rounds are relative to the running maximum, not yet
// normalised) and takes both products in bfloat16 pairs with float32 sums (vdpbf16ps); elsewhere it keeps them
// in float32 (closer to exact).
//
// int8 caches (`lacax_decode_attention_int8`, two more operands k_scale, v_scale [L, B, S, KV] f32): a stored
// key or value is q * scale (one scale per token and kv head, lacax.cache.kv_cache.quantize_kv), dequantized
// here as it is read; the result has the queries' dtype. The key scale multiplies the widened key before its
// rotation, the value scale multiplies the slot's softmax weight (sum_s p_s * (v_s * c_s) = sum_s (p_s * c_s) *
// v_s), so the values pass reads one byte per element. With bfloat16 products the dequantized, rotated keys are
// rounded to bfloat16 (as the reference rounds them) and the values pass stays in float32.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using lacax::ParallelFor;
using lacax::SameDims;

typedef float v16 __attribute__((vector_size(64)));

inline v16 Load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// bfloat16 is stored as uint16_t (the top half of a float32).
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// 16 bfloat16 values widened to float32. With AVX-512 one vpmovzxwd from memory and a shift (GCC 12 splits the
// generic conversion below into 8-lane halves joined by extracts and inserts: a third of the decode-attention
// time went to it).
inline v16 Load16(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
#endif
  v16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// 16 int8 values widened to float32 (exact): one vpmovsxbd from memory and a convert.
inline v16 Load16(const int8_t* p) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  v16 v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  typedef int8_t i8x16 __attribute__((vector_size(16)));
  i8x16 b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, v16);
#endif
}

inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t x) { return lacax::Bf16ToFloat(x); }
inline float ToFloat(int8_t x) { return static_cast<float>(x); }

// The dtype of the result for queries QT and cache KT: the cache's, except for an int8 cache (the queries').
template <typename QT, typename KT>
using OutType = std::conditional_t<std::is_same_v<KT, int8_t>, QT, KT>;

inline void FromFloat(float x, float* out) { *out = x; }
inline void FromFloat(float x, uint16_t* out) { *out = lacax::FloatToBf16(x); }

inline v16 Max16(v16 a, v16 b) { return a < b ? b : a; }  // lane-wise std::max(a, b)

// op folded over the 16 lanes of v (a butterfly of shuffles).
template <typename Op>
inline float Reduce16(v16 v, Op op) {
  v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

inline float HorizontalSum(v16 v) { return Reduce16(v, [](v16 a, v16 b) { return a + b; }); }
inline float HorizontalMax(v16 v) { return Reduce16(v, Max16); }

// exp(x) lane by lane for x <= 0 (softmax weights), relative error ~1e-7; branch- and call-free.
inline v16 ExpNonPositive16(v16 x) {
  const v16 lowest = v16{} - 87.0f;
  x = x < lowest ? lowest : x;
  const float kRound = 12582912.0f;
  const v16 n = (x * 1.44269504088896341f + kRound) - kRound;
  const v16 r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float ExpNonPositive(float x) { return ExpNonPositive16(v16{} + x)[0]; }  // the same, one value

// One row's online-softmax step over a block of sb logits x (-inf = masked): x becomes the weights relative
// to the new running max m, the running sum l and the row's unnormalised output acc[HD] are rescaled to it.
// A row with nothing visible in the block gets all-zero weights. Written in 16-lane vectors: GCC does not
// vectorise the max reduction by itself (without -ffast-math), and a scalar max chain over every block of
// every row cost about a third of a prefill's attention time.
template <int HD>
inline void SoftmaxUpdate(float* x, int64_t sb, float& m, float& l, float* acc) {
  const int64_t full = sb / 16 * 16;
  v16 vmax = v16{} - INFINITY;
  for (int64_t ds = 0; ds < full; ds += 16) {
    const v16 v = Load16(x + ds);
    vmax = Max16(vmax, v);
  }
  float block_max = HorizontalMax(vmax);
  for (int64_t ds = full; ds < sb; ++ds) block_max = std::max(block_max, x[ds]);
  if (block_max == -INFINITY) {
    std::fill(x, x + sb, 0.0f);
    return;
  }
  const float new_max = std::max(m, block_max);
  const float correction = m == -INFINITY ? 0.0f : ExpNonPositive(m - new_max);
  m = new_max;
  v16 vsum = {};
  for (int64_t ds = 0; ds < full; ds += 16) {
    const v16 v = Load16(x + ds);
    const v16 p = v > -INFINITY ? ExpNonPositive16(v - new_max) : v16{};
    Store16(x + ds, p);
    vsum += p;
  }
  float sum = HorizontalSum(vsum);
  for (int64_t ds = full; ds < sb; ++ds) {
    const float keep = x[ds] > -INFINITY ? 1.0f : 0.0f;
    const float p = ExpNonPositive(x[ds] - new_max) * keep;
    x[ds] = p;
    sum += p;
  }
  l = l * correction + sum;
  if (correction != 1.0f) {
    for (int64_t d = 0; d < HD; ++d) acc[d] *= correction;
  }
}

// What a query that sees no slot gets (the reference's uniform distribution over all S slots): the mean of
// the S value rows at v (rows `stride` elements apart; an int8 row s times its scale vs[s * scale_stride]),
// written to dst.
template <int HD, typename KT, typename OT>
void MeanValues(const KT* v, int64_t S, int64_t stride, OT* dst, const float* vs = nullptr,
                int64_t scale_stride = 0) {
  float sum[HD] = {};
  for (int64_t s = 0; s < S; ++s) {
    const float c = vs == nullptr ? 1.0f : vs[s * scale_stride];
    for (int64_t d = 0; d < HD; ++d) sum[d] += ToFloat(v[s * stride + d]) * c;
  }
  for (int64_t d = 0; d < HD; ++d) FromFloat(sum[d] / static_cast<float>(S), dst + d);
}

// w[r * row_stride + s] *= c[s] for `rows` rows of sb weights: an int8 cache's value scales folded into the
// softmax weights of one kv head's query rows.
inline void ScaleWeights(float* w, int64_t rows, int64_t row_stride, int64_t sb, const float* c) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t s = 0; s < sb; ++s) w[r * row_stride + s] *= c[s];
}

constexpr int64_t kDecodeRows = 64;  // KV * T * G up to which the decode path runs (more: AttendBlocked)
constexpr int64_t kBlock = 64;   // slots per softmax block (logits of a block stay in L1)
constexpr int64_t kChunk = 256;  // slots per work item handed to a thread

struct Shapes {
  int64_t B, T, KV, G, S, n;  // n = T * G queries per kv head
};

constexpr int64_t kGroup = 16;  // slots whose logits come out of one reduction tree (one vector of 16)

// What a block of a chunk needs from its positions: does some query see a slot of it, does every query see all.
struct BlockView {
  bool seen, unmasked;
};

// Reads every 64-byte line of [p, p + bytes) (one whole-line load each) and returns an OR of them, so that a
// chunk's keys and values come into L2 at the read bandwidth before the compute on them starts. Interleaving
// the loads with the compute, however far ahead the prefetches below reach, leaves each slot's loads waiting
// on memory; a plain stream of loads lets the hardware prefetchers run at full rate. Measured on Zen 4 (2
// cores; 30 layers of SmolLM2's cache, 4128 of 4160 slots, from DRAM; touching on and off in alternate calls,
// 40 pairs in one process): bfloat16 203-204 -> 190-199 us per layer (medians), float32 382 -> 333; a
// bfloat16 cache of 544 slots, 37-43 us, alike. The bfloat16 decode at 4096 tokens: 1.017x and 1.019x
// (medians of 5 and 6 interleaved pairs through `generate`).
inline uint64_t TouchLines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  u32x16 acc = {};
  for (int64_t off = 0; off < bytes; off += 64) {
    u32x16 line;
    std::memcpy(&line, c + off, sizeof(line));
    acc |= line;
  }
  return acc[0] | acc[15];
}

// Keeps the touch loads from being optimised away (their result is otherwise unused).
inline void KeepAlive(uint64_t x) { asm volatile("" : : "r"(x)); }
// How far ahead of the slot being rotated its keys, values and rotation rows are prefetched into L2: without
// it the loads waited on L3/DRAM (perf: most samples on the key and value loads; 4k slots, 2 threads, 30
// layers: 250-300 -> 200-230 us per layer with it; 32 to 128 slots ahead measured alike, into L1 slower).
// With the chunk touched first (TouchLines) most of these hit L2; they are kept for the rotation rows, and
// because removing them measured no faster.
constexpr int64_t kPrefetchSlots = 64;

// out[s] = the sum of p[s]'s 16 lanes, for s = 0..15 (p is overwritten): a transpose-and-add tree of 15 steps
// (two shuffles and an add each) in place of 16 horizontal sums of 4 dependent steps each.
inline v16 LaneSums16(v16* p) {
  for (int i = 0; i < 8; ++i) {  // [slot 2i: 8 partial sums | slot 2i+1: 8]
    const v16 a = p[2 * i], b = p[2 * i + 1];
    p[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {  // 4 slots x 4 partial sums
    const v16 a = p[2 * i], b = p[2 * i + 1];
    p[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {  // 8 slots x 2
    const v16 a = p[2 * i], b = p[2 * i + 1];
    p[i] = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(p[0], p[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(p[0], p[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// acc_i[0..HD) += sum_s w_i[s] * v[s][0..HD) for R query rows (weights `kBlock` apart, accumulators HD apart),
// the accumulators held in registers over the sb slots (value rows `stride` elements apart).
template <int HD, int R, typename KT>
inline void AccumulateValues(const float* w, int64_t sb, const KT* v, int64_t stride, float* acc) {
  constexpr int NV = HD / 16;
  v16 o[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) o[i][c] = Load16(acc + i * HD + c * 16);
  for (int64_t s = 0; s < sb; ++s) {
    v16 x[NV];
    for (int c = 0; c < NV; ++c) x[c] = Load16(v + s * stride + c * 16);
    for (int i = 0; i < R; ++i) {
      const float p = w[i * kBlock + s];
      for (int c = 0; c < NV; ++c) o[i][c] += p * x[c];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) Store16(acc + i * HD + c * 16, o[i][c]);
}

// AccumulateValues for rem (1..R) rows, the tile size picked at run time.
template <int HD, int R, typename KT>
void AccumulateValuesUpTo(int64_t rem, const float* w, int64_t sb, const KT* v, int64_t stride, float* acc) {
  if constexpr (R > 1) {
    if (rem < R) return AccumulateValuesUpTo<HD, R - 1, KT>(rem, w, sb, v, stride, acc);
  }
  AccumulateValues<HD, R, KT>(w, sb, v, stride, acc);
}

// The values pass for `rows` query rows, in register tiles of up to 16 / NV rows (the value rows are read
// once per tile: once in all for a decode step's G queries of a kv head).
template <int HD, typename KT>
void AccumulateValueRows(const float* w, int64_t rows, int64_t sb, const KT* v, int64_t stride, float* acc) {
  constexpr int NV = HD / 16, R = NV >= 8 ? 2 : 16 / NV;
  for (int64_t r = 0; r < rows; r += R) {
    AccumulateValuesUpTo<HD, R, KT>(std::min<int64_t>(R, rows - r), w + r * kBlock, sb, v, stride, acc + r * HD);
  }
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Dots = true;

// The bfloat16 form of the values pass (AccumulateValues): acc_i[0..HD) += sum_s w_i[s] * v[s][0..HD) for R
// query rows, two slots per vdpbf16ps. wp holds each row's weights rounded to bfloat16 in pairs (slots 2k and
// 2k + 1 in one 32-bit word; rows kBlock / 2 words apart); the two slots' value rows are interleaved word by
// word (vpermt2w), so that each lane of a product holds (v[s][d], v[s + 1][d]). An odd sb pairs its last slot
// with zeros.
template <int HD, int R>
inline void AccumulateValuePairs(const uint32_t* wp, int64_t sb, const uint16_t* v, int64_t stride, float* acc) {
  constexpr int NV = HD / 16, NB = HD / 32;
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                   24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  __m512 o[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) o[i][c] = _mm512_loadu_ps(acc + i * HD + c * 16);
  for (int64_t s = 0; s < sb; s += 2) {
    __m512i x[NV];
    for (int c = 0; c < NB; ++c) {
      const __m512i a = _mm512_loadu_si512(v + s * stride + c * 32);
      const __m512i b = s + 1 < sb ? _mm512_loadu_si512(v + (s + 1) * stride + c * 32) : _mm512_setzero_si512();
      x[2 * c] = _mm512_permutex2var_epi16(a, lo, b);
      x[2 * c + 1] = _mm512_permutex2var_epi16(a, hi, b);
    }
    for (int i = 0; i < R; ++i) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(wp[i * (kBlock / 2) + s / 2]));
      for (int c = 0; c < NV; ++c) o[i][c] = _mm512_dpbf16_ps(o[i][c], w, (__m512bh)x[c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + i * HD + c * 16, o[i][c]);
}

template <int HD, int R>
void AccumulateValuePairsUpTo(int64_t rem, const uint32_t* wp, int64_t sb, const uint16_t* v, int64_t stride,
                              float* acc) {
  if constexpr (R > 1) {
    if (rem < R) return AccumulateValuePairsUpTo<HD, R - 1>(rem, wp, sb, v, stride, acc);
  }
  AccumulateValuePairs<HD, R>(wp, sb, v, stride, acc);
}

// Rounds the first sb weights of each of `rows` rows (kBlock apart) to bfloat16 pairs (kBlock / 2 words apart);
// an odd sb's missing partner is 0.
inline void WeightPairs(float* w, int64_t rows, int64_t sb, uint32_t* wp) {
  for (int64_t r = 0; r < rows; ++r) {
    float* x = w + r * kBlock;
    if (sb % 2) x[sb] = 0.0f;
    for (int64_t k = 0; k < sb; k += 32) {
      const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(x + k));
      _mm512_storeu_si512(wp + r * (kBlock / 2) + k / 2, (__m512i)b);
    }
  }
}
#else
constexpr bool kBf16Dots = false;
#endif

// One query's (scaled, float32) dot products with a group's 16 float32 keys ([kGroup][HD] at k).
template <int HD>
inline v16 GroupDots(const float* q, const float* k) {
  constexpr int NV = HD / 16;
  v16 qv[NV];
  for (int c = 0; c < NV; ++c) qv[c] = Load16(q + c * 16);
  v16 part[kGroup];
  for (int ds = 0; ds < kGroup; ++ds) {
    v16 sum = qv[0] * Load16(k + ds * HD);
    for (int c = 1; c < NV; ++c) sum += qv[c] * Load16(k + ds * HD + c * 16);
    part[ds] = sum;
  }
  return LaneSums16(part);
}

#if defined(__AVX512BF16__)
// The same for a bfloat16 query (unscaled) and 16 bfloat16 keys `stride` elements apart, in bfloat16 pairs.
template <int HD>
inline v16 GroupDotsBf16(const uint16_t* q, const uint16_t* k, int64_t stride) {
  __m512bh qv[HD / 32];
  for (int c = 0; c < HD / 32; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + c * 32);
  v16 part[kGroup];
  for (int ds = 0; ds < kGroup; ++ds) {
    const uint16_t* kr = k + ds * stride;
    __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(kr));
    for (int c = 1; c < HD / 32; ++c) sum = _mm512_dpbf16_ps(sum, qv[c], (__m512bh)_mm512_loadu_si512(kr + c * 32));
    part[ds] = (v16)sum;
  }
  return LaneSums16(part);
}
#endif

// Online-softmax partial result of one (batch row, slot chunk of at most kChunk slots): per query row
// r = j * n + t * G + g,
// the running max m, the running sum l and the unnormalised output acc[hd].
//
// Per block of kBlock slots, a group of 16 slots at a time: the keys of every kv head are rotated (if asked)
// into float32 slot by slot (each slot's KV * hd keys are contiguous), then each query's 16 dot products with
// its head's keys are reduced together (LaneSums16) and masked at once (not at all when every query sees every
// slot of the block). Then the online-softmax update, and the values pass of each head with each tile of query
// rows accumulated in registers. A block no query can see (empty slots, or all in the queries' future) is
// skipped. The rotation tables are rope_table's [S, hd] rows, whose halves are equal: only the first is read.
//
// Measured against the previous slot-by-slot kernel (horizontal sums per dot product, accumulators in memory),
// one thread, SmolLM2's 3 kv heads x 3 queries, bfloat16: 72 -> 55 ns per slot from L2; 2 threads over 30
// layers of 4128 slots: 250-300 -> 200-230 us per layer (scratch harness; the decode rows of
// experiments/bench_decode.py measure the effect on the model).
template <int HD, typename KT, bool kDot = false>
void AttendChunk(const Shapes& sh, int64_t b, int64_t s_begin, int64_t s_end, const float* qs, const KT* K,
                 const KT* V, const int32_t* P, const int32_t* QP, const float* cos_t, const float* sin_t,
                 bool rotate, float* m, float* l, float* acc, const uint16_t* qb = nullptr, float scale = 1.0f,
                 const float* KS = nullptr, const float* VS = nullptr) {
  constexpr int NV = HD / 16, HV = NV / 2;
  constexpr bool kInt8 = std::is_same_v<KT, int8_t>;  // KS, VS: the slots' scales [S][KV]
  const int64_t rows = sh.KV * sh.n, KV = sh.KV, n = sh.n, G = sh.G;
  alignas(64) float logits[kDecodeRows * kBlock];  // n <= rows <= kDecodeRows (checked by the caller)
  // One group's keys: kDot: [kGroup][KV][HD] bfloat16 (rotated, or a partial group padded with zeros; a whole
  // unrotated group is read in place), else [KV][kGroup][HD] float32.
  std::vector<float> kf(KV * kGroup * HD / (kDot ? 2 : 1));
  int32_t qp[kDecodeRows];
  int32_t q_max = -1, q_min = INT32_MAX;  // q_min < 0 when some query is padding
  for (int64_t a = 0; a < n; ++a) {
    qp[a] = QP[a / G];
    q_max = std::max(q_max, qp[a]);
    q_min = std::min(q_min, qp[a]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  std::fill(acc, acc + rows * HD, 0.0f);
  if (q_max < 0) return;  // only padding queries: each sees no slot
  constexpr int64_t kLine = 64;
  const int64_t row_bytes = KV * HD * static_cast<int64_t>(sizeof(KT));  // one slot's keys (or values)
  // Per block, from its positions (every head) in one pass: is any slot visible to some query, is every slot
  // visible to every query (then nothing is masked)? The keys and values of every block some query sees are
  // then read into L2, a load per cache line, before any is computed on (see TouchLines).
  BlockView views[kChunk / kBlock];
  uint64_t touched = 0;
  for (int64_t s0 = s_begin, i = 0; s0 < s_end; s0 += kBlock, ++i) {
    const int64_t sb = std::min(kBlock, s_end - s0);
    const int32_t* pb = P + s0 * KV;
    int32_t p_min = INT32_MAX, p_max = INT32_MIN, seen = 0;
    for (int64_t e = 0; e < sb * KV; ++e) {
      p_min = std::min(p_min, pb[e]);
      p_max = std::max(p_max, pb[e]);
      seen += pb[e] >= 0 && pb[e] <= q_max;
    }
    views[i] = {seen > 0, p_min >= 0 && p_max <= q_min};
    if (seen > 0) {
      touched |= TouchLines(K + s0 * KV * HD, sb * row_bytes) | TouchLines(V + s0 * KV * HD, sb * row_bytes);
      if constexpr (kInt8) {
        const int64_t scale_bytes = sb * KV * static_cast<int64_t>(sizeof(float));
        touched |= TouchLines(KS + s0 * KV, scale_bytes) | TouchLines(VS + s0 * KV, scale_bytes);
      }
    }
  }
  KeepAlive(touched);
  for (int64_t s0 = s_begin, i = 0; s0 < s_end; s0 += kBlock, ++i) {
    const int64_t sb = std::min(kBlock, s_end - s0);
    const int32_t* pb = P + s0 * KV;
    if (!views[i].seen) continue;
    const bool unmasked = views[i].unmasked;
    for (int64_t g0 = 0; g0 < sb; g0 += kGroup) {
      const int64_t gs = std::min(kGroup, sb - g0);
      // The group's keys of every head, slot by slot (each slot's KV * HD keys are contiguous).
      for (int64_t ds = 0; ds < kGroup; ++ds) {
        const int64_t s = s0 + g0 + ds;
        if (s + kPrefetchSlots < s_end) {
          const char* pk = reinterpret_cast<const char*>(K + (s + kPrefetchSlots) * KV * HD);
          const char* pv = reinterpret_cast<const char*>(V + (s + kPrefetchSlots) * KV * HD);
          for (int64_t off = 0; off < row_bytes; off += kLine) {
            __builtin_prefetch(pk + off, 0, 2);
            __builtin_prefetch(pv + off, 0, 2);
          }
          if (rotate) {
            for (int64_t off = 0; off < HD / 2 * static_cast<int64_t>(sizeof(float)); off += kLine) {  // first half
              __builtin_prefetch(reinterpret_cast<const char*>(cos_t + (s + kPrefetchSlots) * HD) + off, 0, 2);
              __builtin_prefetch(reinterpret_cast<const char*>(sin_t + (s + kPrefetchSlots) * HD) + off, 0, 2);
            }
          }
        }
        if constexpr (kDot && !kInt8) {
          if (!rotate && gs == kGroup) continue;  // read in place
        }
        v16 co[HV] = {}, si[HV] = {};  // the slot's rotation (every head's)
        if (rotate && ds < gs) {
          for (int c = 0; c < HV; ++c) {
            co[c] = Load16(cos_t + s * HD + c * 16);
            si[c] = Load16(sin_t + s * HD + c * 16);
          }
        }
        for (int64_t j = 0; j < KV; ++j) {
          float* dst = kf.data() + (kDot ? (ds * KV + j) * HD / 2 : (j * kGroup + ds) * HD);
          if (ds >= gs) {
            std::fill(dst, dst + (kDot ? HD / 2 : HD), 0.0f);
            continue;
          }
          const KT* kr = K + (s * KV + j) * HD;
          v16 k[NV];
          for (int c = 0; c < NV; ++c) k[c] = Load16(kr + c * 16);
          if constexpr (kInt8) {
            const float ks = KS[s * KV + j];
            for (int c = 0; c < NV; ++c) k[c] *= ks;
          }
          if (rotate) {
            for (int c = 0; c < HV; ++c) {
              const v16 x1 = k[c], x2 = k[c + HV];
              k[c] = x1 * co[c] - x2 * si[c];
              k[c + HV] = x2 * co[c] + x1 * si[c];
            }
          }
          if constexpr (kDot) {
#if defined(__AVX512BF16__)
            for (int c = 0; c < NV / 2; ++c)  // rounded to bfloat16, as the reference rounds the rotated keys
              _mm512_storeu_si512(dst + c * 16, (__m512i)_mm512_cvtne2ps_pbh((__m512)k[2 * c + 1], (__m512)k[2 * c]));
#endif
          } else {
            for (int c = 0; c < NV; ++c) Store16(dst + c * 16, k[c]);
          }
        }
      }
      // kDot: the group's bfloat16 keys, in place (a whole unrotated bfloat16 group) or in kf ([kGroup][KV][HD]).
      const uint16_t* kg = nullptr;
      if constexpr (kDot) {
        kg = !kInt8 && !rotate && gs == kGroup ? reinterpret_cast<const uint16_t*>(K) + (s0 + g0) * KV * HD
                                     : reinterpret_cast<const uint16_t*>(kf.data());
      }
      for (int64_t j = 0; j < KV; ++j) {
        i32x16 kpv = {};
        if (!unmasked) {
          for (int64_t ds = 0; ds < kGroup; ++ds) kpv[ds] = ds < gs ? pb[(g0 + ds) * KV + j] : -1;
        }
        for (int64_t a = 0; a < n; ++a) {
          v16 dots = {};
          if constexpr (kDot) {
#if defined(__AVX512BF16__)
            dots = GroupDotsBf16<HD>(qb + (j * n + a) * HD, kg + j * HD, KV * HD) * scale;
#endif
          } else {
            dots = GroupDots<HD>(qs + (j * n + a) * HD, kf.data() + j * kGroup * HD);
          }
          float* dst = logits + (j * n + a) * kBlock + g0;
          if (unmasked) {
            Store16(dst, dots);
          } else {
            const i32x16 visible = (kpv >= 0) & (kpv <= qp[a]) & (qp[a] >= 0 ? -1 : 0);
            Store16(dst, visible ? dots : v16{} - INFINITY);
          }
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) SoftmaxUpdate<HD>(logits + r * kBlock, sb, m[r], l[r], acc + r * HD);
    if constexpr (kInt8) {  // the value scales into the weights (l keeps the unscaled sum)
      for (int64_t j = 0; j < KV; ++j) {
        float c[kBlock];
        for (int64_t ds = 0; ds < sb; ++ds) c[ds] = VS[(s0 + ds) * KV + j];
        ScaleWeights(logits + j * n * kBlock, n, kBlock, sb, c);
      }
    }
    if constexpr (kDot && !kInt8) {
#if defined(__AVX512BF16__)
      alignas(64) uint32_t wp[kDecodeRows * kBlock / 2];
      WeightPairs(logits, rows, sb, wp);
      constexpr int R = HD / 16 >= 8 ? 2 : 16 / (HD / 16);
      for (int64_t j = 0; j < KV; ++j)
        for (int64_t r = 0; r < n; r += R)
          AccumulateValuePairsUpTo<HD, R>(std::min<int64_t>(R, n - r), wp + (j * n + r) * (kBlock / 2), sb,
                                          reinterpret_cast<const uint16_t*>(V) + (s0 * KV + j) * HD, KV * HD,
                                          acc + (j * n + r) * HD);
#endif
    } else {
      for (int64_t j = 0; j < KV; ++j)
        AccumulateValueRows<HD, KT>(logits + j * n * kBlock, n, sb, V + (s0 * KV + j) * HD, KV * HD,
                                    acc + j * n * HD);
    }
  }
}

// The custom call's operands, typed by the Attend instantiation that reads them.
struct Operands {
  const void* q;
  const void* k_all;
  const void* v_all;
  const int32_t* pos_all;
  const int32_t* query_pos;
  const float* cos_t;
  const float* sin_t;
  bool rotate;
  void* out;
  const float* k_scale = nullptr;  // int8 caches: [L, B, S, KV]
  const float* v_scale = nullptr;
};

template <int HD, typename QT, typename KT>
void Attend(ffi::ThreadPool& pool, const Shapes& sh, int64_t layer, const Operands& op) {
  const QT* q = static_cast<const QT*>(op.q);
  const KT* k_all = static_cast<const KT*>(op.k_all);
  const KT* v_all = static_cast<const KT*>(op.v_all);
  const int32_t *pos_all = op.pos_all, *query_pos = op.query_pos;
  const float *cos_t = op.cos_t, *sin_t = op.sin_t;
  const bool rotate = op.rotate;
  using OT = OutType<QT, KT>;
  OT* out = static_cast<OT*>(op.out);
  const int64_t B = sh.B, T = sh.T, KV = sh.KV, G = sh.G, S = sh.S, n = sh.n, rows = KV * n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
  // bfloat16 queries and a bfloat16 or int8 cache: the key products in bfloat16 pairs (vdpbf16ps), the queries
  // as they are (the scale goes on the logits). Otherwise float32 queries, scaled.
  constexpr bool kDot = kBf16Dots && std::is_same_v<QT, uint16_t> && !std::is_same_v<KT, float>;
  // The queries regrouped per kv head: [b][j * n + t * G + g][d].
  std::vector<float> qs(kDot ? 0 : B * rows * HD);
  std::vector<uint16_t> qb(kDot ? B * rows * HD : 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < KV; ++j)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t to = (b * rows + j * n + t * G + g) * HD, from = (((b * T + t) * KV + j) * G + g) * HD;
          if constexpr (kDot) {
            std::memcpy(qb.data() + to, q + from, HD * sizeof(uint16_t));
          } else {
            for (int64_t d = 0; d < HD; ++d) qs[to + d] = ToFloat(q[from + d]) * scale;
          }
        }
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  const int64_t stride = rows * (HD + 2);  // per (b, chunk): m[rows], l[rows], acc[rows * HD]
  std::vector<float> partial(B * chunks * stride);
  auto layer_offset = [&](int64_t b) { return (layer * B + b) * S; };
  // An int8 cache's scales of row b's layer ([S][KV], as the positions); null for a float cache.
  constexpr bool kInt8 = std::is_same_v<KT, int8_t>;
  auto scales = [&](const float* all, int64_t b) { return kInt8 ? all + layer_offset(b) * KV : nullptr; };
  ParallelFor(pool, B * chunks, [&](int64_t item) {
    const int64_t b = item / chunks, c = item % chunks;
    float* p = partial.data() + item * stride;
    AttendChunk<HD, KT, kDot>(sh, b, c * kChunk, std::min(S, (c + 1) * kChunk),
                              kDot ? nullptr : qs.data() + b * rows * HD,
                              k_all + layer_offset(b) * KV * HD, v_all + layer_offset(b) * KV * HD,
                              pos_all + layer_offset(b) * KV, query_pos + b * T, cos_t, sin_t, rotate, p, p + rows,
                              p + 2 * rows, kDot ? qb.data() + b * rows * HD : nullptr, scale,
                              scales(op.k_scale, b), scales(op.v_scale, b));
  });
  // Merge the chunks' partial softmaxes.
  for (int64_t b = 0; b < B; ++b) {
    const KT* V = v_all + layer_offset(b) * KV * HD;
    const float* VS = scales(op.v_scale, b);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < KV; ++j)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = j * n + t * G + g;
          OT* dst = out + (((b * T + t) * KV + j) * G + g) * HD;
          float total_max = -INFINITY;
          for (int64_t c = 0; c < chunks; ++c) {
            const float* p = partial.data() + (b * chunks + c) * stride;
            if (p[rows + r] > 0.0f) total_max = std::max(total_max, p[r]);
          }
          if (total_max == -INFINITY) {  // sees no slot
            MeanValues<HD, KT, OT>(V + j * HD, S, KV * HD, dst, VS == nullptr ? nullptr : VS + j, KV);
            continue;
          }
          float denom = 0.0f;
          float numer[HD] = {};
          for (int64_t c = 0; c < chunks; ++c) {
            const float* p = partial.data() + (b * chunks + c) * stride;
            if (!(p[rows + r] > 0.0f)) continue;
            const float w = ExpNonPositive(p[r] - total_max);
            denom += w * p[rows + r];
            const float* ac = p + 2 * rows + r * HD;
            for (int64_t d = 0; d < HD; ++d) numer[d] += w * ac[d];
          }
          const float inv = 1.0f / denom;
          for (int64_t d = 0; d < HD; ++d) FromFloat(numer[d] * inv, dst + d);
        }
  }
}

// --- Many query rows (prefill, chunked prefill): blocked attention ---------------------------------------
//
// Work item: one (batch row, kv head, block of tokens), i.e. up to kRows query rows r = (t - t0) * G + g.
// The layer's keys are first rotated (if asked), converted to float32 and transposed per block of kKeys
// slots, so that both products are broadcast-FMA loops over register tiles of 4 query rows (no horizontal
// sums). A key block that no query of the item can see (all its slots empty, or every position after the
// item's last query: the causal future of a prefill) is skipped; a block every query sees whole needs no
// mask. Same semantics as the decode path above, including the uniform distribution for a query that sees
// no slot.

constexpr int64_t kRows = 64;  // query rows per work item
constexpr int64_t kKeys = 64;  // slots per key block

struct KeyBlock {
  int32_t min_pos, max_pos;  // over the block's filled slots
  bool any, all;             // some / every slot of the block filled (slots past S count as empty)
};

// logits[i][0..kKeys) = q_i . kt[., 0..kKeys) for the 4 query rows at q (row stride HD); kt is [HD][kKeys].
template <int HD>
inline void LogitsTile(const float* q, const float* kt, float* logits) {
  v16 a[4][4] = {};
#pragma GCC unroll 4
  for (int d = 0; d < HD; ++d) {
    const v16 k0 = Load16(kt + d * kKeys), k1 = Load16(kt + d * kKeys + 16), k2 = Load16(kt + d * kKeys + 32),
              k3 = Load16(kt + d * kKeys + 48);
    for (int i = 0; i < 4; ++i) {
      const float x = q[i * HD + d];
      a[i][0] += x * k0;
      a[i][1] += x * k1;
      a[i][2] += x * k2;
      a[i][3] += x * k3;
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int c = 0; c < 4; ++c) Store16(logits + i * kKeys + c * 16, a[i][c]);
}

// acc_i[0..HD) += sum_s p_i[s] * v[s][0..HD) for the 4 rows at p (row stride kKeys) and acc (row stride HD);
// v rows are `stride` elements apart.
template <int HD, typename KT>
inline void ValuesTile(const float* p, int64_t sb, const KT* v, int64_t stride, float* acc) {
  constexpr int NV = HD / 16, CV = NV < 4 ? NV : 4;
  for (int cb = 0; cb < NV; cb += CV) {
    v16 o[4][CV];
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < CV; ++c) o[i][c] = Load16(acc + i * HD + (cb + c) * 16);
    for (int64_t s = 0; s < sb; ++s) {
      v16 x[CV];
      for (int c = 0; c < CV; ++c) x[c] = Load16(v + s * stride + (cb + c) * 16);
      for (int i = 0; i < 4; ++i) {
        const float w = p[i * kKeys + s];
        for (int c = 0; c < CV; ++c) o[i][c] += w * x[c];
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < CV; ++c) Store16(acc + i * HD + (cb + c) * 16, o[i][c]);
  }
}

template <int HD, typename QT, typename KT>
void AttendBlocked(ffi::ThreadPool& pool, const Shapes& sh, int64_t layer, const Operands& op) {
  const QT* q = static_cast<const QT*>(op.q);
  const KT* k_all = static_cast<const KT*>(op.k_all);
  const KT* v_all = static_cast<const KT*>(op.v_all);
  using OT = OutType<QT, KT>;
  OT* out = static_cast<OT*>(op.out);
  const int64_t B = sh.B, T = sh.T, KV = sh.KV, G = sh.G, S = sh.S;
  constexpr bool kInt8 = std::is_same_v<KT, int8_t>;  // op.k_scale, op.v_scale: [L, B, S, KV]
  const int64_t blocks = (S + kKeys - 1) / kKeys;
  const int64_t tokens_per_item = std::max<int64_t>(1, kRows / G);
  const int64_t token_blocks = (T + tokens_per_item - 1) / tokens_per_item;
  const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
  auto layer_offset = [&](int64_t b) { return (layer * B + b) * S; };

  // Keys rotated, in float32, transposed per block: kt[((b * KV + j) * blocks + blk)][d][kKeys].
  std::vector<float> kt(B * KV * blocks * HD * kKeys);
  std::vector<KeyBlock> info(B * KV * blocks);
  ParallelFor(pool, B * blocks, [&](int64_t item) {
    const int64_t b = item / blocks, blk = item % blocks, s0 = blk * kKeys;
    const KT* K = k_all + layer_offset(b) * KV * HD;
    const int32_t* P = op.pos_all + layer_offset(b) * KV;
    for (int64_t j = 0; j < KV; ++j) {
      float* dst = kt.data() + ((b * KV + j) * blocks + blk) * HD * kKeys;
      KeyBlock bi{INT32_MAX, INT32_MIN, false, true};
      for (int64_t ds = 0; ds < kKeys; ++ds) {
        const int64_t s = s0 + ds;
        if (s >= S) {
          bi.all = false;
          for (int64_t d = 0; d < HD; ++d) dst[d * kKeys + ds] = 0.0f;
          continue;
        }
        const int32_t kp = P[s * KV + j];
        if (kp >= 0) {
          bi.any = true;
          bi.min_pos = std::min(bi.min_pos, kp);
          bi.max_pos = std::max(bi.max_pos, kp);
        } else {
          bi.all = false;
        }
        const KT* kr = K + (s * KV + j) * HD;
        const float c = kInt8 ? op.k_scale[(layer_offset(b) + s) * KV + j] : 1.0f;
        if (op.rotate) {
          const float* cs = op.cos_t + s * HD;
          const float* sn = op.sin_t + s * HD;
          for (int64_t d = 0; d < HD / 2; ++d) {
            const float x1 = ToFloat(kr[d]) * c, x2 = ToFloat(kr[d + HD / 2]) * c;
            dst[d * kKeys + ds] = x1 * cs[d] - x2 * sn[d];
            dst[(d + HD / 2) * kKeys + ds] = x2 * cs[d] + x1 * sn[d];  // the halves of a table row are equal
          }
        } else {
          for (int64_t d = 0; d < HD; ++d) dst[d * kKeys + ds] = ToFloat(kr[d]) * c;
        }
      }
      info[(b * KV + j) * blocks + blk] = bi;
    }
  });

  ParallelFor(pool, B * KV * token_blocks, [&](int64_t item) {
    const int64_t b = item / (KV * token_blocks), j = (item / token_blocks) % KV, tb = item % token_blocks;
    const int64_t t0 = tb * tokens_per_item, t1 = std::min(T, t0 + tokens_per_item);
    const int64_t rows = (t1 - t0) * G, tiles = (rows + 3) / 4, padded = tiles * 4;
    const KT* V = v_all + layer_offset(b) * KV * HD + j * HD;
    const int32_t* P = op.pos_all + layer_offset(b) * KV + j;
    const float* VS = kInt8 ? op.v_scale + layer_offset(b) * KV + j : nullptr;
    // On the heap: 80 KiB at head_dim 128 is more than a pool thread's stack should be asked for.
    std::unique_ptr<float[]> buffer(new float[kRows * (2 * HD + kKeys)]);
    float* qs = buffer.get();
    float* acc = qs + kRows * HD;
    float* w = acc + kRows * HD;
    float m[kRows], l[kRows];
    int32_t qp[kRows];
    int32_t q_min = INT32_MAX, q_max = -1;
    bool all_rows_see = true;  // every real row has a position (no padding query)
    for (int64_t r = 0; r < padded; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.0f;
      std::fill(acc + r * HD, acc + (r + 1) * HD, 0.0f);
      if (r >= rows) {
        qp[r] = -1;
        std::fill(qs + r * HD, qs + (r + 1) * HD, 0.0f);
        continue;
      }
      const int64_t t = t0 + r / G, g = r % G;
      qp[r] = op.query_pos[b * T + t];
      if (qp[r] >= 0) {
        q_min = std::min(q_min, qp[r]);
        q_max = std::max(q_max, qp[r]);
      } else {
        all_rows_see = false;
      }
      const QT* qr = q + (((b * T + t) * KV + j) * G + g) * HD;
      for (int64_t d = 0; d < HD; ++d) qs[r * HD + d] = ToFloat(qr[d]) * scale;
    }
    for (int64_t blk = 0; blk < blocks && q_max >= 0; ++blk) {
      const KeyBlock& bi = info[(b * KV + j) * blocks + blk];
      if (!bi.any || bi.min_pos > q_max) continue;  // no query of this item sees any of its slots
      const int64_t s0 = blk * kKeys, sb = std::min(kKeys, S - s0);
      const float* ktb = kt.data() + ((b * KV + j) * blocks + blk) * HD * kKeys;
      for (int64_t i = 0; i < tiles; ++i) LogitsTile<HD>(qs + i * 4 * HD, ktb, w + i * 4 * kKeys);
      if (!(bi.all && all_rows_see && bi.max_pos <= q_min)) {  // some (query, slot) pairs are masked
        int32_t kp[kKeys];
        for (int64_t ds = 0; ds < kKeys; ++ds) kp[ds] = ds < sb ? P[(s0 + ds) * KV] : -1;
        for (int64_t r = 0; r < padded; ++r) {
          float* x = w + r * kKeys;
          for (int64_t ds = 0; ds < kKeys; ++ds) {
            const bool visible = kp[ds] >= 0 && qp[r] >= 0 && kp[ds] <= qp[r];
            x[ds] = visible ? x[ds] : -INFINITY;
          }
        }
      }
      for (int64_t r = 0; r < padded; ++r) SoftmaxUpdate<HD>(w + r * kKeys, sb, m[r], l[r], acc + r * HD);
      if constexpr (kInt8) {  // the value scales into the weights (l keeps the unscaled sum)
        float c[kKeys];
        for (int64_t ds = 0; ds < sb; ++ds) c[ds] = VS[(s0 + ds) * KV];
        ScaleWeights(w, padded, kKeys, sb, c);
      }
      for (int64_t i = 0; i < tiles; ++i)
        ValuesTile<HD, KT>(w + i * 4 * kKeys, sb, V + s0 * KV * HD, KV * HD, acc + i * 4 * HD);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = t0 + r / G, g = r % G;
      OT* dst = out + (((b * T + t) * KV + j) * G + g) * HD;
      if (!(l[r] > 0.0f)) {  // sees no slot
        MeanValues<HD, KT, OT>(V, S, KV * HD, dst, VS, KV);
        continue;
      }
      const float inv = 1.0f / l[r];
      for (int64_t d = 0; d < HD; ++d) FromFloat(acc[r * HD + d] * inv, dst + d);
    }
  });
}

using AttendFn = void (*)(ffi::ThreadPool&, const Shapes&, int64_t, const Operands&);

// The cache's element type: float32, bfloat16 (uint16_t) or int8 (with scales).
enum class Cache { kF32, kBf16, kInt8 };

template <int HD, typename QT, typename KT>
AttendFn PickPath(bool blocked) {
  return blocked ? &AttendBlocked<HD, QT, KT> : &Attend<HD, QT, KT>;
}

template <int HD, typename QT>
AttendFn PickCache(Cache cache, bool blocked) {
  switch (cache) {
    case Cache::kF32: return PickPath<HD, QT, float>(blocked);
    case Cache::kBf16: return PickPath<HD, QT, uint16_t>(blocked);
    case Cache::kInt8: return PickPath<HD, QT, int8_t>(blocked);
  }
  return nullptr;
}

// The instantiation for (head_dim, query dtype, cache dtype); uint16_t holds bfloat16.
template <int HD>
AttendFn Pick(bool q_bf16, Cache cache, bool blocked) {
  return q_bf16 ? PickCache<HD, uint16_t>(cache, blocked) : PickCache<HD, float>(cache, blocked);
}

bool IsFloat(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

ffi::Error Invalid(const char* message) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, message); }

// Both handlers: k_scale / v_scale are null for a float cache.
ffi::Error Run(ffi::ThreadPool& pool, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k_all,
               const ffi::AnyBuffer& v_all, const ffi::Buffer<ffi::S32>& pos_all,
               const ffi::Buffer<ffi::S32>& query_pos, const ffi::Buffer<ffi::S32>& layer,
               const ffi::Buffer<ffi::F32>& cos_t, const ffi::Buffer<ffi::F32>& sin_t, ffi::AnyBuffer& out,
               int64_t rotate, const ffi::Buffer<ffi::F32>* k_scale, const ffi::Buffer<ffi::F32>* v_scale) {
  const auto qd = q.dimensions();
  const auto kd = k_all.dimensions();
  if (qd.size() != 5 || kd.size() != 5) return Invalid("q and the cache must be rank 5");
  const bool int8 = k_scale != nullptr;
  if (int8) {
    if (!IsFloat(q.element_type()) || k_all.element_type() != ffi::DataType::S8 ||
        v_all.element_type() != ffi::DataType::S8 || out.element_type() != q.element_type()) {
      return Invalid("int8 cache: q float32 or bfloat16, k and v int8, the result of q's dtype");
    }
  } else if (!IsFloat(q.element_type()) || !IsFloat(k_all.element_type()) ||
             v_all.element_type() != k_all.element_type() || out.element_type() != k_all.element_type()) {
    return Invalid("q and the cache must be float32 or bfloat16, v and the result of the cache's dtype");
  }
  const Shapes sh{qd[0], qd[1], qd[2], qd[3], kd[2], qd[1] * qd[3]};
  const int64_t hd = qd[4], L = kd[0];
  if (kd[1] != sh.B || kd[3] != sh.KV || kd[4] != hd) return Invalid("cache/query shapes do not match");
  const auto pd = pos_all.dimensions();
  const auto qpd = query_pos.dimensions();
  if (pd.size() != 4 || pd[0] != kd[0] || pd[1] != sh.B || pd[2] != sh.S || pd[3] != sh.KV || qpd.size() != 2 ||
      qpd[0] != sh.B || qpd[1] != sh.T || !SameDims(v_all.dimensions(), kd)) {
    return Invalid("positions, query positions or values do not match");
  }
  if (int8 && (!SameDims(k_scale->dimensions(), pd) || !SameDims(v_scale->dimensions(), pd))) {
    return Invalid("int8 cache: the scales must be [L, B, S, KV], as the positions");
  }
  const bool blocked = sh.KV * sh.n > kDecodeRows;  // prefill: many query rows
  if (blocked && sh.G > kRows) return Invalid("more than 64 query heads per kv head");
  const int64_t li = layer.typed_data()[0];
  if (li < 0 || li >= L) return Invalid("layer index out of range");
  const bool rot = rotate != 0;
  if (rot && (cos_t.dimensions()[0] != sh.S || cos_t.dimensions()[1] != hd)) {
    return Invalid("rotation tables must be [S, head_dim]");
  }
  const bool q_bf16 = q.element_type() == ffi::DataType::BF16;
  const Cache cache = int8 ? Cache::kInt8 : k_all.element_type() == ffi::DataType::BF16 ? Cache::kBf16 : Cache::kF32;
  AttendFn attend = hd == 32 ? Pick<32>(q_bf16, cache, blocked)
                    : hd == 64 ? Pick<64>(q_bf16, cache, blocked)
                    : hd == 128 ? Pick<128>(q_bf16, cache, blocked) : nullptr;
  if (attend == nullptr) return Invalid("head_dim must be 32, 64 or 128");
  attend(pool, sh, li,
         Operands{q.untyped_data(), k_all.untyped_data(), v_all.untyped_data(), pos_all.typed_data(),
                  query_pos.typed_data(), cos_t.typed_data(), sin_t.typed_data(), rot, out.untyped_data(),
                  int8 ? k_scale->typed_data() : nullptr, int8 ? v_scale->typed_data() : nullptr});
  return ffi::Error::Success();
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_all, ffi::AnyBuffer v_all,
                           ffi::Buffer<ffi::S32> pos_all, ffi::Buffer<ffi::S32> query_pos,
                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> cos_t, ffi::Buffer<ffi::F32> sin_t,
                           ffi::Result<ffi::AnyBuffer> out, int64_t rotate) {
  return Run(pool, q, k_all, v_all, pos_all, query_pos, layer, cos_t, sin_t, *out, rotate, nullptr, nullptr);
}

ffi::Error DecodeAttentionInt8(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_all, ffi::AnyBuffer v_all,
                               ffi::Buffer<ffi::S32> pos_all, ffi::Buffer<ffi::S32> query_pos,
                               ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> cos_t,
                               ffi::Buffer<ffi::F32> sin_t, ffi::Buffer<ffi::F32> k_scale,
                               ffi::Buffer<ffi::F32> v_scale, ffi::Result<ffi::AnyBuffer> out, int64_t rotate) {
  return Run(pool, q, k_all, v_all, pos_all, query_pos, layer, cos_t, sin_t, *out, rotate, &k_scale, &v_scale);
}

// Writes new keys or values into one layer of the stacked cache, in place (the result aliases `cache`).
// XLA:CPU upcasts a bfloat16 dynamic-update-slice to float32 over the whole operand (its float
// normalisation), which made every bfloat16 decode step convert the entire stacked cache twice per layer.
// Operands: cache [L, B, S, KV, hd]; update [B, T, KV, hd] of the cache's dtype; layer [] s32;
// slots [B, T] s32 (slot of each new token; out of range = dropped, as for padding).
ffi::Error CacheWrite(ffi::AnyBuffer cache, ffi::AnyBuffer update, ffi::Buffer<ffi::S32> layer,
                      ffi::Buffer<ffi::S32> slots, ffi::Result<ffi::AnyBuffer> out) {
  const auto cd = cache.dimensions();
  const auto ud = update.dimensions();
  if (cd.size() != 5 || ud.size() != 4 || update.element_type() != cache.element_type() ||
      ud[0] != cd[1] || ud[2] != cd[3] || ud[3] != cd[4]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cache write: shapes or dtypes do not match");
  }
  const int64_t L = cd[0], B = cd[1], S = cd[2], T = ud[1];
  const size_t row = cd[3] * cd[4] * ffi::ByteWidth(cache.element_type());
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != cache.untyped_data()) std::memcpy(dst, cache.untyped_data(), cache.size_bytes());
  const int64_t li = layer.typed_data()[0];
  if (li < 0 || li >= L) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "layer index out of range");
  const char* src = static_cast<const char*>(update.untyped_data());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = slots.typed_data()[b * T + t];
      if (s < 0 || s >= S) continue;
      std::memcpy(dst + ((li * B + b) * S + s) * row, src + (b * T + t) * row, row);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LacaxCacheWrite, CacheWrite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // cache
                                  .Arg<ffi::AnyBuffer>()         // update
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots
                                  .Ret<ffi::AnyBuffer>());       // cache, updated (aliased)

// The operands both attention handlers share, in order; the int8 one adds k_scale and v_scale after them.
static auto AttentionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()          // q
      .Arg<ffi::AnyBuffer>()          // k_all
      .Arg<ffi::AnyBuffer>()          // v_all
      .Arg<ffi::Buffer<ffi::S32>>()   // pos_all
      .Arg<ffi::Buffer<ffi::S32>>()   // query_pos
      .Arg<ffi::Buffer<ffi::S32>>()   // layer
      .Arg<ffi::Buffer<ffi::F32>>()   // cos
      .Arg<ffi::Buffer<ffi::F32>>();  // sin
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LacaxDecodeAttention, DecodeAttention,
                              AttentionBinding().Ret<ffi::AnyBuffer>().Attr<int64_t>("rotate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LacaxDecodeAttentionInt8, DecodeAttentionInt8,
                              AttentionBinding()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_scale
                                  .Ret<ffi::AnyBuffer>()         // out, in q's dtype
                                  .Attr<int64_t>("rotate"));

// 1 where the decode path takes bfloat16 queries and caches in bfloat16 products (`cpu_attention.bf16_products`).
extern "C" int LacaxAttentionBf16Products() { return kBf16Dots ? 1 : 0; }
