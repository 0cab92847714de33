// Integer-dot quantized linears and a fused decode step for x86 CPUs (AVX2 + FMA + F16C).
//
// Activations are quantized on the fly to int8 in blocks of 32 (as llama.cpp's Q8
// activations, but with a scale d = absmax / 127 per group of 8 values: see quantize_row),
// and each block of 32 weights is one `maddubs` against them: 32 multiply-adds in one
// instruction, so a 2-core CPU keeps up with its memory.
//
// Weight formats (K a multiple of 32, group size G = 16 or 32 * 2^gshift, S = ceil(K / G)):
//   int4  q uint8 [N, K/2], scale/offset f16 or f32 [N, S]:  w = scale * q + offset
//         (GGUF's Q4_0/Q4_1 layout: in each run of 32, byte i = weight i | weight i+16 << 4)
//   int6  q uint8 [N, K] below 64, scale/offset f32 [N, S]:   w = scale * q + offset
//         (GGUF Q6_K values, one per byte: unsigned, so maddubs takes them as they are)
//   int5  q uint8 [N, K/2 + K/8], scale/offset f16 or f32:    w = scale * q + offset
//         (GGUF Q5_0/Q5_1/Q5_K: a row's low nibbles in int4's layout, then its fifth
//         bits, 8 bytes per pair of 32-blocks in the order int5_pair takes them)
//   int8  q int8 [N, K], scale f32 [N, S], offset f32 or none: w = scale * q (+ offset)
// GGUF K-quants (K a multiple of 256) may keep their scales compact instead: scale and
// offset int8 [N, S] (the sub-block integers sc, m) with a float32 factor per super-block of
// 256 weights [N, K / 256] (d, -dmin): scale = d * sc, exact in float32, as stored.
// G = 16 (K-quants' Q2_K, Q3_K, Q6_K) gives each half of a 32-block its own scale: the two
// halves are accumulated separately (lanes of `lo` hold first halves, `hi` second halves).
//
// Activation layout ("pair-interleaved"): blocks go in pairs (A, B) of 64 bytes,
//   [A 0..15 | B 0..15 | A 16..31 | B 16..31],
// which is what one 32-byte load of two int4 blocks gives after masking the low nibbles
// (first 32 bytes) and shifting the high ones (last 32): the weights are used as stored.
// After maddubs + madd, lanes 0-3 hold block A's partial sums and lanes 4-7 block B's, so a
// per-lane scale vector [sA x4, sB x4] applies both blocks' scales in one FMA.
//
// `Decoder` runs every layer of a Llama-family, Qwen3 or Gemma 2/3 model for a step's
// decodes and verification drafts (tokens that attend to their cached context) in one call
// and one OpenMP parallel region: norms (and q/k head norms), linears, RoPE, the paged KV
// write and attention (windows, soft-cap), the gated MLP (SiLU or GELU), residuals. It
// replaces ~40 eager torch ops per layer; the torch modules remain the reference it is
// tested against.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int kInt4 = 0;
constexpr int kInt8 = 1;
constexpr int kInt6 = 2;
constexpr int kInt5 = 3;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Split [0, n) into nth parts, aligned to `align`; part tid.
inline void split(int64_t n, int tid, int nth, int64_t align, int64_t& lo, int64_t& hi) {
  const int64_t units = (n + align - 1) / align;
  lo = std::min(n, units * tid / nth * align);
  hi = std::min(n, units * (tid + 1) / nth * align);
}

// --- activations ---------------------------------------------------------------------------

// Quantized rows of x: per row `npair * 64` int8 (pair-interleaved, zero-padded to an even
// number of blocks), `npair * 8` expanded block scales (4 lanes per block) and the scaled
// block sums d * sum(q) (for the weights' offsets), whole and per half block (group 16).
struct QX {
  int64_t K = 0, nb = 0, npair = 0;
  std::vector<int8_t> q;
  std::vector<float> de;
  std::vector<float> s, sl, sh;  // rows of nb8 (zero-padded to a multiple of 8)
  int64_t nb8 = 0;
  void resize(int64_t M, int64_t K_) {
    K = K_;
    nb = K / 32;
    npair = (nb + 1) / 2;
    nb8 = (nb + 7) / 8 * 8;
    q.resize(static_cast<size_t>(M * npair * 64));
    de.resize(static_cast<size_t>(M * npair * 8));
    s.assign(static_cast<size_t>(M * nb8), 0.0f);
    sl.assign(static_cast<size_t>(M * nb8), 0.0f);
    sh.assign(static_cast<size_t>(M * nb8), 0.0f);
  }
  const int8_t* qrow(int64_t m) const { return q.data() + m * npair * 64; }
  const float* derow(int64_t m) const { return de.data() + m * npair * 8; }
  const float* srow(int64_t m) const { return s.data() + m * nb8; }
  const float* slrow(int64_t m) const { return sl.data() + m * nb8; }
  const float* shrow(int64_t m) const { return sh.data() + m * nb8; }
};

// Max of |v| within each 128-bit half, broadcast to that half's four lanes.
inline __m256 half_absmax(__m256 a, __m256 b) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign_mask, a), _mm256_andnot_ps(sign_mask, b));
  m = _mm256_max_ps(m, _mm256_permute_ps(m, 0x4E));
  return _mm256_max_ps(m, _mm256_permute_ps(m, 0xB1));
}

// Quantize row m of x (K floats) into qx. Each block of 32 values splits into four groups
// of 8 with a scale each, d = absmax / 127: group g = values 4g..4g+3 and 16+4g..16+4g+3,
// exactly the values one int32 lane of the dot product sums (see the layout above), so the
// per-lane scale vector the kernels already multiply by carries four scales per block at
// no cost in the inner loop, and one outlier spoils 8 values instead of 32.
void quantize_row(const float* x, QX& qx, int64_t m) {
  int8_t* qr = qx.q.data() + m * qx.npair * 64;
  float* de = qx.de.data() + m * qx.npair * 8;
  float* sr = qx.s.data() + m * qx.nb8;
  float* slr = qx.sl.data() + m * qx.nb8;
  float* shr = qx.sh.data() + m * qx.nb8;
  const __m256 top = _mm256_set1_ps(127.0f);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t b = 0; b < qx.npair * 2; ++b) {
    int8_t* dst = qr + (b / 2) * 64 + (b % 2) * 16;
    if (b >= qx.nb) {  // padding block of an odd count: zeros
      std::memset(dst, 0, 16);
      std::memset(dst + 32, 0, 16);
      for (int l = 0; l < 4; ++l) de[4 * b + l] = 0.0f;
      continue;
    }
    const float* p = x + b * 32;
    __m256 v[4];
    for (int t = 0; t < 4; ++t) v[t] = _mm256_loadu_ps(p + 8 * t);
    // v[0] and v[2] hold groups 0 (low halves) and 1 (high); v[1] and v[3] groups 2 and 3
    const __m256 d01 = _mm256_div_ps(half_absmax(v[0], v[2]), top);
    const __m256 d23 = _mm256_div_ps(half_absmax(v[1], v[3]), top);
    // 1 / d, and 0 for an all-zero group
    const __m256 id01 = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), d01),
                                      _mm256_cmp_ps(d01, zero, _CMP_NEQ_OQ));
    const __m256 id23 = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), d23),
                                      _mm256_cmp_ps(d23, zero, _CMP_NEQ_OQ));
    __m256i q[4];
    q[0] = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], id01));
    q[1] = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], id23));
    q[2] = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], id01));
    q[3] = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], id23));
    // d * sum(q) per half block (first 16 values, last 16), for the weights' offsets
    const float s_lo = hsum(_mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q[0]), d01),
                                          _mm256_mul_ps(_mm256_cvtepi32_ps(q[1]), d23)));
    const float s_hi = hsum(_mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q[2]), d01),
                                          _mm256_mul_ps(_mm256_cvtepi32_ps(q[3]), d23)));
    // packs works within 128-bit lanes: the permute restores element order
    const __m256i w16a = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
    const __m256i w16b = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
    const __m256i w8 = _mm256_permute4x64_epi64(_mm256_packs_epi16(w16a, w16b), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(w8));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm256_extracti128_si256(w8, 1));
    // lane g of the block's four: group g's scale
    alignas(32) float a[8], c[8];
    _mm256_store_ps(a, d01);
    _mm256_store_ps(c, d23);
    de[4 * b + 0] = a[0];
    de[4 * b + 1] = a[4];
    de[4 * b + 2] = c[0];
    de[4 * b + 3] = c[4];
    sr[b] = s_lo + s_hi;
    slr[b] = s_lo;
    shr[b] = s_hi;
  }
}

// --- weights ---------------------------------------------------------------------------------

