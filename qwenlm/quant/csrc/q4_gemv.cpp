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
  // per activation block: s * sum(xq), the factor of the weight minimum (shared by every row)
  auto ms_t = torch::empty({M, nb}, torch::kFloat32);
  float* MS = ms_t.data_ptr<float>();
  for (int64_t i = 0; i < M * nb; ++i) MS[i] = XS[i] * (float)XSUM[i];
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* Cn = C + n * nb * 16;
    const uint16_t* Dn = D + n * nb;
    const uint16_t* Mn_ = Mn + n * nb;
    for (int64_t r = 0; r < M; ++r) {
      const int8_t* XQr = XQ + r * K;
      const float* XSr = XS + r * nb;
      const float* MSr = MS + r * nb;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) {
        // eight blocks' scales at once: d*s, and the minimum term m * s * sum(xq)
        alignas(32) float ds[8];
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Dn + b)));
        _mm256_store_ps(ds, _mm256_mul_ps(dv, _mm256_loadu_ps(XSr + b)));
        const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Mn_ + b)));
        accm = _mm256_fmadd_ps(mv, _mm256_loadu_ps(MSr + b), accm);
        for (int j = 0; j < 8; j += 2) {
          const __m128i p0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(Cn + (b + j) * 16));
          const __m128i p1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(Cn + (b + j + 1) * 16));
          const __m256i q0 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p0, 4), p0), low4);
          const __m256i q1 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p1, 4), p1), low4);
          const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(XQr + (b + j) * 32));
          const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(XQr + (b + j + 1) * 32));
          const __m256 d0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q0, a0), ones));
          const __m256 d1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q1, a1), ones));
          acc0 = _mm256_fmadd_ps(d0, _mm256_set1_ps(ds[j]), acc0);
          acc1 = _mm256_fmadd_ps(d1, _mm256_set1_ps(ds[j + 1]), acc1);
        }
      }
      float tail = 0.f;
      for (; b < nb; ++b) {  // the last nb % 8 blocks, one at a time
        const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(Cn + b * 16));
        const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p, 4), p), low4);
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(XQr + b * 32));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, a), ones));
        acc0 = _mm256_fmadd_ps(dot, _mm256_set1_ps(_cvtsh_ss(Dn[b]) * XSr[b]), acc0);
        tail += _cvtsh_ss(Mn_[b]) * MSr[b];
      }
      Y[r * N + n] = hsum(_mm256_add_ps(acc0, acc1)) + hsum(accm) + tail;
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_gemv", &q4_gemv, "4-bit weight x int8 activation GEMV (AVX2)");
}
