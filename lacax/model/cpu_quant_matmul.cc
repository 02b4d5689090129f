// Decode-time matmul with packed low-bit weights, for XLA:CPU (an XLA FFI custom call): y = x @ W, where W
// is a `lacax.model.quantized.PackedWeight` kept as its integer codes and per-group scales (and offsets).
//
// Why this exists: the XLA path dequantizes W into a float32 [K, N] matrix every step and then runs the dot,
// so a decode step reads the codes, writes 4 bytes per weight and reads them again: decode time does not
// fall with the bit width. This kernel reads each code once, dequantizes it in registers and multiplies it
// into the few rows of x a decode step has, so the bytes read per step are the packed bytes.
//
// Semantics (as `PackedWeight.dense`, then the product; float32 arithmetic and accumulation):
//   W[k, n] = scale[k / G, n] * (code[k, n] - offset)          symmetric (mins absent)
//   W[k, n] = scale[k / G, n] * code[k, n] + min[k / G, n]     affine (GGUF Q4_1)
//   with storage_bits 8: int8 codes, offset 0; storage_bits 4 or 2: uint8 bytes holding P = 8 / storage_bits
//   codes each, code k of byte k / P at bit offset storage_bits * (k % P), offset 2**(storage_bits - 1).
//
// Operands: x [M, K] f32; data s8 [L, K, N] or u8 [L, K / P, N]; scales [L, K / G, N] f32 or f16; mins like
// scales (affine) or a [1] dummy (symmetric); layer [] s32: the product uses layer `layer` of the stacked
// leaves, read in place (inside the decoder's scan XLA would otherwise copy each layer's slice of the packed
// weight before every call). Attributes: storage_bits, group_size G (a multiple of P dividing K), affine.
// Result: y [M, N] f32.
//
// Work: tiles of 64 output columns (one cache line of int8 codes per input row) are split over XLA's intra-op
// thread pool; a tile is read once per block of 4 rows of x, whose partial sums stay in registers. The
// vector code is GCC/Clang vector extensions, so -march=native makes it AVX-512 (or AVX2, or SSE) and a
// portable build stays correct; the last N % 64 columns take a scalar loop.
//
// Two more entry points stream weights that are not grouped codes of an input-major matrix:
//   LacaxDenseMatmul: y_i = x @ W_i[layer] with each W_i a dense float32 / bfloat16 / float16 stack [L, K, N_i]
//     (the decoder's float projections at decode time; one call computes every product of one input, such as a
//     layer's q, k and v); x and y_i are float32 or bfloat16 (a bfloat16 y_i is the float32 sum rounded to
//     nearest even, as XLA's convert after the call would). K is split into chunks of
//     consecutive rows, so each work item reads one contiguous block of W (eight rows at a time, every column,
//     the next eight prefetched into L2) into its own partial sums [M, N]; the partial sums are added at the
//     end. bfloat16 is widened by a shift, float16 by vcvtph2ps. Where the CPU has AVX512-BF16 and every value
//     of x is a bfloat16 one (a bfloat16 model's activations), a bfloat16 W is multiplied by vdpbf16ps instead:
//     rows k and k + 1 interleaved by vpunpck{l,h}wd, exact products, float32 accumulation (the same result up
//     to float32 summation order). Measured on Zen 4: the same rate as widening when W streams from DRAM (the
//     read bandwidth bounds both), 5-15 % faster when it is in the last-level cache.
//   LacaxRowsMatmul: y = x @ T^T with T an output-major table [N, K] (the LM head's [vocab, hidden] layout):
//     dense float32 / bfloat16 / float16, or codes along K with one scale (and, affine, one min) per group of
//     G inputs, scales [N, K / G]: int8, or 4-bit in GGUF's block order (within each 16 bytes of a row, byte j
//     holds code j in its low nibble and code j + 16 in its high one), so the 16 codes of one nibble meet 16
//     consecutive inputs. Each output is a dot product over a contiguous row. A bfloat16 table times
//     bfloat16-valued x (a bfloat16 model's LM head) uses vdpbf16ps where the CPU has AVX512-BF16 (Zen 4,
//     SmolLM2's [49152, 576] head: 1.55 ms against 1.81 ms widened, interleaved runs in one process).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using lacax::Bf16ToFloat;
using lacax::FloatToBf16;
using lacax::ParallelFor;
using lacax::SameDims;

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

struct Bf16 {  // a bfloat16 value: the top half of a float32
  uint16_t bits;
};

constexpr int64_t kTile = 64;  // output columns per work item
constexpr int kVecs = kTile / 16;
constexpr int kRowBlock = 4;  // rows of x per pass over a tile (the group partial sums stay in registers)

