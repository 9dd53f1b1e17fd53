// The trainer's commands of the offline `fedlora` tool:
//   fedlora eval       — mean cross-entropy of a JSONL file under a model (and an adapter)
//   fedlora train      — a centralised LoRA / LoRA-SB fine-tuning run that writes a PEFT adapter
//   fedlora merge      — a model with an adapter folded into its weights
//   fedlora init-model — a randomly initialised Llama checkpoint in the Hugging Face layout
//   fedlora make-data  — a synthetic instruction dataset split non-IID across clients
#include <spdlog/spdlog.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>

#include "client/tool/commands.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/accuracy.h"
#include "common/llm/decoder.h"
#include "common/llm/synthetic_data.h"
#include "common/llm/trainer.h"
#include "common/privacy/privacy_accountant.h"
#include "common/tensor/peft.h"

namespace fedlora::tool {
namespace {

void PrintJson(const nlohmann::json& j) { std::printf("%s\n", j.dump().c_str()); }

common::Model LoadModelOrExit(const std::string& dir) {
  auto model = common::LoadModel(dir);
  ExitIfError(model.status());
  return std::move(*model);
}

std::vector<common::Example> ReadDataOrExit(const common::Model& model, const std::string& path,
                                            int max_length) {
  auto examples = common::ReadExamples(path, model.tokens, max_length);
  ExitIfError(examples.status());
  size_t without_targets = 0;
  for (const common::Example& e : *examples) without_targets += common::TargetCount(e) == 0;
  if (without_targets > 0)
    spdlog::warn(
        "{} of {} records of {} have no target tokens within {} tokens (a longer maximum length "
        "keeps their responses)",
        without_targets, examples->size(), path, max_length);
  return std::move(*examples);
}

std::optional<common::Adapter> ReadAdapterOrExit(const std::string& dir) {
  if (dir.empty()) return std::nullopt;
  auto read = common::ReadPeftAdapter(dir);
  ExitIfError(read.status());
  return std::move(*read);
}

// ---------------------------------------------------------------------------------------------

struct EvalArgs {
  std::string model, adapter, data, responses;
  int max_length = 0;  // 0: the model's max_position_embeddings
  int batch = 8;
  int threads = 0;
  bool accuracy = false;
  int max_new_tokens = 32;
  bool json = false;
};

void RunEval(const EvalArgs& a) {
  const common::Model model = LoadModelOrExit(a.model);
  const std::optional<common::Adapter> adapter = ReadAdapterOrExit(a.adapter);
  const common::Adapter* lora = adapter ? &*adapter : nullptr;
  const int max_length =
      a.max_length > 0 ? a.max_length : model.weights.config().max_position_embeddings;
  const auto examples = ReadDataOrExit(model, a.data, max_length);
  auto loss = common::Evaluate(model.weights, lora, examples, a.batch, a.threads);
  ExitIfError(loss.status());
  if (loss->tokens == 0)
    ExitIfError(absl::InvalidArgumentError(common::StrCat(a.data, " has no target tokens")));
  const double mean = loss->sum / static_cast<double>(loss->tokens);
  std::printf("loss %.6f  perplexity %.4f  over %lld target tokens in %zu records\n", mean,
              std::exp(mean), static_cast<long long>(loss->tokens), examples.size());
  nlohmann::json summary = {{"loss", mean},
                            {"perplexity", std::exp(mean)},
                            {"tokens", loss->tokens},
                            {"records", examples.size()}};
  if (a.accuracy) {
    if (model.tokenizer == nullptr)
      ExitIfError(absl::FailedPreconditionError(a.model + " has no tokenizer.json"));
    auto records = common::ReadAnswerRecords(a.data, *model.tokenizer);
    ExitIfError(records.status());
    auto result = common::MeasureAccuracy(model.weights, lora, *model.tokenizer,
                                          model.weights.config().eos_token_ids, *records,
                                          {.max_new_tokens = a.max_new_tokens}, 0, a.threads);
    ExitIfError(result.status());
    std::printf("accuracy %.4f  (%lld of %zu answers right, greedy, at most %d new tokens)\n",
                result->accuracy(), static_cast<long long>(result->correct), records->size(),
                a.max_new_tokens);
    summary["accuracy"] = result->accuracy();
    const auto by_task = common::AccuracyByTask(*records, *result);
    for (const auto& [task, accuracy] : by_task) std::printf("  %s %.4f\n", task.c_str(), accuracy);
    if (!by_task.empty()) summary["accuracy_by_task"] = by_task;
    summary["correct"] = result->correct;
    summary["answered"] = records->size();
    if (!a.responses.empty()) {
      std::string lines;
      for (size_t i = 0; i < records->size(); ++i)
        lines += nlohmann::json({{"answer", (*records)[i].answer},
                                 {"response", result->responses[i]},
                                 {"correct", static_cast<bool>(result->is_correct[i])}})
                     .dump() +
                 "\n";
      ExitIfError(common::WriteFileAtomically(a.responses, lines));
    }
  }
  if (a.json) PrintJson(summary);
}

// ---------------------------------------------------------------------------------------------

struct GenerateArgs {
  std::string model, adapter, data;
  std::vector<std::string> prompts;
  common::SamplingOptions sampling;
  uint64_t seed = 0;
  int top_probs = 0;
  int threads = 0;
  bool json = false;
};

// The K most probable next tokens and their probabilities (softmax in double, as llama.cpp
// reports them).
nlohmann::json TopProbabilities(std::span<const float> logits, int k) {
  const Eigen::Map<const Eigen::ArrayXf> l(logits.data(), static_cast<Eigen::Index>(logits.size()));
  Eigen::ArrayXd probs = (l.cast<double>() - l.maxCoeff()).exp();
  probs /= probs.sum();
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  const auto top = order.begin() + std::min<std::ptrdiff_t>(k, std::ssize(order));
  std::partial_sort(order.begin(), top, order.end(),
                    [&](int32_t x, int32_t y) { return probs(x) > probs(y); });
  nlohmann::json out = nlohmann::json::array();
  for (auto it = order.begin(); it != top; ++it) out.push_back({{"id", *it}, {"p", probs(*it)}});
  return out;
}

// Decoding over a KV cache (common/llm/decoder.h). A --prompt is encoded as a text record is (the
// tokenizer's prefix, then the text); a --data record as its prompt: an instruction record's
// template up to "### Response:\n", a text record's text.
void RunGenerate(const GenerateArgs& a) {
  const common::Model model = LoadModelOrExit(a.model);
  if (model.tokenizer == nullptr)
    ExitIfError(
        absl::FailedPreconditionError(a.model + " has no tokenizer.json to encode prompts"));
  const std::optional<common::Adapter> adapter = ReadAdapterOrExit(a.adapter);
  std::vector<std::string> texts = a.prompts;
  if (!a.data.empty())
    ExitIfError(common::ForEachJsonRecord(
        a.data, [&](const nlohmann::json& r, const std::string& where) -> absl::Status {
          auto field = [&](const char* key) {
            return r.is_object() && r.contains(key) && r[key].is_string()
                       ? r[key].get<std::string>()
                       : std::string();
          };
          if (r.is_object() && r.contains("instruction"))
            texts.push_back(common::InstructionPrompt(field("instruction"), field("input")));
          else if (r.is_object() && r.contains("text"))
            texts.push_back(field("text"));
          else
            return absl::InvalidArgumentError(
                where + ": expected an instruction or a text record to take a prompt from");
          return absl::OkStatus();
        }));
  if (texts.empty()) ExitIfError(absl::InvalidArgumentError(a.data + " has no records"));
  std::vector<std::vector<int32_t>> prompts;
  for (const std::string& text : texts) {
    std::vector<int32_t> ids = model.tokenizer->prefix();
    for (int32_t id : model.tokenizer->Encode(text)) ids.push_back(id);
    prompts.push_back(std::move(ids));
  }
  const std::vector<int32_t>& eos = model.weights.config().eos_token_ids;
  const common::Adapter* lora = adapter ? &*adapter : nullptr;
  std::vector<std::vector<int32_t>> generated;
  std::vector<nlohmann::json> tops(prompts.size());
  if (a.top_probs > 0) {  // one prompt at a time, looking at every step's logits
    auto decoder = common::Decoder::Create(&model.weights, lora,
                                           model.weights.config().max_position_embeddings);
    ExitIfError(decoder.status());
    for (size_t p = 0; p < prompts.size(); ++p) {
      std::mt19937_64 rng(a.seed + p);
      tops[p] = nlohmann::json::array();
      auto ids = common::Generate(**decoder, prompts[p], eos, a.sampling, rng,
                                  [&](std::span<const float> logits) {
                                    tops[p].push_back(TopProbabilities(logits, a.top_probs));
                                  });
      ExitIfError(ids.status());
      generated.push_back(std::move(*ids));
    }
  } else {
    auto all =
        common::GenerateAll(model.weights, lora, prompts, eos, a.sampling, a.seed, a.threads);
    ExitIfError(all.status());
    generated = std::move(*all);
  }
  for (size_t p = 0; p < prompts.size(); ++p) {
    const std::string text = model.tokenizer->Decode(generated[p], true);
    if (a.json) {
      nlohmann::json out = {
          {"prompt", texts[p]}, {"prompt_ids", prompts[p]}, {"ids", generated[p]}, {"text", text}};
      if (a.top_probs > 0) out["top"] = tops[p];
      PrintJson(out);
    } else {
      std::printf("%s%s\n", texts[p].c_str(), text.c_str());
    }
  }
}

// ---------------------------------------------------------------------------------------------

struct TrainArgs {
  std::string model, data, out, eval_data;
  std::string method = "lora";
  int rank = 16;
  double alpha = -1;  // default: 2·rank for LoRA, rank for LoRA-SB
  bool rslora = false;
  std::vector<std::string> targets = {"q_proj", "v_proj"};
  int seq = 256;
  int init_examples = 64;
  bool overwrite = false;
  bool json = false;
  std::string schedule = "linear";
  double dp_delta = 1e-5;
  double target_epsilon = -1;  // DP-SGD: pick the noise multiplier that spends this budget
  common::TrainOptions options;
};

void RunTrain(TrainArgs a) {
  const common::Model model = LoadModelOrExit(a.model);
  const auto examples = ReadDataOrExit(model, a.data, a.seq);
  common::LoraSpec spec{a.rank, a.alpha, a.rslora, {}, a.method == "lora-sb"};
  if (spec.alpha < 0) spec.alpha = spec.lora_sb ? a.rank : 2.0 * a.rank;
  for (const std::string& t : a.targets) {
    auto kind = common::ParseLinearKind(t);
    ExitIfError(kind.status());
    spec.targets.push_back(*kind);
  }
  a.options.schedule = a.schedule == "cosine"     ? common::Schedule::kCosine
                       : a.schedule == "constant" ? common::Schedule::kConstant
                                                  : common::Schedule::kLinear;
  if (a.target_epsilon > 0) {  // DP-SGD at a budget: the smallest σ that meets it
    const double q = a.options.dp.sample_rate > 0
                         ? a.options.dp.sample_rate
                         : std::min(1.0, static_cast<double>(a.options.batch) / examples.size());
    if (a.options.steps <= 0)
      ExitIfError(
          absl::InvalidArgumentError("--target-epsilon needs --steps (the budget counts them)"));
    auto sigma = common::NoiseMultiplierFor(a.target_epsilon, q,
                                            static_cast<double>(a.options.steps), a.dp_delta);
    ExitIfError(sigma.status());
    a.options.dp.noise_multiplier = *sigma;
    spdlog::info(
        "DP-SGD: noise multiplier {:.4f} spends epsilon {} at delta {} over {} steps, q {:.4g}",
        *sigma, a.target_epsilon, a.dp_delta, a.options.steps, q);
  }
  auto adapter = common::NewAdapter(model.weights.config(), spec, a.options.seed, a.model);
  ExitIfError(adapter.status());
  if (spec.lora_sb) {
    const size_t n = std::min(examples.size(), static_cast<size_t>(std::max(1, a.init_examples)));
    const std::vector<common::Example> init(examples.begin(), examples.begin() + n);
    spdlog::info("LoRA-SB: initialising B, A, R from the gradient on {} examples", n);
    ExitIfError(common::InitLoraSb(model.weights, init, a.options.lr, a.options.batch,
                                   a.options.threads, *adapter));
  }
  std::optional<std::vector<common::Example>> held_out;
  if (!a.eval_data.empty()) held_out = ReadDataOrExit(model, a.eval_data, a.seq);
  auto evaluate = [&]() -> double {
    auto l =
        common::Evaluate(model.weights, &*adapter, *held_out, a.options.batch, a.options.threads);
    ExitIfError(l.status());
    return l->tokens ? l->sum / static_cast<double>(l->tokens) : 0.0;
  };
  std::optional<double> eval_before;
  if (held_out) {
    eval_before = evaluate();
    spdlog::info("held-out loss before training {:.6f}", *eval_before);
  }
  spdlog::info("training {} on {} examples: {} modules, {} trainable parameters", a.method,
               examples.size(), adapter->num_modules(),
               spec.lora_sb ? adapter->num_modules() * static_cast<size_t>(a.rank) * a.rank
                            : adapter->values().size());
  int64_t tokens = 0;
  auto result = common::Train(
      model.weights, examples, a.options, *adapter, [&tokens](const common::StepReport& r) {
        tokens += r.tokens;
        if (r.step == 1 || r.step == r.steps || r.step % 10 == 0)
          spdlog::info("step {}/{}  loss {:.6f}  lr {:.3g}  grad norm {:.4g}  {:.0f} tokens/s",
                       r.step, r.steps, r.loss, r.lr, r.grad_norm,
                       r.seconds > 0 ? static_cast<double>(tokens) / r.seconds : 0.0);
      });
  ExitIfError(result.status());
  ExitIfError(common::WritePeftAdapter(*adapter, a.out, {.overwrite = a.overwrite}));
  nlohmann::json summary = {{"final_loss", result->final_loss},
                            {"first_loss", result->first_loss},
                            {"steps", result->steps},
                            {"tokens", result->tokens},
                            {"seconds", result->seconds},
                            {"tokens_per_second", result->tokens_per_second()},
                            {"adapter", a.out}};
  if (a.options.dp.noise_multiplier >= 0) {
    auto spent = common::EpsilonFor(result->dp_sample_rate, a.options.dp.noise_multiplier,
                                    static_cast<double>(result->steps), a.dp_delta);
    ExitIfError(spent.status());
    summary["epsilon"] = spent->epsilon;
    summary["delta"] = a.dp_delta;
    summary["noise_multiplier"] = a.options.dp.noise_multiplier;
    summary["sample_rate"] = result->dp_sample_rate;
    std::printf(
        "DP-SGD: epsilon %.4f at delta %g (noise multiplier %.4f, clip %g, sample rate %.4g, "
        "%lld steps; best RDP order %g)\n",
        spent->epsilon, a.dp_delta, a.options.dp.noise_multiplier, a.options.dp.clip,
        result->dp_sample_rate, static_cast<long long>(result->steps), spent->order);
  }
  std::printf("trained %lld steps in %.2f s (%.1f tokens/s): loss %.6f -> %.6f; adapter in %s\n",
              static_cast<long long>(result->steps), result->seconds, result->tokens_per_second(),
              result->first_loss, result->final_loss, a.out.c_str());
  if (held_out) {
    const double after = evaluate();
    summary["eval_loss_before"] = *eval_before;
    summary["eval_loss"] = after;
    std::printf("held-out loss %.6f -> %.6f\n", *eval_before, after);
  }
  if (a.json) PrintJson(summary);
}

// ---------------------------------------------------------------------------------------------

struct InitArgs {
  std::string preset, out, corpus, tokenizer;
  uint64_t seed = 0;
  int merges = 0;
  float init_std = 0.02f;
  bool overwrite = false;
};

// The strings of a JSONL corpus: every text, instruction, input and output field.
std::vector<std::string> CorpusTexts(const std::string& path) {
  std::vector<std::string> texts;
  std::ifstream in(path);
  if (!in) ExitIfError(absl::NotFoundError("cannot read corpus " + path));
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      ExitIfError(absl::InvalidArgumentError(
          common::StrCat(path, ":", number, ": expected a JSON object")));
    for (const char* key : {"text", "instruction", "input", "output"})
      if (j.contains(key) && j[key].is_string()) texts.push_back(j[key]);
  }
  return texts;
}

void RunInitModel(const InitArgs& a) {
  auto preset = common::LlamaPreset(a.preset);
  ExitIfError(preset.status());
  common::LlamaConfig config = *preset;
  // The tokenizer: learned here (byte-level BPE), or another model's files taken as they are.
  std::map<std::string, std::string> tokenizer_files;
  if (a.tokenizer.empty()) {
    tokenizer_files[common::kTokenizerFile] =
        common::TrainByteLevelTokenizer(
            a.corpus.empty() ? std::vector<std::string>{} : CorpusTexts(a.corpus), a.merges,
            {"<|endoftext|>", "<|im_start|>", "<|im_end|>"})
            .dump(2) +
        "\n";
  } else {
    for (const char* name : {common::kTokenizerFile, common::kTokenizerConfigFile}) {
      auto text = common::ReadFileToString(std::filesystem::path(a.tokenizer) / name);
      if (text.ok())
        tokenizer_files[name] = std::move(*text);
      else if (std::string_view(name) == common::kTokenizerFile)
        ExitIfError(text.status());
    }
  }
  const auto json_of = [&](const char* name) {
    auto it = tokenizer_files.find(name);
    return it == tokenizer_files.end() ? nlohmann::json()
                                       : nlohmann::json::parse(it->second, nullptr, false);
  };
  const nlohmann::json tokenizer_config = json_of(common::kTokenizerConfigFile);
  auto tokenizer =
      common::Tokenizer::Parse(json_of(common::kTokenizerFile), "the tokenizer", tokenizer_config);
  ExitIfError(tokenizer.status());
  if (config.vocab_size == 0) config.vocab_size = tokenizer->vocab_size();
  if (tokenizer->vocab_size() > config.vocab_size)
    ExitIfError(absl::InvalidArgumentError(common::StrCat(
        "the tokenizer has ", tokenizer->vocab_size(), " tokens, more than the preset's ",
        config.vocab_size, a.tokenizer.empty() ? "; ask for fewer --merges" : "")));
  // EOS: the tokenizer config's eos_token, else the learned tokenizer's <|endoftext|>.
  std::string eos_text = "<|endoftext|>";
  if (tokenizer_config.is_object() && tokenizer_config.contains("eos_token")) {
    const nlohmann::json& e = tokenizer_config["eos_token"];
    if (e.is_string()) eos_text = e.get<std::string>();
    if (e.is_object() && e.value("content", nlohmann::json()).is_string())
      eos_text = e["content"].get<std::string>();
  }
  const int32_t eos = tokenizer->TokenId(eos_text);
  config.bos_token_id = tokenizer->bos_id() >= 0 ? tokenizer->bos_id() : eos;
  config.eos_token_ids.clear();
  if (eos >= 0) config.eos_token_ids.push_back(eos);
  const common::LlamaWeights weights = common::LlamaWeights::Random(config, a.seed, a.init_std);
  ExitIfError(common::BuildDirectoryAtomically(
      a.out, a.overwrite, [&](const std::filesystem::path& dir) -> absl::Status {
        RETURN_IF_ERROR(weights.WriteInto(dir, common::DType::kF32));
        for (const auto& [name, text] : tokenizer_files)
          RETURN_IF_ERROR(common::WriteFileSynced(dir / name, text));
        return absl::OkStatus();
      }));
  std::printf("wrote %s: %s preset, %zu parameters, vocabulary %d (%s)\n", a.out.c_str(),
              a.preset.c_str(), weights.num_parameters(), config.vocab_size,
              a.tokenizer.empty() ? common::StrCat(a.merges, " merges").c_str()
                                  : ("tokenizer of " + a.tokenizer).c_str());
}

// ---------------------------------------------------------------------------------------------

struct MergeArgs {
  std::string model, adapter, out, dtype = "f32";
  bool overwrite = false;
};

void RunMerge(const MergeArgs& a) {
  auto weights = common::LlamaWeights::Read(a.model);
  ExitIfError(weights.status());
  auto adapter = common::ReadPeftAdapter(a.adapter);
  ExitIfError(adapter.status());
  ExitIfError(weights->Merge(*adapter));
  auto dtype = common::ParseDType(a.dtype);
  ExitIfError(dtype.status());
  // The tokenizer and any other files of the model travel along.
  ExitIfError(weights->WriteModelDirectory(a.out, a.model, *dtype, a.overwrite));
  std::printf("wrote %s: %s with %zu adapter modules merged\n", a.out.c_str(), a.model.c_str(),
              adapter->num_modules());
}

// ---------------------------------------------------------------------------------------------

struct MakeDataArgs {
  std::string out;
  int clients = 4;
  int records = 200;       // per client
  int test_records = 120;  // held out, balanced over the categories
  double alpha = 0.5;
  uint64_t seed = 0;
  bool overwrite = false;
};

void RunMakeData(const MakeDataArgs& a) {
  std::mt19937_64 rng(a.seed);
  const auto proportions = common::DirichletProportions(a.clients, a.alpha, rng);
  std::vector<std::string> files;
  std::vector<std::vector<int>> counts(static_cast<size_t>(a.clients),
                                       std::vector<int>(common::kSyntheticCategories, 0));
  for (int k = 0; k < a.clients; ++k) {
    std::discrete_distribution<int> pick(proportions[k].begin(), proportions[k].end());
    std::string text;
    for (int i = 0; i < a.records; ++i) {
      const int category = pick(rng);
      ++counts[k][category];
      text += common::SyntheticRecord(category, rng).dump() + "\n";
    }
    files.push_back(std::move(text));
  }
  std::string test;
  for (int i = 0; i < a.test_records; ++i)
    test += common::SyntheticRecord(i % common::kSyntheticCategories, rng).dump() + "\n";
  ExitIfError(common::BuildDirectoryAtomically(
      a.out, a.overwrite, [&](const std::filesystem::path& dir) -> absl::Status {
        for (int k = 0; k < a.clients; ++k)
          RETURN_IF_ERROR(
              common::WriteFileSynced(dir / common::StrCat("client-", k + 1, ".jsonl"), files[k]));
        return common::WriteFileSynced(dir / "test.jsonl", test);
      }));
  std::printf(
      "wrote %s: %d clients × %d records (Dirichlet α = %g over %d categories), %d test records\n",
      a.out.c_str(), a.clients, a.records, a.alpha, common::kSyntheticCategories, a.test_records);
  std::printf("| client |");
  for (int c = 0; c < common::kSyntheticCategories; ++c)
    std::printf(" %s |", common::SyntheticCategoryName(c));
  std::printf("\n|---|%s\n", std::string(common::kSyntheticCategories * 4, '-').c_str());
  for (int k = 0; k < a.clients; ++k) {
    std::printf("| client-%d |", k + 1);
    for (int n : counts[k]) std::printf(" %d |", n);
    std::printf("\n");
  }
}

}  // namespace

