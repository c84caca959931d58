// Decode attention over a packed kvshrink store on the CPU (the C++ side of kvshrink.kernels.cpu).
//
// Same contract as kernels/reference.py `packed_attention`: the keys are, in order, the exact tokens whose key
// index is below key0, the store's tokens (key0 .. key0 + T - 1), then the other exact tokens. Work is cut into
// units (sequence, KV head, block of stored tokens) plus one unit per (sequence, KV head) for the exact tokens;
// every unit keeps a running softmax (max m, sum l, weighted value sum acc) for all query rows of its KV head
// (the n_rep query heads times the query tokens), dequantizing codes in tiles of TT tokens in registers/L1, and a
// last pass merges the units (flash-decoding). Units run in parallel through at::parallel_for.
//
// Layouts: the `grouped` codec's declared fields (codecs/quant.py `GroupCodec.layout`), page by page
// (codecs/store.py): a token's codes are a row of packed bytes (2/4/8 bits: 8/bits codes per byte, low bits first;
// 3 bits: 8 codes per little-endian 3-byte word). Per-token groups ("token" axis): codes [B, H, T, D/G, bytes(G)],
// fp16 scale/zero [B, H, T, D/G]; per-channel groups ("channel" axis): codes [B, H, T, bytes(D)] (T/G groups of G
// rows), fp16 scale/zero [B, H, T/G, D]. 16 bits: fp16 values [B, H, T, D]. Optional fp16 head mean [B, 1, T, D]
// and channel mean [B, H, 1, D] are added back. The `rotated` codec's: Lloyd-Max codes of a token's rotated
// direction [B, H, T, bytes(D)] times its norm [B, H, T, 1] (fp16 or fp32) over the codebook / sqrt(D), or fp8 e4m3
// bytes [B, H, T, D] times a per-token scale; the wrapper rotates the query and the exact tokens into that space and
// the output back. T is a page's fill; the wrapper passes one tensor per page.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kTile = 32;  // tokens scored before their values are summed
constexpr int64_t kNegIndex = std::numeric_limits<int64_t>::min();

inline void half_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(c10::Half(src[i], c10::Half::from_bits()));
}

inline float half1(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// exp(x) for x <= 0 (a score minus its running maximum), relative error ~1e-7; 0 below -87 (and for -inf).
// Cody-Waite reduction and a degree-6 polynomial (Cephes expf), written so that the loop over a tile vectorizes.
inline float exp_nonpos(float x) {
  const bool tiny = x < -87.0f;
  x = tiny ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (|n| < 2^22)
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : p * scale;
}

// Each byte's codes as floats, low bits first: 2 bits (4 codes) and 4 bits (2 codes) per byte.
struct CodeTables {
  alignas(64) float two[256][4];
  alignas(64) float four[256][2];
  CodeTables() {
    for (int b = 0; b < 256; ++b) {
      for (int i = 0; i < 4; ++i) two[b][i] = static_cast<float>((b >> (2 * i)) & 3);
      for (int i = 0; i < 2; ++i) four[b][i] = static_cast<float>((b >> (4 * i)) & 15);
    }
  }
};
const CodeTables kCodes;

// float8 e4m3fn bytes as floats (bias 7, no infinities, 0x7f / 0xff NaN)
struct Fp8Values {
  float v[256];
  Fp8Values() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float x = e == 0 ? std::ldexp(m / 8.0f, -6) : std::ldexp(1.0f + m / 8.0f, e - 7);
      if (e == 15 && m == 7) x = std::numeric_limits<float>::quiet_NaN();
      v[b] = (b & 128) ? -x : x;
    }
  }
};
const Fp8Values kFp8Values;

// Codes of `nbytes` packed bytes, as floats: nbytes * 8 / bits values (whole words for 3 bits).
inline void unpack(const uint8_t* __restrict p, int64_t nbytes, int bits, float* __restrict out) {
  switch (bits) {
    case 8:
#pragma omp simd
      for (int64_t k = 0; k < nbytes; ++k) out[k] = static_cast<float>(p[k]);
      break;
    case 4:
      for (int64_t k = 0; k < nbytes; ++k) std::memcpy(out + 2 * k, kCodes.four[p[k]], 2 * sizeof(float));
      break;
    case 2:
      for (int64_t k = 0; k < nbytes; ++k) std::memcpy(out + 4 * k, kCodes.two[p[k]], 4 * sizeof(float));
      break;
    case 3:
      for (int64_t w = 0; w < nbytes / 3; ++w) {
        const uint32_t x = uint32_t(p[3 * w]) | (uint32_t(p[3 * w + 1]) << 8) | (uint32_t(p[3 * w + 2]) << 16);
#pragma omp simd
        for (int j = 0; j < 8; ++j) out[8 * w + j] = static_cast<float>((x >> (3 * j)) & 7u);
      }
      break;
    default:
      break;
  }
}

// out[i] = code_i * s[i] + z[i] over the codes of nbytes bytes of PER codes each (2 or 4 bits), by table.
template <int PER>
inline void dequant_channels(const uint8_t* __restrict p, int64_t nbytes, const float (*table)[PER],
                             const float* __restrict s, const float* __restrict z, float* __restrict out) {
  for (int64_t k = 0; k < nbytes; ++k) {
    const float* c = table[p[k]];
    for (int i = 0; i < PER; ++i) out[PER * k + i] = c[i] * s[PER * k + i] + z[PER * k + i];
  }
}

// out[i] = code_i * a + z over the codes of nbytes bytes of PER codes each (one per-token group), by table.
template <int PER>
inline void dequant_group(const uint8_t* __restrict p, int64_t nbytes, const float (*table)[PER], float a, float z,
                          float* __restrict out) {
  for (int64_t k = 0; k < nbytes; ++k) {
    const float* c = table[p[k]];
    for (int i = 0; i < PER; ++i) out[PER * k + i] = c[i] * a + z;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
#define KVSHRINK_AVX2 1
// Eight codes as floats: from BITS bytes at p (2, 3, 4 bits: one shift per lane) or 8 bytes (8 bits).
// Eight codes as int32 lanes: from BITS bytes at p (2, 3, 4 bits: one shift per lane) or 8 bytes (8 bits).
template <int BITS>
inline __m256i codes8i(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else {
    uint32_t x;
    if constexpr (BITS == 3) {  // assembled in a register: a 3-byte memcpy into a stack word stalls the load after it
      x = uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16);
    } else {
      x = 0;
      std::memcpy(&x, p, BITS);  // never reads past the row
    }
    const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(x)), shifts),
                            _mm256_set1_epi32((1 << BITS) - 1));
  }
}

// 8 codes (2, 3, 4 bits) as int32 lanes from one broadcast 4-byte load: `word` points BACK bytes before the
// chunk's own BITS bytes (BACK = 0 at the start of a span, 4 - BITS later in it, so that no read leaves a span of
// at least 16 codes and no scalar assembly is needed).
template <int BITS, int BACK>
inline __m256i codes8i_word(const uint8_t* word) {
  static_assert(BITS == 2 || BITS == 3 || BITS == 4, "2, 3 or 4 bits");
  uint32_t x;
  std::memcpy(&x, word, 4);  // one 4-byte load (no aliasing through a float pointer), broadcast to the lanes
  const __m256i w = _mm256_set1_epi32(static_cast<int>(x));
  const __m256i shifts = _mm256_setr_epi32(8 * BACK, 8 * BACK + BITS, 8 * BACK + 2 * BITS, 8 * BACK + 3 * BITS,
                                           8 * BACK + 4 * BITS, 8 * BACK + 5 * BITS, 8 * BACK + 6 * BITS,
                                           8 * BACK + 7 * BITS);
  return _mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32((1 << BITS) - 1));
}

// Chunk k (codes 8k .. 8k + 7) of a span of at least 16 codes starting at `span`, as int32 lanes: FIRST (k == 0)
// reads forward, a later chunk through the bytes before its own; 8-bit chunks load exactly their bytes.
template <int BITS, bool FIRST>
inline __m256i codes8i_chunk(const uint8_t* span, int64_t k) {
  if constexpr (BITS == 8) {
    return codes8i<8>(span + 8 * k);
  } else if constexpr (FIRST) {
    return codes8i_word<BITS, 0>(span);
  } else {
    constexpr int kBack = 4 - BITS;
    return codes8i_word<BITS, kBack>(span + k * BITS - kBack);
  }
}

// Lloyd-Max codes as their centroids: the codebook (2^BITS <= 16 entries, padded to 16) lives in two registers and
// each lane picks its centroid by a permute (a blend between the halves at 4 bits).
template <int BITS>
struct Centroids {
  static constexpr int kRegs = BITS == 4 ? 3 : 1;  // the codebook's registers (and the blend's constant)
  __m256 lo, hi;
  explicit Centroids(const float* cb16) : lo(_mm256_loadu_ps(cb16)), hi(_mm256_loadu_ps(cb16 + 8)) {}
  __m256 operator()(__m256i c) const {
    const __m256 v = _mm256_permutevar8x32_ps(lo, c);
    if constexpr (BITS == 4)
      return _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi, c),
                              _mm256_castsi256_ps(_mm256_cmpgt_epi32(c, _mm256_set1_epi32(7))));
    return v;
  }
};

// Calls f(i, codes) for the n codes (a multiple of 8) of a span at p, eight at a time (i: the first code's index,
// codes: int32 lanes): the first chunk read forward, the others through the bytes before them (spans of 16 codes
// or more; shorter ones and 8 bits load exactly their bytes).
template <int BITS, class F>
inline void for_codes8(const uint8_t* __restrict p, int64_t n, F f) {
  if constexpr (BITS == 8) {
    for (int64_t i = 0; i < n; i += 8) f(i, codes8i<8>(p + i));
  } else {
    if (n < 16) {
      for (int64_t i = 0; i < n; i += 8) f(i, codes8i<BITS>(p + i / 8 * BITS));
      return;
    }
    f(0, codes8i_chunk<BITS, true>(p, 0));
    for (int64_t i = 8; i < n; i += 8) f(i, codes8i_chunk<BITS, false>(p, i / 8));
  }
}

// exp(x) of eight lanes, each x <= 0 (exp_nonpos's steps and constants; its result to within an ulp or two): 0 below
// -87 and for -inf, NaN stays NaN.
inline __m256 exp8_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_blendv_ps(x, lo, tiny);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256 scale = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, scale));
}

// D (a multiple of 8) Lloyd-Max codes from p as centroids times a (cb16: the codebook padded to 16 entries)
template <int BITS>
void centroids8(const uint8_t* __restrict p, int64_t D, const float* __restrict cb16, float a, float* __restrict out) {
  const Centroids<BITS> cb(cb16);
  const __m256 va = _mm256_set1_ps(a);
  for_codes8<BITS>(p, D, [&](int64_t i, __m256i c) { _mm256_storeu_ps(out + i, _mm256_mul_ps(cb(c), va)); });
}

// n (a multiple of 8) codes from p: out = code * s + z with per-channel s, z (s == nullptr: the codes themselves)
template <int BITS>
void dequant8(const uint8_t* __restrict p, int64_t n, const float* __restrict s, const float* __restrict z,
              float* __restrict out) {
  if (s) {
    for_codes8<BITS>(p, n, [&](int64_t i, __m256i c) {
      _mm256_storeu_ps(out + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), _mm256_loadu_ps(s + i), _mm256_loadu_ps(z + i)));
    });
  } else {
    for_codes8<BITS>(p, n, [&](int64_t i, __m256i c) { _mm256_storeu_ps(out + i, _mm256_cvtepi32_ps(c)); });
  }
}

// n (a multiple of 8) codes from p: out = code * a + z (one per-token group)
template <int BITS>
void dequant8_group(const uint8_t* __restrict p, int64_t n, float a, float z, float* __restrict out) {
  const __m256 va = _mm256_set1_ps(a), vz = _mm256_set1_ps(z);
  for_codes8<BITS>(p, n, [&](int64_t i, __m256i c) {
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), va, vz));
  });
}