template <typename T>
inline T LoadAs(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// float16 -> float32, exact for every value (normals, subnormals, infinities, NaN).
inline float HalfToFloat(uint16_t h) {
#ifdef __FLT16_MAX__
  _Float16 f;
  std::memcpy(&f, &h, sizeof(f));
  return static_cast<float>(f);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113u;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

inline float ScaleAt(const float* p) { return *p; }
inline float ScaleAt(const uint16_t* p) { return HalfToFloat(*p); }  // uint16_t holds float16

// Widening loads. GCC scalarises __builtin_convertvector from 8- or 16-bit lanes to 32-bit ones, so the
// instruction sets that have the widening instructions get them spelt out; the generic code stays correct.
inline v16 LoadScales(const float* p) { return LoadAs<v16>(p); }
inline v16 LoadScales(const uint16_t* p) {  // 16 float16 values
#if defined(__AVX512F__)
  return (v16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  v16 v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  v16 v;
  for (int i = 0; i < 16; ++i) v[i] = HalfToFloat(p[i]);
  return v;
#endif
}

// 16 bytes -> 16 int32 lanes, sign- or zero-extended.
template <bool SIGNED>
inline i32x16 LoadBytes(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (i32x16)(SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  const __m128i b0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i b1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8));
  const __m256i lo = SIGNED ? _mm256_cvtepi8_epi32(b0) : _mm256_cvtepu8_epi32(b0);
  const __m256i hi = SIGNED ? _mm256_cvtepi8_epi32(b1) : _mm256_cvtepu8_epi32(b1);
  i32x16 v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  i32x16 v;
  for (int i = 0; i < 16; ++i) v[i] = SIGNED ? static_cast<int32_t>(static_cast<int8_t>(p[i])) : p[i];
  return v;
#endif
}

// Packed codes -> float (code - offset) for the lanes of `bits` (code j of each byte already shifted to the
// bottom). AVX-512 looks them up in a 16-entry table with one permute (which reads only the low 4 index
// bits, so a table of period 2**SB also masks); elsewhere mask, subtract and convert.
template <int SB, int32_t OFFSET>
inline v16 CodesToFloat(i32x16 bits) {
#if defined(__AVX512F__)
  alignas(64) float table[16];
  for (int i = 0; i < 16; ++i) table[i] = static_cast<float>((i & ((1 << SB) - 1)) - OFFSET);
  return (v16)_mm512_permutexvar_ps((__m512i)bits, _mm512_load_ps(table));
#else
  return __builtin_convertvector((bits & ((1 << SB) - 1)) - OFFSET, v16);
#endif
}

struct Problem {
  int64_t M, K, N, G;
  const float* x;
  const uint8_t* data;
  const void* scales;
  const void* mins;
  const float* xsum;  // [M, K / G] sums of x over each group (affine only: the mins' factor)
  float* y;
};

// One tile of kTile columns starting at n0, rows [m0, m0 + MR) of x. SB: storage bits (8 = signed int8).
// Per group the codes (offset subtracted exactly) are multiplied into partial sums, which meet the group's
// scale once: W[k, n] = s * q[k, n] (+ min) gives sum_k x[k] W[k, n] = s * sum_k x[k] q[k, n]
// (+ min * sum_k x[k]), one multiply per group instead of one per weight.
template <int SB, bool AFFINE, int MR, typename ST>
void Tile(const Problem& p, int64_t n0, int64_t m0) {
  constexpr int P = 8 / SB;
  // Codes are centred in the affine form too (the group's min absorbs offset * scale): the partial sums then
  // stay small and do not cancel against min * sum(x), which kept Q4_1 products ~3x off the XLA path's.
  constexpr int32_t kOffset = SB == 8 ? 0 : (1 << (SB - 1));
  const ST* scales = static_cast<const ST*>(p.scales);
  const ST* mins = static_cast<const ST*>(p.mins);
  const int64_t N = p.N, K = p.K, G = p.G, groups = K / G;
  const float* x = p.x + m0 * K;
  v16 acc[MR][kVecs];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kVecs; ++c) acc[r][c] = v16{};
  for (int64_t gi = 0; gi < groups; ++gi) {
    v16 part[MR][kVecs];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < kVecs; ++c) part[r][c] = v16{};
    for (int64_t kb = gi * G / P; kb < (gi + 1) * G / P; ++kb) {
      const uint8_t* row = p.data + kb * N + n0;
      // Rows ahead into L2: a tile's rows are short strided segments the hardware prefetchers miss (measured
      // on a Zen 4, 120-layer stacks: 16 rows into L1 15-16 G weights/s for int8, 64 rows into L2 26-29).
      __builtin_prefetch(row + (SB == 8 ? 64 : 32) * N, 0, 2);
      i32x16 bytes[kVecs];
      for (int c = 0; c < kVecs; ++c) {
        bytes[c] = LoadBytes<SB == 8>(row + 16 * c);
      }
      for (int j = 0; j < P; ++j) {
        const int64_t k = kb * P + j;
        v16 q[kVecs];
        for (int c = 0; c < kVecs; ++c) {
          q[c] = SB == 8 ? __builtin_convertvector(bytes[c], v16)
                         : CodesToFloat<SB, kOffset>((i32x16)((u32x16)bytes[c] >> (SB * j)));
        }
        for (int r = 0; r < MR; ++r) {
          const float xv = x[r * K + k];
          for (int c = 0; c < kVecs; ++c) part[r][c] += xv * q[c];
        }
      }
    }
    const int64_t srow = gi * N + n0;
    for (int c = 0; c < kVecs; ++c) {
      const v16 s = LoadScales(scales + srow + 16 * c);
      for (int r = 0; r < MR; ++r) acc[r][c] += s * part[r][c];
      if (AFFINE) {
        const v16 mn = LoadScales(mins + srow + 16 * c) + s * static_cast<float>(kOffset);
        for (int r = 0; r < MR; ++r) acc[r][c] += p.xsum[(m0 + r) * groups + gi] * mn;
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kVecs; ++c) std::memcpy(p.y + (m0 + r) * N + n0 + 16 * c, &acc[r][c], sizeof(v16));
}

// The columns [n0, N) that do not fill a tile, every row: scalar.
template <int SB, bool AFFINE, typename ST>
void TailColumns(const Problem& p, int64_t n0) {
  constexpr int P = 8 / SB;
  constexpr uint32_t kMask = (1u << SB) - 1u;
  constexpr int32_t kOffset = SB == 8 ? 0 : (AFFINE ? 0 : (1 << (SB - 1)));
  const ST* scales = static_cast<const ST*>(p.scales);
  const ST* mins = static_cast<const ST*>(p.mins);
  const int64_t N = p.N, K = p.K;
  for (int64_t n = n0; n < N; ++n) {
    for (int64_t m = 0; m < p.M; ++m) p.y[m * N + n] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t si = (k / p.G) * N + n;
      const uint8_t byte = p.data[(k / P) * N + n];
      const int32_t code = SB == 8 ? static_cast<int32_t>(static_cast<int8_t>(byte))
                                   : static_cast<int32_t>((byte >> (SB * (k % P))) & kMask) - kOffset;
      const float q = static_cast<float>(code);
      const float w = AFFINE ? ScaleAt(scales + si) * q + ScaleAt(mins + si) : ScaleAt(scales + si) * q;
      for (int64_t m = 0; m < p.M; ++m) p.y[m * N + n] += p.x[m * K + k] * w;
    }
  }
}

template <typename F>
void ForRowBlocks(int64_t M, const F& block) {  // block(m0, std::integral_constant<int, MR>), MR <= kRowBlock
  int64_t m0 = 0;
  for (; m0 + kRowBlock <= M; m0 += kRowBlock) block(m0, std::integral_constant<int, kRowBlock>());
  switch (M - m0) {
    case 3: block(m0, std::integral_constant<int, 3>()); break;
    case 2: block(m0, std::integral_constant<int, 2>()); break;
    case 1: block(m0, std::integral_constant<int, 1>()); break;
    default: break;
  }
}

// Sums of x [M, K] over each group of G inputs: [M, K / G] (the affine forms' factor of the group mins).
inline std::vector<float> GroupSums(const float* x, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  std::vector<float> sums(M * groups, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) sums[m * groups + k / G] += x[m * K + k];
  return sums;
}

template <int SB, bool AFFINE, typename ST>
void Run(ffi::ThreadPool& pool, const Problem& problem) {
  Problem p = problem;
  std::vector<float> xsum;
  if (AFFINE) {
    xsum = GroupSums(p.x, p.M, p.K, p.G);
    p.xsum = xsum.data();
  }
  const int64_t tiles = p.N / kTile;
  const bool tail = p.N % kTile != 0;
  ParallelFor(pool, tiles + (tail ? 1 : 0), [&](int64_t t) {
    if (t == tiles) {
      TailColumns<SB, AFFINE, ST>(p, tiles * kTile);
      return;
    }
    ForRowBlocks(p.M, [&](int64_t m0, auto mr) { Tile<SB, AFFINE, decltype(mr)::value, ST>(p, t * kTile, m0); });
  });
}

using RunFn = void (*)(ffi::ThreadPool&, const Problem&);

template <int SB>
RunFn PickScales(bool affine, bool half) {
  if constexpr (SB == 8) {  // int8 codes are symmetric: no affine instantiation
    return half ? &Run<SB, false, uint16_t> : &Run<SB, false, float>;
  } else {
    if (affine) return half ? &Run<SB, true, uint16_t> : &Run<SB, true, float>;
    return half ? &Run<SB, false, uint16_t> : &Run<SB, false, float>;
  }
}

ffi::Error Error(const char* message) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, message); }