void AddLlmCommands(CLI::App& app) {
  {
    auto a = std::make_shared<MakeDataArgs>();
    CLI::App* cmd = app.add_subcommand(
        "make-data",
        "Write a synthetic instruction dataset split non-IID across clients (client-<k>.jsonl, "
        "test.jsonl)");
    cmd->add_option("--out", a->out, "directory to write")->required();
    cmd->add_option("--clients", a->clients, "number of clients")
        ->capture_default_str()
        ->check(CLI::Range(1, 100000));
    cmd->add_option("--records", a->records, "records per client")
        ->capture_default_str()
        ->check(CLI::Range(1, 10000000));
    cmd->add_option("--test-records", a->test_records, "held-out records, every category alike")
        ->capture_default_str()
        ->check(CLI::Range(1, 10000000));
    cmd->add_option("--alpha", a->alpha, "Dirichlet concentration (small: more skewed)")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--seed", a->seed, "random seed")->capture_default_str();
    cmd->add_flag("--overwrite", a->overwrite, "replace --out if it exists");
    cmd->callback([a] { RunMakeData(*a); });
  }
  {
    auto a = std::make_shared<MergeArgs>();
    CLI::App* cmd = app.add_subcommand(
        "merge", "Fold an adapter into a model's weights and write the merged model");
    cmd->add_option("--model", a->model, "Hugging Face model directory")->required();
    cmd->add_option("--adapter", a->adapter, "PEFT adapter directory")->required();
    cmd->add_option("--out", a->out, "model directory to write")->required();
    cmd->add_option("--dtype", a->dtype, "f32, bf16 or f16")
        ->capture_default_str()
        ->check(CLI::IsMember({"f32", "bf16", "f16"}));
    cmd->add_flag("--overwrite", a->overwrite, "replace --out if it exists");
    cmd->callback([a] { RunMerge(*a); });
  }
  {
    auto a = std::make_shared<EvalArgs>();
    CLI::App* cmd = app.add_subcommand(
        "eval", "Mean cross-entropy of a JSONL file's target tokens under a model and adapter");
    cmd->add_option("--model", a->model, "Hugging Face model directory")->required();
    cmd->add_option("--adapter", a->adapter, "PEFT adapter directory (default: the base model)");
    cmd->add_option("--data", a->data, "JSONL file (instruction, text or input_ids records)")
        ->required();
    cmd->add_option("--max-length", a->max_length,
                    "truncate records to this many tokens (default: the model's "
                    "max_position_embeddings)")
        ->check(CLI::Range(2, 1 << 20));
    cmd->add_option("--batch", a->batch, "records per forward pass")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--threads", a->threads, "threads (0: all cores)")->capture_default_str();
    cmd->add_flag("--accuracy", a->accuracy,
                  "also generate a response to every record with an \"answer\" field (greedy) "
                  "and score it by exact match of the extracted answer (LLM-Adapters)");
    cmd->add_option("--max-new-tokens", a->max_new_tokens, "--accuracy: tokens per response")
        ->capture_default_str()
        ->check(CLI::Range(1, 1 << 16));
    cmd->add_option("--responses", a->responses,
                    "--accuracy: write each record's answer, response and verdict here (JSONL)");
    cmd->add_flag("--json", a->json,
                  "end with a JSON line: loss, perplexity, tokens, records (and accuracy, "
                  "correct, answered)");
    cmd->callback([a] { RunEval(*a); });
  }
  {
    auto a = std::make_shared<GenerateArgs>();
    CLI::App* cmd = app.add_subcommand(
        "generate", "Continue prompts under a model and adapter (greedy or sampled, KV cache)");
    cmd->add_option("--model", a->model, "Hugging Face model directory")->required();
    cmd->add_option("--adapter", a->adapter, "PEFT adapter directory (default: the base model)");
    auto* prompt = cmd->add_option("--prompt", a->prompts, "a text to continue (repeatable)");
    auto* data = cmd->add_option(
        "--data", a->data, "JSONL: answer each instruction record's prompt (or continue a text)");
    prompt->excludes(data);
    cmd->add_option("--max-new-tokens", a->sampling.max_new_tokens, "tokens to generate at most")
        ->capture_default_str()
        ->check(CLI::Range(1, 1 << 16));
    cmd->add_option("--temperature", a->sampling.temperature, "0: greedy; else sample logits/T")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    cmd->add_option("--top-p", a->sampling.top_p, "sample from the smallest set of this mass")
        ->capture_default_str()
        ->check(CLI::Range(1e-9, 1.0));
    cmd->add_option("--seed", a->seed, "sampling seed (prompt i uses seed + i)")
        ->capture_default_str();
    cmd->add_option("--top-probs", a->top_probs,
                    "with --json: the K most probable next tokens of each step, with probabilities")
        ->capture_default_str()
        ->check(CLI::Range(0, 1 << 20));
    cmd->add_option("--threads", a->threads, "threads (0: all cores)")->capture_default_str();
    cmd->add_flag("--json", a->json,
                  "one JSON line per prompt: prompt, prompt_ids, ids, text (and top)");
    cmd->callback([a, prompt, data] {
      if (prompt->count() == 0 && data->count() == 0)
        ExitIfError(absl::InvalidArgumentError("give --prompt TEXT or --data FILE"));
      RunGenerate(*a);
    });
  }
  {
    auto a = std::make_shared<TrainArgs>();
    CLI::App* cmd = app.add_subcommand(
        "train", "Fine-tune a LoRA or LoRA-SB adapter centrally and write it as a PEFT directory");
    cmd->add_option("--model", a->model, "Hugging Face model directory")->required();
    cmd->add_option("--data", a->data, "training JSONL")->required();
    cmd->add_option("--out", a->out, "PEFT adapter directory to write")->required();
    cmd->add_flag("--overwrite", a->overwrite, "replace --out if it exists");
    cmd->add_option("--eval-data", a->eval_data, "held-out JSONL, evaluated before and after");
    cmd->add_option("--method", a->method, "lora, or lora-sb (only R trained)")
        ->capture_default_str()
        ->check(CLI::IsMember({"lora", "lora-sb"}));
    cmd->add_option("--rank", a->rank, "LoRA rank r")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--alpha", a->alpha, "lora_alpha (default 2·r; r for lora-sb)");
    cmd->add_flag("--rslora", a->rslora, "scale by alpha/√r instead of alpha/r");
    cmd->add_option("--targets", a->targets, "comma-separated modules (q_proj ... down_proj)")
        ->delimiter(',')
        ->allow_extra_args(false)
        ->capture_default_str();
    cmd->add_option("--batch", a->options.batch, "records per micro-batch")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--seq", a->seq, "maximum tokens per record (longer ones are truncated)")
        ->capture_default_str()
        ->check(CLI::Range(2, 1 << 20));
    auto* steps = cmd->add_option("--steps", a->options.steps, "optimiser steps");
    auto* epochs = cmd->add_option("--epochs", a->options.epochs, "passes over the data");
    steps->excludes(epochs);
    cmd->add_option("--lr", a->options.lr, "peak learning rate")->capture_default_str();
    cmd->add_option("--grad-accum", a->options.grad_accum, "micro-batches per step")
        ->capture_default_str();
    cmd->add_option("--weight-decay", a->options.weight_decay, "AdamW weight decay")
        ->capture_default_str();
    cmd->add_option("--schedule", a->schedule, "linear, cosine or constant (after warmup)")
        ->capture_default_str()
        ->check(CLI::IsMember({"linear", "cosine", "constant"}));
    cmd->add_option("--warmup-ratio", a->options.warmup_ratio, "fraction of steps warming up")
        ->capture_default_str();
    cmd->add_option("--max-grad-norm", a->options.max_grad_norm, "gradient clipping (0: off)")
        ->capture_default_str();
    cmd->add_option("--init-examples", a->init_examples,
                    "lora-sb: records whose gradient initialises B, A and R")
        ->capture_default_str();
    cmd->add_option("--seed", a->options.seed, "data order and LoRA A initialisation")
        ->capture_default_str();
    cmd->add_option("--threads", a->options.threads, "threads (0: all cores)")
        ->capture_default_str();
    cmd->add_option("--dp-noise-multiplier", a->options.dp.noise_multiplier,
                    "DP-SGD: noise stddev / clip (per-example clipping, Poisson sampling)");
    cmd->add_option("--dp-clip", a->options.dp.clip, "DP-SGD: per-example L2 clip norm")
        ->capture_default_str();
    cmd->add_option("--dp-sample-rate", a->options.dp.sample_rate,
                    "DP-SGD: Poisson sampling rate (default batch / records)");
    cmd->add_option("--dp-delta", a->dp_delta, "DP-SGD: delta of the reported epsilon")
        ->capture_default_str();
    cmd->add_option("--target-epsilon", a->target_epsilon,
                    "DP-SGD: choose the noise multiplier that spends this epsilon over --steps");
    cmd->add_flag(
        "--json", a->json,
        "end with a JSON line: tokens_per_second, final_loss, steps, tokens, seconds (and "
        "epsilon with DP-SGD)");
    cmd->callback([a] {
      if (a->options.steps <= 0 && !(a->options.epochs > 0))
        ExitIfError(absl::InvalidArgumentError("give --steps N or --epochs E"));
      RunTrain(*a);
    });
  }
  {
    auto a = std::make_shared<InitArgs>();
    CLI::App* cmd = app.add_subcommand(
        "init-model",
        "Write a randomly initialised Llama checkpoint (config.json, model.safetensors, "
        "byte-level tokenizer.json)");
    cmd->add_option("--preset", a->preset, "architecture: " + common::LlamaPresetNames())
        ->required()
        ->check([](const std::string& name) {
          auto preset = common::LlamaPreset(name);
          return preset.ok() ? std::string() : std::string(preset.status().message());
        });
    cmd->add_option("--out", a->out, "model directory to write")->required();
    cmd->add_flag("--overwrite", a->overwrite, "replace --out if it exists");
    cmd->add_option("--seed", a->seed, "weights' random seed")->capture_default_str();
    cmd->add_option("--init-std", a->init_std, "standard deviation of linears and embeddings")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--tokenizer-corpus", a->corpus,
                    "JSONL whose text fields the tokenizer's BPE merges are learned from");
    cmd->add_option("--merges", a->merges, "BPE merges to learn (0: bytes only)")
        ->capture_default_str()
        ->check(CLI::Range(0, 1 << 20));
    cmd->add_option("--tokenizer", a->tokenizer,
                    "take tokenizer.json (and tokenizer_config.json) from this directory instead "
                    "of learning one; the vocabulary decides the embedding's size")
        ->excludes("--tokenizer-corpus")
        ->excludes("--merges");
    cmd->callback([a] { RunInitModel(*a); });
  }
}

}  // namespace fedlora::tool
