// Weight-only quantized linear layers for x86 CPUs with AVX2 + FMA + F16C.
//
// y[M, N] = x[M, K] @ W^T where W[N, K] is stored quantized and dequantized in registers,
// 32 weights at a time. Decode is memory-bound, so the only goal is to stream the packed
// weights once at full bandwidth: every format shares one loop (`linear`), parametrized by
// a decoder that turns 32 packed weights of row n into four __m256 of floats.
//
// Formats (K a multiple of 32; group size G = 32 * 2^j, the last group of a row may be
// shorter; S = ceil(K / G) scales per row; G = 0 means one scale per row):
//   int8  q int8 [N, K], scale f32 [N, S]:                  w = scale * q
//   int4  q uint8 [N, K/2], scale/offset f16 [N, S]:        w = scale * q + offset
//   nf4   q uint8 [N, K/2], scale f16 [N, S]:               w = scale * NF4[q]
//   fp8   q e4m3 bytes [N, K], scale f32 [N]:                w = scale[n] * fp8(q)
// 4-bit layout (GGUF's): in each run of 32 weights, byte i holds weight i in its low nibble
// and weight i + 16 in its high nibble.
//
// int8 and int4 run on integer inner products, so 32 weights cost a handful of
// instructions and the loop keeps up with memory: x is quantized to int16 per run of 32
// values (d = absmax / 32767, xq = round(x / d)), weights widen to int16, and madd_epi16
// sums pairs into int32. (llama.cpp quantizes x to int8 for maddubs, twice as cheap, but
// that moved SmolLM2's greedy output; int16 keeps x to 1 part in 65534 of its block max.)
// nf4 and fp8 decode to float in registers and keep x in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// Eight bytes at p (signed or unsigned) -> eight int32 lanes.
inline __m256i load8_i8(const int8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// 16 packed bytes -> 32 nibbles as two 16-byte vectors (weights 0..15 and 16..31).
inline void split_nibbles(const uint8_t* p, __m128i& lo, __m128i& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  lo = _mm_and_si128(b, mask);
  hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
}

inline void nibbles_to_i32(const uint8_t* p, __m256i out[4]) {
  __m128i lo, hi;
  split_nibbles(p, lo, hi);
  out[0] = _mm256_cvtepu8_epi32(lo);
  out[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
  out[2] = _mm256_cvtepu8_epi32(hi);
  out[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
}

// Block b (32 weights) of a row uses scale column b >> gshift.
inline int group_shift(int64_t G) { return G == 0 ? 62 : __builtin_ctzll(G / 32); }

struct Int8Decoder {
  const int8_t* q;
  const float* scale;
  int64_t K, S;
  int gshift;
  inline void decode32(int64_t n, int64_t k, __m256 w[4]) const {
    const int8_t* p = q + n * K + k;
    const __m256 s = _mm256_set1_ps(scale[n * S + ((k / 32) >> gshift)]);
    for (int t = 0; t < 4; ++t) w[t] = _mm256_mul_ps(_mm256_cvtepi32_ps(load8_i8(p + 8 * t)), s);
  }
  inline float row_scale(int64_t) const { return 1.0f; }
};

struct Fp8Decoder {
  const int8_t* q;
  const float* scale;
  int64_t K;
  inline void decode32(int64_t n, int64_t k, __m256 w[4]) const {
    // e4m3fn bits shifted into an fp32's exponent/mantissa give value * 2^-120 for normals
    // and subnormals alike; 2^120 is applied here (not in the row scale) so that products
    // never go subnormal.
    const int8_t* p = q + n * K + k;
    const __m256i mag = _mm256_set1_epi32(0x7F);
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const __m256 rebias = _mm256_set1_ps(1.329227995784916e36f);  // 2^120
    for (int t = 0; t < 4; ++t) {
      __m256i v = load8_i8(p + 8 * t);  // sign-extended: bit 31 is the fp8 sign
      __m256i bits = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(v, mag), 20),
                                     _mm256_and_si256(v, sign));
      w[t] = _mm256_mul_ps(_mm256_castsi256_ps(bits), rebias);
    }
  }
  inline float row_scale(int64_t n) const { return scale[n]; }
};

struct Int4Decoder {
  const uint8_t* q;
  const uint16_t* scale;
  const uint16_t* offset;
  int64_t K, S;
  int gshift;
  inline void decode32(int64_t n, int64_t k, __m256 w[4]) const {
    const int64_t g = n * S + ((k / 32) >> gshift);
    const __m256 s = _mm256_set1_ps(half_to_float(scale[g]));
    const __m256 m = _mm256_set1_ps(half_to_float(offset[g]));
    __m256i qi[4];
    nibbles_to_i32(q + (n * K + k) / 2, qi);
    for (int t = 0; t < 4; ++t) w[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qi[t]), s, m);
  }
  inline float row_scale(int64_t) const { return 1.0f; }
};

