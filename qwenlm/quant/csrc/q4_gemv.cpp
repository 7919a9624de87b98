// CPU decoding with 4-, 5- or 8-bit weights (AVX2 + FMA + F16C): a matrix-vector kernel, and one whole
// transformer block of a decode step in a single call (no per-op framework overhead).
//
// Weights: per output row, blocks of 32 input columns, each with an fp16 scale d and fp16 offset m:
// w = d * q + m. 4 bits: 16 bytes of codes 0..15 per block (byte j holds code j in its low nibble and
// code j+16 in its high nibble). 5 bits: blocks in pairs of 40 bytes, the two blocks' low four bits
// as 4-bit blocks have them, then their fifth bits (see pair_dot). 8 bits: 32 signed bytes, codes
// -128..127. Activations are quantized
// per block of 32 to int8 (-127..127) with one fp32 scale s:  x = s * xq.  Then a block's dot product
// is  d*s*sum(q*xq) + m*s*sum(xq).
// The ops are registered with the dispatcher (torch.ops.qwenlm_q4.*) and include only the ATen headers
// they use: torch/extension.h (pybind11 and the whole C++ API) took ~30 s of a ~35 s build.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// Activations of M rows, quantized: xq (M, K) int8, xs (M, K/32) scales, ms = s * sum(xq) per block
struct QuantRows {
  std::vector<int8_t> xq;
  std::vector<float> xs, ms;
  void quantize(const float* x, int64_t M, int64_t K) {
    const int64_t nb = K / 32;
    xq.resize(M * K);
    xs.resize(M * nb);
    ms.resize(M * nb);
    for (int64_t r = 0; r < M; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        const float* p = x + r * K + b * 32;
        float amax = 0.f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(p[j]));
        const float s = amax / 127.f, inv = s > 0.f ? 1.f / s : 0.f;
        int32_t sum = 0;
        for (int j = 0; j < 32; ++j) {
          int v = (int)std::nearbyint(p[j] * inv);
          xq[r * K + b * 32 + j] = (int8_t)v;
          sum += v;
        }
        xs[r * nb + b] = s;
        ms[r * nb + b] = s * (float)sum;
      }
    }
  }
};

// One weight matrix: codes (N, K/32, 16) uint8 (4 bits), (N, K/64, 40) uint8 (5 bits) or
// (N, K/32, 32) int8 (8 bits); d and m (N, K/32) fp16
struct QWeight {
  const uint8_t* codes;
  const uint16_t* d;
  const uint16_t* m;
  int64_t N, K, bits;
  QWeight(const at::Tensor& c, const at::Tensor& dd, const at::Tensor& mm) {
    TORCH_CHECK(c.is_contiguous() && c.dim() == 3 &&
                ((c.dtype() == at::kByte && (c.size(2) == 16 || c.size(2) == 40)) ||
                 (c.dtype() == at::kChar && c.size(2) == 32)),
                "codes must be contiguous (N, K/32, 16) uint8, (N, K/64, 40) uint8 or (N, K/32, 32) int8");
    bits = c.size(2) == 16 ? 4 : c.size(2) == 40 ? 5 : 8;
    TORCH_CHECK(dd.dtype() == at::kHalf && mm.dtype() == at::kHalf && dd.is_contiguous() &&
                mm.is_contiguous() && dd.numel() == c.size(0) * c.size(1) * (bits == 5 ? 2 : 1) &&
                mm.numel() == dd.numel(), "d and m must be contiguous (N, K/32) float16");
    codes = static_cast<const uint8_t*>(c.data_ptr());
    d = reinterpret_cast<const uint16_t*>(dd.data_ptr<at::Half>());
    m = reinterpret_cast<const uint16_t*>(mm.data_ptr<at::Half>());
    N = c.size(0);
    K = c.size(1) * (bits == 5 ? 64 : 32);
  }
};

// sum(q * a) over one block of 32, as eight int32 lanes, from 32 unsigned codes (4 or 5 bits)
inline __m256i unsigned_dot(__m256i q, const int8_t* a_ptr) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a_ptr));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), _mm256_set1_epi16(1));
}

// 16 bytes of nibbles (byte j: code j low, code j+16 high) -> 32 bytes, byte j = code j
inline __m256i nibbles(const uint8_t* c) {
  const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p, 4), p), _mm256_set1_epi8(0x0F));
}

