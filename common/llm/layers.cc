#include "common/llm/layers.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "common/base/status_macros.h"
#include "common/tensor/eigen_types.h"
#include "common/tensor/gemm.h"

namespace fedlora::common {

void UseOneBlasThread() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

// Products split their rows into blocks of kRowBlock; one that fits in a block (a decoding step,
// a short batch) splits its output columns instead, so that it still spreads over the threads.
// Either way the blocks follow from the shapes alone.
void MatMulNT(ThreadPool& pool, const float* x, const float* w, float* y, int64_t rows, int64_t n,
              int64_t m, float alpha, bool accumulate) {
  const float beta = accumulate ? 1.0f : 0.0f;
  if (rows > kRowBlock) {
    ForBlocks(pool, rows, kRowBlock, [&](int64_t r0, int64_t r1) {
      Gemm(false, true, r1 - r0, m, n, alpha, x + r0 * n, n, w, n, beta, y + r0 * m, m);
    });
  } else {
    ForBlocks(pool, m, kColumnBlock, [&](int64_t c0, int64_t c1) {
      Gemm(false, true, rows, c1 - c0, n, alpha, x, n, w + c0 * n, n, beta, y + c0, m);
    });
  }
}

void GemmStored(bool tw, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                StoredSpan w, int64_t ldw, float beta, float* c, int64_t ldc) {
  if (w.dtype() == DType::kF32) {
    Gemm(false, tw, m, n, k, alpha, a, lda, w.f32().data(), ldw, beta, c, ldc);
    return;
  }
  // Rows first..first+count of W (each `len` values, `ldw` apart) as f32 into this thread's panel.
  thread_local std::vector<float> panel;
  const auto convert = [&](int64_t first, int64_t count, int64_t len) {
    panel.resize(static_cast<size_t>(count * len));
    for (int64_t i = 0; i < count; ++i)
      w.subspan(static_cast<size_t>((first + i) * ldw), static_cast<size_t>(len))
          .ToF32(std::span(panel).subspan(static_cast<size_t>(i * len), static_cast<size_t>(len)));
  };
  if (tw) {  // W [n, k]: panels of its rows, each a block of C's columns
    const int64_t step = std::max<int64_t>(1, kWeightPanel / k);
    for (int64_t j0 = 0; j0 < n; j0 += step) {
      const int64_t nj = std::min(step, n - j0);
      convert(j0, nj, k);
      Gemm(false, true, m, nj, k, alpha, a, lda, panel.data(), k, beta, c + j0, ldc);
    }
  } else {  // W [k, n]: panels of its rows, each a slice of the inner dimension added into C
    const int64_t step = std::max<int64_t>(1, kWeightPanel / n);
    for (int64_t i0 = 0; i0 < k; i0 += step) {
      const int64_t ni = std::min(step, k - i0);
      convert(i0, ni, n);
      Gemm(false, false, m, n, ni, alpha, a + i0, lda, panel.data(), n, i0 == 0 ? beta : 1.0f, c,
           ldc);
    }
  }
}

// Stored weights split the output columns whatever the rows, so each panel is converted once.
void MatMulNT(ThreadPool& pool, const float* x, StoredSpan w, float* y, int64_t rows, int64_t n,
              int64_t m, float alpha, bool accumulate) {
  if (w.dtype() == DType::kF32)
    return MatMulNT(pool, x, w.f32().data(), y, rows, n, m, alpha, accumulate);
  ForBlocks(pool, m, kColumnBlock, [&](int64_t c0, int64_t c1) {
    GemmStored(true, rows, c1 - c0, n, alpha, x, n,
               w.subspan(static_cast<size_t>(c0 * n), static_cast<size_t>((c1 - c0) * n)), n,
               accumulate ? 1.0f : 0.0f, y + c0, m);
  });
}

void MatMulNN(ThreadPool& pool, const float* x, StoredSpan w, float* y, int64_t rows, int64_t m,
              int64_t n, bool accumulate) {
  if (w.dtype() == DType::kF32) return MatMulNN(pool, x, w.f32().data(), y, rows, m, n, accumulate);
  ForBlocks(pool, n, kColumnBlock, [&](int64_t c0, int64_t c1) {
    GemmStored(false, rows, c1 - c0, m, 1.0f, x, m,
               w.subspan(static_cast<size_t>(c0), w.size() - static_cast<size_t>(c0)), n,
               accumulate ? 1.0f : 0.0f, y + c0, n);
  });
}

void MatMulNN(ThreadPool& pool, const float* x, const float* w, float* y, int64_t rows, int64_t m,
              int64_t n, bool accumulate) {
  const float beta = accumulate ? 1.0f : 0.0f;
  if (rows > kRowBlock) {
    ForBlocks(pool, rows, kRowBlock, [&](int64_t r0, int64_t r1) {
      Gemm(false, false, r1 - r0, n, m, 1.0f, x + r0 * m, m, w, n, beta, y + r0 * n, n);
    });
  } else {
    ForBlocks(pool, n, kColumnBlock, [&](int64_t c0, int64_t c1) {
      Gemm(false, false, rows, c1 - c0, m, 1.0f, x, m, w + c0, n, beta, y + c0, n);
    });
  }
}

void MatMulTN(ThreadPool& pool, const float* x, const float* y, float* g, int64_t rows, int64_t a,
              int64_t b, float alpha) {
  if (a >= b) {  // blocks of G's rows: columns c0.. of X, transposed, times Y
    ForBlocks(pool, a, kColumnBlock, [&](int64_t c0, int64_t c1) {
      Gemm(true, false, c1 - c0, b, rows, alpha, x + c0, a, y, b, 1.0f, g + c0 * b, b);
    });
  } else {  // blocks of G's columns
    ForBlocks(pool, b, kColumnBlock, [&](int64_t c0, int64_t c1) {
      Gemm(true, false, a, c1 - c0, rows, alpha, x, a, y + c0, b, 1.0f, g + c0, b);
    });
  }
}

void EmbeddingForward(const int32_t* ids, int64_t count, StoredSpan table, int hidden, float* x) {
  for (int64_t i = 0; i < count; ++i)
    table.subspan(static_cast<size_t>(ids[i]) * hidden, static_cast<size_t>(hidden))
        .ToF32(std::span(x + i * hidden, static_cast<size_t>(hidden)));
}

absl::StatusOr<std::vector<Linear>> ModelLinears(const LlamaWeights& weights,
                                                 const Adapter* adapter) {
  const LlamaConfig& c = weights.config();
  std::vector<Linear> out(static_cast<size_t>(c.num_hidden_layers) * kNumLinearKinds);
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (int k = 0; k < kNumLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      Linear& p = out[LinearSlot(l, kind)];
      p.in = LinearIn(c, kind);
      p.out = LinearOut(c, kind);
      p.w = weights.linear(l, kind);
      p.bias = weights.bias(l, kind);
    }
  if (adapter == nullptr) return out;
  ASSIGN_OR_RETURN(const std::vector<size_t> slots, AdapterSlots(c, *adapter));
  const float* values = adapter->values().data();
  for (size_t i = 0; i < slots.size(); ++i) {
    const LoraModule& m = adapter->module(i);
    Linear& p = out[slots[i]];
    p.module = static_cast<int>(i);
    p.rank = m.rank;
    p.scaling = static_cast<float>(m.scaling);
    p.a = values + m.a_offset;
    p.b = values + m.b_offset;
    p.r = m.has_r ? values + m.r_offset : nullptr;
  }
  return out;
}

void LinearForward(ThreadPool& pool, const Linear& p, const float* x, float* y, int64_t rows,
                   float* u, float* v) {
  MatMulNT(pool, x, p.w, y, rows, p.in, p.out, 1.0f, false);
  if (p.bias != nullptr) {
    const Eigen::Map<const Eigen::RowVectorXf> bias(p.bias, p.out);
    ForBlocks(pool, rows, kRowBlock, [&](int64_t begin, int64_t end) {
      MapF(y + begin * p.out, end - begin, p.out).rowwise() += bias;
    });
  }
  if (p.module < 0) return;
  MatMulNT(pool, x, p.a, u, rows, p.in, p.rank, 1.0f, false);
  if (p.r != nullptr) {
    MatMulNT(pool, u, p.r, v, rows, p.rank, p.rank, 1.0f, false);
    u = v;
  }
  MatMulNT(pool, u, p.b, y, rows, p.rank, p.out, p.scaling, true);
}

void LinearBackward(ThreadPool& pool, const Linear& p, const float* x, const float* u,
                    const float* dy, float* dx, bool accumulate, int64_t rows,
                    const LoraGrads& grads, float* du, float* du2) {
  MatMulNN(pool, dy, p.w, dx, rows, p.out, p.in, accumulate);
  if (p.module < 0) return;
  const int64_t r = p.rank;
  // du = s·dy·B: the gradient at B's input.
  MatMulNN(pool, dy, p.b, du, rows, p.out, r, false);
  MapF(du, rows, r) *= p.scaling;
  if (p.r != nullptr) {  // v = u·Rᵀ: dR += duᵀ·u, and the gradient at u is du·R
    if (grads.r != nullptr) MatMulTN(pool, du, u, grads.r, rows, r, r, 1.0f);
    MatMulNN(pool, du, p.r, du2, rows, r, r, false);
    du = du2;
  } else {  // y += s·u·Bᵀ: dB += s·dyᵀ·u; u = x·Aᵀ: dA += duᵀ·x
    if (grads.b != nullptr) MatMulTN(pool, dy, u, grads.b, rows, p.out, r, p.scaling);
    if (grads.a != nullptr) MatMulTN(pool, du, x, grads.a, rows, r, p.in, 1.0f);
  }
  MatMulNN(pool, du, p.a, dx, rows, r, p.in, true);
}

void RmsNormForward(ThreadPool& pool, const float* x, const float* g, double eps, float* rho,
                    float* y, int64_t rows, int width) {
  ForBlocks(pool, rows, kRowBlock, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* xr = x + n * width;
      double ss = 0;
      for (int j = 0; j < width; ++j) ss += static_cast<double>(xr[j]) * xr[j];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / width + eps));
      if (rho != nullptr) rho[n] = inv;
      float* yr = y + n * width;
      for (int j = 0; j < width; ++j) yr[j] = xr[j] * inv * g[j];
    }
  });
}

