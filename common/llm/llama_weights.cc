// LlamaWeights (llama.h): the frozen weights of a checkpoint, mapped or owned, through a table in
// Hugging Face's state-dict order; reading, random initialisation, merging an adapter, writing.
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include "absl/status/status.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/llama.h"
#include "common/tensor/eigen_types.h"

namespace fedlora::common {

LlamaWeights::LlamaWeights(const LlamaConfig& c) : config_(c) {
  const int64_t H = c.hidden_size, V = c.vocab_size;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    table_.push_back({std::move(name), std::move(shape), static_cast<size_t>(n)});
    parameters_ += static_cast<size_t>(n);
    return static_cast<int>(table_.size()) - 1;
  };
  embed_ = add("model.embed_tokens.weight", {V, H});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    LayerEntries e;
    e.bias.fill(-1);
    const std::string p = StrCat("model.layers.", l, ".");
    e.input_norm = add(p + "input_layernorm.weight", {H});
    for (int k = 0; k < kNumLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      if (kind == LinearKind::kGate) e.post_norm = add(p + "post_attention_layernorm.weight", {H});
      e.linear[k] = add(LinearPath(l, kind) + ".weight", {LinearOut(c, kind), LinearIn(c, kind)});
      if (c.has_bias(kind)) e.bias[k] = add(LinearPath(l, kind) + ".bias", {LinearOut(c, kind)});
    }
    if (c.qk_norm) {
      e.q_norm = add(p + "self_attn.q_norm.weight", {c.head_dim});
      e.k_norm = add(p + "self_attn.k_norm.weight", {c.head_dim});
    }
    layers_.push_back(e);
  }
  final_norm_ = add("model.norm.weight", {H});
  lm_head_ = c.tie_word_embeddings ? embed_ : add("lm_head.weight", {V, H});
}

size_t LlamaWeights::Own(size_t bytes) {
  const size_t offset = (owned_.size() + 63) / 64 * 64;
  owned_.resize(offset + bytes);
  return offset;
}

std::vector<TensorToWrite> LlamaWeights::Tensors() const {
  std::vector<TensorToWrite> out;
  for (size_t i = 0; i < table_.size(); ++i)
    out.push_back({table_[i].name, table_[i].shape, matrix(static_cast<int>(i))});
  return out;
}

LlamaWeights LlamaWeights::Random(const LlamaConfig& config, uint64_t seed, float std,
                                  DType dtype) {
  LlamaWeights w(config);
  w.dtype_ = dtype;
  size_t bytes = 0;
  for (Entry& e : w.table_) {
    e.dtype = e.matrix() ? dtype : DType::kF32;
    bytes = (bytes + 63) / 64 * 64 + e.elements * DTypeSize(e.dtype);
  }
  w.owned_.reserve(bytes);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, std);
  std::vector<float> values;
  for (Entry& e : w.table_) {
    // Norm weights 1 and biases 0, as transformers initialises them.
    const bool bias = e.name.ends_with(".bias");
    e.offset = w.Own(e.elements * DTypeSize(e.dtype));
    values.resize(std::min<size_t>(e.elements, 1 << 16));
    for (size_t i = 0; i < e.elements; i += values.size()) {
      const size_t n = std::min(values.size(), e.elements - i);
      for (size_t j = 0; j < n; ++j) values[j] = bias ? 0.0f : !e.matrix() ? 1.0f : normal(rng);
      FromF32(std::span(values).first(n), e.dtype,
              w.owned_.data() + e.offset + i * DTypeSize(e.dtype));
    }
  }
  return w;
}

absl::StatusOr<std::vector<std::filesystem::path>> WeightFiles(const std::filesystem::path& dir) {
  if (std::filesystem::exists(dir / kModelWeightsFile)) return std::vector{dir / kModelWeightsFile};
  if (!std::filesystem::exists(dir / kModelIndexFile))
    return absl::NotFoundError(
        StrCat("no ", kModelWeightsFile, " or ", kModelIndexFile, " in ", dir.string()));
  std::ifstream in(dir / kModelIndexFile);
  nlohmann::json index = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.contains("weight_map") || !index["weight_map"].is_object())
    return absl::InvalidArgumentError(
        StrCat((dir / kModelIndexFile).string(), ": expected a JSON object with \"weight_map\""));
  std::set<std::string> shards;
  for (const auto& [name, file] : index["weight_map"].items()) {
    if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos)
      return absl::InvalidArgumentError(StrCat((dir / kModelIndexFile).string(), ": tensor ", name,
                                               " maps to ", file.dump(),
                                               ", expected a file name in the directory"));
    shards.insert(file.get<std::string>());
  }
  std::vector<std::filesystem::path> files;
  for (const std::string& shard : shards) files.push_back(dir / shard);
  return files;
}