// sum(q * a) over one block of 32 (4 or 8 bits; 5-bit blocks go by pairs, pair_dot), as eight int32
// lanes: 4-bit codes (16 bytes at c) are unsigned, so maddubs takes them as they are; 8-bit codes (32 bytes) are signed: maddubs(|q|, a * sign(q)), whose
// pair sums (at most 2 * 128 * 127) cannot saturate
template <int BITS>
inline __m256i block_dot(const uint8_t* c, const int8_t* a_ptr) {
  if (BITS == 4) return unsigned_dot(nibbles(c), a_ptr);
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a_ptr));
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(a, q)), _mm256_set1_epi16(1));
}

// The two blocks' codes of a 40-byte 5-bit pair (see pair_dot), one byte per code
inline void pair_codes(const uint8_t* c, __m256i& q0, __m256i& q1) {
  long long word;
  std::memcpy(&word, c + 32, 8);
  const __m256i w = _mm256_set1_epi64x(word), bit4 = _mm256_set1_epi8(0x10);
  q0 = _mm256_or_si256(nibbles(c), _mm256_and_si256(_mm256_srlv_epi64(w, _mm256_setr_epi64x(0, 1, 2, 3)), bit4));
  q1 = _mm256_or_si256(nibbles(c + 16), _mm256_and_si256(_mm256_sllv_epi64(w, _mm256_setr_epi64x(4, 3, 2, 1)), bit4));
}

// Two consecutive blocks' dots. 4 and 8 bits: block_dot twice (the second block BITS*4 bytes on). 5 bits:
// a pair of blocks is 40 bytes, the nibbles of each (16 + 16), then a 64-bit word w whose byte i holds
// the fifth bits of codes i, 8+i, 16+i, 24+i of the first block in bits 4..7 and of the second block in
// bits 0..3. Shifting w, broadcast to four 64-bit lanes, right by 0..3 (first block) or left by 4..1
// (second) brings the fifth bit of code 8*lane+i to bit 4 of byte i of its lane: one shift and one mask
// per block spread the 32 bits to 32 bytes.
template <int BITS>
inline void pair_dot(const uint8_t* c, const int8_t* a_ptr, __m256i& d0, __m256i& d1) {
  if (BITS != 5) {
    d0 = block_dot<BITS>(c, a_ptr);
    d1 = block_dot<BITS>(c + BITS * 4, a_ptr + 32);
    return;
  }
  __m256i q0, q1;
  pair_codes(c, q0, q1);
  d0 = unsigned_dot(q0, a_ptr);
  d1 = unsigned_dot(q1, a_ptr + 32);
}

// The codes of two consecutive blocks (a 5-bit pair, or two 4- or 8-bit blocks), one byte per code
template <int BITS>
inline void load_pair(const uint8_t* c, __m256i& q0, __m256i& q1) {
  if (BITS == 4) {
    q0 = nibbles(c);
    q1 = nibbles(c + 16);
  } else if (BITS == 5) {
    pair_codes(c, q0, q1);
  } else {
    q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
    q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32));
  }
}

// sum(q * a) over one block of 32 codes already loaded (load_pair), as eight int32 lanes
template <int BITS>
inline __m256i codes_dot(__m256i q, const int8_t* a_ptr) {
  if (BITS != 8) return unsigned_dot(q, a_ptr);
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a_ptr));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(a, q)), _mm256_set1_epi16(1));
}