// f(std::integral_constant<int, i>{}) for i = 0 .. N - 1, unrolled where the code is written: arrays of registers
// indexed by these constants stay in registers, where GCC keeps an array indexed by a loop counter in memory (and
// stores it on every iteration) even when it unrolls the loop later.
template <class F, int... I>
inline void unroll_each(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
inline void unroll(F&& f) {
  unroll_each(f, std::make_integer_sequence<int, N>{});
}

// The fused loops' rows in passes of at most 6: f(std::integral_constant<int, rb>{}, r0) for each pass of rb rows
// from row r0, rb a compile-time constant.
template <class F>
inline void row_passes(int64_t R, F&& f) {
  for (int64_t r0 = 0; r0 < R; r0 += 6) {
    switch (std::min<int64_t>(6, R - r0)) {
      case 1: f(std::integral_constant<int, 1>{}, r0); break;
      case 2: f(std::integral_constant<int, 2>{}, r0); break;
      case 3: f(std::integral_constant<int, 3>{}, r0); break;
      case 4: f(std::integral_constant<int, 4>{}, r0); break;
      case 5: f(std::integral_constant<int, 5>{}, r0); break;
      default: f(std::integral_constant<int, 6>{}, r0); break;
    }
  }
}

// ---- Values summed straight from their codes (per-token groups, Lloyd-Max rows) -----------------------------------
// For a tile of tokens in one page: acc[r][c0 + d] += sum_j Wg[r][j] * f(code_jd) for CH (8 or 16) channels at a
// time, where f turns codes into floats (the codes themselves for groups, whose scale is folded into Wg and whose
// zero is added by the caller; the centroids for Lloyd-Max rows, whose norm is folded into Wg). RB rows per pass keep
// their CH / 8 accumulators each in registers; the codes of a token are turned into floats once per pass. RB and CH
// are chosen (accum_codes) so that the accumulators, the codes, a weight and the unpacking constants fit in the 16
// vector registers: with 6 rows x 16 channels GCC kept the accumulators on the stack and stored all twelve on every
// token, which made this loop bound by stores (`perf annotate`, Qwen's shapes).
template <int BITS, int RB, int CH, bool FIRST, class ToFloat>
void accum_pass(const float* __restrict Wg, int64_t nt, const uint8_t* __restrict codes0, int64_t tstride,
                float* __restrict acc, int64_t accstride, ToFloat tf) {
  static_assert(CH == 8 || CH == 16, "8 or 16 channels");
  __m256 a0[RB], a1[RB];  // 8 channels each (a1: the second 8 of 16)
  unroll<RB>([&](auto r) {
    a0[r] = _mm256_loadu_ps(acc + r * accstride);
    if constexpr (CH == 16) a1[r] = _mm256_loadu_ps(acc + r * accstride + 8);
  });
  for (int64_t j = 0; j < nt; ++j) {
    // cp: the chunk's bytes inside the token's row, so a chunk read through the bytes before it stays in the row
    const uint8_t* cp = codes0 + j * tstride;
    const __m256 v0 = tf(codes8i_chunk<BITS, FIRST>(cp, 0));
    if constexpr (CH == 16) {
      const __m256 v1 = tf(codes8i_chunk<BITS, false>(cp, 1));
      unroll<RB>([&](auto r) {
        const __m256 w = _mm256_broadcast_ss(Wg + r * kTile + j);
        a0[r] = _mm256_fmadd_ps(w, v0, a0[r]);
        a1[r] = _mm256_fmadd_ps(w, v1, a1[r]);
      });
    } else {
      unroll<RB>([&](auto r) { a0[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(Wg + r * kTile + j), v0, a0[r]); });
    }
  }
  unroll<RB>([&](auto r) {
    _mm256_storeu_ps(acc + r * accstride, a0[r]);
    if constexpr (CH == 16) _mm256_storeu_ps(acc + r * accstride + 8, a1[r]);
  });
}

// Codes as floats, for the fused loops (kRegs: vector registers the conversion holds besides the unpacking's).
struct CodesAsFloat {
  static constexpr int kRegs = 0;
  __m256 operator()(__m256i c) const { return _mm256_cvtepi32_ps(c); }
};

// accum_pass over R rows (passes of at most 6) and C channels (a multiple of 16) starting at code k of each token
// (codes0: token 0's byte of code k, a multiple of 8; row_start: k is a row's first code). A pass of RB rows takes
// 16 channels at a time when its 2 RB accumulators, 2 code vectors and the conversion's registers leave room for a
// weight and the two unpacking constants, else 8.
template <int BITS, class ToFloat>
void accum_codes(const float* Wg, int64_t R, int64_t nt, const uint8_t* codes0, int64_t tstride, float* acc,
                 int64_t accstride, int64_t C, bool row_start, ToFloat tf) {
  row_passes(R, [&](auto rows, int64_t r0) {
    constexpr int kRB = decltype(rows)::value;
    constexpr int kCH = 2 * kRB + 2 + ToFloat::kRegs <= 13 ? 16 : 8;
    const float* w = Wg + r0 * kTile;
    float* y = acc + r0 * accstride;
    for (int64_t c = 0; c < C; c += kCH) {
      const uint8_t* cp = codes0 + c / 8 * BITS;
      if (row_start && c == 0)
        accum_pass<BITS, kRB, kCH, true>(w, nt, cp, tstride, y + c, accstride, tf);
      else
        accum_pass<BITS, kRB, kCH, false>(w, nt, cp, tstride, y + c, accstride, tf);
    }
  });
}

// ---- Key scores straight from their codes (per-channel groups with the scales folded into the query, Lloyd-Max
// rows) ---------------------------------------------------------------------------------------------------------------
// S[r * kTile + j] = sum_d Qs[r][d] f(code_jd) for RB query rows and nt tokens (TB at a time, RB x TB accumulators in
// registers), D a multiple of 16: each token's codes are turned into floats once for all RB rows and never written
// out. Four accumulators are summed together by a transposing horizontal add.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

template <int BITS, int RB, int TB, class ToFloat>
void scores_pass(const float* __restrict Qs, int64_t D, int64_t nt, const uint8_t* __restrict codes0, int64_t tstride,
                 float* __restrict S, ToFloat tf) {
  int64_t j = 0;
  for (; j + TB <= nt; j += TB) {
    __m256 a[RB * TB];
    unroll<RB * TB>([&](auto i) { a[i] = _mm256_setzero_ps(); });
    const uint8_t* cp = codes0 + j * tstride;
    const auto chunk = [&](int64_t k, auto first) {
      unroll<TB>([&](auto t) {
        const __m256 c = tf(codes8i_chunk<BITS, decltype(first)::value>(cp + t * tstride, k));
        unroll<RB>([&](auto r) {
          a[r * TB + t] = _mm256_fmadd_ps(_mm256_loadu_ps(Qs + r * D + 8 * k), c, a[r * TB + t]);
        });
      });
    };
    chunk(0, std::true_type{});
    for (int64_t k = 1; k < D / 8; ++k) chunk(k, std::false_type{});
    constexpr int kN = RB * TB;
    const __m256 z = _mm256_setzero_ps();
    const auto acc_at = [&](int i) { return i < kN ? a[i] : z; };
    alignas(16) float out[(kN + 3) / 4 * 4];
    for (int i = 0; i < kN; i += 4) _mm_store_ps(out + i, hsum4(acc_at(i), acc_at(i + 1), acc_at(i + 2), acc_at(i + 3)));
    for (int r = 0; r < RB; ++r)
      for (int t = 0; t < TB; ++t) S[r * kTile + j + t] = out[r * TB + t];
  }
  if constexpr (TB > 1) {
    if (j < nt) scores_pass<BITS, RB, 1>(Qs, D, nt - j, codes0 + j * tstride, tstride, S + j, tf);
  }
}

// scores_pass over R rows: four tokens at a time for up to 3 rows (12 accumulators), two for up to 6, passes of 6.
template <int BITS, class ToFloat>
void scores_codes(const float* Qs, int64_t R, int64_t D, int64_t nt, const uint8_t* codes0, int64_t tstride,
                  float* S, ToFloat tf) {
  row_passes(R, [&](auto rows, int64_t r0) {
    constexpr int kRB = decltype(rows)::value;
    scores_pass<BITS, kRB, kRB <= 3 ? 4 : 2>(Qs + r0 * D, D, nt, codes0, tstride, S + r0 * kTile, tf);
  });
}

inline void dequant8_any(int bits, const uint8_t* p, int64_t n, const float* s, const float* z, float* out) {
  switch (bits) {
    case 2: dequant8<2>(p, n, s, z, out); break;
    case 3: dequant8<3>(p, n, s, z, out); break;
    case 4: dequant8<4>(p, n, s, z, out); break;
    default: dequant8<8>(p, n, s, z, out); break;
  }
}

inline void dequant8_group_any(int bits, const uint8_t* p, int64_t n, float a, float z, float* out) {
  switch (bits) {
    case 2: dequant8_group<2>(p, n, a, z, out); break;
    case 3: dequant8_group<3>(p, n, a, z, out); break;
    case 4: dequant8_group<4>(p, n, a, z, out); break;
    default: dequant8_group<8>(p, n, a, z, out); break;
  }
}
#endif

// out[i] += fp16 src[i]
inline void add_half(float* __restrict out, const uint16_t* __restrict src, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i),
                                            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)))));
#endif
  for (; i < n; ++i) out[i] += half1(src[i]);
}

// S[r * stride + j] = Q[r] . K[j] for R query rows and n key rows of D floats (row-major, contiguous).
void scores_tile(const float* __restrict Q, int64_t R, const float* __restrict K, int64_t n, int64_t D,
                 float* __restrict S, int64_t stride) {
  int64_t j0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {
    // two rows x four keys per pass: eight accumulators, reduced together by a transposing horizontal add
    for (; j0 + 4 <= n; j0 += 4) {
      const float* k0 = K + j0 * D;
      for (int64_t r = 0; r < R; r += 2) {
        const float* q0 = Q + r * D;
        if (r + 1 == R) {  // an odd last row alone (SmolLM2's 3 query heads per KV head): half the multiply-adds
          __m256 a[4];
          for (auto& x : a) x = _mm256_setzero_ps();
          for (int64_t d = 0; d < D; d += 8) {
            const __m256 x0 = _mm256_loadu_ps(q0 + d);
            for (int k = 0; k < 4; ++k) a[k] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(k0 + k * D + d), a[k]);
          }
          const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
          const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
          alignas(16) float out[4];
          _mm_store_ps(out, sum);
          for (int k = 0; k < 4; ++k) S[r * stride + j0 + k] = out[k];
          break;
        }
        const float* q1 = q0 + D;
        __m256 a[8];
        for (auto& x : a) x = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 x0 = _mm256_loadu_ps(q0 + d), x1 = _mm256_loadu_ps(q1 + d);
          for (int k = 0; k < 4; ++k) {
            const __m256 kv = _mm256_loadu_ps(k0 + k * D + d);
            a[k] = _mm256_fmadd_ps(x0, kv, a[k]);
            a[4 + k] = _mm256_fmadd_ps(x1, kv, a[4 + k]);
          }
        }
        const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
        const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
        const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
        const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
        alignas(32) float out[8];
        _mm256_store_ps(out, sum);
        for (int k = 0; k < 4; ++k) S[r * stride + j0 + k] = out[k];
        for (int k = 0; k < 4; ++k) S[(r + 1) * stride + j0 + k] = out[4 + k];
      }
    }
  }
#endif
  for (; j0 < n; ++j0)
    for (int64_t r = 0; r < R; ++r) S[r * stride + j0] = dot(Q + r * D, K + j0 * D, D);
}