struct NF4Decoder {
  const uint8_t* q;
  const uint16_t* scale;
  int64_t K, S;
  int gshift;
  __m256 lut_lo, lut_hi;  // NF4 levels 0..7 and 8..15
  inline void decode32(int64_t n, int64_t k, __m256 w[4]) const {
    const __m256 s = _mm256_set1_ps(half_to_float(scale[n * S + ((k / 32) >> gshift)]));
    __m256i qi[4];
    nibbles_to_i32(q + (n * K + k) / 2, qi);
    for (int t = 0; t < 4; ++t) {
      __m256 lo = _mm256_permutevar8x32_ps(lut_lo, qi[t]);
      __m256 hi = _mm256_permutevar8x32_ps(lut_hi, qi[t]);
      // bit 3 of the index, moved to the sign bit, picks the upper half of the table
      __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(qi[t], 28));
      w[t] = _mm256_mul_ps(_mm256_blendv_ps(lo, hi, pick), s);
    }
  }
  inline float row_scale(int64_t) const { return 1.0f; }
};

// Rows [n0, n1) of y for up to 4 rows of x at once: each weight is decoded once and used
// MT times while it sits in a register.
template <int MT, class Dec>
void rows_small_m(const Dec& dec, const float* x, int64_t ldx, float* y, int64_t ldy,
                  int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MT][2];
    for (int j = 0; j < MT; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      __m256 w[4];
      dec.decode32(n, k, w);
      for (int j = 0; j < MT; ++j) {
        const float* xr = x + j * ldx + k;
        acc[j][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xr), acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), acc[j][1]);
        acc[j][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), acc[j][1]);
      }
    }
    const float rs = dec.row_scale(n);
    for (int j = 0; j < MT; ++j) y[j * ldy + n] = hsum(_mm256_add_ps(acc[j][0], acc[j][1])) * rs;
  }
}

// Larger M: decode a row of W once into a float buffer (L1/L2-resident), then run every
// row of x against it, four at a time.
template <class Dec>
void rows_large_m(const Dec& dec, const float* x, int64_t M, float* y, int64_t ldy,
                  int64_t K, int64_t n0, int64_t n1) {
  std::vector<float> buf(K);
  float* wb = buf.data();
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t k = 0; k < K; k += 32) {
      __m256 w[4];
      dec.decode32(n, k, w);
      for (int t = 0; t < 4; ++t) _mm256_storeu_ps(wb + k + 8 * t, w[t]);
    }
    const float rs = dec.row_scale(n);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      const float* x0 = x + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < K; k += 8) {
        const __m256 wv = _mm256_loadu_ps(wb + k);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + k), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + K + k), a1);
        a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + 2 * K + k), a2);
        a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + 3 * K + k), a3);
      }
      y[(m + 0) * ldy + n] = hsum(a0) * rs;
      y[(m + 1) * ldy + n] = hsum(a1) * rs;
      y[(m + 2) * ldy + n] = hsum(a2) * rs;
      y[(m + 3) * ldy + n] = hsum(a3) * rs;
    }
    for (; m < M; ++m) {
      const float* xr = x + m * K;
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(wb + k), _mm256_loadu_ps(xr + k), a);
      y[m * ldy + n] = hsum(a) * rs;
    }
  }
}