// Output column n of R consecutive activation rows r0..r0+R-1: each block's codes are unpacked once
// for the R rows. Every row goes through the same float operations in the same order whatever R is,
// so a row's result does not depend on the rows computed beside it (the serving engine relies on it).
template <int BITS, int R>
inline void rows_dot(const QuantRows& q, int64_t r0, const QWeight& W, int64_t n, const float* bias, float* Y) {
  constexpr int64_t BB = BITS * 4;  // bytes of codes per block: 16, 20 or 32
  const int64_t K = W.K, N = W.N, nb = K / 32;
  const uint8_t* Cn = W.codes + n * nb * BB;
  const uint16_t* Dn = W.d + n * nb;
  const uint16_t* Mn = W.m + n * nb;
  const int8_t* XQ = q.xq.data() + r0 * K;
  const float* XS = q.xs.data() + r0 * nb;
  const float* MS = q.ms.data() + r0 * nb;
  __m256 acc0[R], acc1[R], accm[R];
  for (int i = 0; i < R; ++i) acc0[i] = acc1[i] = accm[i] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    // eight blocks' scales at once: d*s, and the minimum term m * s * sum(xq)
    alignas(32) float ds[R][8];
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Dn + b)));
    const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Mn + b)));
    for (int i = 0; i < R; ++i) {
      _mm256_store_ps(ds[i], _mm256_mul_ps(dv, _mm256_loadu_ps(XS + i * nb + b)));
      accm[i] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(MS + i * nb + b), accm[i]);
    }
    for (int j = 0; j < 8; j += 2) {
      __m256i q0, q1;
      load_pair<BITS>(Cn + (b + j) * BB, q0, q1);
      for (int i = 0; i < R; ++i) {
        const int8_t* a = XQ + i * K + (b + j) * 32;
        const __m256i i0 = codes_dot<BITS>(q0, a), i1 = codes_dot<BITS>(q1, a + 32);
        acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_set1_ps(ds[i][j]), acc0[i]);
        acc1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_set1_ps(ds[i][j + 1]), acc1[i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    const int8_t* XQr = XQ + i * K;
    const float* XSr = XS + i * nb;
    const float* MSr = MS + i * nb;
    float tail = 0.f;
    for (int64_t t = b; t < nb; t += (BITS == 5 ? 2 : 1)) {  // the last nb % 8 blocks (5 bits: nb is even, in pairs)
      __m256i i0, i1;
      if (BITS == 5)
        pair_dot<BITS>(Cn + t * BB, XQr + t * 32, i0, i1);
      else
        i0 = block_dot<BITS>(Cn + t * BB, XQr + t * 32);
      acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_set1_ps(_cvtsh_ss(Dn[t]) * XSr[t]), acc0[i]);
      tail += _cvtsh_ss(Mn[t]) * MSr[t];
      if (BITS == 5) {
        acc1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_set1_ps(_cvtsh_ss(Dn[t + 1]) * XSr[t + 1]), acc1[i]);
        tail += _cvtsh_ss(Mn[t + 1]) * MSr[t + 1];
      }
    }
    Y[(r0 + i) * N + n] = hsum(_mm256_add_ps(acc0[i], acc1[i])) + hsum(accm[i]) + tail + (bias ? bias[n] : 0.f);
  }
}

// y (M, N) = x (M, K) @ W.T (+ bias), x already quantized into q; rows two at a time (four spill
// registers and lose on 8-bit codes)
template <int BITS>
void gemv_bits(const QuantRows& q, int64_t M, const QWeight& W, const float* bias, float* Y) {
  const int64_t N = W.N;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t n = 0; n < N; ++n) {
    int64_t r = 0;
    for (; r + 2 <= M; r += 2) rows_dot<BITS, 2>(q, r, W, n, bias, Y);
    if (r < M) rows_dot<BITS, 1>(q, r, W, n, bias, Y);
  }
}

void gemv(const QuantRows& q, int64_t M, const QWeight& W, const float* bias, float* Y) {
  if (W.bits == 4)
    gemv_bits<4>(q, M, W, bias, Y);
  else if (W.bits == 5)
    gemv_bits<5>(q, M, W, bias, Y);
  else
    gemv_bits<8>(q, M, W, bias, Y);
}

// out (M, K) = rmsnorm(x) * w, normalised in fp32
void rms_norm(const float* x, const float* w, int64_t M, int64_t K, double eps, float* out) {
  for (int64_t r = 0; r < M; ++r) {
    double ss = 0.0;
    for (int64_t j = 0; j < K; ++j) ss += (double)x[r * K + j] * x[r * K + j];
    const float inv = 1.f / std::sqrt((float)(ss / K) + (float)eps);
    for (int64_t j = 0; j < K; ++j) out[r * K + j] = x[r * K + j] * inv * w[j];
  }
}