// acc[r] += sum_j P[r * stride + j] V[j] for R rows and n value rows of D floats.
void values_tile(const float* __restrict P, int64_t R, int64_t stride, const float* __restrict V, int64_t n,
                 int64_t D, float* __restrict acc) {
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 32 == 0) {
    // two rows x 32 channels in eight accumulators; each value vector loaded once for both rows
    for (int64_t r = 0; r < R; r += 2) {
      if (r + 1 == R) {  // an odd last row alone: four accumulators, half the multiply-adds
        const float* p0 = P + r * stride;
        float* y0 = acc + r * D;
        for (int64_t d = 0; d < D; d += 32) {
          __m256 a[4];
          for (int i = 0; i < 4; ++i) a[i] = _mm256_loadu_ps(y0 + d + 8 * i);
          for (int64_t j = 0; j < n; ++j) {
            const float* v = V + j * D + d;
            const __m256 w0 = _mm256_set1_ps(p0[j]);
            for (int i = 0; i < 4; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v + 8 * i), a[i]);
          }
          for (int i = 0; i < 4; ++i) _mm256_storeu_ps(y0 + d + 8 * i, a[i]);
        }
        break;
      }
      const float* p0 = P + r * stride;
      const float* p1 = p0 + stride;
      float* y0 = acc + r * D;
      float* y1 = y0 + D;
      for (int64_t d = 0; d < D; d += 32) {
        __m256 a[8];
        for (int i = 0; i < 4; ++i) {
          a[i] = _mm256_loadu_ps(y0 + d + 8 * i);
          a[4 + i] = _mm256_loadu_ps(y1 + d + 8 * i);
        }
        for (int64_t j = 0; j < n; ++j) {
          const float* v = V + j * D + d;
          const __m256 w0 = _mm256_set1_ps(p0[j]), w1 = _mm256_set1_ps(p1[j]);
          for (int i = 0; i < 4; ++i) {
            const __m256 x = _mm256_loadu_ps(v + 8 * i);
            a[i] = _mm256_fmadd_ps(w0, x, a[i]);
            a[4 + i] = _mm256_fmadd_ps(w1, x, a[4 + i]);
          }
        }
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_ps(y0 + d + 8 * i, a[i]);
          _mm256_storeu_ps(y1 + d + 8 * i, a[4 + i]);
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j)
      if (P[r * stride + j] != 0.0f) axpy(acc + r * D, P[r * stride + j], V + j * D, D);
}

// ---- Integer key scores (qdot=int8) --------------------------------------------------------------------------
// For per-channel key groups the folded query row q*s of one group (one query row, one group of tokens sharing
// scales) is rounded to int8 with one scale a = max|q*s| / 127, and a key's score is a * sum_d qi_d code_d + c0:
// unsigned codes times signed query bytes, summed exactly in int32. Modes the wrapper passes: 0 float (the folded
// fp32 query), 1 int8 through the best integer dot product compiled in, 2 AVX2 (maddubs + madd), 3 VNNI (dpbusd),
// 4 portable loops. The int8 modes give the same bits: the integer sums are exact, the float work around them is
// shared code.
enum QDot { kQFloat = 0, kQInt8 = 1, kQInt8Avx2 = 2, kQInt8Vnni = 3, kQInt8Scalar = 4 };

#if defined(KVSHRINK_AVX2) && !defined(KVSHRINK_NO_VNNI) && \
    ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#define KVSHRINK_VNNI 1
#endif

// Bit i set: mode i can run in this build.
int64_t int8_modes() {
  int64_t m = (1 << kQFloat) | (1 << kQInt8) | (1 << kQInt8Scalar);
#ifdef KVSHRINK_AVX2
  m |= 1 << kQInt8Avx2;
#endif
#ifdef KVSHRINK_VNNI
  m |= 1 << kQInt8Vnni;
#endif
  return m;
}

// The mode kQInt8 stands for here.
int best_int8_mode() {
#if defined(KVSHRINK_VNNI)
  return kQInt8Vnni;
#elif defined(KVSHRINK_AVX2)
  return kQInt8Avx2;
#else
  return kQInt8Scalar;
#endif
}

// One token's codes (`bits` wide, D of them) as bytes in channel order (the portable loops).
inline void codes_u8_plain(const uint8_t* __restrict p, int bits, int64_t D, uint8_t* __restrict out) {
  if (bits == 8) {
    std::memcpy(out, p, D);
  } else if (bits == 3) {
    for (int64_t d = 0; d < D; ++d) {
      const uint8_t* w = p + 3 * (d / 8);
      const uint32_t x = uint32_t(w[0]) | (uint32_t(w[1]) << 8) | (uint32_t(w[2]) << 16);
      out[d] = static_cast<uint8_t>((x >> (3 * (d % 8))) & 7u);
    }
  } else {
    const int per = 8 / bits, mask = (1 << bits) - 1;
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<uint8_t>((p[d / per] >> (bits * (d % per))) & mask);
  }
}

// Where channel ch of a token lands among the bytes `codes_u8` writes (D a multiple of 64): the order the shifts
// leave the codes in; the query is laid out the same way once per group, so the dot products need no shuffles.
inline int64_t code_slot(int bits, int64_t ch) {
  switch (bits) {
    case 2: {  // 16 bytes -> 4 x 16 codes: code j of byte k at 16 j + k
      const int64_t c = ch / 64, r = ch % 64;
      return 64 * c + 16 * (r % 4) + r / 4;
    }
    case 4: {  // 16 bytes -> 2 x 16 codes: low nibble of byte k at k, high at 16 + k
      const int64_t c = ch / 32, r = ch % 32;
      return 32 * c + 16 * (r % 2) + r / 2;
    }
    case 3: {  // 2 x 12 bytes (8 words) -> codes 0-3 of word w of half h at 16 h + 4 w, codes 4-7 32 further
      const int64_t c = ch / 64, r = ch % 64, h = r / 32, w = (r % 32) / 8, j = r % 8;
      return 64 * c + (j < 4 ? 0 : 32) + 16 * h + 4 * w + j % 4;
    }
    default:
      return ch;
  }
}

#ifdef KVSHRINK_AVX2
// Four 3-bit codes (bits 0-11 of each dword) spread to the dword's four bytes.
inline __m256i spread3(__m256i a) {
  const __m256i lo = _mm256_and_si256(a, _mm256_set1_epi32(0x7));
  const __m256i b1 = _mm256_and_si256(_mm256_slli_epi32(a, 5), _mm256_set1_epi32(0x700));
  const __m256i b2 = _mm256_and_si256(_mm256_slli_epi32(a, 10), _mm256_set1_epi32(0x70000));
  const __m256i b3 = _mm256_and_si256(_mm256_slli_epi32(a, 15), _mm256_set1_epi32(0x7000000));
  return _mm256_or_si256(_mm256_or_si256(lo, b1), _mm256_or_si256(b2, b3));
}

// One token's D codes (D a multiple of 64) as bytes in code_slot order; reads only the token's row.
template <int BITS>
inline void codes_u8(const uint8_t* __restrict p, int64_t D, uint8_t* __restrict out) {
  if constexpr (BITS == 8) {
    std::memcpy(out, p, D);
  } else if constexpr (BITS == 4) {
    const __m128i m = _mm_set1_epi8(15);
    for (int64_t c = 0; c < D / 32; ++c) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * c),
                          _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), m), _mm_and_si128(x, m)));
    }
  } else if constexpr (BITS == 2) {
    const __m128i m = _mm_set1_epi8(3);
    for (int64_t c = 0; c < D / 64; ++c) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * c));
      const __m128i v0 = _mm_and_si128(x, m), v1 = _mm_and_si128(_mm_srli_epi16(x, 2), m);
      const __m128i v2 = _mm_and_si128(_mm_srli_epi16(x, 4), m), v3 = _mm_and_si128(_mm_srli_epi16(x, 6), m);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 64 * c), _mm256_set_m128i(v1, v0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 64 * c + 32), _mm256_set_m128i(v3, v2));
    }
  } else {  // 3 bits: each 12-byte half (4 words) is loaded 16 bytes wide, from 4 bytes earlier at the row's end
    const int64_t rb = D / 8 * 3;
    const __m128i at0 = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    const __m128i at4 = _mm_add_epi8(at0, _mm_setr_epi8(4, 4, 4, 0, 4, 4, 4, 0, 4, 4, 4, 0, 4, 4, 4, 0));
    auto half = [&](int64_t o) {
      const bool end = o + 16 > rb;
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (end ? rb - 16 : o)));
      return _mm_shuffle_epi8(x, end ? at4 : at0);
    };
    for (int64_t c = 0; c < D / 64; ++c) {
      const __m256i w = _mm256_set_m128i(half(24 * c + 12), half(24 * c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 64 * c), spread3(w));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 64 * c + 32), spread3(_mm256_srli_epi32(w, 12)));
    }
  }
}

inline void codes_u8_any(int bits, const uint8_t* p, int64_t D, uint8_t* out) {
  switch (bits) {
    case 2: codes_u8<2>(p, D, out); break;
    case 3: codes_u8<3>(p, D, out); break;
    case 4: codes_u8<4>(p, D, out); break;
    default: codes_u8<8>(p, D, out); break;
  }
}

// The eight int32 sums of a[0..7] (each a vector of partial sums) in lanes 0..7.
inline __m256i hsum8(const __m256i* a) {
  const __m256i t0 = _mm256_hadd_epi32(a[0], a[1]), t1 = _mm256_hadd_epi32(a[2], a[3]);
  const __m256i t2 = _mm256_hadd_epi32(a[4], a[5]), t3 = _mm256_hadd_epi32(a[6], a[7]);
  const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}
#endif

inline int32_t int_dot(const int8_t* __restrict q, const uint8_t* __restrict c, int64_t D) {
  int32_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += int32_t(q[d]) * int32_t(c[d]);
  return s;
}

// S[r * stride + j] = Qi[r] . C[j] exactly, for R int8 query rows and n tokens of D code bytes (row-major).
// MODE kQInt8Avx2: bytes multiplied pairwise into int16 (maddubs: |pair| <= 2 * 15 * 127 for codes of at most 4
// bits, so eight pairs add up in int16 without overflow) then into int32 (madd); 8-bit codes (pairs up to
// 2 * 255 * 127) widen to int16 and multiply with the int16 query (Q16) in madd instead. kQInt8Vnni: dpbusd sums
// four products into int32 directly. Needs D a multiple of 32.
template <int MODE>
void int_scores(const int8_t* __restrict Q, const int16_t* __restrict Q16, int64_t R, const uint8_t* __restrict C,
                int64_t n, int64_t D, bool wide, int32_t* __restrict S, int64_t stride) {
  int64_t j0 = 0;
#ifdef KVSHRINK_AVX2
  if constexpr (MODE != kQInt8Scalar) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (; j0 + 4 <= n; j0 += 4) {
      const uint8_t* c0 = C + j0 * D;
      for (int64_t r = 0; r < R; r += 2) {
        const int64_t r1 = r + 1 < R ? r + 1 : r;
        __m256i a[8];
        for (auto& x : a) x = _mm256_setzero_si256();
        if constexpr (MODE == kQInt8Vnni) {
#ifdef KVSHRINK_VNNI
          const int8_t* q0 = Q + r * D;
          const int8_t* q1 = Q + r1 * D;
          for (int64_t d = 0; d < D; d += 32) {
            const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + d));
            const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q1 + d));
            for (int k = 0; k < 4; ++k) {
              const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + k * D + d));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
              a[k] = _mm256_dpbusd_epi32(a[k], c, x0);
              a[4 + k] = _mm256_dpbusd_epi32(a[4 + k], c, x1);
#else
              a[k] = _mm256_dpbusd_avx_epi32(a[k], c, x0);
              a[4 + k] = _mm256_dpbusd_avx_epi32(a[4 + k], c, x1);
#endif
            }
          }
#endif
        } else if (wide) {
          const int16_t* q0 = Q16 + r * D;
          const int16_t* q1 = Q16 + r1 * D;
          for (int64_t d = 0; d < D; d += 16) {
            const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + d));
            const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q1 + d));
            for (int k = 0; k < 4; ++k) {
              const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c0 + k * D + d)));
              a[k] = _mm256_add_epi32(a[k], _mm256_madd_epi16(c, x0));
              a[4 + k] = _mm256_add_epi32(a[4 + k], _mm256_madd_epi16(c, x1));
            }
          }
        } else {
          const int8_t* q0 = Q + r * D;
          const int8_t* q1 = Q + r1 * D;
          __m256i h[8];
          for (auto& x : h) x = _mm256_setzero_si256();
          int pending = 0;
          for (int64_t d = 0; d < D; d += 32) {
            const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + d));
            const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q1 + d));
            for (int k = 0; k < 4; ++k) {
              const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + k * D + d));
              h[k] = _mm256_add_epi16(h[k], _mm256_maddubs_epi16(c, x0));
              h[4 + k] = _mm256_add_epi16(h[4 + k], _mm256_maddubs_epi16(c, x1));
            }
            if (++pending == 8 || d + 32 == D) {
              for (int i = 0; i < 8; ++i) {
                a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(h[i], ones));
                h[i] = _mm256_setzero_si256();
              }
              pending = 0;
            }
          }
        }
        alignas(32) int32_t out[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(out), hsum8(a));
        for (int k = 0; k < 4; ++k) S[r * stride + j0 + k] = out[k];
        if (r + 1 < R)
          for (int k = 0; k < 4; ++k) S[(r + 1) * stride + j0 + k] = out[4 + k];
      }
    }
  }
