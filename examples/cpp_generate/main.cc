// Greedy GPT-2 generation from C++ on an rbe-onnx export (fp32 or RBE-rewritten), with the KV cache.
//
//   rbe_generate --library LIB --model DIR [--new-tokens N] [--threads T] [--eos ID] PROMPT_ID...
//
// LIB is the RBE op library (python -c "import rbe_onnx; print(rbe_onnx.get_library_path())"), DIR the export
// folder holding model.onnx. Prints the generated token ids on one line of stdout; timings go to stderr.
//
// The graph uses Optimum's GPT-2 names: input_ids, attention_mask, position_ids and past_key_values.{i}.key/value
// in; logits [batch, seq, vocab] and present.{i}.key/value out. Each key/value is a buffer [batch, n_head,
// capacity, head_dim] that the graph writes the new positions into: the loop allocates one per layer for the
// whole generation and binds it as both past and present, so no step copies the cache. The cached length is
// the attention mask's width minus the input's.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string library;
  std::string model_dir;
  int new_tokens = 32;
  int threads = 0;               // 0: ONNX Runtime's default
  std::optional<int64_t> eos;    // unset: the export's eos_token_id; --eos -1 disables stopping
  bool eos_given = false;
  std::vector<int64_t> prompt;
};

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "error: " << problem << "\n"
            << "usage: rbe_generate --library LIB --model DIR [--new-tokens N] [--threads T] [--eos ID] ID...\n";
  std::exit(2);
}

int64_t parse_int(const std::string& text, const std::string& what) {
  char* end = nullptr;
  long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0') usage(what + " must be an integer, got '" + text + "'");
  return value;
}

Options parse_args(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--library") opt.library = value();
    else if (arg == "--model") opt.model_dir = value();
    else if (arg == "--new-tokens") opt.new_tokens = static_cast<int>(parse_int(value(), arg));
    else if (arg == "--threads") opt.threads = static_cast<int>(parse_int(value(), arg));
    else if (arg == "--eos") {
      int64_t id = parse_int(value(), arg);
      opt.eos_given = true;
      if (id >= 0) opt.eos = id;
    } else if (arg.rfind("--", 0) == 0) usage("unknown option " + arg);
    else opt.prompt.push_back(parse_int(arg, "a prompt token id"));
  }
  if (opt.library.empty()) usage("--library is required");
  if (opt.model_dir.empty()) usage("--model is required");
  if (opt.prompt.empty()) usage("give at least one prompt token id");
  if (opt.new_tokens < 1) usage("--new-tokens must be >= 1");
  return opt;
}

// rbe_export.json is a flat object written by rbe_onnx.export, and only eos_token_id is read from it (the graph
// itself gives every shape), so a key lookup stands in for a JSON library.
std::optional<int64_t> export_eos(const std::string& model_dir) {
  std::ifstream in(model_dir + "/rbe_export.json");
  if (!in) return std::nullopt;
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string text = buffer.str();
  const std::string key = "\"eos_token_id\"";
  size_t at = text.find(key);
  if (at == std::string::npos) return std::nullopt;
  at = text.find(':', at + key.size());
  if (at == std::string::npos) return std::nullopt;
  const char* start = text.c_str() + at + 1;
  char* end = nullptr;
  long long id = std::strtoll(start, &end, 10);
  if (end == start) return std::nullopt;  // null
  return id;
}

// Layer count, heads and head size, read from the past_key_values.{i}.key inputs of the graph.
struct KvShape {
  int n_layer = 0;
  int64_t n_head = 0;
  int64_t head_dim = 0;
};

KvShape read_kv_shape(Ort::Session& session) {
  Ort::AllocatorWithDefaultOptions alloc;
  KvShape kv;
  bool has_ids = false, has_mask = false, has_pos = false;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    std::string name = session.GetInputNameAllocated(i, alloc).get();
    has_ids |= name == "input_ids";
    has_mask |= name == "attention_mask";
    has_pos |= name == "position_ids";
    const std::string prefix = "past_key_values.", suffix = ".key";
    if (name.rfind(prefix, 0) != 0 || name.size() <= prefix.size() + suffix.size() ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    auto shape = session.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() != 4 || shape[1] <= 0 || shape[3] <= 0)
      throw std::runtime_error(name + " is not [batch, n_head, capacity, head_dim] with static heads and head size");
    kv.n_head = shape[1];
    kv.head_dim = shape[3];
    ++kv.n_layer;
  }
  if (!has_ids || !has_mask || !has_pos || kv.n_layer == 0)
    throw std::runtime_error("the model lacks the GPT-2 KV-cache inputs (input_ids, attention_mask, position_ids, "
                             "past_key_values.N.key/value): export it with `rbe-onnx export gpt2`");
  return kv;
}

// argmax over the last position's logits; the first maximum wins, as numpy's argmax does.
int64_t last_argmax(const Ort::Value& logits) {
  auto shape = logits.GetTensorTypeAndShapeInfo().GetShape();  // [1, seq, vocab]
  const int64_t vocab = shape.back();
  const float* row = logits.GetTensorData<float>() + (shape[1] - 1) * vocab;
  return std::max_element(row, row + vocab) - row;
}