// rotate-half rotary embedding of one head vector in place
inline void rotate(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

// One layer's keys or values, (B, Hkv, S, D): float32, or uint8 codes with an fp16 scale and low
// per (B, Hkv, S) slot (x ~ q * scale + low; engine/cache.py quantize_kv is the same arithmetic).
struct KVView {
  float* f = nullptr;
  uint8_t* q = nullptr;
  at::Half* scale = nullptr;
  at::Half* low = nullptr;
  const float* center = nullptr;  // keys: (B, Hkv, D) subtracted before quantizing (or null)
  int64_t S = 0, D = 0;

  KVView(at::Tensor t, at::Tensor sc, at::Tensor lo, at::Tensor c = at::Tensor()) {
    TORCH_CHECK(t.is_contiguous() && t.dim() == 4, "kv cache: contiguous (B, Hkv, S, D)");
    S = t.size(2);
    D = t.size(3);
    if (t.dtype() == at::kFloat) {
      f = t.data_ptr<float>();
    } else {
      TORCH_CHECK(t.dtype() == at::kByte && sc.dtype() == at::kHalf && lo.dtype() == at::kHalf &&
                  sc.is_contiguous() && lo.is_contiguous() && sc.numel() * D == t.numel() && lo.numel() == sc.numel(),
                  "kv cache: float32, or uint8 with fp16 (B, Hkv, S) scales and lows");
      q = t.data_ptr<uint8_t>();
      scale = sc.data_ptr<at::Half>();
      low = lo.data_ptr<at::Half>();
      if (c.defined()) {
        TORCH_CHECK(c.dtype() == at::kFloat && c.is_contiguous() && c.numel() * S == sc.numel() * D,
                    "kv cache: key centers must be contiguous (B, Hkv, D) float32");
        center = c.data_ptr<float>();
      }
    }
  }
  // slot index of (row-and-head bh, position j)
  int64_t at(int64_t bh, int64_t j) const { return bh * S + j; }

  void write(int64_t bh, int64_t j, const float* x_in) {
    const int64_t o = at(bh, j);
    if (f) {
      std::memcpy(f + o * D, x_in, D * sizeof(float));
      return;
    }
    std::vector<float> xc;
    const float* x = x_in;
    if (center) {
      xc.resize(D);
      for (int64_t i = 0; i < D; ++i) xc[i] = x_in[i] - center[bh * D + i];
      x = xc.data();
    }
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < D; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    lo = std::min(std::max(lo, -65504.f), 65504.f);
    hi = std::min(std::max(hi, -65504.f), 65504.f);
    const at::Half sc16((hi - lo) / 255.f), lo16(lo);
    scale[o] = sc16;
    low[o] = lo16;
    float sc = static_cast<float>(sc16);
    if (!(sc > 0.f)) sc = 1.f;
    const float l = static_cast<float>(lo16);
    uint8_t* dst = q + o * D;
    for (int64_t i = 0; i < D; ++i)
      dst[i] = (uint8_t)std::min(255.f, std::max(0.f, std::nearbyint((x[i] - l) / sc)));
  }

  // dot(x, stored vector); sum_x = sum of x (used by the uint8 form: sc * dot(x, q) + low * sum(x))
  float dot(int64_t bh, int64_t j, const float* x, float sum_x) const {
    const int64_t o = at(bh, j);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    float s = 0.f;
    if (f) {
      const float* k = f + o * D;
      for (; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(k + i), acc);
      s = hsum(acc);
      for (; i < D; ++i) s += x[i] * k[i];
      return s;
    }
    const uint8_t* k = q + o * D;
    for (; i + 8 <= D; i += 8) {
      const __m256 kv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(k + i))));
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), kv, acc);
    }
    s = hsum(acc);
    for (; i < D; ++i) s += x[i] * k[i];
    return static_cast<float>(scale[o]) * s + static_cast<float>(low[o]) * sum_x;
  }

  // out += e * stored vector
  void axpy(int64_t bh, int64_t j, float e, float* out) const {
    const int64_t o = at(bh, j);
    if (f) {
      const float* v = f + o * D;
      for (int64_t i = 0; i < D; ++i) out[i] += e * v[i];
      return;
    }
    const uint8_t* v = q + o * D;
    const float a = e * static_cast<float>(scale[o]), b = e * static_cast<float>(low[o]);
    for (int64_t i = 0; i < D; ++i) out[i] += a * v[i] + b;
  }
};

}  // namespace

