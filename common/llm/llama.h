// A Llama-family decoder with LoRA / LoRA-SB adapters: weights, forward, and backward to the
// adapter's parameters, on the CPU in f32.
//
// In the shape of llm.c's train_gpt2.c: the frozen weights are found through a table (PyTorch's
// [out, in] layout, row-major; mapped from the checkpoint in its type, LlamaWeights below);
// activations live in one workspace allocated once for the largest batch, so a training step
// allocates nothing; the layers are layers.h's free functions, each *Forward with its *Backward,
// which reads as the forward in reverse (the KV-cache Decoder runs the same functions). Only the
// adapter is trained: no gradient is formed for a frozen weight. LlamaWeights is in
// llama_weights.cc, LlamaRunner in llama_runner.cc.
//
// The forward is Hugging Face's LlamaForCausalLM (transformers 4.4x–4.5x) exactly: RMSNorm
// x·rsqrt(mean(x²)+eps)·g; rotary embeddings in the rotate_half convention with the config's
// inverse frequencies (RopeInverseFrequencies: θ^(-2i/D), scaled as rope_scaling says); causal
// grouped-query attention with scores scaled by 1/√D, over a sliding window where the layer has
// one (Mistral, Qwen); SwiGLU down(silu(gate(x))·up(x)); LM head tied to embed_tokens or separate.
// Frozen biases are added where the family has them (Qwen2's q, k, v), and Qwen3's q_norm/k_norm
// RMS-normalise each head of q and k before RoPE. A LoRA module adds s·B·A·x to its linear
// (s·B·R·A·x for LoRA-SB).
//
// Results are the same to the bit for any thread count, run or process (workspace.h): every buffer
// starts on a 64-byte boundary, so where Eigen's vector loops begin a row is fixed by its offset,
// not by the heap; work is cut into blocks of fixed sizes, never by the number of threads, each
// block writes only its own outputs, and per-row losses are summed in row order; OpenBLAS runs one
// thread per call, the pool's threads taking the blocks.
#ifndef FEDLORA_COMMON_LLM_LLAMA_H_
#define FEDLORA_COMMON_LLM_LLAMA_H_

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/env.h"
#include "common/base/parallel.h"
#include "common/llm/llama_config.h"
#include "common/tensor/adapter.h"
#include "common/tensor/safetensors.h"

namespace fedlora::common {

inline constexpr char kModelWeightsFile[] = "model.safetensors";
inline constexpr char kModelIndexFile[] = "model.safetensors.index.json";

// The safetensors files of the model in `dir`: model.safetensors, or the shards its
// model.safetensors.index.json lists (each a file name in `dir`).
absl::StatusOr<std::vector<std::filesystem::path>> WeightFiles(const std::filesystem::path& dir);

// The frozen weights of a checkpoint. The matrices (linears, embeddings, LM head) stay in the
// checkpoint's type (f32, bf16 or f16), memory-mapped from its files: a model takes the memory of
// its checkpoint, and pages are shared with every process mapping the same files. The vectors
// (norms, biases) are held as f32. Copies share the mapped files; only what Merge changes is owned.
// The files must not be truncated or rewritten in place while mapped (replacing them by rename,
// as every fedlora writer does, is safe).
class LlamaWeights {
 public:
  // Reads <dir>/config.json and maps the weights of model.safetensors or of the shards listed in
  // model.safetensors.index.json (F32, F16 or BF16; a tensor whose offset is not aligned to its
  // type is copied instead). Before any weight is read (only the table of names and shapes, bounded
  // by the config's caps, is built), every tensor config.json implies is looked up in the
  // safetensors headers: a missing, misshapen or unexpected tensor (e.g. a bias) is refused by
  // name, with what config.json says and what the checkpoint has; NaN or Inf weights are refused.
  static absl::StatusOr<LlamaWeights> Read(const std::filesystem::path& dir);

  // Read's checks alone, reading config.json and the safetensors headers, no weights: the model's
  // size when the checkpoint is the one config.json describes, else Read's error.
  static absl::StatusOr<ModelSize> Check(const std::filesystem::path& dir);

  // A randomly initialised model as transformers initialises one: linears and embeddings
  // N(0, std²) (transformers' initializer_range, 0.02), norms 1. Deterministic in `seed`; the
  // matrices are held rounded to `dtype`.
  static LlamaWeights Random(const LlamaConfig& config, uint64_t seed, float std = 0.02f,
                             DType dtype = DType::kF32);