void RmsNormBackward(ThreadPool& pool, const float* x, const float* g, const float* rho,
                     const float* dy, float* dx, int64_t rows, int width) {
  ForBlocks(pool, rows, kRowBlock, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float *xr = x + n * width, *dyr = dy + n * width;
      double dot = 0;
      for (int j = 0; j < width; ++j) dot += static_cast<double>(g[j]) * dyr[j] * xr[j];
      const float r = rho[n];
      const float coef = static_cast<float>(dot * r * r * r / width);
      float* dxr = dx + n * width;
      for (int j = 0; j < width; ++j) dxr[j] += r * g[j] * dyr[j] - xr[j] * coef;
    }
  });
}

void Rope(ThreadPool& pool, float* x, int64_t rows, int heads, int head_dim, const float* cos,
          const float* sin, int first, int64_t seq, bool inverse) {
  const int half = head_dim / 2;
  const int64_t width = static_cast<int64_t>(heads) * head_dim;
  const float sign = inverse ? -1.0f : 1.0f;
  ForBlocks(pool, rows, kRowBlock, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t t = first + n % seq;
      const float *cs = cos + t * half, *sn = sin + t * half;
      for (int h = 0; h < heads; ++h) {
        float* xh = x + n * width + static_cast<int64_t>(h) * head_dim;
        for (int j = 0; j < half; ++j) {
          const float x1 = xh[j], x2 = xh[j + half], s = sign * sn[j];
          xh[j] = x1 * cs[j] - x2 * s;
          xh[j + half] = x2 * cs[j] + x1 * s;
        }
      }
    }
  });
}

