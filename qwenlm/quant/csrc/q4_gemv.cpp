// 4-bit weight x int8 activation matrix-vector products for CPU decoding (AVX2 + FMA + F16C).
//
// Weights: per output row, blocks of 32 input columns; each block stores 16 bytes of 4-bit codes
// (byte j holds code j in its low nibble and code j+16 in its high nibble) and an fp16 scale d and
// fp16 minimum m:  w = d * q + m.  Activations are quantized per block of 32 to int8 with one fp32
// scale s:  x = s * xq.  Then a block's dot product is  d*s*sum(q*xq) + m*s*sum(xq).
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// x (M, K) fp32 -> xq (M, K) int8, scales (M, K/32), block sums of xq (M, K/32)
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs, int32_t* xsum) {
  const int64_t nb = K / 32;
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
      xsum[r * nb + b] = sum;
    }
  }
}

}  // namespace

// x (M, K) float32; codes (N, K/32, 16) uint8; d, m (N, K/32) float16 -> y (M, N) float32
torch::Tensor q4_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor d, torch::Tensor m) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous (M, K) float32");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), nb = K / 32;
  TORCH_CHECK(K % 32 == 0 && codes.size(1) == nb && codes.size(2) == 16, "codes must be (N, K/32, 16)");
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto xs = torch::empty({M, nb}, torch::kFloat32);
  auto xsum = torch::empty({M, nb}, torch::kInt32);
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xsum.data_ptr<int32_t>());
  auto y = torch::empty({M, N}, torch::kFloat32);
  const uint8_t* C = codes.data_ptr<uint8_t>();
  const uint16_t* D = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* Mn = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  const int8_t* XQ = xq.data_ptr<int8_t>();
  const float* XS = xs.data_ptr<float>();
  const int32_t* XSUM = xsum.data_ptr<int32_t>();
  float* Y = y.data_ptr<float>();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t r = 0; r < M; ++r) {
      __m256 acc = _mm256_setzero_ps();
      float acc_min = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(C + (n * nb + b) * 16));
        const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        const __m256i q = _mm256_and_si256(both, low4);  // codes 0..15, then 16..31
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(XQ + r * K + b * 32));
        const __m256i dot16 = _mm256_maddubs_epi16(q, a);  // u8 * s8 pairs -> s16 (|.| <= 3810)
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot16, ones));
        const float s = XS[r * nb + b];
        const float ds = _cvtsh_ss(D[n * nb + b]) * s;
        acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(ds), acc);
        acc_min += _cvtsh_ss(Mn[n * nb + b]) * s * (float)XSUM[r * nb + b];
      }
      Y[r * N + n] = hsum(acc) + acc_min;
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_gemv", &q4_gemv, "4-bit weight x int8 activation GEMV (AVX2)");
}