absl::StatusOr<LlamaWeights::Checkpoint> LlamaWeights::Match(
    const std::filesystem::path& dir) const {
  ASSIGN_OR_RETURN(const std::vector<std::filesystem::path> paths, WeightFiles(dir));
  Checkpoint checkpoint;
  for (const std::filesystem::path& path : paths) {
    ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::Open(path));
    checkpoint.files.push_back(std::move(file));
  }
  std::map<std::string, size_t> expected;
  for (size_t i = 0; i < table_.size(); ++i) expected[table_[i].name] = i;
  checkpoint.tensors.assign(table_.size(), {nullptr, nullptr});
  int64_t tensors = 0, parameters = 0;  // what the checkpoint holds
  for (size_t f = 0; f < paths.size(); ++f) {
    const SafetensorsView& view = checkpoint.files[f].view();
    for (const TensorInfo& t : view.tensors()) {
      ++tensors;
      parameters += t.num_elements();
      auto it = expected.find(t.name);
      if (it == expected.end()) {
        if (t.name == "lm_head.weight" && config_.tie_word_embeddings) continue;  // tied copy
        if (t.name.ends_with("rotary_emb.inv_freq")) continue;  // recomputed from rope_theta
        return absl::InvalidArgumentError(
            StrCat(paths[f].string(), ": unexpected tensor ", t.name, " ", ShapeString(t.shape),
                   " (not part of a ", config_.model_type, " checkpoint with this config.json",
                   t.name.ends_with(".bias") ? ", which has no bias there)" : ")"));
      }
      const Entry& e = table_[it->second];
      if (t.shape != e.shape)
        return absl::InvalidArgumentError(StrCat(paths[f].string(), ": config.json says ", t.name,
                                                 " is ", ShapeString(e.shape),
                                                 ", the checkpoint has ", ShapeString(t.shape),
                                                 " (hint: config.json of another model?)"));
      checkpoint.tensors[it->second] = {&view, &t};
    }
  }
  for (size_t i = 0; i < table_.size(); ++i) {
    if (checkpoint.tensors[i].second != nullptr) continue;
    ASSIGN_OR_RETURN(const ModelSize size, ModelSizeOf(config_));
    return absl::InvalidArgumentError(StrCat(
        "model in ", dir.string(), ": config.json says ", table_.size(), " tensors of ",
        size.parameters, " parameters (", size.f32_bytes, " bytes as f32), the checkpoint has ",
        tensors, " tensors of ", parameters, " parameters and no ", table_[i].name, " ",
        ShapeString(table_[i].shape), " (hint: config.json of another model?)"));
  }
  return checkpoint;
}

absl::StatusOr<ModelSize> LlamaWeights::Check(const std::filesystem::path& dir) {
  ASSIGN_OR_RETURN(const LlamaConfig config, ReadLlamaConfig(dir));
  RETURN_IF_ERROR(LlamaWeights(config).Match(dir).status());
  return ModelSizeOf(config);
}

absl::StatusOr<LlamaWeights> LlamaWeights::Read(const std::filesystem::path& dir) {
  ASSIGN_OR_RETURN(const LlamaConfig config, ReadLlamaConfig(dir));
  LlamaWeights w(config);
  // The buffer only once the checkpoint holds every tensor: a config.json that does not describe
  // the checkpoint costs nothing.
  ASSIGN_OR_RETURN(Checkpoint checkpoint, w.Match(dir));
  w.dtype_ = checkpoint.tensors[static_cast<size_t>(w.embed_)].second->dtype;
  const auto stored = [&](size_t i) {
    return checkpoint.tensors[i].first->Elements(*checkpoint.tensors[i].second);
  };
  // A matrix is used in place when its offset suits its type; vectors are held as f32.
  size_t owned = 0;
  for (size_t i = 0; i < w.table_.size(); ++i) {
    Entry& e = w.table_[i];
    const StoredSpan s = stored(i);
    if (!AllFinite(s.data(), s.dtype(), s.size()))
      return absl::InvalidArgumentError(
          StrCat("model in ", dir.string(), " has NaN or Inf weights in ", e.name));
    e.dtype = e.matrix() ? s.dtype() : DType::kF32;
    if (e.dtype == s.dtype() && reinterpret_cast<uintptr_t>(s.data()) % DTypeSize(e.dtype) == 0)
      e.mapped = static_cast<const std::byte*>(s.data());
    else
      owned = (owned + 63) / 64 * 64 + e.elements * DTypeSize(e.dtype);
  }
  w.owned_.reserve(owned);
  for (size_t i = 0; i < w.table_.size(); ++i) {
    Entry& e = w.table_[i];
    if (e.mapped != nullptr) continue;
    const StoredSpan s = stored(i);
    e.offset = w.Own(e.elements * DTypeSize(e.dtype));
    if (e.dtype == s.dtype())
      std::memcpy(w.owned_.data() + e.offset, s.data(), s.size_bytes());
    else
      s.ToF32({reinterpret_cast<float*>(w.owned_.data() + e.offset), e.elements});
  }
  w.files_ = std::make_shared<const std::vector<SafetensorsFile>>(std::move(checkpoint.files));
  return w;
}