#endif
  (void)Q16;
  (void)wide;
  for (; j0 < n; ++j0)
    for (int64_t r = 0; r < R; ++r) S[r * stride + j0] = int_dot(Q + r * D, C + j0 * D, D);
}

// The int8 query of one unit's R rows for one key group: rows of q * scale rounded to int8 with one scale per row
// (a[r] = max |q*s| / 127, ties to even), laid out in code_slot order when `slots` (the SIMD modes); c0[r] =
// q . (zero + mean). The query rows are put in slot order once per unit, the group's scales once per group.
struct Int8Query {
  int64_t R = 0, D = 0;
  bool wide = false;  // 8-bit codes: the AVX2 path also needs the query as int16
  const float* Q = nullptr;
  std::vector<int8_t> qi;
  std::vector<int16_t> q16;
  std::vector<int64_t> chan;  // the channel at each slot
  std::vector<float> qp, sp, qs, a, c0;

  Int8Query(const float* Q_, int64_t R_, int64_t D_, int bits, bool slots)
      : R(R_), D(D_), wide(bits == 8), Q(Q_) {
    if (!R) return;
    qi.assign(R * D, 0);
    q16.assign(wide ? R * D : 0, 0);
    chan.resize(D);
    for (int64_t d = 0; d < D; ++d) chan[slots ? code_slot(bits, d) : d] = d;
    qp.resize(R * D);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t s = 0; s < D; ++s) qp[r * D + s] = Q[r * D + chan[s]];
    sp.resize(D);
    qs.resize(D);
    a.assign(R, 0.0f);
    c0.assign(R, 0.0f);
  }

  void fold(const float* scale, const float* zero) {
    for (int64_t s = 0; s < D; ++s) sp[s] = scale[chan[s]];
    for (int64_t r = 0; r < R; ++r) {
      const float* q = qp.data() + r * D;
      float amax = 0.0f;
      int64_t s = 0;
#ifdef KVSHRINK_AVX2
      // eight lanes at a time (GCC left the simd loop below scalar: it was the int8 path's hottest loop)
      const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      __m256 vmax = _mm256_setzero_ps();
      for (; s + 8 <= D; s += 8) {
        const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(q + s), _mm256_loadu_ps(sp.data() + s));
        _mm256_storeu_ps(qs.data() + s, x);
        vmax = _mm256_max_ps(vmax, _mm256_and_ps(x, abs_mask));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vmax);
      for (float v : lanes) amax = std::max(amax, v);
#endif
      for (; s < D; ++s) {
        qs[s] = q[s] * sp[s];
        amax = std::max(amax, std::fabs(qs[s]));
      }
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      a[r] = amax / 127.0f;
      round_row(inv, qi.data() + r * D, wide ? q16.data() + r * D : nullptr);
      c0[r] = dot(Q + r * D, zero, D);
    }
  }

 private:
  // qs * inv rounded to the nearest integer (ties to even; |qs * inv| <= 127 up to a rounding) as int8 (and int16)
  void round_row(float inv, int8_t* __restrict o, int16_t* __restrict o16) const {
    int64_t s = 0;
#ifdef KVSHRINK_AVX2
    const __m256 vi = _mm256_set1_ps(inv);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; s + 32 <= D; s += 32) {
      __m256i v[4];
      for (int k = 0; k < 4; ++k)
        v[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(qs.data() + s + 8 * k), vi),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i w01 = _mm256_packs_epi32(v[0], v[1]), w23 = _mm256_packs_epi32(v[2], v[3]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + s),
                          _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), order));
      if (o16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o16 + s), _mm256_permute4x64_epi64(w01, 0xD8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o16 + s + 16), _mm256_permute4x64_epi64(w23, 0xD8));
      }
    }
#endif
    for (; s < D; ++s) {
      const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(qs[s] * inv)));
      o[s] = static_cast<int8_t>(v);
      if (o16) o16[s] = static_cast<int16_t>(v);
    }
  }
};

// One store (keys or values) of one layer, in pages: page i holds fills[i] tokens, each field shaped
// [B, H (1 for the head mean), entries, ...]; every page but the first and the last holds page_tokens tokens.
// Kinds of stored rows (codecs/*.py layouts): grouped codes with scales (kivi, tada, rotated uniform groups),
// Lloyd-Max codes of a rotated direction times the vector's norm (rotated codec), fp8 e4m3 times a per-token scale.
enum Kind { kGrouped = 0, kLloydMax = 1, kFp8 = 2 };

struct Store {
  int kind = kGrouped;
  int bits = 16;
  bool channel_axis = false;
  bool norm32 = false;                 // Lloyd-Max / fp8: the norms (scales) are fp32, not fp16
  std::vector<const void*> norms;      // Lloyd-Max / fp8: one per token, per page
  std::vector<float> codebook;         // Lloyd-Max: the centroids, already divided by sqrt(D)
  int64_t group = 1, H = 0, T = 0, D = 0;
  int64_t row_bytes = 0;  // token axis: bytes of one group's codes; channel axis: bytes of one token's codes
  int64_t ngroups = 1;    // token axis: groups per token
  bool whole_row = false; // token axis: the groups' codes are contiguous, so one unpack serves the whole row
  int64_t page_tokens = 1;
  std::vector<int64_t> fills;
  std::vector<const uint8_t*> codes;
  std::vector<const uint16_t*> codes16, scale, zero, head_mean;
  const uint16_t* channel_mean = nullptr;

  int page_shift = -1;  // log2(page_tokens) when it is a power of two (a shift instead of a division per token)

  // (page, token within the page) of stored token t
  inline void locate(int64_t t, int64_t& page, int64_t& local) const {
    const int64_t first = fills[0];
    if (t < first) {
      page = 0;
      local = t;
    } else if (page_shift >= 0) {
      page = 1 + ((t - first) >> page_shift);
      local = (t - first) & (page_tokens - 1);
    } else {
      page = 1 + (t - first) / page_tokens;
      local = (t - first) % page_tokens;
    }
  }
};

const uint16_t* half_ptr(const at::Tensor& t) {
  return t.numel() ? reinterpret_cast<const uint16_t*>(t.data_ptr()) : nullptr;
}

Store make_store(const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scale,
                 const std::vector<at::Tensor>& zero, const std::vector<at::Tensor>& hm, const at::Tensor& cm,
                 int64_t bits, int64_t axis, int64_t group, int64_t kind, const std::vector<at::Tensor>& norms,
                 const at::Tensor& codebook, int64_t T, int64_t D, int64_t page_tokens,
                 const std::vector<int64_t>& fills) {
  Store s;
  s.kind = static_cast<int>(kind);
  s.bits = static_cast<int>(bits);
  if (s.kind != kGrouped) {
    TORCH_CHECK(norms.size() == codes.size(), "norms: one tensor per page");
    for (const auto& t : norms) {
      TORCH_CHECK(t.is_contiguous(), "pages must be contiguous");
      s.norm32 = t.scalar_type() == at::kFloat;
      s.norms.push_back(t.numel() ? t.data_ptr() : nullptr);
    }
  }
  if (s.kind == kLloydMax) {
    TORCH_CHECK(codebook.scalar_type() == at::kFloat && codebook.numel() == (int64_t(1) << bits), "codebook");
    const float* c = codebook.data_ptr<float>();
    for (int64_t i = 0; i < codebook.numel(); ++i) s.codebook.push_back(c[i] / std::sqrt(static_cast<float>(D)));
    s.codebook.resize(std::max<size_t>(s.codebook.size(), 16), 0.0f);  // 16 entries for the permute path
  }
  s.channel_axis = axis == 1;
  s.group = group;
  s.T = T;
  s.D = D;
  s.page_tokens = page_tokens;
  if (page_tokens > 0 && (page_tokens & (page_tokens - 1)) == 0) {
    s.page_shift = 0;
    while ((int64_t(1) << s.page_shift) < page_tokens) ++s.page_shift;
  }
  s.fills = fills;
  const size_t n = codes.size();
  TORCH_CHECK(fills.size() == n, "one fill per page");
  TORCH_CHECK(hm.empty() || hm.size() == n, "head mean: one tensor per page");
  s.H = n ? codes[0].size(1) : 0;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(codes[i].is_contiguous(), "pages must be contiguous");
    if (bits == 16) {
      s.codes16.push_back(half_ptr(codes[i]));
    } else {
      s.codes.push_back(codes[i].numel() ? codes[i].data_ptr<uint8_t>() : nullptr);
      if (s.kind == kGrouped) {
        s.scale.push_back(half_ptr(scale[i]));
        s.zero.push_back(half_ptr(zero[i]));
      }
    }
    if (!hm.empty()) s.head_mean.push_back(half_ptr(hm[i]));
  }
  if (bits != 16 && n) {
    s.row_bytes = codes[0].size(-1);
    if (!s.channel_axis && s.kind == kGrouped) {
      s.ngroups = D / group;
      const int64_t per = bits == 3 ? 8 : 8 / bits;
      const int64_t codes_in_bytes = bits == 3 ? s.row_bytes / 3 * 8 : s.row_bytes * per;
      s.whole_row = codes_in_bytes == group;
    }
  }
  s.channel_mean = half_ptr(cm);
  return s;
}

// Dequantizes the rows of one (sequence, head) of a store; keeps the current channel group's scale and zero.
class Reader {
 public:
  Reader(const Store& s, int64_t b, int64_t h) : s_(s), D_(s.D) {
    const int64_t bh = b * s.H + h;
    const size_t n = s.fills.size();
    for (size_t i = 0; i < n; ++i) {
      const int64_t f = s.fills[i];
      if (s.kind != kGrouped) {
        codes_.push_back(s.codes[i] + bh * f * s.row_bytes);
        const int64_t esz = s.norm32 ? 4 : 2;
        norms_.push_back(static_cast<const uint8_t*>(s.norms[i]) + bh * f * esz);
      } else if (s.bits == 16) {
        codes16_.push_back(s.codes16[i] + bh * f * D_);
      } else if (s.channel_axis) {
        codes_.push_back(s.codes[i] + bh * f * s.row_bytes);
        scale_.push_back(s.scale[i] + bh * (f / s.group) * D_);
        zero_.push_back(s.zero[i] + bh * (f / s.group) * D_);
      } else {
        codes_.push_back(s.codes[i] + bh * f * s.ngroups * s.row_bytes);
        scale_.push_back(s.scale[i] + bh * f * s.ngroups);
        zero_.push_back(s.zero[i] + bh * f * s.ngroups);
      }
      if (!s.head_mean.empty()) head_mean_.push_back(s.head_mean[i] + b * f * D_);
    }
    if (s.channel_mean) {
      channel_mean_.resize(D_);
      half_to_float(s.channel_mean + bh * D_, channel_mean_.data(), D_);
    }
    codes_buf_.resize(D_ + 16);
    if (s.channel_axis) {
      group_scale_.assign(D_ + 16, 0.0f);  // padded: 2/4-bit rows are dequantized a whole byte at a time
      group_zero_.assign(D_ + 16, 0.0f);
    }
  }

  bool has_head_mean() const { return !head_mean_.empty(); }

  // Channel axis or Lloyd-Max rows: the codes of tokens t .. t + n - 1, row_bytes apart, when they lie in one page
  // (else nullptr).
  const uint8_t* tile_codes(int64_t t, int64_t n) const {
    int64_t p, lt;
    return one_page(t, n, p, lt) ? codes_[p] + lt * s_.row_bytes : nullptr;
  }

  // Lloyd-Max / fp8 rows: token t's norm (scale).
  float norm(int64_t t) const {
    int64_t p, lt;
    s_.locate(t, p, lt);
    return norm_at(p, lt);
  }

  // Whether fused_tile can read this store: per-token groups of whole rows (2/3/4/8 bits, groups a multiple of 16
  // channels) or Lloyd-Max rows (2/3/4 bits), no head mean, head dim a multiple of 16 (AVX2 builds).
  bool can_fuse() const {
#ifdef KVSHRINK_AVX2
    if (!head_mean_.empty() || D_ % 16) return false;
    if (s_.kind == kGrouped)
      return !s_.channel_axis && s_.bits != 16 && s_.whole_row && s_.group % 16 == 0;
    return s_.kind == kLloydMax && s_.bits <= 4;
#else
    return false;
#endif
  }

