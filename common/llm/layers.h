// The layers of a Llama decoder as free functions, in the manner of llm.c: each *Forward has its
// *Backward, which reads as the forward in reverse; buffers are plain row-major float arrays whose
// shapes the comments give; the work runs on a ThreadPool in blocks of fixed sizes (workspace.h),
// so that a result never depends on the number of threads. LlamaRunner (a batch of sequences,
// forward and backward, llama_runner.cc) and Decoder (new positions against a KV cache,
// decoder.cc) compute every layer with these functions.
#ifndef FEDLORA_COMMON_LLM_LAYERS_H_
#define FEDLORA_COMMON_LLM_LAYERS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/parallel.h"
#include "common/llm/llama.h"
#include "common/llm/workspace.h"

namespace fedlora::common {

// Sets OpenBLAS to one thread for the process, once (the first runner or decoder does): the pool
// splits every product itself, in blocks that do not depend on the thread count, while OpenBLAS's
// own split would change the products' bits with its number of threads.
void UseOneBlasThread();

// C = alpha·A·op(W) + beta·C on this thread, op transposing when tw; C is m×n, the inner size k.
// W may be stored in any DType: f16 and bf16 are converted exactly to f32 in panels of at most
// kWeightPanel elements into the thread's scratch, each panel multiplied on OpenBLAS's sgemm, so
// the product is the f32 product with those weights (a panel costs its conversion once for all m
// rows).
inline constexpr int64_t kWeightPanel = int64_t{1} << 20;
void GemmStored(bool tw, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                StoredSpan w, int64_t ldw, float beta, float* c, int64_t ldc);

// Y (+)= alpha·X·Wᵀ.  X [rows, n], W [m, n], Y [rows, m].
void MatMulNT(ThreadPool& pool, const float* x, const float* w, float* y, int64_t rows, int64_t n,
              int64_t m, float alpha, bool accumulate);
void MatMulNT(ThreadPool& pool, const float* x, StoredSpan w, float* y, int64_t rows, int64_t n,
              int64_t m, float alpha, bool accumulate);
// Y (+)= X·W.  X [rows, m], W [m, n], Y [rows, n].
void MatMulNN(ThreadPool& pool, const float* x, const float* w, float* y, int64_t rows, int64_t m,
              int64_t n, bool accumulate);
void MatMulNN(ThreadPool& pool, const float* x, StoredSpan w, float* y, int64_t rows, int64_t m,
              int64_t n, bool accumulate);
// G += alpha·Xᵀ·Y.  X [rows, a], Y [rows, b], G [a, b].
void MatMulTN(ThreadPool& pool, const float* x, const float* y, float* g, int64_t rows, int64_t a,
              int64_t b, float alpha);

// x[n] = the embedding of ids[n].  table [V, H], x [count, H].
void EmbeddingForward(const int32_t* ids, int64_t count, StoredSpan table, int hidden, float* x);

// A linear of the model with its adapter module, if any: y = x·Wᵀ + bias + s·B·A·x (LoRA, Hu et
// al. 2021), or + s·B·R·A·x (LoRA-SB, Ponkshe et al. 2024), all views into the weights and the
// adapter.
struct Linear {
  int64_t in = 0, out = 0;
  StoredSpan w;                 // [out, in], as the checkpoint stores it
  const float* bias = nullptr;  // [out], or null
  int module = -1;              // the adapter's module, or -1 (then the rest is unset)
  int64_t rank = 0;
  float scaling = 0;
  const float* a = nullptr;  // [r, in]
  const float* b = nullptr;  // [out, r]
  const float* r = nullptr;  // [r, r], LoRA-SB only (null for LoRA)
};

// The model's linears with `adapter`'s modules on them (null: none), [L·7] by layer·7 + kind; an
// adapter module that is not a linear of the model is refused by name.
absl::StatusOr<std::vector<Linear>> ModelLinears(const LlamaWeights& weights,
                                                 const Adapter* adapter);

// y = x·Wᵀ + bias + s·u'·Bᵀ with u = x·Aᵀ and u' = u·Rᵀ (LoRA-SB) or u (LoRA).
// x [rows, in], y [rows, out]; u [rows, r] keeps x·Aᵀ for the backward; v [rows, r] is scratch for
// u·Rᵀ (LoRA-SB only).
void LinearForward(ThreadPool& pool, const Linear& p, const float* x, float* y, int64_t rows,
                   float* u, float* v);

// Where a module's gradients go (null: not wanted), each laid out as its parameter.
struct LoraGrads {
  float* a = nullptr;  // [r, in]
  float* b = nullptr;  // [out, r]
  float* r = nullptr;  // [r, r]
};
// Given dy [rows, out]: dx (+)= dy·W + du'·A with du = s·dy·B [rows, r] and du' = du·R (LoRA-SB)
// or du; and into `grads`: LoRA dB += s·dyᵀ·u, dA += duᵀ·x; LoRA-SB dR += duᵀ·u (A, B frozen).
// x [rows, in] and u [rows, r] as the forward left them; du, du2 [rows, r] scratch.
void LinearBackward(ThreadPool& pool, const Linear& p, const float* x, const float* u,
                    const float* dy, float* dx, bool accumulate, int64_t rows,
                    const LoraGrads& grads, float* du, float* du2);

// RMSNorm (Zhang & Sennrich 2019): y = x·ρ·g with ρ = 1/√(mean(x²) + eps) per row of `width`, the
// sum of squares in double. x, y [rows, width] (y may be x); g [width]; rho [rows] keeps ρ for the
// backward, or is null.
void RmsNormForward(ThreadPool& pool, const float* x, const float* g, double eps, float* rho,
                    float* y, int64_t rows, int width);
// dx += ∂/∂x given dy [rows, width]: ∂/∂x_j = ρ·g_j·dy_j − x_j·ρ³/width·Σ_k g_k·dy_k·x_k.
void RmsNormBackward(ThreadPool& pool, const float* x, const float* g, const float* rho,
                     const float* dy, float* dx, int64_t rows, int width);

// Rotary embedding (Su et al. 2021) in Hugging Face's rotate_half convention: the halves (x1, x2)
// of each head become (x1·cos − x2·sin, x2·cos + x1·sin) at the row's position, row n being at
// position first + n mod seq. `inverse` applies the transposed rotation, which carries gradients
// back. x [rows, heads·D] in place; cos, sin [positions, D/2] (RopeTables).
void Rope(ThreadPool& pool, float* x, int64_t rows, int heads, int head_dim, const float* cos,
          const float* sin, int first, int64_t seq, bool inverse);

// Grouped-query attention with `c`'s heads and head_dim (query head h reads kv head h / (Hq /
// Hkv)). Causal attention of `batch` sequences of `seq` tokens (row n = b·seq + t). q, att [N,
// Hq·D]; k, v [N, Hkv·D]; p [batch, Hq, seq, seq] keeps the probabilities.
void AttentionForward(ThreadPool& pool, const LlamaConfig& c, const float* q, const float* k,
                      const float* v, int batch, int seq, int window, float* p, float* att);
// Given datt [N, Hq·D]: dq [N, Hq·D], dk, dv [N, Hkv·D] (set, not added). scratch: per thread,
// [seq, seq] floats.
void AttentionBackward(ThreadPool& pool, const LlamaConfig& c, const float* q, const float* k,
                       const float* v, const float* p, const float* datt, int batch, int seq,
                       int window, float* dq, float* dk, float* dv,
                       std::vector<AlignedFloats>& scratch);
// The decoder's: m new positions first..first+m−1 of one sequence against a KV cache holding
// positions 0..first+m−1. q, att [m, Hq·D]; k_cache, v_cache [≥ first+m, Hkv·D]; scratch: per
// thread, [m, first+m] floats.
void CachedAttentionForward(ThreadPool& pool, const LlamaConfig& c, const float* q,
                            const float* k_cache, const float* v_cache, int m, int first,
                            int window, std::vector<AlignedFloats>& scratch, float* att);

// SwiGLU's gate (Shazeer 2020): act = silu(gate)·up = gate/(1 + e^(−gate))·up over n elements (act
// may be gate).
void SwigluForward(ThreadPool& pool, const float* gate, const float* up, float* act, int64_t n);
// Given dact: dgate = dact·up·σ·(1 + gate·(1 − σ)) and dup = dact·gate·σ, σ = 1/(1 + e^(−gate)).
void SwigluBackward(ThreadPool& pool, const float* gate, const float* up, const float* dact,
                    float* dgate, float* dup, int64_t n);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_LAYERS_H_