namespace {

// One query head of one sequence: queries at positions first..first+m−1 against keys and values at
// 0..first+m−1, causal over the last `window` positions when > 0:
//   p_i = softmax_j(q_i·k_jᵀ/√D) over i' − window < j ≤ i' (i' = first + i), 0 elsewhere;
//   out_i = p_i·v.
// q, out [m, D] with row stride ldq; k, v [first+m, D] with row stride ldkv; p [m, first+m] with
// row stride ldp.
// Its products run on sgemm with leading dimensions: a head is a column block of the [rows,
// heads·D] activations.
void AttentionHeadForward(const float* q, const float* k, const float* v, int64_t ldq, int64_t ldkv,
                          int m, int first, int head_dim, int window, float* p, int64_t ldp,
                          float* out) {
  const int end = first + m;
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(head_dim));
  Gemm(false, true, m, end, head_dim, inv_sqrt_d, q, ldq, k, ldkv, 0.0f, p, ldp);
  for (int i = 0; i < m; ++i) {  // causal softmax over the window: pos − window < j ≤ pos
    const int pos = first + i;
    const int lo = window > 0 ? std::max(0, pos - window + 1) : 0;
    float* row = p + static_cast<int64_t>(i) * ldp;
    Eigen::Map<Eigen::ArrayXf> live(row + lo, pos + 1 - lo);
    live = (live - live.maxCoeff()).exp();
    live /= live.sum();
    std::fill(row, row + lo, 0.0f);
    std::fill(row + pos + 1, row + end, 0.0f);
  }
  Gemm(false, false, m, head_dim, end, 1.0f, p, ldp, v, ldkv, 0.0f, out, ldq);
}

}  // namespace