  // acc[r] += sum_j W[r * stride + j] v_{t+j} for the nt tokens from t, summed from their codes without writing
  // the rows out: a group's scale goes into the weights (Wg = W * scale), its zero is added once per row and group
  // (sum_j W zero_j). buf: at least kTile * (R + 2) * groups floats. False (nothing done): the tile spans pages.
  bool fused_tile(int64_t t, int64_t nt, const float* W, int64_t R, int64_t stride, float* buf, float* acc) {
#ifdef KVSHRINK_AVX2
    int64_t p0, l0;
    if (!one_page(t, nt, p0, l0)) return false;
    const int64_t D = D_;
    if (s_.kind == kLloydMax) {
      float* Wg = buf;
      for (int64_t j = 0; j < nt; ++j) {
        const float a = norm_at(p0, l0 + j);
        for (int64_t r = 0; r < R; ++r) Wg[r * kTile + j] = W[r * stride + j] * a;
      }
      const uint8_t* codes = codes_[p0] + l0 * s_.row_bytes;
      const float* cb = s_.codebook.data();
      switch (s_.bits) {
        case 2: accum_codes<2>(Wg, R, nt, codes, s_.row_bytes, acc, D, D, true, Centroids<2>(cb)); break;
        case 3: accum_codes<3>(Wg, R, nt, codes, s_.row_bytes, acc, D, D, true, Centroids<3>(cb)); break;
        default: accum_codes<4>(Wg, R, nt, codes, s_.row_bytes, acc, D, D, true, Centroids<4>(cb)); break;
      }
      return true;
    }
    const int64_t ng = s_.ngroups, G = s_.group, rb = s_.row_bytes, tstride = ng * rb;
    float* A = buf;                   // [ng, kTile] scales, group-major
    float* Z = A + kTile * ng;        // [ng, kTile] zeros
    float* Wg = Z + kTile * ng;       // [R, kTile] one group's weights
    if (ng == 1) {
      half_to_float(scale_[p0] + l0, A, nt);
      half_to_float(zero_[p0] + l0, Z, nt);
    } else {
      const uint16_t* sc = scale_[p0] + l0 * ng;
      const uint16_t* zc = zero_[p0] + l0 * ng;
      for (int64_t j = 0; j < nt; ++j)
        for (int64_t g = 0; g < ng; ++g) {
          A[g * kTile + j] = half1(sc[j * ng + g]);
          Z[g * kTile + j] = half1(zc[j * ng + g]);
        }
    }
    const uint8_t* codes = codes_[p0] + l0 * tstride;
    const CodesAsFloat to_float;
    for (int64_t g = 0; g < ng; ++g) {
      const float* ag = A + g * kTile;
      const float* zg = Z + g * kTile;
      for (int64_t r = 0; r < R; ++r) {
        const float* w = W + r * stride;
        float* o = Wg + r * kTile;
        float zs = 0.0f;
#pragma omp simd reduction(+ : zs)
        for (int64_t j = 0; j < nt; ++j) {
          o[j] = w[j] * ag[j];
          zs += w[j] * zg[j];
        }
        float* y = acc + r * D + g * G;
        const __m256 vz = _mm256_set1_ps(zs);
        for (int64_t d = 0; d < G; d += 8) _mm256_storeu_ps(y + d, _mm256_add_ps(_mm256_loadu_ps(y + d), vz));
      }
      const uint8_t* cg = codes + g * rb;
      switch (s_.bits) {
        case 2: accum_codes<2>(Wg, R, nt, cg, tstride, acc + g * G, D, G, g == 0, to_float); break;
        case 3: accum_codes<3>(Wg, R, nt, cg, tstride, acc + g * G, D, G, g == 0, to_float); break;
        case 4: accum_codes<4>(Wg, R, nt, cg, tstride, acc + g * G, D, G, g == 0, to_float); break;
        default: accum_codes<8>(Wg, R, nt, cg, tstride, acc + g * G, D, G, g == 0, to_float); break;
      }
    }
    if (!channel_mean_.empty()) {  // sum_j W (v_j + mean) = sum_j W v_j + mean * sum_j W
      for (int64_t r = 0; r < R; ++r) {
        float ws = 0.0f;
        for (int64_t j = 0; j < nt; ++j) ws += W[r * stride + j];
        axpy(acc + r * D, ws, channel_mean_.data(), D);
      }
    }
    return true;
#else
    (void)t; (void)nt; (void)W; (void)R; (void)stride; (void)buf; (void)acc;
    return false;
#endif
  }

  const std::vector<float>& channel_mean() const { return channel_mean_; }

  // Channel axis: load the scale and zero of the group holding token t (the channel mean folded into the zero);
  // true when it changed.
  bool load_group_of(int64_t t) {
    const int64_t j = t / s_.group;
    if (j == group_) return false;
    int64_t p, lt;
    s_.locate(t, p, lt);
    half_to_float(scale_[p] + (lt / s_.group) * D_, group_scale_.data(), D_);
    half_to_float(zero_[p] + (lt / s_.group) * D_, group_zero_.data(), D_);
    if (!channel_mean_.empty()) {
      for (int64_t d = 0; d < D_; ++d) group_zero_[d] += channel_mean_[d];
    }
    group_ = j;
    return true;
  }
  const float* group_scale() const { return group_scale_.data(); }
  const float* group_zero() const { return group_zero_.data(); }

  // Channel axis: token t's codes as floats (no scale, zero or mean) into out (D floats, up to 7 more written).
  void codes_into(int64_t t, float* out) const {
    int64_t p, lt;
    s_.locate(t, p, lt);
    const uint8_t* c = codes_[p] + lt * s_.row_bytes;
#ifdef KVSHRINK_AVX2
    if (D_ % 8 == 0) return dequant8_any(s_.bits, c, D_, nullptr, nullptr, out);
#endif
    unpack(c, s_.row_bytes, s_.bits, out);
  }

  // Channel axis: token t's codes as bytes into out[D]: in code_slot order (`slots`, D a multiple of 64) or in
  // channel order.
  void codes_u8(int64_t t, uint8_t* out, bool slots) const {
    int64_t p, lt;
    s_.locate(t, p, lt);
    const uint8_t* c = codes_[p] + lt * s_.row_bytes;
#ifdef KVSHRINK_AVX2
    if (slots) return codes_u8_any(s_.bits, c, D_, out);
#endif
    (void)slots;
    codes_u8_plain(c, s_.bits, D_, out);
  }

  // Token t fully dequantized (scale, zero, means) into out[D].
  void row(int64_t t, float* __restrict out) {
    const int64_t D = D_;
    const int bits = s_.bits;
    int64_t pg, lt;
    s_.locate(t, pg, lt);
    if (s_.kind != kGrouped) {
      const float a = norm_at(pg, lt);
      const uint8_t* p = codes_[pg] + lt * s_.row_bytes;
      if (s_.kind == kFp8) {
        for (int64_t d = 0; d < D; ++d) out[d] = kFp8Values.v[p[d]] * a;
      } else {
#ifdef KVSHRINK_AVX2
        if (D % 8 == 0) {
          const float* cb = s_.codebook.data();
          switch (bits) {
            case 2: return centroids8<2>(p, D, cb, a, out);
            case 3: return centroids8<3>(p, D, cb, a, out);
            case 4: return centroids8<4>(p, D, cb, a, out);
            default: break;
          }
        }
#endif
        float* c = codes_buf_.data();
        unpack(p, s_.row_bytes, bits, c);
        const float* cb = s_.codebook.data();
        for (int64_t d = 0; d < D; ++d) out[d] = cb[static_cast<int>(c[d])] * a;
      }
      return;
    }
    if (bits == 16) {
      half_to_float(codes16_[pg] + lt * D, out, D);
      add_channel_mean(out);
    } else if (s_.channel_axis) {
      load_group_of(t);
      const uint8_t* p = codes_[pg] + lt * s_.row_bytes;
      const float* sc = group_scale_.data();
      const float* z = group_zero_.data();
#ifdef KVSHRINK_AVX2
      if (D % 8 == 0) {
        dequant8_any(bits, p, D, sc, z, out);
      } else
#endif
      if (bits == 2) {
        dequant_channels<4>(p, s_.row_bytes, kCodes.two, sc, z, out);  // writes up to 3 floats past D
      } else if (bits == 4) {
        dequant_channels<2>(p, s_.row_bytes, kCodes.four, sc, z, out);
      } else {
        float* c = codes_buf_.data();
        codes_into(t, c);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) out[d] = c[d] * sc[d] + z[d];
      }
    } else {
      const int64_t G = s_.group, ng = s_.ngroups, rb = s_.row_bytes;
      const uint8_t* p = codes_[pg] + lt * ng * rb;
      const uint16_t* sc = scale_[pg] + lt * ng;
      const uint16_t* zc = zero_[pg] + lt * ng;
#ifdef KVSHRINK_AVX2
      if (s_.whole_row && G % 8 == 0) {
        for (int64_t g = 0; g < ng; ++g)
          dequant8_group_any(bits, p + g * rb, G, half1(sc[g]), half1(zc[g]), out + g * G);
      } else
#endif
      if (s_.whole_row && (bits == 2 || bits == 4)) {
        for (int64_t g = 0; g < ng; ++g) {
          if (bits == 2)
            dequant_group<4>(p + g * rb, rb, kCodes.two, half1(sc[g]), half1(zc[g]), out + g * G);
          else
            dequant_group<2>(p + g * rb, rb, kCodes.four, half1(sc[g]), half1(zc[g]), out + g * G);
        }
      } else {
        float* c = codes_buf_.data();
        if (s_.whole_row) {
          unpack(p, ng * rb, bits, c);
        } else {
          for (int64_t g = 0; g < ng; ++g) unpack(p + g * rb, rb, bits, c + g * G);  // overflow: rewritten
        }
        for (int64_t g = 0; g < ng; ++g) {
          const float a = half1(sc[g]), z = half1(zc[g]);
          const float* cg = c + g * G;
          float* o = out + g * G;
#pragma omp simd
          for (int64_t i = 0; i < G; ++i) o[i] = cg[i] * a + z;
        }
      }
      add_channel_mean(out);
    }
    if (!head_mean_.empty()) add_half(out, head_mean_[pg] + lt * D, D);
  }


 private:
  // Whether tokens t .. t + n - 1 lie in one page; (page, token within it) of t.
  bool one_page(int64_t t, int64_t n, int64_t& page, int64_t& local) const {
    int64_t last_page, last_local;
    s_.locate(t, page, local);
    s_.locate(t + n - 1, last_page, last_local);
    return page == last_page;
  }

  // Lloyd-Max / fp8 rows: the norm (scale) of token `local` of page `page`.
  float norm_at(int64_t page, int64_t local) const {
    return s_.norm32 ? reinterpret_cast<const float*>(norms_[page])[local]
                     : half1(reinterpret_cast<const uint16_t*>(norms_[page])[local]);
  }

  void add_channel_mean(float* __restrict out) const {
    if (channel_mean_.empty()) return;
    const float* m = channel_mean_.data();
#pragma omp simd
    for (int64_t d = 0; d < D_; ++d) out[d] += m[d];
  }

  const Store& s_;
  int64_t D_;
  std::vector<const uint8_t*> codes_;
  std::vector<const uint16_t*> codes16_, scale_, zero_, head_mean_;
  std::vector<const uint8_t*> norms_;
  std::vector<float> channel_mean_, codes_buf_, group_scale_, group_zero_;
  int64_t group_ = -1;
};

// The normalised Walsh-Hadamard transform of one row of D floats, block-diagonal in blocks of `block` (a power of
// two dividing D), in place: the butterflies in the order codecs/rotation.py `fwht` takes them and the same float32
// scale, so a row turns into the same bits as there.
void fwht_row(float* __restrict x, int64_t D, int64_t block) {
  for (int64_t h = 1; h < block; h *= 2)
    for (int64_t j = 0; j < D; j += 2 * h)
      for (int64_t i = j; i < j + h; ++i) {
        const float a = x[i], b = x[i + h];
        x[i] = a + b;
        x[i + h] = a - b;
      }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
  for (int64_t d = 0; d < D; ++d) x[d] *= scale;
}

// rows [n, D] (head of row r: (r / rows_per_head) % heads) turned into a rotation's space, R x = H (signs * x),
// into out.
void rotate_rows(const float* x, float* out, int64_t n, int64_t D, int64_t rows_per_head, int64_t heads,
                 const float* signs, int64_t block) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* s = signs + ((r / rows_per_head) % heads) * D;
      float* y = out + r * D;
      for (int64_t d = 0; d < D; ++d) y[d] = x[r * D + d] * s[d];
      fwht_row(y, D, block);
    }
  });
}