// A quantized weight as raw pointers (the tensors are owned by the Python module).
struct QW {
  int kind = kInt4;
  int64_t N = 0, K = 0, S = 0;
  int gshift = 0;      // block b (32 weights) uses scale column b >> gshift (G >= 32)
  bool half = false;   // G = 16: block b uses columns 2b (first half) and 2b + 1
  bool f16 = false;    // scale and offset stored as float16 (else float32)
  // GGUF K-quants' compact scales: scale and offset int8 [N, S] (the sub-block integers),
  // each times a float32 per super-block of 256 weights ([N, K / 256]): d * sc, -dmin * m
  bool sub8 = false;
  const uint8_t* q = nullptr;
  const void* scale = nullptr;
  const void* offset = nullptr;  // same dtype as scale, or null (int8 only)
  const float* scale_sup = nullptr;  // sub8: [N, Ssup]
  const float* offset_sup = nullptr;
  int64_t Ssup = 0;
  const float* bias = nullptr;   // [N] or null
};

// Block b (32 weights) of a row uses scale column b >> gshift; G = 0 means one per row.
int group_shift(int64_t G) {
  TORCH_CHECK(G == 0 || G == 16 || (G % 32 == 0 && ((G / 32) & (G / 32 - 1)) == 0),
              "group size must be 0 (per row), 16 or 32 times a power of two, got ", G);
  return G == 0 ? 62 : G == 16 ? 0 : __builtin_ctzll(G / 32);
}

// The kind a weight's dtype implies when none is given: uint8 -> int4, int8 -> int8.
int infer_kind(const torch::Tensor& q, int64_t kind) {
  if (kind >= 0) return static_cast<int>(kind);
  return q.scalar_type() == torch::kUInt8 ? kInt4 : kInt8;
}

// The float32 super-block factors [N, K / 256] of a sub8 scale or offset.
const float* super_factors(const c10::optional<torch::Tensor>& t, const QW& w, const char* what) {
  TORCH_CHECK(t.has_value() && t->scalar_type() == torch::kFloat32 && t->is_contiguous() &&
              t->dim() == 2 && t->size(0) == w.N && t->size(1) == w.K / 256,
              "int8 sub-block ", what, "s need float32 super-block factors [N, K / 256]");
  return t->data_ptr<float>();
}

QW make_qw(int kind, const torch::Tensor& q, const torch::Tensor& scale,
           const c10::optional<torch::Tensor>& offset, const c10::optional<torch::Tensor>& bias,
           int64_t G, const c10::optional<torch::Tensor>& scale_sup = c10::nullopt,
           const c10::optional<torch::Tensor>& offset_sup = c10::nullopt) {
  QW w;
  w.kind = kind;
  TORCH_CHECK(kind == kInt4 || kind == kInt8 || kind == kInt6 || kind == kInt5,
              "unknown weight kind ", kind);
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && q.device().is_cpu(),
              "quantized weights must be contiguous CPU tensors");
  TORCH_CHECK(q.dim() == 2, "q must be 2-D");
  w.N = q.size(0);
  w.f16 = scale.scalar_type() == torch::kFloat16;
  w.sub8 = scale.scalar_type() == torch::kInt8;
  TORCH_CHECK(w.f16 || w.sub8 || scale.scalar_type() == torch::kFloat32,
              "scale must be float16/32 (or int8 with super-block factors)");
  if (kind == kInt4) {
    TORCH_CHECK(q.scalar_type() == torch::kUInt8, "int4 weights: q uint8 [N, K/2]");
    TORCH_CHECK(offset.has_value(), "int4 weights need an offset shaped like the scale");
    w.K = q.size(1) * 2;
  } else if (kind == kInt5) {
    TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.size(1) % 20 == 0 && offset.has_value(),
                "int5 weights: q uint8 [N, K/2 + K/8], scale and offset [N, S]");
    w.K = q.size(1) / 5 * 8;
  } else if (kind == kInt6) {
    TORCH_CHECK(q.scalar_type() == torch::kUInt8 && !w.f16 && offset.has_value(),
                "int6 weights: q uint8 [N, K] below 64, scale and offset float32 [N, S]");
    w.K = q.size(1);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kInt8 && !w.f16,
                "int8 weights: q int8 [N, K], scale float32 [N, S]");
    w.K = q.size(1);
  }
  if (offset.has_value()) {
    TORCH_CHECK(offset->sizes() == scale.sizes() && offset->scalar_type() == scale.scalar_type()
                && offset->is_contiguous(), "the offset must be shaped and typed like the scale");
    w.offset = offset->data_ptr();
  }
  TORCH_CHECK(w.K % 32 == 0, "K must be a multiple of 32");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == w.N, "scale must be [N, S]");
  w.S = scale.size(1);
  w.gshift = group_shift(G);
  w.half = G == 16;
  TORCH_CHECK(w.S == (G == 0 ? 1 : (w.K + G - 1) / G), "scale must be [N, ceil(K / G)]");
  if (w.sub8) {
    TORCH_CHECK(kind != kInt8 && (G == 16 || G == 32) && w.K % 256 == 0,
                "int8 sub-block scales: int4/int5/int6 weights, groups of 16 or 32, K a "
                "multiple of 256");
    w.Ssup = w.K / 256;
    w.scale_sup = super_factors(scale_sup, w, "scale");
    if (offset.has_value()) w.offset_sup = super_factors(offset_sup, w, "offset");
  }
  w.q = reinterpret_cast<const uint8_t*>(q.data_ptr());
  w.scale = scale.data_ptr();
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->numel() == w.N &&
                bias->is_contiguous(), "bias must be float32 [N]");
    w.bias = bias->data_ptr<float>();
  }
  return w;
}

inline float to_float(uint16_t h) { return _cvtsh_ss(h); }
inline float to_float(float f) { return f; }

// One row's stored scales s (and offsets o, or null) of type T, expanded per block: whole
// blocks into (sb, ob), or with G = 16 first halves into (sb, ob) and second into (sb2, ob2).
// Typed loops without per-element branches: this runs once per row per call.
template <typename T>
inline void expand_scales(const QW& w, const T* s, const T* o, int64_t nb, float* sb,
                          float* ob, float* sb2, float* ob2) {
  if (w.half) {
    for (int64_t b = 0; b < nb; ++b) {
      sb[b] = to_float(s[2 * b]);
      sb2[b] = to_float(s[2 * b + 1]);
    }
    if (o) {
      for (int64_t b = 0; b < nb; ++b) {
        ob[b] = to_float(o[2 * b]);
        ob2[b] = to_float(o[2 * b + 1]);
      }
    }
    return;
  }
  const int sh = w.gshift;
  for (int64_t b = 0; b < nb; ++b) sb[b] = to_float(s[b >> sh]);
  if (o) {
    for (int64_t b = 0; b < nb; ++b) ob[b] = to_float(o[b >> sh]);
  }
}

// Row n's per-block scales and offsets as floats, zero-padded to a multiple of 8 (see
// expand_scales).
inline void row_scales(const QW& w, int64_t n, int64_t nb8, float* sb, float* ob, float* sb2,
                       float* ob2) {
  const int64_t nb = w.K / 32;
  if (w.sub8) {  // eight blocks of 32 per super-block
    const int8_t* s = static_cast<const int8_t*>(w.scale) + n * w.S;
    const int8_t* o = w.offset ? static_cast<const int8_t*>(w.offset) + n * w.S : nullptr;
    const float* ss = w.scale_sup + n * w.Ssup;
    const float* os = o ? w.offset_sup + n * w.Ssup : nullptr;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j = w.half ? 2 * b : b;
      sb[b] = static_cast<float>(s[j]) * ss[b >> 3];
      if (o) ob[b] = static_cast<float>(o[j]) * os[b >> 3];
      if (w.half) {
        sb2[b] = static_cast<float>(s[j + 1]) * ss[b >> 3];
        if (o) ob2[b] = static_cast<float>(o[j + 1]) * os[b >> 3];
      }
    }
  } else if (w.f16) {
    const uint16_t* s = static_cast<const uint16_t*>(w.scale) + n * w.S;
    const uint16_t* o = w.offset ? static_cast<const uint16_t*>(w.offset) + n * w.S : nullptr;
    expand_scales(w, s, o, nb, sb, ob, sb2, ob2);
  } else {
    const float* s = static_cast<const float*>(w.scale) + n * w.S;
    const float* o = w.offset ? static_cast<const float*>(w.offset) + n * w.S : nullptr;
    expand_scales(w, s, o, nb, sb, ob, sb2, ob2);
  }
  for (int64_t b = nb; b < nb8; ++b) {
    sb[b] = ob[b] = 0.0f;
    if (w.half) sb2[b] = ob2[b] = 0.0f;
  }
}

// Pair p of an int4 row: [A 0..15 | B 0..15] (lo) and [A 16..31 | B 16..31] (hi), unsigned.
// `whole`: the caller knows block B exists.
inline void int4_pair(const uint8_t* row, int64_t p, int64_t nb, __m256i& lo, __m256i& hi,
                      bool whole = false) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256i v;
  if (whole || 2 * p + 1 < nb) {
    v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * 32));
  } else {  // odd tail: block A only (never read past the row)
    v = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + p * 32)));
  }
  lo = _mm256_and_si256(v, mask);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
}