ffi::Error QuantMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer data, ffi::AnyBuffer scales,
                       ffi::AnyBuffer mins, ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::Buffer<ffi::F32>> y,
                       int64_t storage_bits, int64_t group_size, int64_t affine) {
  const auto xd = x.dimensions();
  const auto dd = data.dimensions();
  const auto sd = scales.dimensions();
  if (xd.size() != 2 || dd.size() != 3 || sd.size() != 3) return Error("x must be rank 2, data and scales rank 3");
  if (storage_bits != 8 && storage_bits != 4 && storage_bits != 2) return Error("storage_bits must be 8, 4 or 2");
  const int64_t M = xd[0], K = xd[1], L = dd[0], N = dd[2], P = 8 / storage_bits, G = group_size;
  const auto want = storage_bits == 8 ? ffi::DataType::S8 : ffi::DataType::U8;
  if (data.element_type() != want || dd[1] * P != K) return Error("data must be s8 [L, K, N] or u8 [L, K / P, N]");
  if (G <= 0 || G % P != 0 || K % G != 0) return Error("group_size must be a multiple of P that divides K");
  if (storage_bits == 8 && affine) return Error("8-bit codes are symmetric");
  const auto st = scales.element_type();
  if ((st != ffi::DataType::F32 && st != ffi::DataType::F16) || sd[0] != L || sd[1] != K / G || sd[2] != N) {
    return Error("scales must be f32 or f16 [L, K / group_size, N]");
  }
  if (affine && (mins.element_type() != st || !SameDims(mins.dimensions(), sd))) {
    return Error("mins must match the scales");
  }
  const auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != M || yd[1] != N) return Error("the result must be [M, N]");
  const int64_t li = layer.typed_data()[0];
  if (li < 0 || li >= L) return Error("layer index out of range");
  const bool half = st == ffi::DataType::F16;
  const size_t scale_bytes = half ? 2 : 4;
  const int64_t per_layer_scales = (K / G) * N;
  const RunFn run = storage_bits == 8 ? PickScales<8>(false, half)
                    : storage_bits == 4 ? PickScales<4>(affine != 0, half)
                                        : PickScales<2>(affine != 0, half);
  run(pool, Problem{M, K, N, G, x.typed_data(),
                    static_cast<const uint8_t*>(data.untyped_data()) + li * (K / P) * N,
                    static_cast<const char*>(scales.untyped_data()) + li * per_layer_scales * scale_bytes,
                    affine ? static_cast<const char*>(mins.untyped_data()) + li * per_layer_scales * scale_bytes
                           : mins.untyped_data(),
                    nullptr, y->typed_data()});
  return ffi::Error::Success();
}


// --- dense weights and output-major tables ------------------------------------------------------------------

inline float WeightAt(const float* p) { return *p; }
inline float WeightAt(const uint16_t* p) { return HalfToFloat(*p); }  // float16
inline float WeightAt(const Bf16* p) { return Bf16ToFloat(p->bits); }

inline v16 LoadWeights(const float* p) { return LoadAs<v16>(p); }
inline v16 LoadWeights(const uint16_t* p) { return LoadScales(p); }  // float16
inline v16 LoadWeights(const Bf16* p) {  // 16 bfloat16 values, widened exactly (a shift)
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (v16)_mm512_slli_epi32(w, 16);
#elif defined(__AVX2__)
  const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  v16 v;
  const __m256i slo = _mm256_slli_epi32(lo, 16), shi = _mm256_slli_epi32(hi, 16);
  std::memcpy(&v, &slo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &shi, 32);
  return v;
#else
  const u32x16 w = __builtin_convertvector(LoadAs<u16x16>(p), u32x16) << 16;
  return (v16)w;
#endif
}

inline float HSum(v16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#endif
}

struct DenseProblem {
  int64_t M, K, N;
  const float* x;
  const void* w;          // [K, N] of one layer
  const uint16_t* x_bf16;  // x as bfloat16 [M, K] when the operand came as one (else null)
};