struct Problem {
  const float* q = nullptr;  // [B, HQ, QN, D], multiplied by the softmax scaling
  int64_t B = 0, HQ = 0, HKV = 0, QN = 0, D = 0, n_rep = 0, R = 0;
  int64_t T = 0, TE = 0, key0 = 0, TK = 0;
  const float* exact_k = nullptr;  // [B, HKV, TE, D]
  const float* exact_v = nullptr;
  const int64_t* exact_index = nullptr;  // [TE]
  const bool* mask = nullptr;            // [.., QN, TK] with strides mask_b, mask_q (True = attend)
  int64_t mask_b = 0, mask_q = 0;
  bool causal = false;
  int qdot = 0;  // QDot: how per-channel key groups without a head mean are scored (resolved: never kQInt8)
};

// Running softmax of one unit over n keys, a tile of kTile keys at a time: score(t0, nt, S) writes the R rows'
// scores of keys t0 .. t0 + nt - 1 to S[r * kTile + j]; values(t0, nt, P, acc) adds sum_j P[r * kTile + j] v_j to
// acc[r]; key_index(j) is key j's index (for the mask).
template <class Score, class Values, class KeyIndex>
void attend_keys(const Problem& P, int64_t b, int64_t n, Score score, Values values, KeyIndex key_index, float* m,
                 float* l, float* acc) {
  const int64_t R = P.R, D = P.D, QN = P.QN;
  std::vector<float> S(R * kTile);
  const bool* mask = P.mask ? P.mask + b * P.mask_b : nullptr;
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t nt = std::min(kTile, n - t0);
    score(t0, nt, S.data());
    // causal only: when the first query row sees the tile's latest key, every row sees the whole tile
    bool visible = !mask;
    if (visible && P.causal) {
      int64_t last = kNegIndex;
      for (int64_t j = 0; j < nt; ++j) last = std::max(last, key_index(t0 + j));
      visible = last <= P.TK - QN;
    }
    if (!visible) {
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t k = key_index(t0 + j);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = r % QN;
          const bool ok = mask ? mask[i * P.mask_q + k] : k <= P.TK - QN + i;
          if (!ok) S[r * kTile + j] = kNegInf;
        }
      }
    }
    bool any = false;
    for (int64_t r = 0; r < R; ++r) {
      float* s = S.data() + r * kTile;
      float tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < nt; ++j) tile_max = s[j] > tile_max ? s[j] : tile_max;
      const float new_max = std::max(m[r], tile_max);
      if (new_max == kNegInf) {
        std::fill(s, s + nt, 0.0f);
        continue;
      }
      if (new_max > m[r]) {
        const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - new_max);
        l[r] *= alpha;
        float* a = acc + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
        m[r] = new_max;
      }
      float sum = 0.0f;
      int64_t j = 0;
#ifdef KVSHRINK_AVX2
      {
        const __m256 mx = _mm256_set1_ps(new_max);
        __m256 vsum = _mm256_setzero_ps();
        for (; j + 8 <= nt; j += 8) {
          const __m256 p = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j), mx));
          _mm256_storeu_ps(s + j, p);
          vsum = _mm256_add_ps(vsum, p);
        }
        const __m128 h = _mm_add_ps(_mm256_castps256_ps128(vsum), _mm256_extractf128_ps(vsum, 1));
        const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
        sum = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
      }
#endif
      for (; j < nt; ++j) {
        const float p = exp_nonpos(s[j] - new_max);
        s[j] = p;
        sum += p;
      }
      l[r] += sum;
      any = true;
    }
    if (!any) continue;  // every key of the tile masked for every row
    values(t0, nt, S.data(), acc);
  }
}

// Stored tokens [t_begin, t_end) of sequence b, KV head h.
void store_unit(const Problem& P, const Store& ks, const Store& vs, int64_t b, int64_t h, int64_t t_begin,
                int64_t t_end, float* m, float* l, float* acc) {
  const int64_t R = P.R, D = P.D;
  const float* Q = P.q + (b * P.HQ + h * P.n_rep) * P.QN * D;  // the R rows of this KV head, contiguous
  Reader kr(ks, b, h), vr(vs, b, h);
  // Per-channel key groups without a head mean: fold the group's scales into the query,
  // q.k = sum_d (q_d s_d) code_d + sum_d q_d (z_d + channel mean_d), so a key costs an unpack and no dequantizing.
  // With a head mean (tada mean=head) the mean's share of the score would be a second dot product per key and
  // query row, which costs more than dequantizing the key once for all rows (measured: 1.77 vs 1.41 ms for one
  // Qwen-shaped layer at 16k, benchmarks/cpu_attention.py), so such keys are dequantized.
  const bool fold = ks.bits != 16 && ks.channel_axis && !kr.has_head_mean();
  // qdot=int8: the folded query is rounded to int8 per (row, group) and the codes are summed in integers
  const int mode = fold && ks.kind == kGrouped ? P.qdot : kQFloat;
  const bool slots = mode == kQInt8Avx2 || mode == kQInt8Vnni;
  // values read straight from their codes into the weighted sum (Reader::fused_tile), where the layout allows
  const bool fused_values = vr.can_fuse();
  // keys scored straight from their codes: per-channel groups folded into the query (float mode) and Lloyd-Max
  // rows (2/3/4 bits), head dim a multiple of 16 (AVX2 builds)
#ifdef KVSHRINK_AVX2
  const bool fused_keys = D % 16 == 0 && (ks.kind == kLloydMax ? ks.bits <= 4 : fold);
#else
  const bool fused_keys = false;
#endif
  std::vector<float> qs(fold ? R * D : 0), c0(fold ? R : 0), kbuf(kTile * D + 16);
  Int8Query iq(Q, mode != kQFloat ? R : 0, D, ks.bits, slots);
  std::vector<uint8_t> cbuf(mode != kQFloat ? kTile * D : 0);
  std::vector<int32_t> dots(mode != kQFloat ? R * kTile : 0);
  int64_t folded = -1;  // the group whose scales qs / iq hold (row() below may move the reader's group elsewhere)
  auto score = [&](int64_t j0, int64_t nt, float* S) {
    const int64_t t0 = t_begin + j0;
    if (mode != kQFloat) {
      for (int64_t j = 0; j < nt;) {  // a run of tokens of one group at a time
        const int64_t t = t0 + j, g = t / ks.group, n = std::min(nt - j, (g + 1) * ks.group - t);
        kr.load_group_of(t);
        if (g != folded) {
          iq.fold(kr.group_scale(), kr.group_zero());
          folded = g;
        }
        for (int64_t i = 0; i < n; ++i) kr.codes_u8(t + i, cbuf.data() + i * D, slots);
        int32_t* dj = dots.data() + j;
        const bool wide = ks.bits == 8;
        switch (mode) {
          case kQInt8Vnni: int_scores<kQInt8Vnni>(iq.qi.data(), iq.q16.data(), R, cbuf.data(), n, D, wide, dj, kTile); break;
          case kQInt8Avx2: int_scores<kQInt8Avx2>(iq.qi.data(), iq.q16.data(), R, cbuf.data(), n, D, wide, dj, kTile); break;
          default: int_scores<kQInt8Scalar>(iq.qi.data(), iq.q16.data(), R, cbuf.data(), n, D, wide, dj, kTile); break;
        }
        for (int64_t r = 0; r < R; ++r) {
          const float a = iq.a[r], z = iq.c0[r];
          for (int64_t i = j; i < j + n; ++i) S[r * kTile + i] = a * static_cast<float>(dots[r * kTile + i]) + z;
        }
        j += n;
      }
    } else if (fold && t0 / ks.group == (t0 + nt - 1) / ks.group) {  // the tile lies in one group
      kr.load_group_of(t0);
      if (t0 / ks.group != folded) {
        folded = t0 / ks.group;
        const float* sc = kr.group_scale();
        for (int64_t r = 0; r < R; ++r) {
          const float* q = Q + r * D;
          float* o = qs.data() + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] = q[d] * sc[d];
          c0[r] = dot(q, kr.group_zero(), D);
        }
      }
      const uint8_t* codes = fused_keys ? kr.tile_codes(t0, nt) : nullptr;
      if (codes) {
#ifdef KVSHRINK_AVX2
        const CodesAsFloat to_float;
        switch (ks.bits) {
          case 2: scores_codes<2>(qs.data(), R, D, nt, codes, ks.row_bytes, S, to_float); break;
          case 3: scores_codes<3>(qs.data(), R, D, nt, codes, ks.row_bytes, S, to_float); break;
          case 4: scores_codes<4>(qs.data(), R, D, nt, codes, ks.row_bytes, S, to_float); break;
          default: scores_codes<8>(qs.data(), R, D, nt, codes, ks.row_bytes, S, to_float); break;
        }
#endif
      } else {
        for (int64_t j = 0; j < nt; ++j) kr.codes_into(t0 + j, kbuf.data() + j * D);
        scores_tile(qs.data(), R, kbuf.data(), nt, D, S, kTile);
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < nt; ++j) S[r * kTile + j] += c0[r];
    } else if (const uint8_t* codes = fused_keys && ks.kind == kLloydMax ? kr.tile_codes(t0, nt) : nullptr) {
#ifdef KVSHRINK_AVX2
      // Lloyd-Max rows: q . (norm * centroids) = norm * (q . centroids)
      const float* cb = ks.codebook.data();
      switch (ks.bits) {
        case 2: scores_codes<2>(Q, R, D, nt, codes, ks.row_bytes, S, Centroids<2>(cb)); break;
        case 3: scores_codes<3>(Q, R, D, nt, codes, ks.row_bytes, S, Centroids<3>(cb)); break;
        default: scores_codes<4>(Q, R, D, nt, codes, ks.row_bytes, S, Centroids<4>(cb)); break;
      }
#endif
      for (int64_t j = 0; j < nt; ++j) {
        const float a = kr.norm(t0 + j);
        for (int64_t r = 0; r < R; ++r) S[r * kTile + j] *= a;
      }
    } else {
      for (int64_t j = 0; j < nt; ++j) kr.row(t0 + j, kbuf.data() + j * D);
      scores_tile(Q, R, kbuf.data(), nt, D, S, kTile);
    }
  };
  std::vector<float> vbuf(kTile * D + 16), wbuf(fused_values ? kTile * (R + 2) * vs.ngroups : 0);
  auto values = [&](int64_t j0, int64_t nt, const float* W, float* acc_rows) {
    const int64_t t0 = t_begin + j0;
    if (fused_values && vr.fused_tile(t0, nt, W, R, kTile, wbuf.data(), acc_rows)) return;
    for (int64_t j = 0; j < nt; ++j) vr.row(t0 + j, vbuf.data() + j * D);
    values_tile(W, R, kTile, vbuf.data(), nt, D, acc_rows);
  };
  auto key_index = [&](int64_t j) { return P.key0 + t_begin + j; };
  attend_keys(P, b, t_end - t_begin, score, values, key_index, m, l, acc);
}

// A contiguous float32, float16 or bfloat16 tensor's data as float32: its own pointer when float32, else widened
// into `buf`.
const float* exact_as_float(const at::Tensor& t, std::vector<float>& buf) {
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  buf.resize(t.numel());
  if (t.scalar_type() == at::kHalf) {
    half_to_float(reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()), buf.data(), t.numel());
  } else {
    const at::BFloat16* src = t.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < t.numel(); ++i) buf[i] = static_cast<float>(src[i]);
  }
  return buf.data();
}

// The exact (full-precision) tokens of sequence b, KV head h.
void exact_unit(const Problem& P, int64_t b, int64_t h, float* m, float* l, float* acc) {
  const int64_t R = P.R, D = P.D;
  const float* Q = P.q + (b * P.HQ + h * P.n_rep) * P.QN * D;
  const float* K = P.exact_k + (b * P.HKV + h) * P.TE * D;
  const float* V = P.exact_v + (b * P.HKV + h) * P.TE * D;
  auto score = [&](int64_t j0, int64_t nt, float* S) { scores_tile(Q, R, K + j0 * D, nt, D, S, kTile); };
  auto values = [&](int64_t j0, int64_t nt, const float* W, float* acc_rows) {
    values_tile(W, R, kTile, V + j0 * D, nt, D, acc_rows);
  };
  auto key_index = [&](int64_t j) { return P.exact_index[j]; };
  attend_keys(P, b, P.TE, score, values, key_index, m, l, acc);
}