// Pair p of an int5 row: int4's nibbles with the fifth bits of blocks A and B or-ed in.
// A whole pair's 8 bytes of fifth bits are stored in the order this takes them
// (quant_formats.pack_int5): broadcast, byte j of every 64-bit lane holds the bits of lanes
// j, j+8, j+16, j+24 of lo (bits 0-3) and of hi (bits 4-7), so a per-lane shift and a mask
// place each bit. A lone last block A has 4 bytes, bit j = weight j, picked by
// byte shuffles instead.
inline void int5_pair(const uint8_t* row, int64_t K, int64_t p, int64_t nb, __m256i& lo,
                      __m256i& hi, bool whole = false) {
  const __m256i five = _mm256_set1_epi8(0x10);
  int4_pair(row, p, nb, lo, hi, whole);
  const uint8_t* qh = row + K / 2 + p * 8;
  if (whole || 2 * p + 1 < nb) {
    // 64-bit lane s wants bit s (lo) and bit 4 + s (hi) of each byte at bit 4: one shift
    // per lane moves it there, within its byte, and a mask keeps it
    int64_t ab;
    std::memcpy(&ab, qh, 8);
    const __m256i v = _mm256_set1_epi64x(ab);
    lo = _mm256_or_si256(lo, _mm256_and_si256(
        _mm256_sllv_epi64(v, _mm256_setr_epi64x(4, 3, 2, 1)), five));
    hi = _mm256_or_si256(hi, _mm256_and_si256(
        _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 1, 2, 3)), five));
    return;
  }
  const __m256i pick_lo = _mm256_set_epi64x(0x0505050505050505, 0x0404040404040404,
                                            0x0101010101010101, 0x0000000000000000);
  const __m256i pick_hi = _mm256_set_epi64x(0x0707070707070707, 0x0606060606060606,
                                            0x0303030303030303, 0x0202020202020202);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  int64_t a = 0;
  std::memcpy(&a, qh, 4);  // block A's bits; B's lanes meet zero x
  const __m256i v = _mm256_set1_epi64x(a);
  const __m256i bl = _mm256_and_si256(_mm256_shuffle_epi8(v, pick_lo), bit);
  const __m256i bh = _mm256_and_si256(_mm256_shuffle_epi8(v, pick_hi), bit);
  lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(bl, bit), five));
  hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(bh, bit), five));
}

// Pair p of a one-byte-per-weight row (int8 or int6) in the same arrangement.
inline void byte_pair(const uint8_t* row, int64_t p, int64_t nb, __m256i& lo, __m256i& hi,
                      bool whole = false) {
  const uint8_t* a = row + p * 64;
  if (whole || 2 * p + 1 < nb) {
    lo = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(a + 32),
                             reinterpret_cast<const __m128i*>(a));
    hi = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(a + 48),
                             reinterpret_cast<const __m128i*>(a + 16));
  } else {
    lo = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
    hi = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + 16)));
  }
}

// The expanded scale vector of pair p from 8 block scales held in sv (pairs p%4 within).
inline __m256 pair_scales(__m256 sv, int k) {
  static const int idx[4][8] = {{0, 0, 0, 0, 1, 1, 1, 1}, {2, 2, 2, 2, 3, 3, 3, 3},
                                {4, 4, 4, 4, 5, 5, 5, 5}, {6, 6, 6, 6, 7, 7, 7, 7}};
  return _mm256_permutevar8x32_ps(sv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx[k])));
}

// Eight int8 sub-block values as floats times one super-block factor.
inline __m256 sub8_times(const int8_t* p, float sup) {
  const __m256 v = _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  return _mm256_mul_ps(v, _mm256_set1_ps(sup));
}

// Where a row's block scales and offsets are read from, 8 blocks at a time: the stored
// values directly (group size 32, and the row's last 8-wide load stays inside the tensor:
// what it reads past the row's end meets zero x blocks, but memory past the tensor may hold
// NaN bit patterns and NaN * 0 is NaN), else a float copy expanded per block and
// zero-padded. With G = 16, s2/o2 hold the second halves' scales and offsets.
struct RowScales {
  const uint16_t* s16 = nullptr;
  const uint16_t* o16 = nullptr;
  const float* s32 = nullptr;
  const float* o32 = nullptr;
  const float* s2 = nullptr;
  const float* o2 = nullptr;
  const int8_t* s8 = nullptr;  // sub8, b a multiple of 8: times ss[b / 8]
  const int8_t* o8 = nullptr;
  const float* ss = nullptr;
  const float* os = nullptr;
  inline bool has_offset() const { return o16 || o32 || o8; }
  inline __m256 scale8(int64_t b) const {
    if (s8) return sub8_times(s8 + b, ss[b >> 3]);
    return s16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s16 + b)))
               : _mm256_loadu_ps(s32 + b);
  }
  inline __m256 offset8(int64_t b) const {
    if (o8) return sub8_times(o8 + b, os[b >> 3]);
    return o16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(o16 + b)))
               : _mm256_loadu_ps(o32 + b);
  }
};

inline RowScales row_scales_of(const QW& w, int64_t n, float* buf, int64_t nb8) {
  RowScales r;
  const bool direct = !w.half && w.gshift == 0 && (w.N - n) * w.S >= nb8;
  if (direct && w.sub8) {
    r.s8 = static_cast<const int8_t*>(w.scale) + n * w.S;
    r.ss = w.scale_sup + n * w.Ssup;
    if (w.offset) {
      r.o8 = static_cast<const int8_t*>(w.offset) + n * w.S;
      r.os = w.offset_sup + n * w.Ssup;
    }
  } else if (direct && w.f16) {
    r.s16 = static_cast<const uint16_t*>(w.scale) + n * w.S;
    if (w.offset) r.o16 = static_cast<const uint16_t*>(w.offset) + n * w.S;
  } else if (direct) {
    r.s32 = static_cast<const float*>(w.scale) + n * w.S;
    if (w.offset) r.o32 = static_cast<const float*>(w.offset) + n * w.S;
  } else {
    row_scales(w, n, nb8, buf, buf + nb8, buf + 2 * nb8, buf + 3 * nb8);
    r.s32 = buf;
    if (w.offset) r.o32 = buf + nb8;
    if (w.half) {
      r.s2 = buf + 2 * nb8;
      if (w.offset) r.o2 = buf + 3 * nb8;
    }
  }
  return r;
}

// Sum of 32 products of a weight half-pair (lo or hi: 16 weights of block A, 16 of B)
// with the matching int8 x, as 8 int32 lanes (4 per block). Signed int8 weights go through
// the sign trick (|w| . sign(x, w)); int4/int6 are unsigned and go straight into maddubs.
template <int KIND>
inline __m256i half_dot(__m256i w, __m256i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (KIND == kInt8) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
                             ones);
  }
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
}

// y[m0 + j, n0 + i] for RN rows of W and MT rows of x: each pair of weight blocks is
// unpacked once and used MT times, each pair of x blocks loaded once and used RN times.
template <int KIND, bool HALF, int RN, int MT>
void qgemm_tile(const QW& w, const QX& x, int64_t m0, int64_t n0, float* y, int64_t ldy,
                float* buf) {
  const int64_t nb = w.K / 32, npair = x.npair, nb8 = (nb + 7) / 8 * 8;
  const __m256i ones = _mm256_set1_epi16(1);
  RowScales rs[RN];
  for (int i = 0; i < RN; ++i) rs[i] = row_scales_of(w, n0 + i, buf + i * 4 * nb8, nb8);
  __m256 acc[RN][MT];
  for (int i = 0; i < RN; ++i)
    for (int j = 0; j < MT; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t p8 = 0; p8 < npair; p8 += 4) {
    const int64_t b8 = 2 * p8;
    __m256 sv[RN], sv2[RN];
    for (int i = 0; i < RN; ++i) {
      sv[i] = rs[i].scale8(b8);
      if (HALF) sv2[i] = _mm256_loadu_ps(rs[i].s2 + b8);
      if (!rs[i].has_offset()) continue;
      // offsets: sum over groups of offset * d * sum(q)
      const __m256 ov = rs[i].offset8(b8);
      if (HALF) {
        const __m256 ov2 = _mm256_loadu_ps(rs[i].o2 + b8);
        for (int j = 0; j < MT; ++j) {
          acc[i][j] = _mm256_fmadd_ps(ov, _mm256_loadu_ps(x.slrow(m0 + j) + b8), acc[i][j]);
          acc[i][j] = _mm256_fmadd_ps(ov2, _mm256_loadu_ps(x.shrow(m0 + j) + b8), acc[i][j]);
        }
      } else {
        for (int j = 0; j < MT; ++j)
          acc[i][j] = _mm256_fmadd_ps(ov, _mm256_loadu_ps(x.srow(m0 + j) + b8), acc[i][j]);
      }
    }
    const int64_t pe = std::min<int64_t>(p8 + 4, npair);
    for (int64_t p = p8; p < pe; ++p) {
      __m256i lo[RN], hi[RN];
      for (int i = 0; i < RN; ++i) {
        if (KIND == kInt4) {
          int4_pair(w.q + (n0 + i) * (w.K / 2), p, nb, lo[i], hi[i]);
        } else if (KIND == kInt5) {
          int5_pair(w.q + (n0 + i) * (w.K / 8 * 5), w.K, p, nb, lo[i], hi[i]);
        } else {
          byte_pair(w.q + (n0 + i) * w.K, p, nb, lo[i], hi[i]);
        }
      }
      __m256 ws[RN], ws2[RN];
      for (int i = 0; i < RN; ++i) {
        ws[i] = pair_scales(sv[i], static_cast<int>(p - p8));
        if (HALF) ws2[i] = pair_scales(sv2[i], static_cast<int>(p - p8));
      }
      for (int j = 0; j < MT; ++j) {
        const int8_t* xq = x.qrow(m0 + j) + p * 64;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
        const __m256 de = _mm256_loadu_ps(x.derow(m0 + j) + p * 8);
        for (int i = 0; i < RN; ++i) {
          if (HALF) {
            acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(half_dot<KIND>(lo[i], x0)),
                                        _mm256_mul_ps(ws[i], de), acc[i][j]);
            acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(half_dot<KIND>(hi[i], x1)),
                                        _mm256_mul_ps(ws2[i], de), acc[i][j]);
            continue;
          }
          __m256i s32;
          if (KIND == kInt8) {  // lanes reach 2 * 128 * 127: add in 32 bits
            s32 = _mm256_add_epi32(half_dot<KIND>(lo[i], x0), half_dot<KIND>(hi[i], x1));
          } else {
            // int4 / int5 / int6 lanes are at most 2 * 63 * 127: two still fit in 16 bits
            s32 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[i], x0),
                                                     _mm256_maddubs_epi16(hi[i], x1)), ones);
          }
          acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(ws[i], de),
                                      acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < RN; ++i) {
    const float bias = w.bias ? w.bias[n0 + i] : 0.0f;
    for (int j = 0; j < MT; ++j) y[(m0 + j) * ldy + n0 + i] = hsum(acc[i][j]) + bias;
  }
}