template <class Dec>
torch::Tensor run_linear(const Dec& dec, const torch::Tensor& x, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Rows of W are independent: split them across threads in chunks big enough to amortize
  // the fork (a 576-wide row is ~300 bytes of int4).
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (M > 4) {
      rows_large_m(dec, xp, M, yp, N, K, n0, n1);
      return;
    }
    switch (M) {
      case 1: rows_small_m<1>(dec, xp, K, yp, N, K, n0, n1); break;
      case 2: rows_small_m<2>(dec, xp, K, yp, N, K, n0, n1); break;
      case 3: rows_small_m<3>(dec, xp, K, yp, N, K, n0, n1); break;
      default: rows_small_m<4>(dec, xp, K, yp, N, K, n0, n1); break;
    }
  });
  return y;
}

// The whole matrix as float32 [N, K] (the reference of the kernels, and the weight of
// dequantize-then-matmul for big batches).
template <class Dec>
torch::Tensor run_dequantize(const Dec& dec, int64_t N, int64_t K) {
  auto w = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const __m256 rs = _mm256_set1_ps(dec.row_scale(n));
      for (int64_t k = 0; k < K; k += 32) {
        __m256 v[4];
        dec.decode32(n, k, v);
        for (int t = 0; t < 4; ++t)
          _mm256_storeu_ps(wp + n * K + k + 8 * t, _mm256_mul_ps(v[t], rs));
      }
    }
  });
  return w;
}


// --- int8-activation kernels (int8 and int4 weights) --------------------------------------

// x [M, K] -> xq int16 [M, K], dx [M, K/32] (block scales) and sx [M, K/32] (dx * sum xq).
void quantize_activations(const float* x, int64_t M, int64_t K, int16_t* xq, float* dx,
                          float* sx) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < M * K / 32; ++i) {
    const float* p = x + i * 32;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int t = 0; t < 4; ++t) {
      v[t] = _mm256_loadu_ps(p + 8 * t);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[t]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 32767.0f;
    const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int t = 0; t < 4; ++t) q[t] = _mm256_cvtps_epi32(_mm256_mul_ps(v[t], id));  // nearest-even
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    // packs works within 128-bit lanes; the 64-bit permute restores element order
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + i * 32), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + i * 32 + 16), hi);
    dx[i] = d;
    sx[i] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}

struct QuantizedX {
  const int16_t* q;
  const float* d;
  const float* s;
  int64_t K;
};

// 32 int4 weights -> two vectors of 16 int16 (weights 0..15, 16..31).
struct Block16 {
  __m256i lo, hi;
};

inline Block16 int4_block(const uint8_t* p) {
  __m128i lo, hi;
  split_nibbles(p, lo, hi);
  return {_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi)};
}

inline Block16 int8_block(const int8_t* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(b)),
          _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1))};
}

// Eight int32 partial sums of a block of 32 weights times 32 int16 values of x.
inline __m256i block_dot(const Block16& w, const int16_t* xq) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
  return _mm256_add_epi32(_mm256_madd_epi16(w.lo, x0), _mm256_madd_epi16(w.hi, x1));
}

// One block of 32 int4 weights against rows [m0, m0 + MT) of x: acc += cvt(w . xq) * s * dx,
// off += o * sx (the offset times the block's sum of x).
template <int MT>
inline void int4_block_dot(const Block16 w, float s, float o, const QuantizedX& x, int64_t m0,
                           int64_t nb, int64_t b, __m256* acc, float* off) {
  for (int j = 0; j < MT; ++j) {
    const int64_t r = (m0 + j) * nb + b;
    const __m256i p = block_dot(w, x.q + r * 32);
    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * x.d[r]), acc[j]);
    off[j] += o * x.s[r];
  }
}