// x (M, K) float32; codes (N, K/32, 16) uint8 or (N, K/32, 32) int8; d, m (N, K/32) float16 -> y (M, N) float32
at::Tensor q4_gemv(at::Tensor x, at::Tensor codes, at::Tensor d, at::Tensor m) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x: contiguous (M, K) float32");
  QWeight W(codes, d, m);
  const int64_t M = x.size(0);
  TORCH_CHECK(x.size(1) == W.K, "x has ", x.size(1), " columns, the weight ", W.K);
  QuantRows q;
  q.quantize(x.data_ptr<float>(), M, W.K);
  auto y = at::empty({M, W.N}, at::kFloat);
  gemv(q, M, W, nullptr, y.data_ptr<float>());
  return y;
}

// One decoder block of a decode step for B rows, one new token each, updating h (B, H) in place:
//   h += o(attention(rotary(qkv(rmsnorm1(h)))))   (the new k/v written at slot[b] of the cache)
//   h += down(silu(gate) * up)  with [gate; up] = gu(rmsnorm2(h))
// w: {ln1, qkv codes, d, m, qkv bias (or empty), o codes, d, m, ln2, gu codes, d, m, down codes, d, m}
// cos/sin (B, D); logn (B) or empty; kv: this layer's {k, v, k scale, k low, v scale, v low, k center},
// k/v (B, Hkv, S, D) float32 (the rest empty) or uint8 (scales (B, Hkv, S) fp16, centers (B, Hkv, D)
// fp32: keys are stored minus their row's center, which attention's softmax does not see); slot (B) int64;
// valid (B, S) bool: the slots row b attends to, among the first L.
void decode_block(at::Tensor h, std::vector<at::Tensor> w, double eps, at::Tensor cos,
                  at::Tensor sin, at::Tensor logn, std::vector<at::Tensor> kv,
                  at::Tensor slot, at::Tensor valid, int64_t L, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(w.size() == 15, "decode_block: 15 weight tensors expected");
  TORCH_CHECK(kv.size() == 7, "decode_block: 7 kv cache tensors expected");
  TORCH_CHECK(h.dtype() == at::kFloat && h.is_contiguous() && h.dim() == 2, "h: contiguous (B, H) float32");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && valid.is_contiguous() && slot.is_contiguous(),
              "tables must be contiguous");
  KVView K_(kv[0], kv[2], kv[3], kv[6]), V_(kv[1], kv[4], kv[5]);
  const int64_t B = h.size(0), H = h.size(1), S = K_.S, D = K_.D;
  TORCH_CHECK(kv[0].size(0) == B && kv[0].size(1) == kv_heads && heads % kv_heads == 0 && L <= S &&
              kv[1].sizes() == kv[0].sizes(), "kv cache shape");
  const QWeight Wqkv(w[1], w[2], w[3]), Wo(w[5], w[6], w[7]), Wgu(w[9], w[10], w[11]), Wd(w[12], w[13], w[14]);
  const int64_t nq = heads * D, nkv = kv_heads * D, I = Wgu.N / 2;
  TORCH_CHECK(Wqkv.K == H && Wqkv.N == nq + 2 * nkv && Wo.K == nq && Wo.N == H && Wgu.K == H && Wd.K == I &&
              Wd.N == H, "decode_block: weight shapes do not match the model");
  const float* bqkv = w[4].numel() ? w[4].data_ptr<float>() : nullptr;
  float* hp = h.data_ptr<float>();
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const float* lg = logn.numel() ? logn.data_ptr<float>() : nullptr;
  const int64_t* sl = slot.data_ptr<int64_t>();
  const bool* vl = valid.data_ptr<bool>();

  std::vector<float> x(B * std::max(H, nq)), qkv(B * Wqkv.N), att(B * nq), gu(B * 2 * I), y(B * H);
  QuantRows q;
  // attention
  rms_norm(hp, w[0].data_ptr<float>(), B, H, eps, x.data());
  q.quantize(x.data(), B, H);
  gemv(q, B, Wqkv, bqkv, qkv.data());
  for (int64_t b = 0; b < B; ++b) {
    float* row = qkv.data() + b * Wqkv.N;
    for (int64_t hh = 0; hh < heads + kv_heads; ++hh) rotate(row + hh * D, cs + b * D, sn + b * D, D);
    if (lg)
      for (int64_t i = 0; i < nq; ++i) row[i] *= lg[b];
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
      K_.write(b * kv_heads + kh, sl[b], row + nq + kh * D);
      V_.write(b * kv_heads + kh, sl[b], row + nq + nkv + kh * D);
    }
  }
  const float scale = 1.f / std::sqrt((float)D);
  const int64_t group = heads / kv_heads;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t bh = 0; bh < B * heads; ++bh) {
    const int64_t b = bh / heads, hq = bh % heads, kvh = b * kv_heads + hq / group;
    const float* qv = qkv.data() + b * Wqkv.N + hq * D;
    float sum_q = 0.f;
    for (int64_t i = 0; i < D; ++i) sum_q += qv[i];
    const bool* ok = vl + b * S;
    std::vector<float> p(L);
    float mx = -INFINITY;
    for (int64_t j = 0; j < L; ++j) {
      if (!ok[j]) { p[j] = -INFINITY; continue; }
      p[j] = K_.dot(kvh, j, qv, sum_q) * scale;
      mx = std::max(mx, p[j]);
    }
    float* o = att.data() + b * nq + hq * D;
    std::fill(o, o + D, 0.f);
    if (mx == -INFINITY) continue;  // no valid key (cannot happen: the new token is always valid)
    float den = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      if (p[j] == -INFINITY) continue;
      const float e = std::exp(p[j] - mx);
      den += e;
      V_.axpy(kvh, j, e, o);
    }
    const float inv = 1.f / den;
    for (int64_t i = 0; i < D; ++i) o[i] *= inv;
  }
  q.quantize(att.data(), B, nq);
  gemv(q, B, Wo, nullptr, y.data());
  for (int64_t i = 0; i < B * H; ++i) hp[i] += y[i];
  // MLP
  rms_norm(hp, w[8].data_ptr<float>(), B, H, eps, x.data());
  q.quantize(x.data(), B, H);
  gemv(q, B, Wgu, nullptr, gu.data());
  std::vector<float> act(B * I);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < I; ++i) {
      const float g = gu[b * 2 * I + i];
      act[b * I + i] = g / (1.f + std::exp(-g)) * gu[b * 2 * I + I + i];
    }
  q.quantize(act.data(), B, I);
  gemv(q, B, Wd, nullptr, y.data());
  for (int64_t i = 0; i < B * H; ++i) hp[i] += y[i];
}