// Eight stored scales (or offsets) of one row as floats.
template <bool F16>
inline __m256 load8(const void* p, int64_t i) {
  if (F16) {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
  return _mm256_loadu_ps(static_cast<const float*>(p) + i);
}

template <bool F16>
inline float load1(const void* p, int64_t i) {
  return F16 ? _cvtsh_ss(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Pair p of weight row r as (lo, hi) halves, for any KIND.
template <int KIND, bool WHOLE>
inline void weight_pair(const QW& w, const uint8_t* r, int64_t p, int64_t nb, __m256i& lo,
                        __m256i& hi) {
  if (KIND == kInt4) {
    int4_pair(r, p, nb, lo, hi, WHOLE);
  } else if (KIND == kInt5) {
    int5_pair(r, w.K, p, nb, lo, hi, WHOLE);
  } else {
    byte_pair(r, p, nb, lo, hi, WHOLE);
  }
}

// Pair p's 8 int32 lanes (4 per block) of one weight row against x.
template <int KIND>
inline __m256i pair_dot(__m256i lo, __m256i hi, __m256i x0, __m256i x1) {
  if (KIND == kInt8) return _mm256_add_epi32(half_dot<KIND>(lo, x0), half_dot<KIND>(hi, x1));
  // int4 / int5 / int6 lanes are at most 2 * 63 * 127: two still fit in 16 bits
  return _mm256_madd_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)),
      _mm256_set1_epi16(1));
}

// The scales (or offsets) of eight blocks from block b8 on of one row stored from `at`:
// one per block into v, or with G = 16 (HALF: two per block, interleaved as stored) first
// halves into v and second halves into v2.
template <bool F16, bool HALF>
inline void block_scales(const void* p, int64_t at, __m256& v, __m256& v2) {
  if (!HALF) {
    v = load8<F16>(p, at);
    return;
  }
  const __m256 a = load8<F16>(p, at), b = load8<F16>(p, at + 8);
  // per 128-bit lane [a0 a2 b0 b2 | a4 a6 b4 b6], then the lanes' 64-bit halves in order
  v = _mm256_castpd_ps(_mm256_permute4x64_pd(
      _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
  v2 = _mm256_castpd_ps(_mm256_permute4x64_pd(
      _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
}

// block_scales for the last nb - b8 < 8 blocks, zero-padded as row_scales pads them.
template <bool F16, bool HALF>
inline void last_block_scales(const void* p, int64_t at, int64_t blocks, __m256& v,
                              __m256& v2) {
  alignas(32) float t[2][8] = {};
  for (int64_t j = 0; j < blocks; ++j) {
    t[0][j] = load1<F16>(p, at + (HALF ? 2 * j : j));
    if (HALF) t[1][j] = load1<F16>(p, at + 2 * j + 1);
  }
  v = _mm256_load_ps(t[0]);
  v2 = _mm256_load_ps(t[1]);
}

// block_scales of int8 sub-block values p (one super-block: 8 blocks, 8 or 16 values) times
// their super-block factor `sup`.
template <bool HALF>
inline void sub_block_scales(const int8_t* p, float sup, __m256& v, __m256& v2) {
  if (!HALF) {
    v = sub8_times(p, sup);
    return;
  }
  // [a0 b0 a1 b1 ...]: first halves to the low 8 bytes, second halves to the high 8
  const __m128i ab = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)),
                                      _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9,
                                                    11, 13, 15));
  const __m256 d = _mm256_set1_ps(sup);
  v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(ab)), d);
  v2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(ab, 8))), d);
}

// Four pairs (eight blocks) from pair p8 on of RN weight rows r[i] against x, into acc[i],
// with the rows' block scales s[i] (second halves' t[i] with G = 16): qgemm_tile's
// operations in its order.
template <int KIND, bool HALF, int RN, int NP>
inline void gemv_group(const QW& w, const uint8_t* const* r, const QX& x, int64_t p8,
                       const __m256* s, const __m256* t, __m256* acc) {
  const int64_t nb = w.K / 32;
  const int8_t* xq = x.qrow(0);
  const float* de = x.derow(0);
  for (int k = 0; k < NP; ++k) {
    const int64_t p = p8 + k;
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + p * 64));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + p * 64 + 32));
    const __m256 d = _mm256_loadu_ps(de + p * 8);
    const __m256i idx = _mm256_setr_epi32(2 * k, 2 * k, 2 * k, 2 * k, 2 * k + 1, 2 * k + 1,
                                          2 * k + 1, 2 * k + 1);
    for (int i = 0; i < RN; ++i) {
      __m256i lo, hi;
      weight_pair<KIND, NP == 4>(w, r[i], p, nb, lo, hi);
      const __m256 ws = _mm256_mul_ps(_mm256_permutevar8x32_ps(s[i], idx), d);
      if (HALF) {
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(half_dot<KIND>(lo, x0)), ws, acc[i]);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(half_dot<KIND>(hi, x1)),
                                 _mm256_mul_ps(_mm256_permutevar8x32_ps(t[i], idx), d), acc[i]);
      } else {
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_dot<KIND>(lo, hi, x0, x1)), ws,
                                 acc[i]);
      }
    }
  }
}

// Rows [n0, n1) (a multiple of RN) of y for one row of x and a weight with one scale per
// block of 32 (GGUF's Q4_0/Q4_1/Q5_x/Q8_0, K-quants' Q4_K/Q5_K) or per half block (HALF:
// Q2_K, Q3_K, Q6_K), RN rows at a time. The general tile's per-row set-up (expanded scale
// copies, format checks at run time) cost as much as the products at K = 576; this reads
// the stored scales in place, eight blocks at a time (SC: float32, float16, or int8 sub-block
// values times a float32 per super-block of 256 weights). Each output is bit-identical to
// qgemm_tile's, so one sequence decodes alone as in a batch.
constexpr int kF32 = 0, kF16 = 1, kSub8 = 2;