  // Folds an adapter into the weights: W ← W + s·B·A (s·B·R·A for LoRA-SB), in float64, each
  // changed matrix then held in `held` (default: the checkpoint's type, rounded once, what a
  // merged model is written in; f32 for merges that repeat, such as FLoRA's, so as not to round
  // each time). Refuses an adapter whose modules are not linears of this model, and changes
  // nothing then.
  absl::Status Merge(const Adapter& adapter, std::optional<DType> held = std::nullopt);

  // Writes config.json and model.safetensors into `dir` (which must exist), each fsynced, the
  // matrices in `dtype` (the checkpoint's type when unset).
  absl::Status WriteInto(const std::filesystem::path& dir, std::optional<DType> dtype = {},
                         Env* env = Env::Default()) const;

  // Writes a whole model directory atomically: these weights, plus every other file of
  // `companion_dir` (tokenizer.json, generation_config.json, ...) but its weights and config.
  absl::Status WriteModelDirectory(const std::filesystem::path& dir,
                                   const std::filesystem::path& companion_dir,
                                   std::optional<DType> dtype, bool overwrite,
                                   Env* env = Env::Default()) const;

  // The tensors under their Hugging Face names, as held (views into this object).
  std::vector<TensorToWrite> Tensors() const;

  const LlamaConfig& config() const { return config_; }
  // The type the checkpoint stores its matrices in (Random's dtype).
  DType dtype() const { return dtype_; }
  StoredSpan embed() const { return matrix(embed_); }                         // [V, H]
  const float* input_norm(int l) const { return at(layers_[l].input_norm); }  // [H]
  StoredSpan linear(int l, LinearKind k) const {                              // [out, in]
    return matrix(layers_[l].linear[static_cast<int>(k)]);
  }
  const float* bias(int l, LinearKind k) const {  // [out], or null without one
    return at(layers_[l].bias[static_cast<int>(k)]);
  }
  const float* q_norm(int l) const { return at(layers_[l].q_norm); }        // [D], or null
  const float* k_norm(int l) const { return at(layers_[l].k_norm); }        // [D], or null
  const float* post_norm(int l) const { return at(layers_[l].post_norm); }  // [H]
  const float* final_norm() const { return at(final_norm_); }               // [H]
  StoredSpan lm_head() const { return matrix(lm_head_); }                   // [V, H]
  size_t num_parameters() const { return parameters_; }

 private:
  struct Entry {
    std::string name;
    std::vector<int64_t> shape;
    size_t elements = 0;
    DType dtype = DType::kF32;          // as held: a matrix's stored type, f32 for a vector
    const std::byte* mapped = nullptr;  // in files_, or null: owned_ from `offset` (bytes)
    size_t offset = 0;
    bool matrix() const { return shape.size() == 2; }
  };
  // Table entries of a decoder layer; -1 where the architecture has no such tensor.
  struct LayerEntries {
    int input_norm = -1, post_norm = -1, q_norm = -1, k_norm = -1;
    std::array<int, kNumLinearKinds> linear{}, bias{};
  };
  // The checkpoint in a directory (its files mapped, only their headers parsed) in which every
  // entry of table_ was found with its shape: per entry, the view and the tensor that hold it.
  struct Checkpoint {
    std::vector<SafetensorsFile> files;
    std::vector<std::pair<const SafetensorsView*, const TensorInfo*>> tensors;
  };
  // The table of `config`'s tensors; the buffer is left to Random and Read.
  explicit LlamaWeights(const LlamaConfig& config);
  absl::StatusOr<Checkpoint> Match(const std::filesystem::path& dir) const;
  const std::byte* bytes(int entry) const {
    if (entry < 0) return nullptr;
    const Entry& e = table_[static_cast<size_t>(entry)];
    return e.mapped != nullptr ? e.mapped : owned_.data() + e.offset;
  }
  StoredSpan matrix(int entry) const {
    const Entry& e = table_[static_cast<size_t>(entry)];
    return {bytes(entry), e.dtype, e.elements};
  }
  const float* at(int entry) const { return reinterpret_cast<const float*>(bytes(entry)); }
  // Owned room for `bytes` more, at the returned offset (a multiple of 64 from owned_'s start).
  // owned_ is reserved before anything is read from it and then extended: it must not move.
  size_t Own(size_t bytes);