void AttentionForward(ThreadPool& pool, const LlamaConfig& c, const float* q, const float* k,
                      const float* v, int batch, int seq, int window, float* p, float* att) {
  const int D = c.head_dim, group = c.num_attention_heads / c.num_key_value_heads;
  const int64_t Q = c.q_dim(), KV = c.kv_dim(), T = seq;
  pool.For(static_cast<size_t>(batch) * c.num_attention_heads, [&](size_t item, int) {
    const int b = static_cast<int>(item) / c.num_attention_heads,
              h = static_cast<int>(item) % c.num_attention_heads;
    const int64_t row0 = b * T, g = h / group;
    AttentionHeadForward(q + row0 * Q + h * D, k + row0 * KV + g * D, v + row0 * KV + g * D, Q, KV,
                         seq, 0, D, window,
                         p + (static_cast<int64_t>(b) * c.num_attention_heads + h) * T * T, T,
                         att + row0 * Q + h * D);
  });
}

void AttentionBackward(ThreadPool& pool, const LlamaConfig& c, const float* q, const float* k,
                       const float* v, const float* p, const float* datt, int batch, int seq,
                       int window, float* dq, float* dk, float* dv,
                       std::vector<AlignedFloats>& scratch) {
  const int D = c.head_dim, group = c.num_attention_heads / c.num_key_value_heads;
  const int64_t Q = c.q_dim(), KV = c.kv_dim(), T = seq;
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(D));
  // One item per (sequence, kv head): the query heads sharing a kv head all add into its dK, dV.
  pool.For(static_cast<size_t>(batch) * c.num_key_value_heads, [&](size_t item, int thread) {
    const int b = static_cast<int>(item) / c.num_key_value_heads,
              g = static_cast<int>(item) % c.num_key_value_heads;
    const int64_t row0 = b * T;
    const float* K = k + row0 * KV + g * D;
    const float* V = v + row0 * KV + g * D;
    float* dK = dk + row0 * KV + g * D;
    float* dV = dv + row0 * KV + g * D;
    for (int64_t t = 0; t < T; ++t) {
      std::fill_n(dK + t * KV, D, 0.0f);
      std::fill_n(dV + t * KV, D, 0.0f);
    }
    float* dP = scratch[static_cast<size_t>(thread)].data();  // [T, T]
    for (int h = g * group; h < (g + 1) * group; ++h) {
      const float* P = p + (static_cast<int64_t>(b) * c.num_attention_heads + h) * T * T;
      const float* dO = datt + row0 * Q + h * D;
      const float* Qh = q + row0 * Q + h * D;
      Gemm(true, false, T, D, T, 1.0f, P, T, dO, Q, 1.0f, dV, KV);  // dV += Pᵀ·dO
      Gemm(false, true, T, T, D, 1.0f, dO, Q, V, KV, 0.0f, dP, T);  // dP = dO·Vᵀ
      for (int64_t i = 0; i < T; ++i) {  // softmax backward: dS = P∘(dP − Σ_j P·dP), scaled
        const float* pr = P + i * T;
        float* dr = dP + i * T;
        const int64_t lo = window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
        double dot = 0;
        for (int64_t j = lo; j <= i; ++j) dot += static_cast<double>(pr[j]) * dr[j];
        for (int64_t j = lo; j <= i; ++j)
          dr[j] = pr[j] * (dr[j] - static_cast<float>(dot)) * inv_sqrt_d;
        std::fill(dr, dr + lo, 0.0f);
        std::fill(dr + i + 1, dr + T, 0.0f);
      }
      Gemm(false, false, T, D, T, 1.0f, dP, T, K, KV, 0.0f, dq + row0 * Q + h * D, Q);  // dQ = dS·K
      Gemm(true, false, T, D, T, 1.0f, dP, T, Qh, Q, 1.0f, dK, KV);  // dK += dSᵀ·Q
    }
  });
}