template <int KIND, int SC, bool OFFSET, bool HALF, int RN>
void gemv(const QW& w, const QX& x, int64_t n0, int64_t n1, float* y) {
  constexpr bool F16 = SC == kF16;
  const int64_t nb = w.K / 32, npair = x.npair, S = w.S, per = HALF ? 2 : 1;
  const int64_t row_bytes = KIND == kInt4 ? w.K / 2 : KIND == kInt5 ? w.K / 8 * 5 : w.K;
  const int64_t whole = nb / 8 * 4;  // pairs in groups of eight whole blocks
  for (int64_t n = n0; n + RN <= n1; n += RN) {
    const uint8_t* r[RN];
    int64_t at[RN];
    __m256 acc[RN];
    for (int i = 0; i < RN; ++i) {
      r[i] = w.q + (n + i) * row_bytes;
      at[i] = (n + i) * S;
      acc[i] = _mm256_setzero_ps();
    }
    const int8_t* s8 = static_cast<const int8_t*>(w.scale);
    const int8_t* o8 = static_cast<const int8_t*>(w.offset);
    for (int64_t p8 = 0; p8 < npair; p8 += 4) {
      const int64_t b8 = 2 * p8;
      const bool last = p8 >= whole;
      __m256 s[RN], t[RN], o[RN], u[RN];
      for (int i = 0; i < RN; ++i) {
        const int64_t from = at[i] + per * b8;
        if (SC == kSub8) {  // K is a multiple of 256: never `last`
          const int64_t sup = (n + i) * w.Ssup + b8 / 8;
          sub_block_scales<HALF>(s8 + from, w.scale_sup[sup], s[i], t[i]);
          if (OFFSET) sub_block_scales<HALF>(o8 + from, w.offset_sup[sup], o[i], u[i]);
        } else if (!last) {
          block_scales<F16, HALF>(w.scale, from, s[i], t[i]);
          if (OFFSET) block_scales<F16, HALF>(w.offset, from, o[i], u[i]);
        } else {
          last_block_scales<F16, HALF>(w.scale, from, nb - b8, s[i], t[i]);
          if (OFFSET) last_block_scales<F16, HALF>(w.offset, from, nb - b8, o[i], u[i]);
        }
        if (OFFSET && HALF) {
          acc[i] = _mm256_fmadd_ps(o[i], _mm256_loadu_ps(x.slrow(0) + b8), acc[i]);
          acc[i] = _mm256_fmadd_ps(u[i], _mm256_loadu_ps(x.shrow(0) + b8), acc[i]);
        } else if (OFFSET) {
          acc[i] = _mm256_fmadd_ps(o[i], _mm256_loadu_ps(x.srow(0) + b8), acc[i]);
        }
      }
      switch (last ? npair - p8 : 4) {
        case 1: gemv_group<KIND, HALF, RN, 1>(w, r, x, p8, s, t, acc); break;
        case 2: gemv_group<KIND, HALF, RN, 2>(w, r, x, p8, s, t, acc); break;
        case 3: gemv_group<KIND, HALF, RN, 3>(w, r, x, p8, s, t, acc); break;
        default: gemv_group<KIND, HALF, RN, 4>(w, r, x, p8, s, t, acc);
      }
    }
    for (int i = 0; i < RN; ++i) y[n + i] = hsum(acc[i]) + (w.bias ? w.bias[n + i] : 0.0f);
  }
}

// Rows [n0, n1) at M = 1 through gemv when the weight has a scale per block of 32 or per
// half block; returns the first row left for the general tile (n0 when none was done).
// int4 goes two rows at a time (two streams of weights measured fastest); the others one
// row at a time: two streams of int8 weights out of memory ran at 6-7 GB/s on one core, one
// stream at 16-20 GB/s, and int5 rows (nibbles, then fifth bits: two streams a row) 8-12%
// faster one at a time.
// gemv with offsets, for the way the weight stores its scales.
template <int KIND, bool HALF, int RN>
void gemv_by_scales(const QW& w, const QX& x, int64_t n0, int64_t n1, float* y) {
  if (KIND != kInt8 && w.sub8) {
    gemv<KIND, kSub8, true, HALF, RN>(w, x, n0, n1, y);
  } else if (w.f16) {
    gemv<KIND, kF16, true, HALF, RN>(w, x, n0, n1, y);
  } else {
    gemv<KIND, kF32, true, HALF, RN>(w, x, n0, n1, y);
  }
}

template <int KIND, bool HALF>
int64_t gemv_rows(const QW& w, const QX& x, int64_t n0, int64_t n1, float* y) {
  if (!HALF && w.gshift != 0) return n0;
  if (KIND == kInt4) {
    const int64_t n2 = n0 + (n1 - n0) / 2 * 2;
    gemv_by_scales<KIND, HALF, 2>(w, x, n0, n2, y);
    return n2;
  }
  if (KIND == kInt8 && !w.offset) {
    gemv<KIND, kF32, false, HALF, 1>(w, x, n0, n1, y);
  } else {
    gemv_by_scales<KIND, HALF, 1>(w, x, n0, n1, y);
  }
  return n1;
}

template <int KIND, bool HALF>
void qgemm_rows_kind(const QW& w, const QX& x, int64_t M, int64_t n0, int64_t n1, float* y,
                     int64_t ldy, float* buf) {
  // A band of W rows stays in L1 while every tile of x passes over it.
  constexpr int64_t kBand = 16;
  if (M == 1) n0 = gemv_rows<KIND, HALF>(w, x, n0, n1, y);
  for (int64_t b0 = n0; b0 < n1; b0 += kBand) {
    const int64_t b1 = std::min(n1, b0 + kBand);
    if (M == 1) {
      // two weight rows at a time: four fit the registers of int4 too, but two streams of
      // weights out of memory measured 10% faster per decode step than four
      constexpr int RN = 2;
      int64_t n = b0;
      for (; n + RN <= b1; n += RN) qgemm_tile<KIND, HALF, RN, 1>(w, x, 0, n, y, ldy, buf);
      for (; n < b1; ++n) qgemm_tile<KIND, HALF, 1, 1>(w, x, 0, n, y, ldy, buf);
      continue;
    }
    // four rows of x (L1) against each row of the band (L1), then the next four rows
    int64_t m = 0;
    constexpr int MT = KIND != kInt8 && !HALF ? 8 : 4;
    for (; m + MT <= M; m += MT)
      for (int64_t n = b0; n < b1; ++n) qgemm_tile<KIND, HALF, 1, MT>(w, x, m, n, y, ldy, buf);
    for (; m + 4 <= M; m += 4)
      for (int64_t n = b0; n < b1; ++n) qgemm_tile<KIND, HALF, 1, 4>(w, x, m, n, y, ldy, buf);    for (int64_t n = b0; n < b1; ++n) {
      switch (M - m) {
        case 1: qgemm_tile<KIND, HALF, 1, 1>(w, x, m, n, y, ldy, buf); break;
        case 2: qgemm_tile<KIND, HALF, 1, 2>(w, x, m, n, y, ldy, buf); break;
        case 3: qgemm_tile<KIND, HALF, 1, 3>(w, x, m, n, y, ldy, buf); break;
        default: break;
      }
    }
  }
}

template <int KIND>
void qgemm_rows_half(const QW& w, const QX& x, int64_t M, int64_t n0, int64_t n1, float* y,
                     int64_t ldy, float* buf) {
  if (w.half) {
    qgemm_rows_kind<KIND, true>(w, x, M, n0, n1, y, ldy, buf);
  } else {
    qgemm_rows_kind<KIND, false>(w, x, M, n0, n1, y, ldy, buf);
  }
}

// Rows [n0, n1) of y = x W^T (+ bias) for all M rows of the quantized x.
void qgemm_rows(const QW& w, const QX& x, int64_t M, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  const int64_t nb8 = (w.K / 32 + 7) / 8 * 8;
  // 4 rows of (scales, offsets) for whole blocks or both halves
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(16 * nb8 + 8));
  if (w.kind == kInt4) {
    qgemm_rows_half<kInt4>(w, x, M, n0, n1, y, ldy, buf.data());
  } else if (w.kind == kInt6) {
    qgemm_rows_half<kInt6>(w, x, M, n0, n1, y, ldy, buf.data());

  } else if (w.kind == kInt5) {
    qgemm_rows_half<kInt5>(w, x, M, n0, n1, y, ldy, buf.data());
  } else {
    qgemm_rows_half<kInt8>(w, x, M, n0, n1, y, ldy, buf.data());
  }
}

// --- the fused decode step -------------------------------------------------------------------

// What a model family changes in every layer, set from Python before the layers are added.
struct DecoderOptions {
  bool gelu_tanh = false;     // GeGLU with tanh gelu (Gemma) instead of SwiGLU
  double attn_scale = 0.0;    // the scores' scale; 0: head_dim^-1/2
  double attn_softcap = 0.0;  // scores become cap * tanh(s / cap) (Gemma 2); 0: none
};

// What one layer has beyond a Llama layer. Norm weights are what the row is multiplied by
// (Gemma's 1 + w already added).
struct LayerOptions {
  c10::optional<torch::Tensor> q_norm, k_norm;  // [head_dim]: each q/k head before RoPE
  c10::optional<torch::Tensor> attn_out_norm;   // [hidden]: the attention block's output
  c10::optional<torch::Tensor> mlp_out_norm;    // [hidden]: the MLP block's output
  int64_t window = 0;      // attend to the last `window` positions; 0: to all
  int64_t rope_table = 0;  // which of forward's RoPE tables rotates this layer's q and k
};

struct Layer {
  QW qkv, o, gate_up, down;
  const float* in_norm;
  const float* post_norm;  // on the residual stream before the MLP
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  const float* attn_out_norm = nullptr;
  const float* mlp_out_norm = nullptr;
  int64_t window = 0, rope_table = 0;
  float* k_cache;  // [num_blocks, block_size, Hkv, D]
  float* v_cache;
  std::vector<torch::Tensor> keep;  // owns what the pointers point into
};

inline void rmsnorm_row(const float* x, const float* w, float* out, int64_t H, float eps) {
  __m256 ss = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= H; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    ss = _mm256_fmadd_ps(v, v, ss);
  }
  float s = hsum(ss);
  for (; i < H; ++i) s += x[i] * x[i];
  const float r = 1.0f / std::sqrt(s / static_cast<float>(H) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= H; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv),
                                            _mm256_loadu_ps(w + i)));
  for (; i < H; ++i) out[i] = x[i] * r * w[i];
}

inline void add_row(float* acc, const float* v, int64_t H) {
  int64_t i = 0;
  for (; i + 8 <= H; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), _mm256_loadu_ps(v + i)));
  for (; i < H; ++i) acc[i] += v[i];
}