// w (N, K) float32 -> 8-bit blocks of 32: codes (N, K/32, 32) int8 and d (N, K/32) fp16, with
// d = half(amax / 127) and codes = round_half_even(w / max(float(d), 1e-12)) clamped to [-127, 127]:
// the arithmetic of quantize_q8's torch reference (quant/q4.py), in one pass instead of six.
std::vector<at::Tensor> quantize_q8(at::Tensor w) {
  TORCH_CHECK(w.dtype() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(1) % 32 == 0,
              "quantize_q8: contiguous (N, K) float32 with K a multiple of 32");
  const int64_t blocks = w.size(0) * (w.size(1) / 32);
  auto codes = at::empty({w.size(0), w.size(1) / 32, 32}, at::kChar);
  auto d = at::empty({w.size(0), w.size(1) / 32}, at::kHalf);
  const float* src = w.data_ptr<float>();
  int8_t* dst = codes.data_ptr<int8_t>();
  at::Half* dp = d.data_ptr<at::Half>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < blocks; ++i) {
    const float* p = src + i * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(p[j]));
    const at::Half h(amax / 127.f);
    dp[i] = h;
    const float dd = std::max(static_cast<float>(h), 1e-12f);
    for (int j = 0; j < 32; ++j)
      dst[i * 32 + j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(p[j] / dd))));
  }
  return {codes, d};
}

// 32 codes (bytes; signed for 8 bits) -> 32 floats d * q + m at out
inline void store_block(__m256i q, bool is_signed, float d, float m, float* out) {
  const __m256 D = _mm256_set1_ps(d), M = _mm256_set1_ps(m);
  const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
  for (int k = 0; k < 4; ++k) {
    const __m128i part = k % 2 ? _mm_srli_si128(halves[k / 2], 8) : halves[k / 2];
    const __m256i v = is_signed ? _mm256_cvtepi8_epi32(part) : _mm256_cvtepu8_epi32(part);
    _mm256_storeu_ps(out + 8 * k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), D, M));
  }
}