// Rows [k, k + R) of W into out [M, N] (out = the sum when `first`, else out += it).
template <typename WT, int R>
inline void DenseRowGroup(const DenseProblem& p, int64_t k, float* out, bool first) {
  const WT* w = static_cast<const WT*>(p.w) + k * p.N;
  const int64_t N = p.N, K = p.K, M = p.M, full = N / 16 * 16;
  for (int64_t n = 0; n < full; n += 16) {
    v16 wv[R];
    // The next group's lines into L2, one per cache line of each row: a group's rows are short streams
    // (N elements), which the hardware prefetchers pick up too late (measured: 22-32 -> 34-43 GB/s).
    if (n % (64 / sizeof(WT)) == 0) {
      for (int j = 0; j < R; ++j) __builtin_prefetch(w + (R + j) * N + n, 0, 2);
    }
    for (int j = 0; j < R; ++j) wv[j] = LoadWeights(w + j * N + n);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = p.x + m * K + k;
      v16 acc = first ? v16{} : LoadAs<v16>(out + m * N + n);
      for (int j = 0; j < R; ++j) acc += xm[j] * wv[j];
      std::memcpy(out + m * N + n, &acc, sizeof(acc));
    }
  }
  for (int64_t n = full; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float acc = first ? 0.0f : out[m * N + n];
      for (int j = 0; j < R; ++j) acc += p.x[m * K + k + j] * WeightAt(w + j * N + n);
      out[m * N + n] = acc;
    }
  }
}

// x as bfloat16 [M, K] if every value of x is one (the product is then exact in bfloat16 operands), else empty.
inline std::vector<uint16_t> ExactBf16(const float* x, int64_t size) {
  std::vector<uint16_t> out(size);
  for (int64_t i = 0; i < size; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], sizeof(u));
    if ((u & 0xffffu) != 0) return {};
    out[i] = static_cast<uint16_t>(u >> 16);
  }
  return out;
}

#if defined(__AVX512BF16__)
// Rows [k, k + 8) of a bfloat16 W into out [M, N] (out = the sum when `first`, else out += it) for x rows that
// are bfloat16 values (`xb`, [M, K] as bfloat16): vdpbf16ps on row pairs (k, k + 1) interleaved by
// vpunpck{l,h}wd. In each block of 32 columns the float32 sums are kept in the unpacks' lane order (columns
// 8j + t and 8j + 4 + t of 128-bit lane j); Bf16DotUnpermute puts them back once at the end. The last N % 32
// columns take the widening path, in plain order.
inline void Bf16DotRowGroup(const DenseProblem& p, const uint16_t* xb, int64_t k, float* out, bool first) {
  const uint16_t* w = static_cast<const uint16_t*>(p.w) + k * p.N;
  const int64_t N = p.N, K = p.K, M = p.M, full = N / 32 * 32;
  for (int64_t n = 0; n < full; n += 32) {
    __m512i lo[4], hi[4];
    for (int j = 0; j < 4; ++j) {
      __builtin_prefetch(w + (8 + 2 * j) * N + n, 0, 2);  // the next group, as DenseRowGroup
      __builtin_prefetch(w + (9 + 2 * j) * N + n, 0, 2);
      const __m512i a = _mm512_loadu_si512(w + 2 * j * N + n), b = _mm512_loadu_si512(w + (2 * j + 1) * N + n);
      lo[j] = _mm512_unpacklo_epi16(a, b);
      hi[j] = _mm512_unpackhi_epi16(a, b);
    }
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xm = xb + m * K + k;
      float* o = out + m * N + n;
      __m512 acc_lo = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o);
      __m512 acc_hi = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o + 16);
      for (int j = 0; j < 4; ++j) {
        uint32_t pair;
        std::memcpy(&pair, xm + 2 * j, sizeof(pair));
        const __m512bh xp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        acc_lo = _mm512_dpbf16_ps(acc_lo, (__m512bh)lo[j], xp);
        acc_hi = _mm512_dpbf16_ps(acc_hi, (__m512bh)hi[j], xp);
      }
      _mm512_storeu_ps(o, acc_lo);
      _mm512_storeu_ps(o + 16, acc_hi);
    }
  }
  if (full < N) {  // the tail columns, widened, in plain order
    for (int64_t n = full; n < N; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        float acc = first ? 0.0f : out[m * N + n];
        for (int j = 0; j < 8; ++j) acc += p.x[m * K + k + j] * Bf16ToFloat(w[j * N + n]);
        out[m * N + n] = acc;
      }
    }
  }
}

// y [M, N] from the unpacks' lane order back to column order, block by block of 32 columns.
inline void Bf16DotUnpermute(float* y, int64_t M, int64_t N) {
  const int64_t full = N / 32 * 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < full; n += 32) {
      float* o = y + m * N + n;
      float tmp[32];
      std::memcpy(tmp, o, sizeof(tmp));
      for (int j = 0; j < 4; ++j) {
        for (int t = 0; t < 4; ++t) {
          o[8 * j + t] = tmp[4 * j + t];           // acc_lo lane 4j + t
          o[8 * j + 4 + t] = tmp[16 + 4 * j + t];  // acc_hi lane 4j + t
        }
      }
    }
  }
}
#endif

// y [size] += each of the (chunks - 1) partial sums that follow chunk 0's, in chunk order.
inline void AddPartials(float* y, const float* partial, int64_t chunks, int64_t size) {
  for (int64_t c = 1; c < chunks; ++c) {
    const float* part = partial + (c - 1) * size;
    for (int64_t i = 0; i < size; ++i) y[i] += part[i];
  }
}

// Rows [k0, k1) of one product into out [M, N]: its partial sums.
template <typename WT>
void DenseChunk(const DenseProblem& p, const uint16_t* xb, int64_t k0, int64_t k1, float* out) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<WT, Bf16>::value) {
    if (xb != nullptr) {  // the caller passes xb only where K % 8 == 0 (row pairs need whole groups of 8 rows)
      for (int64_t k = k0; k < k1; k += 8) Bf16DotRowGroup(p, xb, k, out, k == k0);
      return;
    }
  }
#endif
  (void)xb;
  int64_t k = k0;
  bool first = true;
  for (; k + 8 <= k1; k += 8, first = false) DenseRowGroup<WT, 8>(p, k, out, first);
  for (; k < k1; ++k, first = false) DenseRowGroup<WT, 1>(p, k, out, first);
}