// x[D] rotated in place with the rotate-half layout: (cos, signed sin) rows of the table.
inline void rope_row(float* x, const float* cs, int64_t D) {
  const float* c = cs;
  const float* s = cs + D;
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * c[i] + b * s[i];
    x[i + h] = b * c[i + h] + a * s[i + h];
  }
}

// e^x for x <= 88 (softmax after subtracting the max; SiLU), 8 at a time: 2^n * e^r with
// r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 polynomial (relative error ~2e-7).
inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// out = silu(g) * u over n values, silu(g) = g / (1 + e^-g), 8 at a time: at 32 rows a
// step computes 1.5 million of these, which scalar expf made several percent of the step.
inline void silu_mul_row(const float* g, const float* u, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    // e^-g with -g clamped to 88 (e^-g beyond float range: silu is then 0 either way)
    const __m256 e = exp_neg(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv),
                                           _mm256_set1_ps(88.0f)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                            _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// out = gelu_tanh(g) * u over n values, 8 at a time, with torch's tanh approximation
// 0.5 g (1 + tanh(t)), t = sqrt(2/pi) (g + 0.044715 g^3), written as g / (1 + e^(-2t)) to
// share silu_mul_row's exp.
inline void gelu_tanh_mul_row(const float* g, const float* u, float* out, int64_t n) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 m2k = _mm256_set1_ps(-2.0f * k);
  const __m256 c = _mm256_set1_ps(0.044715f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(c, gv), _mm256_mul_ps(gv, gv), gv);
    // e^(-2t) with -2t clamped to 88 (beyond float range the product is 0 either way)
    const __m256 e = exp_neg(_mm256_min_ps(_mm256_mul_ps(m2k, inner), _mm256_set1_ps(88.0f)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                            _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i)
    out[i] = 0.5f * g[i] * (1.0f + std::tanh(k * (g[i] + 0.044715f * g[i] * g[i] * g[i]))) * u[i];
}

// One query (D floats) against keys [first, len) of one KV head of a sequence's paged
// cache: softmax(q k^T * scale) v into out, with the scaled scores soft-capped to
// softcap * tanh(s / softcap) when softcap > 0. Every query's result follows the same
// sequence of operations whatever else is computed, so a token's attention does not depend
// on how its sequence was chunked or batched. scores holds len - first + 8 floats.
void attend(const float* q, const int32_t* table, int64_t first, int64_t len,
            const float* kc, const float* vc, int64_t kv_stride, int64_t bs, int64_t D,
            float scale, float softcap, float* scores, float* out) {
  auto key = [&](const float* cache, int64_t j) {
    return cache + (static_cast<int64_t>(table[j / bs]) * bs + j % bs) * kv_stride;
  };
  // the module computes tanh(q.k * (scale / cap)) * cap
  const float capped_scale = softcap > 0.0f ? scale / softcap : scale;
  auto score = [&](__m256 acc) {
    const float s = hsum(acc) * capped_scale;
    return softcap > 0.0f ? std::tanh(s) * softcap : s;
  };
  const int64_t n = len - first;
  // scores, four keys at a time (four independent FMA chains)
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k0 = key(kc, first + j);
    const float* k1 = key(kc, first + j + 1);
    const float* k2 = key(kc, first + j + 2);
    const float* k3 = key(kc, first + j + 3);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
    }
    scores[j] = score(a0);
    scores[j + 1] = score(a1);
    scores[j + 2] = score(a2);
    scores[j + 3] = score(a3);
  }
  for (; j < n; ++j) {
    const float* k0 = key(kc, first + j);
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8)
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k0 + d), a0);
    scores[j] = score(a0);
  }
  // softmax
  __m256 mv = _mm256_set1_ps(-INFINITY);
  for (j = 0; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(scores + j));
  float mx = hmax(mv);
  for (; j < n; ++j) mx = std::max(mx, scores[j]);
  for (int64_t t = n; t < n + 8; ++t) scores[t] = -INFINITY;  // padding: e^-inf = 0
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 dv = _mm256_setzero_ps();
  for (j = 0; j < n; j += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(scores + j), mxv));
    const __m256 e0 = _mm256_blendv_ps(e, _mm256_setzero_ps(),
                                       _mm256_cmp_ps(_mm256_loadu_ps(scores + j),
                                                     _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
    _mm256_storeu_ps(scores + j, e0);
    dv = _mm256_add_ps(dv, e0);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / hsum(dv));
  // weighted sum of values, 64 dimensions at a time in registers
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int64_t nv = std::min<int64_t>(8, (D - d0) / 8);
    __m256 acc[8];
    for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
    if (nv == 8) {
      for (j = 0; j < n; ++j) {
        const float* v = key(vc, first + j) + d0;
        const __m256 p = _mm256_set1_ps(scores[j]);
        for (int t = 0; t < 8; ++t) acc[t] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * t), acc[t]);
      }
    } else {
      for (j = 0; j < n; ++j) {
        const float* v = key(vc, first + j) + d0;
        const __m256 p = _mm256_set1_ps(scores[j]);
        for (int64_t t = 0; t < nv; ++t)
          acc[t] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * t), acc[t]);
      }
    }
    for (int64_t t = 0; t < nv; ++t) _mm256_storeu_ps(out + d0 + 8 * t, _mm256_mul_ps(acc[t], inv));
  }
}

// One step's tokens and buffers, shared by every thread of the parallel region.
struct Step {
  int64_t B;  // tokens
  float* res;  // [B, hidden] residual stream
  float* h;    // [B, hidden] block input / output
  float* qkv;  // [B, (Hq + 2 Hkv) D]
  float* attn;  // [B, Hq D]
  float* gate_up;  // [B, 2 I]
  float* act;  // [B, I]
  QX *qx_h, *qx_a, *qx_i;
  const int64_t* pos;
  const int64_t* slots;
  const int64_t* token_seq;
  const int32_t* tables;  // [sequences, max_blocks]
  int64_t max_blocks;
  std::vector<const float*> rope;  // [positions, 2, D] tables
};

class Decoder {
 public:
  Decoder(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
          int64_t intermediate, double eps, int64_t block_size, const DecoderOptions& options)
      : H_(hidden), Hq_(num_heads), Hkv_(num_kv_heads), D_(head_dim), I_(intermediate),
        eps_(static_cast<float>(eps)), bs_(block_size), gelu_(options.gelu_tanh),
        scale_(options.attn_scale > 0 ? static_cast<float>(options.attn_scale)
                                      : 1.0f / std::sqrt(static_cast<float>(head_dim))),
        softcap_(static_cast<float>(options.attn_softcap)) {
    TORCH_CHECK(head_dim % 8 == 0 && hidden % 32 == 0 && intermediate % 32 == 0 &&
                num_heads % num_kv_heads == 0, "the fused step needs head_dim % 8 == 0 and "
                "hidden/intermediate sizes that are multiples of 32");
    TORCH_CHECK(options.attn_softcap >= 0, "the attention soft-cap must be >= 0");
  }