// Rows [n0, n1) x rows [m0, m0 + MT) of y for int4 weights. Blocks go in pairs into two
// accumulators so consecutive FMAs do not wait on each other.
template <int MT>
void int4_qdot(const uint8_t* q, const uint16_t* scale, const uint16_t* offset, int64_t S,
               int gshift, const QuantizedX& x, int64_t m0, float* y, int64_t ldy, int64_t n0,
               int64_t n1) {
  const int64_t K = x.K, nb = K / 32;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc0[MT], acc1[MT];
    float off[MT];
    for (int j = 0; j < MT; ++j) {
      acc0[j] = acc1[j] = _mm256_setzero_ps();
      off[j] = 0.0f;
    }
    const uint8_t* qr = q + n * K / 2;
    const uint16_t* sr = scale + n * S;
    const uint16_t* orow = offset + n * S;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      const int64_t g0 = b >> gshift, g1 = (b + 1) >> gshift;
      int4_block_dot<MT>(int4_block(qr + b * 16), half_to_float(sr[g0]), half_to_float(orow[g0]),
                         x, m0, nb, b, acc0, off);
      int4_block_dot<MT>(int4_block(qr + b * 16 + 16), half_to_float(sr[g1]),
                         half_to_float(orow[g1]), x, m0, nb, b + 1, acc1, off);
    }
    if (b < nb)
      int4_block_dot<MT>(int4_block(qr + b * 16), half_to_float(sr[b >> gshift]),
                         half_to_float(orow[b >> gshift]), x, m0, nb, b, acc0, off);
    for (int j = 0; j < MT; ++j)
      y[(m0 + j) * ldy + n] = hsum(_mm256_add_ps(acc0[j], acc1[j])) + off[j];
  }
}

template <int MT>
inline void int8_block_dot(const Block16 w, float ws, const QuantizedX& x, int64_t m0,
                           int64_t nb, int64_t b, __m256* acc) {
  for (int j = 0; j < MT; ++j) {
    const int64_t r = (m0 + j) * nb + b;
    const __m256i p = block_dot(w, x.q + r * 32);
    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ws * x.d[r]), acc[j]);
  }
}

// Rows [n0, n1) x rows [m0, m0 + MT) of y for int8 weights with group scales.
template <int MT>
void int8_qdot(const int8_t* q, const float* scale, int64_t S, int gshift,
               const QuantizedX& x, int64_t m0, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K = x.K, nb = K / 32;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc0[MT], acc1[MT];
    for (int j = 0; j < MT; ++j) acc0[j] = acc1[j] = _mm256_setzero_ps();
    const int8_t* qr = q + n * K;
    auto load = [&](int64_t b) { return int8_block(qr + b * 32); };
    const float* sr = scale + n * S;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      int8_block_dot<MT>(load(b), sr[b >> gshift], x, m0, nb, b, acc0);
      int8_block_dot<MT>(load(b + 1), sr[(b + 1) >> gshift], x, m0, nb, b + 1, acc1);
    }
    if (b < nb) int8_block_dot<MT>(load(b), sr[b >> gshift], x, m0, nb, b, acc0);
    for (int j = 0; j < MT; ++j)
      y[(m0 + j) * ldy + n] = hsum(_mm256_add_ps(acc0[j], acc1[j]));
  }
}

// Quantize x once, then split the rows of W across threads; each thread runs every row of
// x against its rows of W, four at a time (a 4-row tile of W stays in L1 meanwhile).
template <class Tile>
torch::Tensor run_qdot(const torch::Tensor& x, int64_t N, Tile tile) {
  const int64_t M = x.size(0), K = x.size(1);
  auto y = torch::empty({M, N}, x.options());
  auto xq = torch::empty({M, K}, torch::dtype(torch::kInt16));
  auto dx = torch::empty({M, K / 32}, x.options());
  auto sx = torch::empty({M, K / 32}, x.options());
  quantize_activations(x.data_ptr<float>(), M, K, xq.data_ptr<int16_t>(), dx.data_ptr<float>(),
                       sx.data_ptr<float>());
  const QuantizedX qx{xq.data_ptr<int16_t>(), dx.data_ptr<float>(), sx.data_ptr<float>(), K};
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t nt = n0; nt < n1; nt += 8) {
      const int64_t nt1 = std::min(nt + 8, n1);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) tile(std::integral_constant<int, 4>(), qx, m, yp, N, nt, nt1);
      switch (M - m) {
        case 1: tile(std::integral_constant<int, 1>(), qx, m, yp, N, nt, nt1); break;
        case 2: tile(std::integral_constant<int, 2>(), qx, m, yp, N, nt, nt1); break;
        case 3: tile(std::integral_constant<int, 3>(), qx, m, yp, N, nt, nt1); break;
        default: break;
      }
    }
  });
  return y;
}