// The (N, K) float32 weight of 4-, 5- or 8-bit blocks, w = d * q + m (quant/q4.py's dequantize_q4, one
// pass): the long-prompt path multiplies by it.
at::Tensor dequantize(at::Tensor codes, at::Tensor d, at::Tensor m) {
  const QWeight W(codes, d, m);
  const int64_t N = W.N, K = W.K, nb = K / 32;
  auto out = at::empty({N, K}, at::kFloat);
  float* y = out.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* c = W.codes + n * nb * W.bits * 4;
    const uint16_t* dn = W.d + n * nb;
    const uint16_t* mn = W.m + n * nb;
    float* row = y + n * K;
    for (int64_t b = 0; b < nb; b += (W.bits == 5 ? 2 : 1)) {
      if (W.bits == 8) {
        store_block(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * 32)), true,
                    _cvtsh_ss(dn[b]), _cvtsh_ss(mn[b]), row + b * 32);
      } else if (W.bits == 4) {
        store_block(nibbles(c + b * 16), false, _cvtsh_ss(dn[b]), _cvtsh_ss(mn[b]), row + b * 32);
      } else {  // a pair of blocks (see pair_dot)
        __m256i q0, q1;
        pair_codes(c + b * 20, q0, q1);
        store_block(q0, false, _cvtsh_ss(dn[b]), _cvtsh_ss(mn[b]), row + b * 32);
        store_block(q1, false, _cvtsh_ss(dn[b + 1]), _cvtsh_ss(mn[b + 1]), row + (b + 1) * 32);
      }
    }
  }
  return out;
}

// llama.cpp Q5_0 rows (N, nb * 22) uint8 (per block: fp16 d, the 32-bit word of fifth bits, 16 bytes of
// nibbles), nb even -> 5-bit pairs (N, nb/2, 40) uint8 as pair_dot reads them, and d (N, nb) fp16: what
// pack_q5_words (quant/q4.py) computes, in one pass.
std::vector<at::Tensor> repack_q5_0(at::Tensor raw, int64_t nb) {
  TORCH_CHECK(raw.dtype() == at::kByte && raw.dim() == 2 && raw.is_contiguous() && nb % 2 == 0 &&
              raw.size(1) == nb * 22, "repack_q5_0: contiguous (N, nb * 22) uint8 with nb even");
  const int64_t N = raw.size(0);
  auto codes = at::empty({N, nb / 2, 40}, at::kByte);
  auto d = at::empty({N, nb}, at::kHalf);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  uint16_t* dd = reinterpret_cast<uint16_t*>(d.data_ptr<at::Half>());
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t p = 0; p < nb / 2; ++p) {
      uint8_t* out = dst + (n * (nb / 2) + p) * 40;
      uint32_t qh[2];
      for (int t = 0; t < 2; ++t) {
        const uint8_t* blk = src + (n * nb + 2 * p + t) * 22;
        std::memcpy(dd + n * nb + 2 * p + t, blk, 2);
        std::memcpy(&qh[t], blk + 2, 4);
        std::memcpy(out + 16 * t, blk + 6, 16);
      }
      for (int i = 0; i < 8; ++i) {
        uint8_t byte = 0;
        for (int lane = 0; lane < 4; ++lane) {
          byte |= ((qh[0] >> (8 * lane + i)) & 1u) << (4 + lane);
          byte |= ((qh[1] >> (8 * lane + i)) & 1u) << lane;
        }
        out[32 + i] = byte;
      }
    }
  }
  return {codes, d};
}

// Rows of llama.cpp super-blocks (N, nb * BYTES) uint8 -> float32 (N, nb * 256), each super-block of 256
// weights written by block(bytes, out)
template <int BYTES, typename Block>
at::Tensor super_block_rows(const at::Tensor& raw, int64_t nb, const char* what, Block block) {
  TORCH_CHECK(raw.dtype() == at::kByte && raw.dim() == 2 && raw.is_contiguous() && raw.size(1) == nb * BYTES,
              what, ": contiguous (N, nb * ", BYTES, ") uint8");
  const int64_t blocks = raw.size(0) * nb;
  auto out = at::empty({raw.size(0), nb * 256}, at::kFloat);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* y = out.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < blocks; ++i) block(src + i * BYTES, y + i * 256);
  return out;
}