void packed_attention(at::Tensor out, at::Tensor q,
                      std::vector<at::Tensor> k_codes, std::vector<at::Tensor> k_scale,
                      std::vector<at::Tensor> k_zero, std::vector<at::Tensor> k_head_mean,
                      at::Tensor k_channel_mean, int64_t k_bits, int64_t k_axis, int64_t k_group, int64_t k_kind,
                      std::vector<at::Tensor> k_norms, at::Tensor k_codebook,
                      std::vector<at::Tensor> v_codes, std::vector<at::Tensor> v_scale,
                      std::vector<at::Tensor> v_zero, std::vector<at::Tensor> v_head_mean,
                      at::Tensor v_channel_mean, int64_t v_bits, int64_t v_axis, int64_t v_group, int64_t v_kind,
                      std::vector<at::Tensor> v_norms, at::Tensor v_codebook,
                      int64_t tokens, int64_t page_tokens, std::vector<int64_t> fills, at::Tensor exact_k, at::Tensor exact_v, at::Tensor exact_index, int64_t key0,
                      at::Tensor mask, int64_t mask_b, int64_t mask_q, bool causal, int64_t split_tokens,
                      at::Tensor k_signs, at::Tensor v_signs, int64_t rotation_block, int64_t qdot,
                      double scaling) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32 [B,HQ,QN,D]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(), "out like q");
  TORCH_CHECK(exact_k.is_contiguous() && exact_v.is_contiguous() && exact_k.scalar_type() == exact_v.scalar_type() &&
                  (exact_k.scalar_type() == at::kFloat || exact_k.scalar_type() == at::kHalf ||
                   exact_k.scalar_type() == at::kBFloat16),
              "exact keys/values: contiguous, both float32, float16 or bfloat16");
  TORCH_CHECK((exact_index.scalar_type() == at::kLong || exact_index.scalar_type() == at::kInt) &&
                  exact_index.is_contiguous() && exact_index.numel() == exact_k.size(2),
              "exact_index: contiguous int64 or int32, one per exact token");
  TORCH_CHECK(!mask.numel() || (mask.scalar_type() == at::kBool), "mask: bool");
  Problem P;
  // the query times the softmax scaling (the float32 product torch's `q * scaling` gives), in a copy
  std::vector<float> q_scaled(q.numel());
  {
    const float* src = q.data_ptr<float>();
    const float sc = static_cast<float>(scaling);
    for (int64_t i = 0; i < q.numel(); ++i) q_scaled[i] = src[i] * sc;
  }
  P.q = q_scaled.data();
  P.B = q.size(0);
  P.HQ = q.size(1);
  P.QN = q.size(2);
  P.D = q.size(3);
  P.HKV = exact_k.size(1);
  P.n_rep = P.HQ / P.HKV;
  P.R = P.n_rep * P.QN;
  P.T = tokens;
  P.TE = exact_k.size(2);
  P.key0 = key0;
  P.TK = P.T + P.TE;
  // the exact tokens in float32: a 16-bit window (the layers hold it in `exact_dtype`) is widened here, once per call
  std::vector<float> ek_f, ev_f;
  P.exact_k = exact_as_float(exact_k, ek_f);
  P.exact_v = exact_as_float(exact_v, ev_f);
  // Rotated codes are read in their rotated space: the query rows and the exact keys turn with the keys' rotation
  // (signs [HKV, D]; query head hq has KV head hq / n_rep's), the exact values with the values'; the output turns
  // back below. Empty signs: that side is not rotated.
  std::vector<float> q_rot, ek_rot, ev_rot;
  for (const at::Tensor* t : {&k_signs, &v_signs})
    TORCH_CHECK(!t->numel() || (t->scalar_type() == at::kFloat && t->is_contiguous() &&
                                t->numel() == P.HKV * P.D && rotation_block > 0 && P.D % rotation_block == 0),
                "signs: contiguous float32 [HKV, D] and a block dividing D");
  if (k_signs.numel()) {
    q_rot.resize(q.numel());
    rotate_rows(P.q, q_rot.data(), P.B * P.HQ * P.QN, P.D, P.n_rep * P.QN, P.HKV, k_signs.data_ptr<float>(),
                rotation_block);
    P.q = q_rot.data();
    ek_rot.resize(exact_k.numel());
    rotate_rows(P.exact_k, ek_rot.data(), P.B * P.HKV * P.TE, P.D, P.TE, P.HKV, k_signs.data_ptr<float>(),
                rotation_block);
    P.exact_k = ek_rot.data();
  }
  if (v_signs.numel()) {
    ev_rot.resize(exact_v.numel());
    rotate_rows(P.exact_v, ev_rot.data(), P.B * P.HKV * P.TE, P.D, P.TE, P.HKV, v_signs.data_ptr<float>(),
                rotation_block);
    P.exact_v = ev_rot.data();
  }
  std::vector<int64_t> index_64;
  if (P.TE && exact_index.scalar_type() == at::kInt) {
    const int32_t* src = exact_index.data_ptr<int32_t>();
    index_64.assign(src, src + P.TE);
  }
  P.exact_index = !P.TE ? nullptr : index_64.empty() ? exact_index.data_ptr<int64_t>() : index_64.data();
  P.mask = mask.numel() ? mask.data_ptr<bool>() : nullptr;
  P.mask_b = mask_b;
  P.mask_q = mask_q;
  P.causal = causal && !P.mask && P.QN > 1;
  TORCH_CHECK(qdot >= 0 && qdot <= kQInt8Scalar && (int8_modes() >> qdot & 1),
              "qdot mode ", qdot, " is not built here (modes available: bit mask ", int8_modes(), ")");
  P.qdot = static_cast<int>(qdot == kQInt8 ? best_int8_mode() : qdot);
  if ((P.qdot == kQInt8Avx2 || P.qdot == kQInt8Vnni) && P.D % 64) P.qdot = kQInt8Scalar;  // same bits, plain loops
  const Store ks = make_store(k_codes, k_scale, k_zero, k_head_mean, k_channel_mean, k_bits, k_axis, k_group,
                              k_kind, k_norms, k_codebook, tokens, P.D, page_tokens, fills);
  const Store vs = make_store(v_codes, v_scale, v_zero, v_head_mean, v_channel_mean, v_bits, v_axis, v_group,
                              v_kind, v_norms, v_codebook, tokens, P.D, page_tokens, fills);
  for (const Store* s : {&ks, &vs}) {
    TORCH_CHECK(s->bits == 2 || s->bits == 3 || s->bits == 4 || s->bits == 8 || s->bits == 16, "bits 2/3/4/8/16");
    TORCH_CHECK(!tokens || s->H == P.HKV, "store heads differ from the exact tokens' heads");
  }
  const int64_t n_split = tokens ? (tokens + split_tokens - 1) / split_tokens : 0;
  const int64_t slots = n_split + 1;  // the last slot: exact tokens
  const int64_t BH = P.B * P.HKV, R = P.R, D = P.D;
  std::vector<float> M(BH * slots * R, kNegInf), L(BH * slots * R, 0.0f), A(BH * slots * R * D, 0.0f);
  // every store unit first (equal sizes), then the small exact ones, dealt to the threads in turn: a cut of the
  // list into contiguous chunks left one thread with twice the store units of the other on 3 KV heads
  const int64_t n_units = BH * slots;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_units));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = w; i < n_units; i += workers) {
        const bool store = i < BH * n_split;
        const int64_t bh = store ? i / n_split : i - BH * n_split;
        const int64_t s = store ? i % n_split : n_split;
        const int64_t u = bh * slots + s, b = bh / P.HKV, h = bh % P.HKV;
        float* m = M.data() + u * R;
        float* l = L.data() + u * R;
        float* acc = A.data() + u * R * D;
        if (store) {
          store_unit(P, ks, vs, b, h, s * split_tokens, std::min(tokens, (s + 1) * split_tokens), m, l, acc);
        } else if (P.TE) {
          exact_unit(P, b, h, m, l, acc);
        }
      }
    }
  });
  float* o = out.data_ptr<float>();
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(slots);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / P.HKV, h = bh % P.HKV;
      float* out_rows = o + (b * P.HQ + h * P.n_rep) * P.QN * D;
      for (int64_t r = 0; r < R; ++r) {
        float mx = kNegInf;
        for (int64_t s = 0; s < slots; ++s) mx = std::max(mx, M[(bh * slots + s) * R + r]);
        float* y = out_rows + r * D;
        std::fill(y, y + D, 0.0f);
        if (mx == kNegInf) continue;  // every key masked: zeros (turned back, still zeros), as the reference's
        float total = 0.0f;
        for (int64_t s = 0; s < slots; ++s) {
          const float ms = M[(bh * slots + s) * R + r];
          w[s] = ms == kNegInf ? 0.0f : std::exp(ms - mx);
          total += w[s] * L[(bh * slots + s) * R + r];
        }
        for (int64_t s = 0; s < slots; ++s) {
          if (w[s] != 0.0f) axpy(y, w[s] / total, A.data() + ((bh * slots + s) * R + r) * D, D);
        }
        if (v_signs.numel()) {  // back from the values' rotated space: R^-1 y = signs * H y
          fwht_row(y, D, rotation_block);
          const float* sg = v_signs.data_ptr<float>() + h * D;
          for (int64_t d = 0; d < D; ++d) y[d] *= sg[d];
        }
      }
    }
  });
}

// ---- Encoding a few tokens for the `rotated` codec (the decode step's flush) ------------------------------------
// The same float32 operations as codecs/rotation.py, so the same bits: rotate (signs, then the butterflies of
// `fwht`), and from the rotated rows and their norms (computed by torch, whose reduction order this file does not
// reproduce) the Lloyd-Max codes and the decoded directions. Per-call overhead is what these save: a decode step
// moves one token per layer into the store, and the PyTorch path spends ~50 small tensor operations on it.

// x [B, H, T, D] float32 turned into the rotated space, H (signs * x), into out (the same shape); signs [H, D].
void rotate_tokens(at::Tensor out, at::Tensor x, at::Tensor signs, int64_t block) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [B,H,T,D]");
  const int64_t H = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(signs.scalar_type() == at::kFloat && signs.is_contiguous() && signs.numel() == H * D,
              "signs: contiguous float32 [H, D]");
  TORCH_CHECK(block > 0 && D % block == 0, "block must divide D");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(), "out like x");
  rotate_rows(x.data_ptr<float>(), out.data_ptr<float>(), x.numel() / D, D, T, H, signs.data_ptr<float>(), block);
}

// n codes (one byte each) packed `bits` wide into out, as `codecs.packing.pack` lays them: 2/4/8 bits low codes
// first within a byte; 3 bits 8 codes to a little-endian 3-byte word; the last byte or word zero-padded.
inline void pack_codes(const uint8_t* code, int64_t n, int64_t bits, uint8_t* out) {
  if (bits == 8) {
    std::memcpy(out, code, n);
  } else if (bits == 3) {
    for (int64_t w = 0; w < (n + 7) / 8; ++w) {
      uint32_t word = 0;
      for (int64_t j = 0; j < 8 && 8 * w + j < n; ++j) word |= uint32_t(code[8 * w + j]) << (3 * j);
      out[3 * w] = word & 0xFF;
      out[3 * w + 1] = (word >> 8) & 0xFF;
      out[3 * w + 2] = (word >> 16) & 0xFF;
    }
  } else {
    const int64_t per = 8 / bits;
    std::memset(out, 0, (n + per - 1) / per);
    for (int64_t i = 0; i < n; ++i) out[i / per] |= static_cast<uint8_t>(code[i] << (bits * (i % per)));
  }
}