void CachedAttentionForward(ThreadPool& pool, const LlamaConfig& c, const float* q,
                            const float* k_cache, const float* v_cache, int m, int first,
                            int window, std::vector<AlignedFloats>& scratch, float* att) {
  const int D = c.head_dim, group = c.num_attention_heads / c.num_key_value_heads;
  const int64_t Q = c.q_dim(), KV = c.kv_dim();
  pool.For(static_cast<size_t>(c.num_attention_heads), [&](size_t h, int thread) {
    const int64_t g = static_cast<int64_t>(h) / group;
    AttentionHeadForward(q + h * D, k_cache + g * D, v_cache + g * D, Q, KV, m, first, D, window,
                         scratch[static_cast<size_t>(thread)].data(), first + m, att + h * D);
  });
}

void SwigluForward(ThreadPool& pool, const float* gate, const float* up, float* act, int64_t n) {
  ForBlocks(pool, n, kElementBlock, [&](int64_t begin, int64_t end) {
    Eigen::Map<const Eigen::ArrayXf> z(gate + begin, end - begin), u(up + begin, end - begin);
    Eigen::Map<Eigen::ArrayXf>(act + begin, end - begin) = z / (1.0f + (-z).exp()) * u;
  });
}

void SwigluBackward(ThreadPool& pool, const float* gate, const float* up, const float* dact,
                    float* dgate, float* dup, int64_t n) {
  ForBlocks(pool, n, kElementBlock, [&](int64_t begin, int64_t end) {
    const int64_t count = end - begin;
    Eigen::Map<const Eigen::ArrayXf> z(gate + begin, count), u(up + begin, count),
        da(dact + begin, count);
    Eigen::Map<Eigen::ArrayXf> sig(dgate + begin, count), du(dup + begin, count);
    sig = 1.0f / (1.0f + (-z).exp());
    du = da * z * sig;
    sig = da * u * sig * (1.0f + z * (1.0f - sig));  // now ∂/∂gate
  });
}

}  // namespace fedlora::common