// Chunk boundaries over K rows (multiples of 8 but the last) for `threads` threads: 2 x threads chunks of
// 0.35 / threads of the rows each, then 2 x threads of 0.15 / threads. A caller waits at the end of a call for
// the last item a helper took (the helpers also start a few microseconds late), so the last items are small;
// the boundaries depend only on K and the thread count, so the float32 sums are the same in every run.
inline std::vector<int64_t> TaperedChunks(int64_t K, int64_t threads) {
  const int64_t units = (K + 7) / 8;
  std::vector<int64_t> bounds{0};
  double cum = 0.0;
  for (int64_t c = 0; c < 4 * threads; ++c) {
    cum += (c < 2 * threads ? 0.35 : 0.15) / static_cast<double>(threads);
    const int64_t b = c + 1 == 4 * threads ? units : std::min(units, static_cast<int64_t>(cum * units + 0.5));
    if (b > bounds.back()) bounds.push_back(b);
  }
  for (int64_t& b : bounds) b = std::min(K, b * 8);
  return bounds;
}

// y_i = x @ W_i for the products of one call (the same x; W_i [K, N_i]) in one pass over the thread pool: a
// work item is one chunk of K rows of every product, so a call pays the pool's start and join once for a
// layer's q / k / v or gate / up products (a decode step's k and v, in calls of their own, streamed at two
// thirds of q's rate from that fixed cost).
template <typename WT>
void DenseRun(ffi::ThreadPool& pool, const std::vector<DenseProblem>& ps, const std::vector<float*>& ys) {
  const int64_t K = ps[0].K, M = ps[0].M, count = static_cast<int64_t>(ps.size());
  const std::vector<int64_t> bounds = TaperedChunks(K, std::max<int64_t>(1, pool.num_threads()));
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  // Partial sums of chunks 1.. of each product (chunk 0 writes the result itself). Not zeroed: each chunk's
  // first row group writes them (`first`); zeroing was a memset of (chunks - 1) x M x N floats per product.
  std::vector<int64_t> offset(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) offset[i + 1] = offset[i] + (chunks - 1) * M * ps[i].N;
  const std::unique_ptr<float[]> partial(offset[count] > 0 ? new float[offset[count]] : nullptr);
  // x as bfloat16 for the vdpbf16ps path: as it came, or float32 x whose every value is a bfloat16 one.
  const uint16_t* xb = nullptr;
  std::vector<uint16_t> exact;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<WT, Bf16>::value) {
    if (K % 8 == 0) {
      xb = ps[0].x_bf16;
      if (xb == nullptr) {
        exact = ExactBf16(ps[0].x, M * K);
        if (!exact.empty()) xb = exact.data();
      }
    }
  }
#endif
  ParallelFor(pool, chunks, [&](int64_t c) {
    for (int64_t i = 0; i < count; ++i) {
      float* out = c == 0 ? ys[i] : partial.get() + offset[i] + (c - 1) * M * ps[i].N;
      DenseChunk<WT>(ps[i], xb, bounds[c], bounds[c + 1], out);
    }
  });
  for (int64_t i = 0; i < count; ++i) {
    AddPartials(ys[i], partial.get() + offset[i], chunks, M * ps[i].N);
#if defined(__AVX512BF16__)
    if (xb != nullptr) Bf16DotUnpermute(ys[i], M, ps[i].N);
#endif
  }
}

// x [M, K], layer [], then the weights W_1.. [L, K, N_i] (one dtype) and the results y_1.. [M, N_i].
ffi::Error DenseMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs ws,
                       ffi::RemainingRets ys) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return Error("x must be rank 2");
  const int64_t M = xd[0], K = xd[1];
  const size_t count = ws.size();
  if (count == 0 || ys.size() != count) return Error("the call needs one result per weight, and a weight");
  const auto xt = x.element_type();
  if (xt != ffi::DataType::F32 && xt != ffi::DataType::BF16) return Error("x must be f32 or bf16");
  // A bfloat16 x is widened here (M x K values, once for every product) and a bfloat16 result rounded here
  // (M x N), instead of by a convert of XLA's before and after the call (two more thunks per projection).
  const uint16_t* x_bf16 = xt == ffi::DataType::BF16 ? static_cast<const uint16_t*>(x.untyped_data()) : nullptr;
  std::unique_ptr<float[]> x_wide;  // written whole before it is read
  const float* xf = static_cast<const float*>(x.untyped_data());
  if (x_bf16 != nullptr) {
    x_wide.reset(new float[M * K]);
    for (int64_t i = 0; i < M * K; ++i) x_wide[i] = Bf16ToFloat(x_bf16[i]);
    xf = x_wide.get();
  }
  const int64_t li = layer.typed_data()[0];
  std::vector<DenseProblem> ps;
  std::vector<float*> yf(count);
  std::vector<uint16_t*> y_bf16(count, nullptr);
  std::vector<std::unique_ptr<float[]>> y_wide(count);
  ffi::DataType t = ffi::DataType::INVALID;
  for (size_t i = 0; i < count; ++i) {
    auto w = ws.get<ffi::AnyBuffer>(i);
    auto y = ys.get<ffi::AnyBuffer>(i);
    if (w.has_error() || y.has_error()) return Error("the weights and results must be buffers");
    const auto wd = w->dimensions();
    if (wd.size() != 3 || wd[1] != K) return Error("each weight must be [L, K, N] with x's K");
    const int64_t L = wd[0], N = wd[2];
    if (li < 0 || li >= L) return Error("layer index out of range");
    if (i == 0) t = w->element_type();
    if (w->element_type() != t) return Error("the weights of one call must share a dtype");
    const auto yd = (*y)->dimensions();
    if (yd.size() != 2 || yd[0] != M || yd[1] != N) return Error("each result must be [M, N] of its weight");
    const auto yt = (*y)->element_type();
    if (yt != ffi::DataType::F32 && yt != ffi::DataType::BF16) return Error("the results must be f32 or bf16");
    const size_t item = t == ffi::DataType::F32 ? 4 : 2;
    ps.push_back({M, K, N, xf, static_cast<const char*>(w->untyped_data()) + li * K * N * item, x_bf16});
    if (yt == ffi::DataType::BF16) {
      y_bf16[i] = static_cast<uint16_t*>((*y)->untyped_data());
      y_wide[i].reset(new float[M * N]);
      yf[i] = y_wide[i].get();
    } else {
      yf[i] = static_cast<float*>((*y)->untyped_data());
    }
  }
  if (t == ffi::DataType::F32) {
    DenseRun<float>(pool, ps, yf);
  } else if (t == ffi::DataType::BF16) {
    DenseRun<Bf16>(pool, ps, yf);
  } else if (t == ffi::DataType::F16) {
    DenseRun<uint16_t>(pool, ps, yf);
  } else {
    return Error("w must be f32, bf16 or f16");
  }
  for (size_t i = 0; i < count; ++i) {
    if (y_bf16[i] == nullptr) continue;
    for (int64_t j = 0; j < M * ps[i].N; ++j) y_bf16[i][j] = FloatToBf16(y_wide[i][j]);
  }
  return ffi::Error::Success();
}