  // One layer's weights (int4: q, scale, offset; int8: q, scale, None), norms, caches and
  // what it has beyond a Llama layer.
  void add_layer(std::vector<c10::optional<torch::Tensor>> qkv,
                 std::vector<c10::optional<torch::Tensor>> o,
                 std::vector<c10::optional<torch::Tensor>> gate_up,
                 std::vector<c10::optional<torch::Tensor>> down, torch::Tensor in_norm,
                 torch::Tensor post_norm, torch::Tensor k_cache, torch::Tensor v_cache,
                 const LayerOptions& options) {
    Layer L;
    L.qkv = take(qkv, L.keep, (Hq_ + 2 * Hkv_) * D_, H_);
    L.o = take(o, L.keep, H_, Hq_ * D_);
    L.gate_up = take(gate_up, L.keep, 2 * I_, H_);
    L.down = take(down, L.keep, H_, I_);
    L.in_norm = norm_weight(in_norm, H_, L.keep);
    L.post_norm = norm_weight(post_norm, H_, L.keep);
    L.q_norm = optional_norm(options.q_norm, D_, L.keep);
    L.k_norm = optional_norm(options.k_norm, D_, L.keep);
    L.attn_out_norm = optional_norm(options.attn_out_norm, H_, L.keep);
    L.mlp_out_norm = optional_norm(options.mlp_out_norm, H_, L.keep);
    TORCH_CHECK(options.window >= 0 && options.rope_table >= 0,
                "a window and a RoPE table index are >= 0");
    L.window = options.window;
    L.rope_table = options.rope_table;
    for (auto* t : {&k_cache, &v_cache}) {
      TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->dim() == 4 &&
                  t->size(1) == bs_ && t->size(2) == Hkv_ && t->size(3) == D_,
                  "KV caches must be float32 [blocks, block_size, kv_heads, head_dim]");
    }
    L.k_cache = k_cache.data_ptr<float>();
    L.v_cache = v_cache.data_ptr<float>();
    L.keep.insert(L.keep.end(), {k_cache, v_cache});
    layers_.push_back(std::move(L));
  }

  // Hidden states [T, hidden] after the final norm (when set and every layer runs; else
  // before it, with the residual stream as a second output), of T tokens
  // that each attend to their sequence's cache up to their own position (decodes, and
  // drafts being verified): x [T, hidden] embeddings, positions [T], token_seq [T] (each
  // token's row of block_tables), slot_mapping [T], block_tables [B, max_blocks] int32,
  // rope tables, each [P, 2, D] (cos, signed sin), indexed by the layers' rope_table. The
  // step's K/V are all written before any token attends.
  std::vector<torch::Tensor> forward(torch::Tensor x, torch::Tensor positions,
                                     std::vector<torch::Tensor> rope_tables,
                                     torch::Tensor slot_mapping, torch::Tensor block_tables,
                                     torch::Tensor token_seq, int64_t num_layers) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) == H_ &&
                x.is_contiguous(), "x must be contiguous float32 [T, hidden]");
    const int64_t B = x.size(0);  // tokens
    const int64_t nl = num_layers < 0 ? static_cast<int64_t>(layers_.size())
                                      : std::min<int64_t>(num_layers, layers_.size());
    TORCH_CHECK(positions.numel() == B && slot_mapping.numel() == B && token_seq.numel() == B,
                "one position, slot and sequence per token");
    auto pos = positions.to(torch::kInt64).contiguous();
    auto slots = slot_mapping.to(torch::kInt64).contiguous();
    auto tables = block_tables.to(torch::kInt32).contiguous();
    auto tseq = token_seq.to(torch::kInt64).contiguous();
    Step s;
    s.B = B;
    s.pos = pos.data_ptr<int64_t>();
    s.slots = slots.data_ptr<int64_t>();
    s.token_seq = tseq.data_ptr<int64_t>();
    s.tables = tables.data_ptr<int32_t>();
    s.max_blocks = tables.size(1);
    int64_t min_rope_len = INT64_MAX;
    for (auto& t : rope_tables) {
      t = t.contiguous();
      TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.dim() == 3 && t.size(1) == 2 &&
                  t.size(2) == D_, "rope tables must be float32 [positions, 2, head_dim]");
      s.rope.push_back(t.data_ptr<float>());
      min_rope_len = std::min(min_rope_len, t.size(0));
    }
    for (int64_t l = 0; l < nl; ++l)
      TORCH_CHECK(layers_[l].rope_table < static_cast<int64_t>(rope_tables.size()),
                  "layer ", l, " rotates with rope table ", layers_[l].rope_table, " of ",
                  rope_tables.size());
    int64_t max_len = 1;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(s.pos[b] >= 0 && s.pos[b] < min_rope_len, "position out of the rope table");
      TORCH_CHECK(s.token_seq[b] >= 0 && s.token_seq[b] < tables.size(0),
                  "token_seq out of range");
      TORCH_CHECK(s.pos[b] < s.max_blocks * bs_, "position beyond the block table");
      max_len = std::max(max_len, s.pos[b] + 1);
    }

    auto residual = x.clone();
    auto h = torch::empty({B, H_}, x.options());
    auto qkv = torch::empty({B, qkv_n()}, x.options());
    auto attn = torch::empty({B, Hq_ * D_}, x.options());
    auto gu = torch::empty({B, 2 * I_}, x.options());
    auto act = torch::empty({B, I_}, x.options());
    QX qx_h, qx_a, qx_i;
    qx_h.resize(B, H_);
    qx_a.resize(B, Hq_ * D_);
    qx_i.resize(B, I_);
    s.res = residual.data_ptr<float>();
    s.h = h.data_ptr<float>();
    s.qkv = qkv.data_ptr<float>();
    s.attn = attn.data_ptr<float>();
    s.gate_up = gu.data_ptr<float>();
    s.act = act.data_ptr<float>();
    s.qx_h = &qx_h;
    s.qx_a = &qx_a;
    s.qx_i = &qx_i;
    const bool finish = final_norm_.defined() && nl == static_cast<int64_t>(layers_.size());
    const int nt = std::max(1, at::get_num_threads());

#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      std::vector<float> scores(static_cast<size_t>(max_len) + 16);
      for (int64_t l = 0; l < nl; ++l) {
        const Layer& L = layers_[l];
        // residual += the previous layer's (normed) MLP output; h = norm(residual)
        residual_norm(s, l > 0 ? layers_[l - 1].mlp_out_norm : nullptr, l > 0, L.in_norm,
                      tid, nth);
#pragma omp barrier
        attention_block(L, s, scores.data(), tid, nth);
        residual_norm(s, L.attn_out_norm, true, L.post_norm, tid, nth);
#pragma omp barrier
        mlp_block(L, s, tid, nth);
      }
      // h = the last MLP's output as the layers give it (normed where the layer norms it)
      const float* last_out_norm = nl > 0 ? layers_[nl - 1].mlp_out_norm : nullptr;
      int64_t lo, hi;
      split(B, tid, nth, 1, lo, hi);
      for (int64_t b = lo; b < hi; ++b) {
        float* hb = s.h + b * H_;
        if (last_out_norm != nullptr) rmsnorm_row(hb, last_out_norm, hb, H_, eps_);
        if (finish) {
          add_row(s.res + b * H_, hb, H_);
          rmsnorm_row(s.res + b * H_, final_norm_.data_ptr<float>(), hb, H_, eps_);
        }
      }
    }
    if (finish) return {h};
    return {h, residual};
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // The final norm's weight: forward then returns norm(h + residual) alone.
  void set_final_norm(torch::Tensor w) {
    std::vector<torch::Tensor> keep;
    norm_weight(w, H_, keep);
    final_norm_ = w;
  }

 private:
  int64_t qkv_n() const { return (Hq_ + 2 * Hkv_) * D_; }

  // This thread's rows of: h = out_norm(h) (when given: the block's output norm);
  // residual += h (when `add`); h = norm(residual); quantize h.
  void residual_norm(const Step& s, const float* out_norm, bool add, const float* norm,
                     int tid, int nth) const {
    int64_t lo, hi;
    split(s.B, tid, nth, 1, lo, hi);
    for (int64_t b = lo; b < hi; ++b) {
      float* hb = s.h + b * H_;
      float* rb = s.res + b * H_;
      if (out_norm != nullptr) rmsnorm_row(hb, out_norm, hb, H_, eps_);
      if (add) add_row(rb, hb, H_);
      rmsnorm_row(rb, norm, hb, H_, eps_);
      quantize_row(hb, *s.qx_h, b);
    }
  }

  // qkv projection of the quantized h, q/k head norms, RoPE, the K/V write, attention and
  // the output projection into h. Ends at a barrier.
  void attention_block(const Layer& L, const Step& s, float* scores, int tid, int nth) const {
    const int64_t n = qkv_n(), group = Hq_ / Hkv_;
    int64_t lo, hi;
    split(n, tid, nth, 8, lo, hi);
    qgemm_rows(L.qkv, *s.qx_h, s.B, lo, hi, s.qkv, n);
#pragma omp barrier
    split(s.B, tid, nth, 1, lo, hi);
    for (int64_t b = lo; b < hi; ++b) rotate_and_store(L, s, b);
#pragma omp barrier
    // one (token, query head) per work item
    split(s.B * Hq_, tid, nth, 1, lo, hi);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t b = it / Hq_, hq = it % Hq_, g = hq / group;
      const int64_t len = s.pos[b] + 1;
      const int64_t first = L.window > 0 ? std::max<int64_t>(0, len - L.window) : 0;
      attend(s.qkv + b * n + hq * D_, s.tables + s.token_seq[b] * s.max_blocks, first, len,
             L.k_cache + g * D_, L.v_cache + g * D_, Hkv_ * D_, bs_, D_, scale_, softcap_,
             scores, s.attn + (b * Hq_ + hq) * D_);
    }
#pragma omp barrier
    split(s.B, tid, nth, 1, lo, hi);
    for (int64_t b = lo; b < hi; ++b) quantize_row(s.attn + b * Hq_ * D_, *s.qx_a, b);
#pragma omp barrier
    split(H_, tid, nth, 8, lo, hi);
    qgemm_rows(L.o, *s.qx_a, s.B, lo, hi, s.h, H_);
