// Batched gather matrix-vector LoRA on the CPU ("BGMV", punica / S-LoRA's decode kernel):
//
//     y[t] += (x[t] · A[s]ᵀ) · Bt[s]        s = slots[t], tokens with s < 0 untouched
//
// y [T, out] and x [T, in] are fp32; A [S, R, in] and Bt [S, R, out] are fp32 or bf16. A decode
// step reads every resident adapter once and does ~2 FLOPs per weight, so it is bound by memory
// bandwidth: keeping the weights in bf16 halves the bytes. torch's bf16 bmm has no fast path for
// one-token rows on a CPU (measured ~2x slower than fp32), hence this loop. bf16 → fp32 is exact
// (the bf16 bits are the high half of the fp32 bits) and every product and sum is in fp32, so the
// only difference from fp32 weights is the rounding of the weights themselves.
// AVX-512 where the build has it (the loader passes the flags the CPU supports), plain loops otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#ifdef __AVX512F__
// 16 weights as fp32: bf16 widened to 32 bits and shifted into the high half.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

// h[r] = x · a[r]  for r < R   (a: [R, in])
template <typename W>
void down_project(float* h, const float* x, const W* a, int64_t R, int64_t in) {
  int64_t r = 0;
#ifdef __AVX512F__
  const int64_t in16 = in - in % 16;
  for (; r + 4 <= R; r += 4) {  // four rows at a time: each x block is loaded once for four weight rows
    const W* a0 = a + r * in; const W* a1 = a0 + in; const W* a2 = a1 + in; const W* a3 = a2 + in;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    for (int64_t k = 0; k < in16; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      s0 = _mm512_fmadd_ps(xv, load16(a0 + k), s0);
      s1 = _mm512_fmadd_ps(xv, load16(a1 + k), s1);
      s2 = _mm512_fmadd_ps(xv, load16(a2 + k), s2);
      s3 = _mm512_fmadd_ps(xv, load16(a3 + k), s3);
    }
    float t0 = _mm512_reduce_add_ps(s0), t1 = _mm512_reduce_add_ps(s1), t2 = _mm512_reduce_add_ps(s2), t3 = _mm512_reduce_add_ps(s3);
    for (int64_t k = in16; k < in; ++k) {
      t0 += x[k] * to_float(a0[k]); t1 += x[k] * to_float(a1[k]); t2 += x[k] * to_float(a2[k]); t3 += x[k] * to_float(a3[k]);
    }
    h[r] = t0; h[r + 1] = t1; h[r + 2] = t2; h[r + 3] = t3;
  }
#endif
  for (; r < R; ++r) {
    const W* ar = a + r * in;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < in; ++k) acc += x[k] * to_float(ar[k]);
    h[r] = acc;
  }
}

// y += Σ_r h[r] · b[r]   (b: [R, out]), read front to back: one sequential stream per token lets the
// hardware prefetcher run ahead (y, at most a few KB, stays in L1 across the R passes)
template <typename W>
void up_project(float* y, const float* h, const W* b, int64_t R, int64_t out) {
  for (int64_t r = 0; r < R; ++r) {
    const float hr = h[r];
    const W* br = b + r * out;
    int64_t o = 0;
#ifdef __AVX512F__
    const __m512 hv = _mm512_set1_ps(hr);
    for (; o + 16 <= out; o += 16) _mm512_storeu_ps(y + o, _mm512_fmadd_ps(hv, load16(br + o), _mm512_loadu_ps(y + o)));
#endif
    for (; o < out; ++o) y[o] += hr * to_float(br[o]);
  }
}

template <typename W>
void bgmv_tokens(float* y, const float* x, const W* A, const W* Bt, const int64_t* slots,
                 int64_t T, int64_t R, int64_t in, int64_t out) {
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(R);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slots[t];
      if (s < 0) continue;
      down_project(h.data(), x + t * in, A + s * R * in, R, in);
      up_project(y + t * out, h.data(), Bt + s * R * out, R, out);
    }
  });
}

void bgmv_(torch::Tensor y, torch::Tensor x, torch::Tensor A, torch::Tensor Bt, torch::Tensor slots) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu() && A.device().is_cpu() && Bt.device().is_cpu() && slots.device().is_cpu(),
              "bgmv_: CPU tensors expected");
  TORCH_CHECK(y.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat, "bgmv_: x and y must be float32");
  TORCH_CHECK(A.scalar_type() == Bt.scalar_type(), "bgmv_: A and Bt must have one dtype");
  TORCH_CHECK(slots.scalar_type() == torch::kLong, "bgmv_: slots must be int64");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && A.is_contiguous() && Bt.is_contiguous() && slots.is_contiguous(),
              "bgmv_: contiguous tensors expected");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && A.dim() == 3 && Bt.dim() == 3 && slots.dim() == 1, "bgmv_: x [T, in], y [T, out], A [S, R, in], Bt [S, R, out], slots [T]");
  const int64_t T = x.size(0), in = x.size(1), out = y.size(1), R = A.size(1);
  TORCH_CHECK(y.size(0) == T && slots.size(0) == T && A.size(2) == in && Bt.size(2) == out && Bt.size(1) == R && Bt.size(0) == A.size(0),
              "bgmv_: shapes do not agree");
  if (T > 0) {
    const int64_t S = A.size(0);
    const int64_t* sl = slots.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sl[t] < S, "bgmv_: slot ", sl[t], " out of range (", S, " slots)");
  }
  if (A.scalar_type() == torch::kFloat) {
    bgmv_tokens<float>(y.data_ptr<float>(), x.data_ptr<float>(), A.data_ptr<float>(), Bt.data_ptr<float>(), slots.data_ptr<int64_t>(), T, R, in, out);
  } else {
    TORCH_CHECK(A.scalar_type() == torch::kBFloat16, "bgmv_: weights must be float32 or bfloat16");
    bgmv_tokens<uint16_t>(y.data_ptr<float>(), x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(A.data_ptr()),
                          reinterpret_cast<const uint16_t*>(Bt.data_ptr()), slots.data_ptr<int64_t>(), T, R, in, out);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bgmv_", &bgmv_, "y[t] += x[t] @ A[slots[t]].T @ Bt[slots[t]] for slots[t] >= 0 (in place)");
}