struct RowsProblem {
  int64_t M, K, N, G;
  const float* x;     // [M, K]
  const void* data;   // [N, K] dense, or [N, K / P] codes
  const void* scales;
  const void* mins;
  const float* xsum;  // [M, K / G] (affine only)
  float* y;
};

constexpr int64_t kRowsBlock = 32;  // outputs per work item

// Outputs [n0, n1) for rows [m0, m0 + MR) of x: dense table rows.
template <typename WT, int MR>
void DenseRowsBlock(const RowsProblem& p, int64_t n0, int64_t n1, int64_t m0) {
  const int64_t K = p.K, full = K / 32 * 32;
  const float* x = p.x + m0 * K;
  for (int64_t n = n0; n < n1; ++n) {
    const WT* row = static_cast<const WT*>(p.data) + n * K;
    v16 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = v16{};
    for (int64_t k = 0; k < full; k += 32) {
      // Two rows ahead into L2 (a work item's rows are one contiguous run; see DenseRowGroup).
      __builtin_prefetch(row + 2 * K + k, 0, 2);
      if (sizeof(WT) == 4) __builtin_prefetch(row + 2 * K + k + 16, 0, 2);
      const v16 w0 = LoadWeights(row + k), w1 = LoadWeights(row + k + 16);
      for (int r = 0; r < MR; ++r) {
        acc[r][0] += LoadAs<v16>(x + r * K + k) * w0;
        acc[r][1] += LoadAs<v16>(x + r * K + k + 16) * w1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      float s = HSum(acc[r][0] + acc[r][1]);
      for (int64_t k = full; k < K; ++k) s += x[r * K + k] * WeightAt(row + k);
      p.y[(m0 + r) * p.N + n] = s;
    }
  }
}

#if defined(__AVX512BF16__)
// A bfloat16 table times rows of x that are bfloat16 values themselves (a bfloat16 model's residual stream,
// widened to float32 for the call): AVX512-BF16's vdpbf16ps multiplies 32 pairs exactly and accumulates in
// float32, half the instructions of widening each weight and an FMA. `xb` is x as bfloat16 [M, K].
template <int MR>
void Bf16DotRowsBlock(const RowsProblem& p, const uint16_t* xb, int64_t n0, int64_t n1, int64_t m0) {
  const int64_t K = p.K, full = K / 32 * 32;
  const uint16_t* x = xb + m0 * K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = static_cast<const uint16_t*>(p.data) + n * K;
    __m512 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 32) {
      __builtin_prefetch(row + 2 * K + k, 0, 2);  // two rows ahead into L2, as DenseRowsBlock
      const __m512bh w = (__m512bh)_mm512_loadu_si512(row + k);
      for (int r = 0; r < MR; ++r) {
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(x + r * K + k), w);
      }
    }
    for (int r = 0; r < MR; ++r) {
      float s = _mm512_reduce_add_ps(acc[r]);
      for (int64_t k = full; k < K; ++k) s += p.x[(m0 + r) * K + k] * Bf16ToFloat(row[k]);
      p.y[(m0 + r) * p.N + n] = s;
    }
  }
}
#endif

// Outputs [n0, n1) for rows [m0, m0 + MR) of x: codes, 16 bytes (16 * P codes: code 16 s + j of a chunk in
// slot s of byte j) at a time; G % (16 P) == 0.
template <int SB, bool AFFINE, int MR, typename ST>
void CodeRowsBlock(const RowsProblem& p, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int P = 8 / SB;
  constexpr int32_t kOffset = SB == 8 ? 0 : (1 << (SB - 1));  // centred as in Tile (the min absorbs it)
  const ST* scales = static_cast<const ST*>(p.scales);
  const ST* mins = static_cast<const ST*>(p.mins);
  const int64_t K = p.K, G = p.G, groups = K / G, row_bytes = K / P;
  const float* x = p.x + m0 * K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = static_cast<const uint8_t*>(p.data) + n * row_bytes;
    v16 acc[MR];
    float bias[MR];
    for (int r = 0; r < MR; ++r) {
      acc[r] = v16{};
      bias[r] = 0.0f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      v16 part[MR];
      for (int r = 0; r < MR; ++r) part[r] = v16{};
      for (int64_t b = g * G / P; b < (g + 1) * G / P; b += 16) {
        const i32x16 bytes = LoadBytes<SB == 8>(row + b);
        for (int s = 0; s < P; ++s) {
          const v16 q = SB == 8 ? __builtin_convertvector(bytes, v16)
                                : CodesToFloat<SB, kOffset>((i32x16)((u32x16)bytes >> (SB * s)));
          for (int r = 0; r < MR; ++r) part[r] += LoadAs<v16>(x + r * K + b * P + 16 * s) * q;
        }
      }
      const float sc = ScaleAt(scales + n * groups + g);
      for (int r = 0; r < MR; ++r) acc[r] += sc * part[r];
      if (AFFINE) {
        const float mn = ScaleAt(mins + n * groups + g) + sc * static_cast<float>(kOffset);
        for (int r = 0; r < MR; ++r) bias[r] += mn * p.xsum[(m0 + r) * groups + g];
      }
    }
    for (int r = 0; r < MR; ++r) p.y[(m0 + r) * p.N + n] = HSum(acc[r]) + bias[r];
  }
}