// Q6_K (210 bytes per 256 weights): 128 bytes of low four bits (ql), 64 bytes of high two bits (qh), 16
// int8 scales (one per 16 weights), fp16 d; in each half of 128 weights, weight 32*g + l takes its low
// bits from ql[l] (g = 0, 2) or ql[32 + l] (g = 1, 3), low nibble for g < 2, and bits 2g, 2g+1 of qh[l];
// w = (d * scale) * (q - 32), the float operations of the gguf package's dequantization, in its order.
at::Tensor dequantize_q6_k(at::Tensor raw, int64_t nb) {
  return super_block_rows<210>(raw, nb, "dequantize_q6_k", [](const uint8_t* ql, float* o) {
    const uint8_t* qh = ql + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(ql + 192);
    uint16_t bits;
    std::memcpy(&bits, ql + 208, 2);
    const float d = _cvtsh_ss(bits);
    for (int half = 0; half < 2; ++half, o += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q0 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
        const int q1 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        o[l] = (d * (float)sc[is]) * (float)q0;
        o[l + 32] = (d * (float)sc[is + 2]) * (float)q1;
        o[l + 64] = (d * (float)sc[is + 4]) * (float)q2;
        o[l + 96] = (d * (float)sc[is + 6]) * (float)q3;
      }
    }
  });
}

// Q4_K (144 bytes per 256 weights): fp16 d and dmin, 12 bytes holding eight 6-bit scales and eight
// 6-bit minimums, 128 bytes of codes (sub-block g of 32 weights: the low (g even) or high (g odd)
// nibbles of bytes 32*(g/2)..+31); w = (d * sc_g) * q - dmin * m_g, as the gguf package computes it
// (every product there is exact in float32, so a fused multiply-add rounds the same).
at::Tensor dequantize_q4_k(at::Tensor raw, int64_t nb) {
  return super_block_rows<144>(raw, nb, "dequantize_q4_k", [](const uint8_t* b, float* o) {
    uint16_t h[2];
    std::memcpy(h, b, 4);
    const float d = _cvtsh_ss(h[0]), dmin = _cvtsh_ss(h[1]);
    const uint8_t* s = b + 4;
    const uint8_t* qs = b + 16;
    for (int g = 0; g < 8; ++g) {
      const int sc = g < 4 ? (s[g] & 63) : ((s[g + 4] & 0x0F) | ((s[g - 4] >> 2) & 0x30));
      const int mn = g < 4 ? (s[g + 4] & 63) : ((s[g + 4] >> 4) | ((s[g] >> 2) & 0x30));
      const float ds = d * (float)sc, dm = dmin * (float)mn;
      const uint8_t* q = qs + 32 * (g / 2);
      const int shift = 4 * (g % 2);
      for (int l = 0; l < 32; ++l) o[32 * g + l] = ds * (float)((q[l] >> shift) & 0x0F) - dm;
    }
  });
}

TORCH_LIBRARY(qwenlm_q4, mod) {
  mod.def("dequantize_q4_k(Tensor raw, int nb) -> Tensor", &dequantize_q4_k);  // llama.cpp Q4_K -> float32
  mod.def("dequantize_q6_k(Tensor raw, int nb) -> Tensor", &dequantize_q6_k);  // llama.cpp Q6_K -> float32
  mod.def("quantize_q8(Tensor w) -> Tensor[]", &quantize_q8);  // 8-bit blocks of 32, fp16 scale (one pass)
  mod.def("dequantize(Tensor codes, Tensor d, Tensor m) -> Tensor", &dequantize);  // the float32 weight
  mod.def("repack_q5_0(Tensor raw, int nb) -> Tensor[]", &repack_q5_0);  // llama.cpp Q5_0 -> 5-bit pairs
  mod.def("q4_gemv(Tensor x, Tensor codes, Tensor d, Tensor m) -> Tensor", &q4_gemv);  // weight x int8 activations
  // one decoder block of a decode step; h and the cache (kv) are written in place
  mod.def("decode_block(Tensor(a!) h, Tensor[] w, float eps, Tensor cos, Tensor sin, Tensor logn, "
          "Tensor(b!)[] kv, Tensor slot, Tensor valid, int L, int heads, int kv_heads) -> ()", &decode_block);
}