void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(x.size(1) % 32 == 0, "K must be a multiple of 32");
}

void check_w(const torch::Tensor& t, c10::ScalarType type, const char* name) {
  TORCH_CHECK(t.scalar_type() == type && t.is_contiguous() && t.device().is_cpu(),
              name, " has the wrong dtype, layout or device");
}

// Scale columns S for group size G (0: per row) and the shift mapping blocks to columns.
int64_t check_groups(const torch::Tensor& scale, int64_t N, int64_t K, int64_t G) {
  TORCH_CHECK(G == 0 || (G % 32 == 0 && ((G / 32) & (G / 32 - 1)) == 0),
              "group size must be 0 (per row) or 32 times a power of two, got ", G);
  const int64_t S = G == 0 ? 1 : (K + G - 1) / G;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == S,
              "scale must be [N, ceil(K / G)]");
  return S;
}

Int8Decoder int8_decoder(const torch::Tensor& q, const torch::Tensor& scale, int64_t G) {
  check_w(q, torch::kInt8, "q");
  check_w(scale, torch::kFloat32, "scale");
  const int64_t K = q.size(1);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  return {q.data_ptr<int8_t>(), scale.data_ptr<float>(), K,
          check_groups(scale, q.size(0), K, G), group_shift(G)};
}

Fp8Decoder fp8_decoder(const torch::Tensor& q, const torch::Tensor& scale) {
  check_w(q, torch::kInt8, "q (fp8 bits viewed as int8)");
  check_w(scale, torch::kFloat32, "scale");
  TORCH_CHECK(q.size(1) % 32 == 0, "K must be a multiple of 32");
  return {q.data_ptr<int8_t>(), scale.data_ptr<float>(), q.size(1)};
}

Int4Decoder int4_decoder(const torch::Tensor& q, const torch::Tensor& scale,
                         const torch::Tensor& offset, int64_t K, int64_t G) {
  check_w(q, torch::kUInt8, "q");
  check_w(scale, torch::kFloat16, "scale");
  check_w(offset, torch::kFloat16, "offset");
  TORCH_CHECK(K % 32 == 0 && q.size(1) * 2 == K, "q must be [N, K/2] with K % 32 == 0");
  TORCH_CHECK(offset.sizes() == scale.sizes(), "offset and scale shapes differ");
  return {q.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale.data_ptr()),
          reinterpret_cast<const uint16_t*>(offset.data_ptr()), K,
          check_groups(scale, q.size(0), K, G), group_shift(G)};
}

NF4Decoder nf4_decoder(const torch::Tensor& q, const torch::Tensor& scale,
                       const torch::Tensor& table, int64_t K, int64_t G) {
  check_w(q, torch::kUInt8, "q");
  check_w(scale, torch::kFloat16, "scale");
  check_w(table, torch::kFloat32, "table");
  TORCH_CHECK(table.numel() == 16, "the NF4 table has 16 levels");
  TORCH_CHECK(K % 32 == 0 && q.size(1) * 2 == K, "q must be [N, K/2] with K % 32 == 0");
  const float* t = table.data_ptr<float>();
  return {q.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale.data_ptr()), K,
          check_groups(scale, q.size(0), K, G), group_shift(G), _mm256_loadu_ps(t),
          _mm256_loadu_ps(t + 8)};
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, int64_t G) {
  check_x(x);
  const Int8Decoder dec = int8_decoder(q, scale, G);
  TORCH_CHECK(dec.K == x.size(1), "x and q disagree on K");
  return run_qdot(x, q.size(0), [&](auto mt, const QuantizedX& qx, int64_t m0, float* y,
                                    int64_t ldy, int64_t n0, int64_t n1) {
    int8_qdot<decltype(mt)::value>(dec.q, dec.scale, dec.S, dec.gshift, qx, m0, y, ldy, n0, n1);
  });
}