absl::Status LlamaWeights::Merge(const Adapter& adapter, std::optional<DType> held) {
  ASSIGN_OR_RETURN(std::vector<size_t> slots, AdapterSlots(config_, adapter));
  const DType to = held.value_or(dtype_);
  const auto entry_of = [&](size_t i) {
    return layers_[slots[i] / kNumLinearKinds].linear[slots[i] % kNumLinearKinds];
  };
  const auto in_place = [&](const Entry& e) { return e.mapped == nullptr && e.dtype == to; };
  // Room for every new copy first: owned_ must not move while a matrix is read from it.
  size_t owned = owned_.size();
  for (size_t i = 0; i < slots.size(); ++i)
    if (const Entry& e = table_[static_cast<size_t>(entry_of(i))]; !in_place(e))
      owned = (owned + 63) / 64 * 64 + e.elements * DTypeSize(to);
  owned_.reserve(owned);
  std::vector<float> row;
  for (size_t i = 0; i < slots.size(); ++i) {
    const int entry = entry_of(i);
    Entry& e = table_[static_cast<size_t>(entry)];
    const LoraModule& m = adapter.module(i);
    MatrixD b = adapter.B(i).cast<double>() * m.scaling;
    if (m.has_r) b = b * adapter.R(i).cast<double>();
    const MatrixD delta = b * adapter.A(i).cast<double>();
    const StoredSpan from = matrix(entry);
    const size_t offset = in_place(e) ? e.offset : Own(e.elements * DTypeSize(to));
    const size_t in = static_cast<size_t>(m.in_features);
    row.resize(in);
    for (int64_t r = 0; r < m.out_features; ++r) {  // row by row: no f32 copy of the matrix
      from.subspan(static_cast<size_t>(r) * in, in).ToF32(row);
      Eigen::Map<Eigen::RowVectorXf> w(row.data(), static_cast<Eigen::Index>(in));
      w = (w.cast<double>() + delta.row(r)).cast<float>();
      FromF32(row, to, owned_.data() + offset + static_cast<size_t>(r) * in * DTypeSize(to));
    }
    e = {e.name, e.shape, e.elements, to, nullptr, offset};
  }
  return absl::OkStatus();
}

absl::Status LlamaWeights::WriteInto(const std::filesystem::path& dir, std::optional<DType> wanted,
                                     Env* env) const {
  const DType dtype = wanted.value_or(dtype_);
  nlohmann::json json = LlamaConfigJson(config_);
  json["torch_dtype"] = dtype == DType::kBF16  ? "bfloat16"
                        : dtype == DType::kF16 ? "float16"
                                               : "float32";
  RETURN_IF_ERROR(WriteFileSynced(dir / kModelConfigFile, json.dump(2) + "\n", env));
  const std::vector<TensorToWrite> tensors = Tensors();
  return WriteFileSynced(
      dir / kModelWeightsFile,
      [&](std::FILE* f) {
        return WriteSafetensors(f, tensors, dtype, {{"format", "pt"}});
      },
      env);
}

absl::Status LlamaWeights::WriteModelDirectory(const std::filesystem::path& dir,
                                               const std::filesystem::path& companion_dir,
                                               std::optional<DType> dtype, bool overwrite,
                                               Env* env) const {
  return BuildDirectoryAtomically(
      dir, overwrite,
      [&](const std::filesystem::path& out) -> absl::Status {
        RETURN_IF_ERROR(WriteInto(out, dtype, env));
        for (const auto& entry : std::filesystem::directory_iterator(companion_dir)) {
          const std::string name = entry.path().filename().string();
          if (!entry.is_regular_file() || name == kModelConfigFile || name == kModelIndexFile ||
              name.ends_with(".safetensors"))
            continue;
          ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(entry.path()));
          RETURN_IF_ERROR(WriteFileSynced(out / name, bytes, env));
        }
        return absl::OkStatus();
      },
      env);
}

}  // namespace fedlora::common