template <typename WT>
void DenseRowsRun(ffi::ThreadPool& pool, const RowsProblem& p) {
  const int64_t items = (p.N + kRowsBlock - 1) / kRowsBlock;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<WT, Bf16>::value) {
    const std::vector<uint16_t> xb = ExactBf16(p.x, p.M * p.K);
    if (!xb.empty()) {
      ParallelFor(pool, items, [&](int64_t t) {
        const int64_t n0 = t * kRowsBlock, n1 = std::min(p.N, n0 + kRowsBlock);
        ForRowBlocks(p.M, [&](int64_t m0, auto mr) { Bf16DotRowsBlock<decltype(mr)::value>(p, xb.data(), n0, n1, m0); });
      });
      return;
    }
  }
#endif
  ParallelFor(pool, items, [&](int64_t t) {
    const int64_t n0 = t * kRowsBlock, n1 = std::min(p.N, n0 + kRowsBlock);
    ForRowBlocks(p.M, [&](int64_t m0, auto mr) { DenseRowsBlock<WT, decltype(mr)::value>(p, n0, n1, m0); });
  });
}

template <int SB, bool AFFINE, typename ST>
void CodeRowsRun(ffi::ThreadPool& pool, const RowsProblem& problem) {
  RowsProblem p = problem;
  const int64_t M = p.M;
  std::vector<float> xsum;
  if (AFFINE) {
    xsum = GroupSums(p.x, M, p.K, p.G);
    p.xsum = xsum.data();
  }
  const int64_t items = (p.N + kRowsBlock - 1) / kRowsBlock;
  ParallelFor(pool, items, [&](int64_t t) {
    const int64_t n0 = t * kRowsBlock, n1 = std::min(p.N, n0 + kRowsBlock);
    ForRowBlocks(M, [&](int64_t m0, auto mr) { CodeRowsBlock<SB, AFFINE, decltype(mr)::value, ST>(p, n0, n1, m0); });
  });
}

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer data, ffi::AnyBuffer scales,
                      ffi::AnyBuffer mins, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t storage_bits,
                      int64_t group_size, int64_t affine) {
  const auto xd = x.dimensions();
  const auto dd = data.dimensions();
  if (xd.size() != 2 || dd.size() != 2) return Error("x and data must be rank 2");
  const int64_t M = xd[0], K = xd[1], N = dd[0], G = group_size;
  const auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != M || yd[1] != N) return Error("the result must be [M, N]");
  const auto dt = data.element_type();
  RowsProblem p{M, K, N, G, x.typed_data(), data.untyped_data(), scales.untyped_data(), mins.untyped_data(),
                nullptr, y->typed_data()};
  if (storage_bits == 0) {  // a dense table [N, K]
    if (dd[1] != K) return Error("a dense table must be [N, K]");
    if (dt == ffi::DataType::F32) {
      DenseRowsRun<float>(pool, p);
    } else if (dt == ffi::DataType::BF16) {
      DenseRowsRun<Bf16>(pool, p);
    } else if (dt == ffi::DataType::F16) {
      DenseRowsRun<uint16_t>(pool, p);
    } else {
      return Error("a dense table must be f32, bf16 or f16");
    }
    return ffi::Error::Success();
  }
  if (storage_bits != 8 && storage_bits != 4) return Error("storage_bits must be 0 (dense), 8 or 4");
  const int64_t P = 8 / storage_bits;
  const auto want = storage_bits == 8 ? ffi::DataType::S8 : ffi::DataType::U8;
  if (dt != want || dd[1] * P != K) return Error("codes must be s8 [N, K] or u8 [N, K / 2]");
  if (G <= 0 || G % (16 * P) != 0 || K % G != 0) return Error("group_size must be a multiple of 16 P dividing K");
  if (storage_bits == 8 && affine) return Error("8-bit codes are symmetric");
  const auto sd = scales.dimensions();
  const auto st = scales.element_type();
  if ((st != ffi::DataType::F32 && st != ffi::DataType::F16) || sd.size() != 2 || sd[0] != N || sd[1] != K / G) {
    return Error("scales must be f32 or f16 [N, K / group_size]");
  }
  if (affine && (mins.element_type() != st || !SameDims(mins.dimensions(), sd))) {
    return Error("mins must match the scales");
  }
  const bool half = st == ffi::DataType::F16;
  if (storage_bits == 8) {
    half ? CodeRowsRun<8, false, uint16_t>(pool, p) : CodeRowsRun<8, false, float>(pool, p);
  } else if (affine) {
    half ? CodeRowsRun<4, true, uint16_t>(pool, p) : CodeRowsRun<4, true, float>(pool, p);
  } else {
    half ? CodeRowsRun<4, false, uint16_t>(pool, p) : CodeRowsRun<4, false, float>(pool, p);
  }
  return ffi::Error::Success();
}


// --- sparse int8 codes: a bit mask per 64 columns and the kept codes ----------------------------------------
//
// LacaxSparseMatmul: y = x @ W[layer] with W [K, N] stored as int8 codes of which only the kept (non-zero
// mask bit) ones are stored: for each tile of 64 columns, for k = 0..K-1, mask[layer, tile, k] (64 bits,
// bit c = column 64 tile + c) and the kept codes of that row of the tile, in column order, one after the
// other in `values` from offsets[layer, tile] to offsets[layer, tile + 1]. Scales as LacaxQuantMatmul's
// ([L, K / G, N], symmetric).
// With AVX-512 VBMI2 a row of a tile is one masked expand-load (vpexpandb); elsewhere a bit loop.

inline void ExpandRow(uint64_t mask, const int8_t* src, int8_t* dst) {  // dst: 64 codes, zeros where unkept
#if defined(__AVX512VBMI2__)
  _mm512_storeu_si512(dst, _mm512_maskz_expandloadu_epi8(mask, src));
#else
  std::memset(dst, 0, 64);
  for (int i = 0; mask; mask &= mask - 1, ++i) dst[__builtin_ctzll(mask)] = src[i];
#endif
}