// y [..., D] float32 rows and their norms n (one per row): the codes of u = y / max(n, 1e-30), z = u * sqrt_d against the
// ascending edges (the number of edges below z, as torch.bucketize with right=False), packed `bits` wide (low bits
// first; 3 bits: 8 codes per little-endian 3-byte word) into packed (uint8 [N, D * bits / 8]), and the decoded
// directions codebook[code] / sqrt_d into dec (float32 [N, D]).
void lloydmax_tokens(at::Tensor packed, at::Tensor dec, at::Tensor y, at::Tensor n, at::Tensor edges,
                     at::Tensor codebook, double sqrt_d, int64_t bits) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() >= 1, "y: contiguous float32 [..., D]");
  const int64_t D = y.size(-1), N = y.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(n.scalar_type() == at::kFloat && n.is_contiguous() && n.numel() == N, "n: float32, one norm per row");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "bits 2/3/4");
  TORCH_CHECK(edges.scalar_type() == at::kFloat && edges.numel() == (int64_t(1) << bits) - 1, "edges");
  TORCH_CHECK(codebook.scalar_type() == at::kFloat && codebook.numel() == (int64_t(1) << bits), "codebook");
  TORCH_CHECK(D % 8 == 0, "D must be a multiple of 8");
  const int64_t nbytes = D * bits / 8;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == N * nbytes,
              "packed: contiguous uint8 [N, D * bits / 8]");
  TORCH_CHECK(dec.scalar_type() == at::kFloat && dec.is_contiguous() && dec.numel() == N * D, "dec: float32 [N, D]");
  const float* yp = y.data_ptr<float>();
  const float* np = n.data_ptr<float>();
  const float* e = edges.data_ptr<float>();
  const float* c = codebook.data_ptr<float>();
  const int ne = static_cast<int>(edges.numel());
  const float sd = static_cast<float>(sqrt_d), floor_n = static_cast<float>(1e-30);
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* dp = dec.data_ptr<float>();
  std::vector<uint8_t> code(D);
  for (int64_t i = 0; i < N; ++i) {
    const float* row = yp + i * D;
    const float nc = std::max(np[i], floor_n);
    for (int64_t d = 0; d < D; ++d) {
      const float z = (row[d] / nc) * sd;
      int k = 0;
      while (k < ne && e[k] < z) ++k;
      code[d] = static_cast<uint8_t>(k);
      dp[i * D + d] = c[k] / sd;
    }
    pack_codes(code.data(), D, bits, out + i * nbytes);
  }
}

// The fp16 value next to h (bits) towards +inf (up) or -inf, as torch.nextafter gives it for float16.
inline uint16_t half_next(uint16_t h, bool up) {
  if ((h & 0x7C00) == 0x7C00 && (h & 0x03FF)) return h;  // NaN
  if ((h & 0x7FFF) == 0) return up ? 0x0001 : 0x8001;     // +-0: the smallest subnormal of that direction
  const bool negative = h & 0x8000;
  if ((h & 0x7FFF) == 0x7C00 && (up != negative)) return h;  // +inf up, -inf down
  return (up != negative) ? h + 1 : h - 1;  // away from zero: magnitude + 1; towards it: - 1
}

// `codecs.quant.quantize`'s fp16 zero and scale of a group spanning [lo, hi]: the zero is lo rounded, then one step
// down where it came out above; the scale (hi - zero) / levels rounded, then one step up where below. Returns
// whether both are finite in fp16, and (zf, inv): the zero as float and the scale's inverse (0 for scale 0).
inline bool fp16_zero_scale(float lo, float hi, int levels, uint16_t* scale_out, uint16_t* zero_out, float* zf,
                            float* inv) {
  uint16_t z = c10::Half(lo).x;
  if (half1(z) > lo) z = half_next(z, false);
  *zf = half1(z);
  const float exact = (hi - *zf) / static_cast<float>(levels);
  uint16_t sc = c10::Half(exact).x;
  if (half1(sc) < exact) sc = half_next(sc, true);
  *scale_out = sc;
  *zero_out = z;
  const float sf = half1(sc);
  *inv = sf > 0 ? 1.0f / sf : 0.0f;
  return (sc & 0x7C00) != 0x7C00 && (z & 0x7C00) != 0x7C00;
}

// One code: round((x - zero) / scale) half to even (the default rounding mode), clamped to [0, levels].
inline uint8_t code_of(float x, float zf, float inv, float top) {
  return static_cast<uint8_t>(std::min(std::max(std::nearbyint((x - zf) * inv), 0.0f), top));
}

// `codecs.quant.quantize` of one contiguous group of n values: its fp16 zero and scale (`fp16_zero_scale`), then
// each value's code. False when a scale or zero is not finite in fp16 (or x holds a NaN).
inline bool quantize_group(const float* x, int64_t n, int levels, uint8_t* codes, uint16_t* scale_out,
                           uint16_t* zero_out) {
  float lo = x[0], hi = x[0];
  bool nan = false;  // torch's amin/amax give NaN for a group with one: no finite scale, refused
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    nan |= v != v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  if (nan) return false;
  float zf, inv;
  if (!fp16_zero_scale(lo, hi, levels, scale_out, zero_out, &zf, &inv)) return false;
  const float top = static_cast<float>(levels);
  for (int64_t i = 0; i < n; ++i) codes[i] = code_of(x[i], zf, inv, top);
  return true;
}

// `quantize_group` for each of the D channels of one block xb [G, D] (a group per channel, along the block's G
// tokens): the same bits, with the channels as the lanes so the compiler vectorizes the loops (a strided
// per-channel walk would not be). lo, hi: scratch of D floats each. False when a scale or zero is not finite in
// fp16 or the block holds a NaN (codes then not written).
inline bool quantize_channels(const float* xb, int64_t G, int64_t D, int levels, uint8_t* code, uint16_t* sc,
                              uint16_t* zr, float* lo, float* hi) {
  int nan = 0;
  for (int64_t d = 0; d < D; ++d) lo[d] = hi[d] = xb[d];
  for (int64_t g = 0; g < G; ++g) {
    const float* row = xb + g * D;
#pragma omp simd reduction(| : nan)
    for (int64_t d = 0; d < D; ++d) {
      const float v = row[d];
      nan |= v != v;
      lo[d] = v < lo[d] ? v : lo[d];  // std::min(lo, v)
      hi[d] = hi[d] < v ? v : hi[d];  // std::max(hi, v)
    }
  }
  if (nan) return false;
  bool ok = true;
  for (int64_t d = 0; d < D; ++d)  // from here lo holds each channel's zero and hi its scale's inverse
    ok &= fp16_zero_scale(lo[d], hi[d], levels, sc + d, zr + d, lo + d, hi + d);
  if (!ok) return false;
  const float top = static_cast<float>(levels);
  for (int64_t g = 0; g < G; ++g) {
    const float* row = xb + g * D;
    uint8_t* out = code + g * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = code_of(row[d], lo[d], hi[d], top);
  }
  return true;
}

// `codecs.quant.encode_block`'s quantize-and-pack of x [B, H, T, D] (float32, already centred) into the `grouped`
// layout's fields, preallocated by the caller: per-token groups (axis 0) codes [B, H, T, D/G, bytes(G)] and
// scale/zero [B, H, T, D/G, 1]; per-channel groups (axis 1) codes [B, H, T/G, G, bytes(D)] and scale/zero
// [B, H, T/G, 1, D] (fp16). The same bits as the PyTorch steps, whatever the thread count (groups are
// independent; large calls split them over threads). False (fields partly written) when a scale or zero
// overflows fp16 or x holds a NaN.
bool grouped_encode(at::Tensor codes, at::Tensor scale, at::Tensor zero, at::Tensor x, int64_t bits, int64_t group,
                    int64_t axis) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [B,H,T,D]");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits 2/3/4/8");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && scale.scalar_type() == at::kHalf &&
                  scale.is_contiguous() && zero.scalar_type() == at::kHalf && zero.is_contiguous(),
              "codes: contiguous uint8; scale, zero: contiguous float16");
  const int64_t T = x.size(2), D = x.size(3), N = x.size(0) * x.size(1) * T;
  const int levels = (1 << bits) - 1;
  auto nbytes = [&](int64_t n) { return bits == 3 ? (n + 7) / 8 * 3 : (n * bits + 7) / 8; };
  const float* xp = x.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>());
  uint16_t* zp = reinterpret_cast<uint16_t*>(zero.data_ptr<at::Half>());
  std::atomic<bool> ok{true};
  if (axis == 0) {
    TORCH_CHECK(group > 0 && D % group == 0, "per-token groups must divide D");
    const int64_t groups = N * (D / group), gb = nbytes(group);
    TORCH_CHECK(codes.numel() == groups * gb && scale.numel() == groups && zero.numel() == groups,
                "fields: [B, H, T, D/G, bytes] codes and one scale and zero per group");
    at::parallel_for(0, groups, std::max<int64_t>(1, 16384 / group), [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> code(group);
      bool mine = true;
      for (int64_t i = begin; i < end; ++i) {
        mine &= quantize_group(xp + i * group, group, levels, code.data(), sp + i, zp + i);
        pack_codes(code.data(), group, bits, cp + i * gb);
      }
      if (!mine) ok = false;
    });
  } else {
    TORCH_CHECK(group > 0 && T % group == 0, "per-channel groups must divide the block's tokens");
    const int64_t blocks = N / group, rb = nbytes(D);
    TORCH_CHECK(codes.numel() == N * rb && scale.numel() == blocks * D && zero.numel() == blocks * D,
                "fields: [B, H, T/G, G, bytes] codes and [B, H, T/G, 1, D] scales and zeros");
    at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / (group * D)), [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> code(group * D);
      std::vector<float> lo(D), hi(D);
      bool mine = true;
      for (int64_t k = begin; k < end; ++k) {
        mine &= quantize_channels(xp + k * group * D, group, D, levels, code.data(), sp + k * D, zp + k * D,
                                  lo.data(), hi.data());
        for (int64_t g = 0; g < group; ++g) pack_codes(code.data() + g * D, D, bits, cp + (k * group + g) * rb);
      }
      if (!mine) ok = false;
    });
  }
  return ok.load();
}

// One decode step's tokens into a layer's exact window: [window ; x] along the tokens, in the window's dtype
// (float32, float16 or bfloat16: rounded to nearest even, as torch's `.to`), for keys and values at once, and
// only if every value of x is finite: an empty list otherwise (nothing is written; the caller finds the first
// bad value and says where). window [B, H, W, D] contiguous, x [B, H, T, D] of any of those dtypes.
template <typename Out>
bool append_rows(const at::Tensor& window, const at::Tensor& x, at::Tensor& out) {
  const int64_t BH = window.size(0) * window.size(1), W = window.size(2), T = x.size(2), D = window.size(3);
  const Out* w = window.data_ptr<Out>();
  Out* o = out.data_ptr<Out>();
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
  const float* src = xf.data_ptr<float>();
  bool finite = true;
  for (int64_t bh = 0; bh < BH; ++bh) {
    std::memcpy(o + bh * (W + T) * D, w + bh * W * D, sizeof(Out) * W * D);
    Out* dst = o + (bh * (W + T) + W) * D;
    const float* row = src + bh * T * D;
    for (int64_t i = 0; i < T * D; ++i) {
      finite &= std::isfinite(row[i]);
      dst[i] = static_cast<Out>(row[i]);
    }
  }
  return finite;
}

std::vector<at::Tensor> append_finite(at::Tensor keys, at::Tensor values, at::Tensor k, at::Tensor v) {
  std::vector<at::Tensor> out;
  for (auto [window, x] : {std::pair<at::Tensor, at::Tensor>{keys, k}, {values, v}}) {
    TORCH_CHECK(window.dim() == 4 && x.dim() == 4 && window.is_contiguous() && window.size(0) == x.size(0) &&
                    window.size(1) == x.size(1) && window.size(3) == x.size(3),
                "append_finite: a contiguous window [B, H, W, D] and states [B, H, T, D] of the same B, H, D");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                "append_finite: the states must be float32, float16 or bfloat16");
    at::Tensor joined = at::empty({window.size(0), window.size(1), window.size(2) + x.size(2), window.size(3)},
                                  window.options());
    bool finite;
    switch (window.scalar_type()) {
      case at::kFloat: finite = append_rows<float>(window, x, joined); break;
      case at::kHalf: finite = append_rows<at::Half>(window, x, joined); break;
      case at::kBFloat16: finite = append_rows<at::BFloat16>(window, x, joined); break;
      default: TORCH_CHECK(false, "append_finite: the window must be float32, float16 or bfloat16");
    }
    if (!finite) return {};
    out.push_back(joined);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(kvshrink_cpu, m) {
  m.def("packed_attention", &packed_attention);
  m.def("int8_modes", &int8_modes);
  m.def("rotate_tokens", &rotate_tokens);
  m.def("lloydmax_tokens", &lloydmax_tokens);
  m.def("append_finite", &append_finite);
  m.def("grouped_encode", &grouped_encode);
}