#pragma omp barrier
  }

  // Token b's q and k heads normed (when the layer norms them) and rotated; its K/V
  // written to its cache slot.
  void rotate_and_store(const Layer& L, const Step& s, int64_t b) const {
    float* row = s.qkv + b * qkv_n();
    for (int64_t hh = 0; hh < Hq_ + Hkv_; ++hh) {
      const float* w = hh < Hq_ ? L.q_norm : L.k_norm;
      if (w != nullptr) rmsnorm_row(row + hh * D_, w, row + hh * D_, D_, eps_);
    }
    const float* cs = s.rope[L.rope_table] + s.pos[b] * 2 * D_;
    for (int64_t hh = 0; hh < Hq_ + Hkv_; ++hh) rope_row(row + hh * D_, cs, D_);
    const int64_t at = s.slots[b] * Hkv_ * D_;
    std::memcpy(L.k_cache + at, row + Hq_ * D_, sizeof(float) * Hkv_ * D_);
    std::memcpy(L.v_cache + at, row + (Hq_ + Hkv_) * D_, sizeof(float) * Hkv_ * D_);
  }

  // The gated MLP of the quantized h: gate_up, act(gate) * up, down into h. Ends at a
  // barrier.
  void mlp_block(const Layer& L, const Step& s, int tid, int nth) const {
    int64_t lo, hi;
    split(2 * I_, tid, nth, 8, lo, hi);
    qgemm_rows(L.gate_up, *s.qx_h, s.B, lo, hi, s.gate_up, 2 * I_);
#pragma omp barrier
    split(s.B, tid, nth, 1, lo, hi);
    for (int64_t b = lo; b < hi; ++b) {
      const float* g = s.gate_up + b * 2 * I_;
      float* a = s.act + b * I_;
      if (gelu_) {
        gelu_tanh_mul_row(g, g + I_, a, I_);
      } else {
        silu_mul_row(g, g + I_, a, I_);
      }
      quantize_row(a, *s.qx_i, b);
    }
#pragma omp barrier
    split(H_, tid, nth, 8, lo, hi);
    qgemm_rows(L.down, *s.qx_i, s.B, lo, hi, s.h, H_);
#pragma omp barrier
  }

  static const float* norm_weight(const torch::Tensor& t, int64_t n,
                                  std::vector<torch::Tensor>& keep) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == n,
                "a norm weight must be contiguous float32 [", n, "]");
    keep.push_back(t);
    return t.data_ptr<float>();
  }

  static const float* optional_norm(const c10::optional<torch::Tensor>& t, int64_t n,
                                    std::vector<torch::Tensor>& keep) {
    return t.has_value() ? norm_weight(*t, n, keep) : nullptr;
  }

  static QW take(const std::vector<c10::optional<torch::Tensor>>& t, std::vector<torch::Tensor>& keep,
                 int64_t N, int64_t K) {
    TORCH_CHECK(t.size() >= 5 && t.size() <= 8, "a weight is (q, scale, offset or None, bias "
                "or None, group size as a tensor[, kind as a tensor[, the scale's and the "
                "offset's super-block factors or None]])");
    TORCH_CHECK(t[0].has_value() && t[1].has_value() && t[4].has_value(),
                "a weight needs q, scale and group size");
    const int kind = infer_kind(*t[0], t.size() >= 6 && t[5].has_value() ? t[5]->item<int64_t>()
                                                                        : -1);
    const c10::optional<torch::Tensor> none;
    QW w = make_qw(kind, *t[0], *t[1], t[2], t[3], t[4]->item<int64_t>(),
                   t.size() >= 7 ? t[6] : none, t.size() >= 8 ? t[7] : none);
    TORCH_CHECK(w.N == N && w.K == K, "weight shape [", w.N, ", ", w.K, "], expected [", N,
                ", ", K, "]");
    for (size_t i = 0; i < t.size(); ++i)
      if (i != 4 && i != 5 && t[i].has_value()) keep.push_back(*t[i]);
    return w;
  }

  int64_t H_, Hq_, Hkv_, D_, I_;
  float eps_;
  int64_t bs_;
  bool gelu_;
  float scale_, softcap_;
  std::vector<Layer> layers_;
  torch::Tensor final_norm_;
};

// y = x W^T (+ bias) for a float32 x [M, K] and a quantized W, parallel over W's rows.
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                        c10::optional<torch::Tensor> offset, c10::optional<torch::Tensor> bias,
                        int64_t G, int64_t kind_arg, c10::optional<torch::Tensor> scale_sup,
                        c10::optional<torch::Tensor> offset_sup) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be float32 [M, K]");
  const int kind = infer_kind(q, kind_arg);
  const QW w = make_qw(kind, q, scale, offset, bias, G, scale_sup, offset_sup);
  TORCH_CHECK(x.size(1) == w.K, "x and the weight disagree on K");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0);
  auto y = torch::empty({M, w.N}, xc.options());
  QX qx;
  qx.resize(M, w.K);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int nt = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t lo, hi;
    split(M, tid, nth, 1, lo, hi);
    for (int64_t m = lo; m < hi; ++m) quantize_row(xp + m * w.K, qx, m);
#pragma omp barrier
    split(w.N, tid, nth, 8, lo, hi);
    qgemm_rows(w, qx, M, lo, hi, yp, w.N);
  }
  return y;
}

// The index of the first maximum of v[0, n) (a greedy row's token), 8 lanes at a time; -1
// when v holds a NaN (the caller then asks torch, which ranks NaN highest).
int64_t argmax_row(const float* v, int64_t n) {
  if (n == 0) return -1;
  __m256 best = _mm256_set1_ps(-INFINITY);
  __m256i at = _mm256_set1_epi32(0), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 nan = _mm256_setzero_ps();
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m256 gt = _mm256_cmp_ps(x, best, _CMP_GT_OQ);  // strictly: each lane keeps its first
    best = _mm256_blendv_ps(best, x, gt);
    at = _mm256_blendv_epi8(at, idx, _mm256_castps_si256(gt));
    idx = _mm256_add_epi32(idx, eight);
  }
  if (_mm256_movemask_ps(nan)) return -1;
  alignas(32) float bv[8];
  alignas(32) int32_t bi[8];
  _mm256_store_ps(bv, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bi), at);
  int64_t arg = -1;
  float top = -INFINITY;
  for (int l = 0; l < 8; ++l) {  // the lanes' maxima: the larger, or the earlier on a tie
    if (i == 0) break;
    if (arg < 0 || bv[l] > top || (bv[l] == top && bi[l] < arg)) {
      top = bv[l];
      arg = bi[l];
    }
  }
  for (; i < n; ++i) {
    if (std::isnan(v[i])) return -1;
    if (arg < 0 || v[i] > top) {
      top = v[i];
      arg = i;
    }
  }
  return arg;
}

// torch.argmax(logits, dim=-1) for float32 logits [B, V]: the first maximum of each row,
// rows in parallel (torch's own CPU argmax took about 1 ms for 32 rows of a 49k vocabulary,
// a step's sampler time), or over the vocabulary in pieces when there are fewer rows than
// threads.
torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32,
              "logits must be float32 [B, V]");
  auto x = logits.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0, "an empty vocabulary has no argmax");
  auto out = torch::empty({B}, torch::kInt64);
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int nt = std::max(1, at::get_num_threads());
  bool nan = false;
  if (B >= nt || nt == 1) {
#pragma omp parallel for num_threads(nt) reduction(|| : nan)
    for (int64_t b = 0; b < B; ++b) {
      op[b] = argmax_row(xp + b * V, V);
      nan = nan || op[b] < 0;
    }
  } else {
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int64_t> arg(nt, -1);
#pragma omp parallel num_threads(nt)
      {
        int64_t lo, hi;
        split(V, omp_get_thread_num(), omp_get_num_threads(), 8, lo, hi);
        if (lo < hi) {
          const int64_t a = argmax_row(xp + b * V + lo, hi - lo);
          arg[omp_get_thread_num()] = a < 0 ? -2 : lo + a;
        }
      }
      int64_t best = -1;
      for (int64_t a : arg) {
        if (a == -2) nan = true;
        if (a >= 0 && (best < 0 || xp[b * V + a] > xp[b * V + best])) best = a;
      }
      op[b] = best;
    }
  }
  if (nan) return logits.argmax(-1);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while these run (they touch no Python object): the server's event
  // loop streams the last step's tokens while the engine thread computes the next step.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("argmax_rows", &argmax_rows, "torch.argmax(logits, -1) of float32 logits [B, V]",
        no_gil);
  m.def("q8_linear", &q8_linear, "y = x W^T (+ b): W int4 (q uint8 packed, scale, offset), "
        "int6 (q uint8 < 64, scale, offset; kind=2), int5 (nibbles then fifth bits; kind=3) or int8 (q int8, scale f32, offset or "
        "None), x quantized to int8 per 32 values",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("offset") = py::none(),
        py::arg("bias") = py::none(), py::arg("group_size") = 32, py::arg("kind") = -1,
        py::arg("scale_super") = py::none(), py::arg("offset_super") = py::none(), no_gil);
  py::class_<DecoderOptions>(m, "DecoderOptions")
      .def(py::init<>())
      .def_readwrite("gelu_tanh", &DecoderOptions::gelu_tanh)
      .def_readwrite("attn_scale", &DecoderOptions::attn_scale)
      .def_readwrite("attn_softcap", &DecoderOptions::attn_softcap);
  py::class_<LayerOptions>(m, "LayerOptions")
      .def(py::init<>())
      .def_readwrite("q_norm", &LayerOptions::q_norm)
      .def_readwrite("k_norm", &LayerOptions::k_norm)
      .def_readwrite("attn_out_norm", &LayerOptions::attn_out_norm)
      .def_readwrite("mlp_out_norm", &LayerOptions::mlp_out_norm)
      .def_readwrite("window", &LayerOptions::window)
      .def_readwrite("rope_table", &LayerOptions::rope_table);
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t,
                    const DecoderOptions&>())
      .def("add_layer", &Decoder::add_layer)
      .def("forward", &Decoder::forward, no_gil)
      .def("num_layers", &Decoder::num_layers)
      .def("set_final_norm", &Decoder::set_final_norm);
}