  LlamaConfig config_;
  DType dtype_ = DType::kF32;
  std::vector<Entry> table_;  // in Hugging Face's state-dict order
  int embed_ = -1, final_norm_ = -1, lm_head_ = -1;
  std::vector<LayerEntries> layers_;
  size_t parameters_ = 0;
  std::shared_ptr<const std::vector<SafetensorsFile>> files_;  // what the mapped entries point into
  std::vector<std::byte> owned_;
};

// One batch of token sequences, right-padded to a common length.
struct TokenBatch {
  int batch = 0;
  int seq = 0;
  std::vector<int32_t> input_ids;  // [batch, seq]
  // [batch, seq]; -100 marks a position without loss. As in Hugging Face, position t is trained to
  // predict labels[t+1] (the shift happens inside the model).
  std::vector<int32_t> labels;

  // Positions that carry a loss term.
  int64_t TargetCount() const;
};

struct LossSum {
  double sum = 0;      // Σ cross-entropy (nats) over target tokens
  int64_t tokens = 0;  // number of target tokens
};

// Runs a model (and optionally an adapter) on batches up to a fixed size. Holds the workspace, so
// one runner serves a whole training run without allocating.
class LlamaRunner {
 public:
  struct Options {
    int max_batch = 1;
    int max_seq = 128;
    bool training = false;  // keep every layer's activations for ForwardBackward
    // With training: keep only each layer's input and recompute the layer's activations in the
    // backward pass (one more forward per step; activation memory of one layer, not all of them).
    bool checkpoint_activations = false;
    int threads = 0;  // 0: the machine's cores
  };

  // `weights` and `adapter` (null for the base model) must outlive the runner. Every adapter module
  // must name a linear of the model ("model.layers.<l>.self_attn.q_proj" etc.) with its shape.
  static absl::StatusOr<std::unique_ptr<LlamaRunner>> Create(const LlamaWeights* weights,
                                                             const Adapter* adapter,
                                                             const Options& options);
  ~LlamaRunner();

  // The summed cross-entropy of the batch's targets.
  absl::StatusOr<LossSum> Forward(const TokenBatch& batch);

  // Bytes of the workspace (activations, their gradients, scratch), allocated at Create.
  size_t workspace_bytes() const;

  // The logits of the token after `ids` (one sequence, up to max_seq tokens): the LM head's output
  // at the last position, [vocab_size]. The whole sequence goes through the forward (no cache).
  absl::StatusOr<std::vector<float>> NextTokenLogits(std::span<const int32_t> ids);

  // Forward, then backward: adds scale·∂(Σ cross-entropy)/∂θ to `grads` for the adapter's
  // trainable parameters (A and B of LoRA modules, R of LoRA-SB modules), laid out as
  // adapter->values(); other entries are left alone.
  absl::StatusOr<LossSum> ForwardBackward(const TokenBatch& batch, float scale,
                                          std::span<float> grads);

  // Forward, then backward to the frozen weights of the given linears: adds scale·∂(Σ CE)/∂W
  // ([out, in]) to dense[l·7 + kind] where that pointer is set. For LoRA-SB's initialisation,
  // which needs the gradient with respect to W0; the adapter, if any, gets no gradient.
  absl::StatusOr<LossSum> WeightGradients(const TokenBatch& batch, float scale,
                                          const std::vector<float*>& dense);

  // One linear's share of a batch's weight gradient: scale·∂(Σ CE)/∂W = dyᵀ·x, summed over the
  // batch's rows (token n = b·seq + t; padding rows are zero in dy).
  struct GradientRows {
    int layer = 0;
    LinearKind kind = LinearKind::kQ;
    const float* x = nullptr;   // [rows, in] the linear's input
    const float* dy = nullptr;  // [rows, out] the scaled gradient at its output
    int64_t rows = 0;
  };
  // The same backward pass, handing the rows of every linear with wanted[l·7 + kind] set to
  // `sink` instead of forming the m×n gradient: what needs only products of the gradient (the
  // sketches of Fed-SB's initialisation) costs O(rows·(in + out)) per column. Called on this
  // thread, one linear at a time.
  absl::StatusOr<LossSum> WeightGradientRows(const TokenBatch& batch, float scale,
                                             const std::vector<bool>& wanted,
                                             const std::function<void(const GradientRows&)>& sink);

  class Impl;

 private:
  explicit LlamaRunner(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_LLAMA_H_