struct Timings {
  double prefill_ms = 0;
  std::vector<double> decode_ms;
};

std::vector<int64_t> greedy(Ort::Session& session, const KvShape& kv, const std::vector<int64_t>& prompt,
                            int new_tokens, std::optional<int64_t> eos, Timings& timings) {
  auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::IoBinding binding(session);
  binding.BindOutput("logits", mem);  // bound first, so it is output 0

  // One key and one value buffer per layer, sized for prompt + new tokens, bound once as past and as present.
  const int64_t capacity = static_cast<int64_t>(prompt.size()) + new_tokens;
  const std::vector<int64_t> kv_shape{1, kv.n_head, capacity, kv.head_dim};
  const size_t kv_size = static_cast<size_t>(kv.n_head * capacity * kv.head_dim);
  std::vector<std::vector<float>> cache(2 * kv.n_layer, std::vector<float>(kv_size));
  std::vector<Ort::Value> cache_values;
  for (int i = 0; i < kv.n_layer; ++i) {
    for (const char* kind : {"key", "value"}) {
      auto& buffer = cache[cache_values.size()];
      cache_values.push_back(Ort::Value::CreateTensor<float>(mem, buffer.data(), buffer.size(), kv_shape.data(),
                                                             kv_shape.size()));
      binding.BindInput(("past_key_values." + std::to_string(i) + "." + kind).c_str(), cache_values.back());
      binding.BindOutput(("present." + std::to_string(i) + "." + kind).c_str(), cache_values.back());
    }
  }

  std::vector<int64_t> ids = prompt, mask(prompt.size(), 1), positions(prompt.size());
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int64_t>(i);

  std::vector<int64_t> generated;
  while (static_cast<int>(generated.size()) < new_tokens) {
    const std::vector<int64_t> step_shape{1, static_cast<int64_t>(ids.size())};
    const std::vector<int64_t> mask_shape{1, static_cast<int64_t>(mask.size())};
    auto ids_value = Ort::Value::CreateTensor<int64_t>(mem, ids.data(), ids.size(), step_shape.data(), 2);
    auto mask_value = Ort::Value::CreateTensor<int64_t>(mem, mask.data(), mask.size(), mask_shape.data(), 2);
    auto pos_value = Ort::Value::CreateTensor<int64_t>(mem, positions.data(), positions.size(), step_shape.data(), 2);
    binding.BindInput("input_ids", ids_value);
    binding.BindInput("attention_mask", mask_value);
    binding.BindInput("position_ids", pos_value);
    // Re-bound (same slot) so that ORT allocates it afresh: its shape changes from [1, prompt, vocab] to [1, 1, vocab].
    binding.BindOutput("logits", mem);

    auto start = std::chrono::steady_clock::now();
    session.Run(Ort::RunOptions{nullptr}, binding);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (generated.empty()) timings.prefill_ms = ms;
    else timings.decode_ms.push_back(ms);

    const int64_t token = last_argmax(binding.GetOutputValues()[0]);
    generated.push_back(token);
    if (eos && token == *eos) break;

    const int64_t position = static_cast<int64_t>(mask.size());
    ids.assign(1, token);
    positions.assign(1, position);
    mask.push_back(1);
  }
  return generated;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse_args(argc, argv);
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "rbe_generate");
    Ort::SessionOptions so;
    if (opt.threads > 0) so.SetIntraOpNumThreads(opt.threads);
    so.SetInterOpNumThreads(1);
    // RegisterCustomOpsLibrary_V2 under the hood: ORT loads the library and keeps it loaded while sessions use it.
    so.RegisterCustomOpsLibrary(opt.library.c_str());
    Ort::Session session(env, (opt.model_dir + "/model.onnx").c_str(), so);

    const KvShape kv = read_kv_shape(session);
    const std::optional<int64_t> eos = opt.eos_given ? opt.eos : export_eos(opt.model_dir);
    Timings timings;
    const auto tokens = greedy(session, kv, opt.prompt, opt.new_tokens, eos, timings);

    for (size_t i = 0; i < tokens.size(); ++i) std::cout << (i ? " " : "") << tokens[i];
    std::cout << std::endl;

    std::vector<double> decode = timings.decode_ms;
    std::sort(decode.begin(), decode.end());
    std::cerr << "[" << kv.n_layer << " layers, " << kv.n_head << " heads x " << kv.head_dim << "] prefill "
              << opt.prompt.size() << " tokens: " << timings.prefill_ms << " ms; decode: "
              << (decode.empty() ? 0.0 : decode[decode.size() / 2]) << " ms/token (median of " << decode.size()
              << " steps)" << std::endl;
    return 0;
  } catch (const Ort::Exception& e) {
    std::cerr << "onnxruntime error: " << e.what() << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
  }
  return 1;
}