struct SparseProblem {
  int64_t M, K, N, G;
  const float* x;
  const uint64_t* mask;    // [N / 64, K] of this layer
  const int8_t* values;    // all layers' kept codes
  const int32_t* offsets;  // [N / 64 + 1] of this layer: tile t's codes are values[offsets[t], offsets[t + 1])
  const void* scales;      // [K / G, N] of this layer
  float* y;
};

// Returns false if the tile's masks ask for more codes than its segment holds (corrupt operands).
template <int MR, typename ST>
bool SparseTile(const SparseProblem& p, int64_t t, int64_t m0) {
  const ST* scales = static_cast<const ST*>(p.scales);
  const int64_t N = p.N, K = p.K, G = p.G, groups = K / G, n0 = t * kTile;
  const uint64_t* mask = p.mask + t * K;
  const int8_t* src = p.values + p.offsets[t];
  const int8_t* end = p.values + p.offsets[t + 1];
  const float* x = p.x + m0 * K;
  v16 acc[MR][kVecs];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kVecs; ++c) acc[r][c] = v16{};
  alignas(64) int8_t row[64];
  for (int64_t gi = 0; gi < groups; ++gi) {
    v16 part[MR][kVecs];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < kVecs; ++c) part[r][c] = v16{};
    for (int64_t k = gi * G; k < (gi + 1) * G; ++k) {
      const uint64_t m = mask[k];
      if (m == 0) continue;  // a pruned row of the tile costs its mask only
      const int kept = __builtin_popcountll(m);
      if (src + kept > end) return false;
      ExpandRow(m, src, row);
      src += kept;
      for (int c = 0; c < kVecs; ++c) {
        const v16 q = __builtin_convertvector(LoadBytes<true>(reinterpret_cast<const uint8_t*>(row) + 16 * c), v16);
        for (int r = 0; r < MR; ++r) part[r][c] += x[r * K + k] * q;
      }
    }
    for (int c = 0; c < kVecs; ++c) {
      const v16 s = LoadScales(scales + gi * N + n0 + 16 * c);
      for (int r = 0; r < MR; ++r) acc[r][c] += s * part[r][c];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kVecs; ++c) std::memcpy(p.y + (m0 + r) * N + n0 + 16 * c, &acc[r][c], sizeof(v16));
  return true;
}

template <typename ST>
bool SparseRun(ffi::ThreadPool& pool, const SparseProblem& p) {
  std::atomic<bool> ok{true};
  ParallelFor(pool, p.N / kTile, [&](int64_t t) {
    ForRowBlocks(p.M, [&](int64_t m0, auto mr) {
      if (!SparseTile<decltype(mr)::value, ST>(p, t, m0)) ok.store(false);
    });
  });
  return ok.load();
}

ffi::Error SparseMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> mask,
                        ffi::Buffer<ffi::S8> values, ffi::Buffer<ffi::S32> offsets, ffi::AnyBuffer scales,
                        ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t group_size) {
  const auto xd = x.dimensions();
  const auto md = mask.dimensions();
  const auto od = offsets.dimensions();
  const auto sd = scales.dimensions();
  if (xd.size() != 2 || md.size() != 4 || od.size() != 2 || sd.size() != 3) {
    return Error("x must be rank 2, mask [L, N / 64, K, 8], offsets [L, N / 64 + 1], scales [L, K / G, N]");
  }
  const int64_t M = xd[0], K = xd[1], L = md[0], T = md[1], N = T * kTile, G = group_size;
  if (md[2] != K || md[3] != 8 || od[0] != L || od[1] != T + 1) return Error("mask / offsets do not match x and N");
  if (G <= 0 || K % G != 0) return Error("group_size must divide K");
  const auto st = scales.element_type();
  if ((st != ffi::DataType::F32 && st != ffi::DataType::F16) || sd[0] != L || sd[1] != K / G || sd[2] != N) {
    return Error("scales must be f32 or f16 [L, K / group_size, N]");
  }
  const auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != M || yd[1] != N) return Error("the result must be [M, N]");
  const int64_t li = layer.typed_data()[0];
  if (li < 0 || li >= L) return Error("layer index out of range");
  const bool half = st == ffi::DataType::F16;
  const size_t scale_bytes = half ? 2 : 4;
  SparseProblem p{M, K, N, G, x.typed_data(),
                  reinterpret_cast<const uint64_t*>(mask.typed_data()) + li * T * K,
                  values.typed_data(), offsets.typed_data() + li * (T + 1),
                  static_cast<const char*>(scales.untyped_data()) + li * (K / G) * N * scale_bytes, y->typed_data()};
  // Every segment must lie inside `values` (corrupt operands must not read out of bounds).
  const int64_t size = values.element_count();
  for (int64_t t = 0; t < T; ++t) {
    if (p.offsets[t] < 0 || p.offsets[t] > p.offsets[t + 1] || p.offsets[t + 1] > size) {
      return Error("offsets must be non-decreasing within values");
    }
  }
  if (!(half ? SparseRun<uint16_t>(pool, p) : SparseRun<float>(pool, p))) {
    return Error("a tile's masks keep more codes than its segment of values holds");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LacaxQuantMatmul, QuantMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::AnyBuffer>()         // data (codes)
                                  .Arg<ffi::AnyBuffer>()         // scales
                                  .Arg<ffi::AnyBuffer>()         // mins (or a dummy)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("storage_bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("affine"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LacaxDenseMatmul, DenseMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x: f32 or bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .RemainingArgs()               // the weights [L, K, N_i]
                                  .RemainingRets());             // the results [M, N_i]: f32 or bf16

XLA_FFI_DEFINE_HANDLER_SYMBOL(LacaxRowsMatmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::AnyBuffer>()         // data: table [N, K] or codes [N, K / P]
                                  .Arg<ffi::AnyBuffer>()         // scales (or a dummy)
                                  .Arg<ffi::AnyBuffer>()         // mins (or a dummy)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("storage_bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("affine"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LacaxSparseMatmul, SparseMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask [L, N / 64, K, 8]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // values (kept codes)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // offsets [L, N / 64 + 1]
                                  .Arg<ffi::AnyBuffer>()         // scales
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("group_size"));