torch::Tensor fp8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  check_x(x);
  TORCH_CHECK(q.size(1) == x.size(1), "x and q disagree on K");
  return run_linear(fp8_decoder(q, scale), x, q.size(0));
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                          torch::Tensor offset, int64_t G) {
  check_x(x);
  const Int4Decoder dec = int4_decoder(q, scale, offset, x.size(1), G);
  return run_qdot(x, q.size(0), [&](auto mt, const QuantizedX& qx, int64_t m0, float* y,
                                    int64_t ldy, int64_t n0, int64_t n1) {
    int4_qdot<decltype(mt)::value>(dec.q, dec.scale, dec.offset, dec.S, dec.gshift, qx, m0, y,
                                   ldy, n0, n1);
  });
}

torch::Tensor nf4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                         torch::Tensor table, int64_t G) {
  check_x(x);
  return run_linear(nf4_decoder(q, scale, table, x.size(1), G), x, q.size(0));
}

std::vector<torch::Tensor> quantize_x(torch::Tensor x) {
  check_x(x);
  const int64_t M = x.size(0), K = x.size(1);
  auto xq = torch::empty({M, K}, torch::dtype(torch::kInt16));
  auto dx = torch::empty({M, K / 32}, x.options());
  auto sx = torch::empty({M, K / 32}, x.options());
  quantize_activations(x.data_ptr<float>(), M, K, xq.data_ptr<int16_t>(), dx.data_ptr<float>(),
                       sx.data_ptr<float>());
  return {xq, dx, sx};
}

torch::Tensor int8_dequantize(torch::Tensor q, torch::Tensor scale, int64_t G) {
  return run_dequantize(int8_decoder(q, scale, G), q.size(0), q.size(1));
}

torch::Tensor fp8_dequantize(torch::Tensor q, torch::Tensor scale) {
  return run_dequantize(fp8_decoder(q, scale), q.size(0), q.size(1));
}

torch::Tensor int4_dequantize(torch::Tensor q, torch::Tensor scale, torch::Tensor offset,
                              int64_t G) {
  const int64_t K = q.size(1) * 2;
  return run_dequantize(int4_decoder(q, scale, offset, K, G), q.size(0), K);
}

torch::Tensor nf4_dequantize(torch::Tensor q, torch::Tensor scale, torch::Tensor table,
                             int64_t G) {
  const int64_t K = q.size(1) * 2;
  return run_dequantize(nf4_decoder(q, scale, table, K, G), q.size(0), K);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // No Python object is touched, so each binding releases the GIL: the LM head runs while
  // the server's event loop streams.
  auto def = [&m](const char* name, auto fn, const char* doc) {
    m.def(name, fn, doc, py::call_guard<py::gil_scoped_release>());
  };
  def("int8_linear", &int8_linear, "y = x @ (scale * q)^T, q int8 [N, K]");
  def("fp8_linear", &fp8_linear, "y = x @ (scale * fp8(q))^T, q e4m3 bits [N, K]");
  def("int4_linear", &int4_linear, "y = x @ (scale * q + offset)^T, q packed 4-bit");
  def("nf4_linear", &nf4_linear, "y = x @ (scale * NF4[q])^T, q packed 4-bit");
  def("quantize_x", &quantize_x, "x -> (int16 values, block scales, scaled block sums)");
  def("int8_dequantize", &int8_dequantize, "float32 [N, K] of an int8 weight");
  def("fp8_dequantize", &fp8_dequantize, "float32 [N, K] of an fp8 weight");
  def("int4_dequantize", &int4_dequantize, "float32 [N, K] of an int4 weight");
  def("nf4_dequantize", &nf4_dequantize, "float32 [N, K] of an nf4 weight");
}
