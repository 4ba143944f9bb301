// repmlp_infer: run a RepMLPNet artifact (TorchScript .pt or AOTInductor .pt2) on images or
// .npy batches from the command line.
// A thin layer over the repmlp_rt core: argument parsing, input grouping, output formatting.
// Exit codes: 0 success, 2 usage error, 1 anything else; errors are one line on stderr.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "messages.hpp"
#include "npy.hpp"
#include "repmlp_rt/image.hpp"
#include "repmlp_rt/runtime.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;
using repmlp_rt::detail::first_line;
using repmlp_rt::detail::shape_string;

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

struct Options {
  std::string artifact;
  std::vector<std::string> inputs;
  std::string device = "cpu";
  int64_t threads = 0;
  int64_t batch = 8;
  int64_t topk = 5;
  bool json = false;
  std::string output;
  bool bench = false;
  int iters = 50;
  int warmup = 5;
  bool info = false;
  bool optimize = false;
  bool no_verify = false;
  bool no_verify_digest = false;
  std::string gemm = "auto";
  bool return_freed_memory = false;
  int64_t max_image_pixels = repmlp_rt::kDefaultMaxImagePixels;
};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// File names need not be UTF-8; invalid bytes become U+FFFD instead of failing the dump.
std::string json_text(const json& value, int indent = -1) {
  return value.dump(indent, ' ', false, json::error_handler_t::replace);
}

// ASCII-only case folding: file names need not be UTF-8, and std::tolower on a plain char is
// undefined for bytes >= 0x80 (negative values).
char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool ends_with_ci(const std::string& text, const std::string& suffix) {
  if (text.size() < suffix.size()) return false;
  return std::equal(suffix.rbegin(), suffix.rend(), text.rbegin(),
                    [](char a, char b) { return ascii_lower(a) == ascii_lower(b); });
}

// Prints one result line per row of `logits`, named by `names`.
void print_results(const repmlp_rt::Runtime& runtime, const at::Tensor& logits,
                   const std::vector<std::string>& names, const Options& opt) {
  auto [scores, indices] = repmlp_rt::softmax_topk(logits, opt.topk);
  const auto& labels = runtime.labels();
  for (int64_t row = 0; row < logits.size(0); ++row) {
    if (opt.json) {
      json topk = json::array();
      for (int64_t k = 0; k < opt.topk; ++k) {
        const int64_t index = indices[row][k].item<int64_t>();
        topk.push_back({{"index", index}, {"label", labels.at(index)},
                        {"score", scores[row][k].item<float>()}});
      }
      std::cout << json_text({{"input", names[row]}, {"topk", topk}}) << '\n';
    } else {
      std::ostringstream line;
      line << names[row] << ':';
      for (int64_t k = 0; k < opt.topk; ++k) {
        const int64_t index = indices[row][k].item<int64_t>();
        line << (k ? ", " : " ") << labels.at(index) << " (" << std::fixed << std::setprecision(4)
             << scores[row][k].item<float>() << ')';
      }
      std::cout << line.str() << '\n';
    }
  }
}

// "a, b, c"
std::string joined(const std::vector<std::string>& names) {
  std::string text;
  for (const auto& name : names) text += (text.empty() ? "" : ", ") + name;
  return text;
}

// "name: stage0 [192, 28, 28], stage1 [...]" per row of an artifact without logits; with
// --json one object per row: each output's name and shape, and an embedding's values.
void print_outputs(const repmlp_rt::Runtime& runtime, const repmlp_rt::NamedOutputs& outputs,
                   const std::vector<std::string>& names, const Options& opt) {
  const bool embedding = runtime.output_kind() == "embedding";
  for (size_t row = 0; row < names.size(); ++row) {
    json described = json::array();
    std::string line = names[row] + ':';
    for (size_t i = 0; i < outputs.size(); ++i) {
      const at::Tensor sample = outputs[i].second[static_cast<int64_t>(row)];
      const std::vector<int64_t> shape = sample.sizes().vec();
      json entry = {{"name", outputs[i].first}, {"shape", shape}};
      if (embedding) {
        const float* values = sample.data_ptr<float>();
        entry["values"] = std::vector<float>(values, values + sample.numel());
      }
      described.push_back(std::move(entry));
      line += (i ? ", " : " ") + outputs[i].first + ' ' + shape_string(shape);
    }
    if (opt.json)
      std::cout << json_text({{"input", names[row]}, {"outputs", described}}) << '\n';
    else
      std::cout << line << '\n';
  }
}

// Writes every output, stacked over the inputs in order: one array per name in an .npz, or
// the single output as an .npy.
void write_outputs(const std::string& path, const std::vector<std::string>& names,
                   const std::vector<std::vector<at::Tensor>>& batches) {
  std::vector<at::Tensor> stacked;
  std::vector<repmlp_rt::NpzEntry> entries;
  for (size_t i = 0; i < names.size(); ++i) {
    stacked.push_back(at::cat(batches[i], 0).contiguous());
    entries.push_back({names[i], stacked.back().sizes().vec(), stacked.back().data_ptr<float>()});
  }
  if (ends_with_ci(path, ".npz"))
    repmlp_rt::write_npz_f32(path, entries);
  else
    repmlp_rt::write_npy_f32(path, entries.at(0).shape, entries.at(0).data);
}

int run_inputs(const repmlp_rt::Runtime& runtime, const Options& opt) {
  const bool logits = runtime.output_kind() == "logits";
  // Per output, its batches in input order (for --output).
  std::vector<std::vector<at::Tensor>> collected(runtime.output_names().size());
  // Pending images of one size, run together as one uint8 batch.
  std::vector<repmlp_rt::Image> pending;
  std::vector<std::string> pending_names;

  auto emit = [&](const repmlp_rt::NamedOutputs& outputs, const std::vector<std::string>& names) {
    if (logits)
      print_results(runtime, outputs.at(0).second, names, opt);
    else
      print_outputs(runtime, outputs, names, opt);
    if (!opt.output.empty())
      for (size_t i = 0; i < outputs.size(); ++i) collected[i].push_back(outputs[i].second);
  };
  auto flush_images = [&] {
    if (pending.empty()) return;
    const int64_t n = static_cast<int64_t>(pending.size());
    const int64_t h = pending[0].height, w = pending[0].width;
    at::Tensor batch = at::empty({n, h, w, 3}, at::kByte);
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(batch[i].data_ptr(), pending[i].rgb.data(), pending[i].rgb.size());
    emit(runtime.infer_outputs(batch), pending_names);
    pending.clear();
    pending_names.clear();
  };

  for (const std::string& input : opt.inputs) {
    if (ends_with_ci(input, ".npy")) {
      flush_images();
      repmlp_rt::NpyArray array = repmlp_rt::read_npy_f32(input);
      // NaN or inf in a batch would only come out as NaN logits and a meaningless top-k.
      const auto bad = std::count_if(array.data.begin(), array.data.end(),
                                     [](float v) { return !std::isfinite(v); });
      if (bad)
        throw repmlp_rt::InputError("'" + input + "': expected finite float32 values, got " +
                                    std::to_string(bad) + " NaN or infinite value(s)");
      at::Tensor all = at::from_blob(array.data.data(), array.shape, at::kFloat);
      // Split along N into --batch rows; the core checks each batch (shape, N >= 1) and the
      // message gets the file name.
      const int64_t rows = array.shape.empty() ? 0 : array.shape[0];
      int64_t start = 0;
      do {
        const int64_t stop = std::min(start + opt.batch, rows);
        at::Tensor batch = rows > opt.batch ? all.slice(0, start, stop) : all;
        std::vector<std::string> names;
        for (int64_t i = start; i < stop; ++i) names.push_back(input + "[" + std::to_string(i) + "]");
        repmlp_rt::NamedOutputs outputs;
        try {
          outputs = runtime.infer_outputs(batch);
        } catch (const repmlp_rt::InputError& e) {
          throw repmlp_rt::InputError("'" + input + "': " + e.what());
        }
        emit(outputs, names);
        start = stop;
      } while (start < rows);
    } else {
      repmlp_rt::Image image = repmlp_rt::decode_image(input, opt.max_image_pixels);
      if (!pending.empty() && (pending[0].height != image.height || pending[0].width != image.width))
        flush_images();
      pending.push_back(std::move(image));
      pending_names.push_back(input);
      if (static_cast<int64_t>(pending.size()) >= opt.batch) flush_images();
    }
  }
  flush_images();
  if (!opt.output.empty()) write_outputs(opt.output, runtime.output_names(), collected);
  return 0;
}

double percentile(std::vector<double> sorted, double p) {
  // nearest-rank percentile of an already sorted sample
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * sorted.size()));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

void run_bench(const repmlp_rt::Runtime& runtime, const Options& opt, double load_ms) {
  const auto& shape = runtime.input_shape();
  at::manual_seed(0);
  at::Tensor input = at::randn({opt.batch, shape[0], shape[1], shape[2]}, at::kFloat);
  auto start = Clock::now();
  runtime.infer_outputs(input);
  const double first_ms = ms_since(start);
  for (int i = 0; i < opt.warmup; ++i) runtime.infer_outputs(input);
  std::vector<double> latencies;
  for (int i = 0; i < opt.iters; ++i) {
    start = Clock::now();
    runtime.infer_outputs(input);
    latencies.push_back(ms_since(start));
  }
  std::sort(latencies.begin(), latencies.end());
  double total = 0;
  for (double v : latencies) total += v;
  const double mean = total / latencies.size();
  const double images_per_s = opt.batch * 1000.0 / mean;
  const double p50 = percentile(latencies, 50), p90 = percentile(latencies, 90),
               p99 = percentile(latencies, 99);
  if (opt.json) {
    std::cout << json_text({{"bench",
                             {{"device", runtime.device()}, {"threads", at::get_num_threads()},
                              {"batch", opt.batch}, {"iters", opt.iters}, {"warmup", opt.warmup},
                              {"optimize", opt.optimize}, {"load_ms", load_ms},
                              {"first_call_ms", first_ms}, {"mean_ms", mean}, {"p50_ms", p50},
                              {"p90_ms", p90}, {"p99_ms", p99}, {"images_per_s", images_per_s}}}})
              << '\n';
  } else {
    std::cout << std::fixed << std::setprecision(3) << "bench: device=" << runtime.device()
              << " threads=" << at::get_num_threads() << " batch=" << opt.batch
              << " iters=" << opt.iters << " warmup=" << opt.warmup
              << " optimize=" << (opt.optimize ? "on" : "off") << '\n'
              << "  load (incl. warm-up): " << load_ms << " ms\n"
              << "  first call:           " << first_ms << " ms\n"
              << "  latency p50/p90/p99:  " << p50 << " / " << p90 << " / " << p99 << " ms\n"
              << "  mean latency:         " << mean << " ms\n"
              << std::setprecision(1) << "  throughput:           " << images_per_s
              << " images/s\n";
  }
}

std::string self_check_text(const repmlp_rt::Runtime& runtime, const Options& opt) {
  if (!runtime.verified()) return "off (--no-verify)";
  std::ostringstream text;
  text << "passed (" << (opt.no_verify_digest ? "digest off; " : "digest of every record; ")
       << "probe error " << std::setprecision(3)
       << runtime.self_check_error() << " <= tolerance " << runtime.self_check_tolerance() << ')';
  return text.str();
}

void print_info(const repmlp_rt::Runtime& runtime, const Options& opt) {
  // For display only (the runtime read and checked it): printed whole, or with a long label
  // list shortened.
  const json manifest = json::parse(runtime.manifest_json());
  json facts = {{"artifact", runtime.path()},
                {"device", runtime.device()},
                {"format_version", runtime.format_version()},
                {"input_shape", runtime.input_shape()},
                {"compute_dtype", runtime.compute_dtype()},
                {"num_classes", runtime.num_classes()},
                {"labels", runtime.labels()},
                {"output_kind", runtime.output_kind()},
                {"output_names", runtime.output_names()},
                {"threads", at::get_num_threads()},
                {"image_decoding", repmlp_rt::has_image_decoding()},
                {"self_check", runtime.verified()
                                   ? json{{"digest", !opt.no_verify_digest},
                                          {"error", runtime.self_check_error()},
                                          {"tolerance", runtime.self_check_tolerance()}}
                                   : json(nullptr)},
                {"gemm_plan", runtime.gemm_plan()},
                {"cuda_build", repmlp_rt::built_with_cuda()}};
  const repmlp_rt::CpuFeatures cpu = repmlp_rt::cpu_features();
  facts["cpu"] = {{"name", cpu.name}, {"kernel_level", cpu.kernel_level}, {"isa", cpu.isa}};
  if (opt.json) {
    std::cout << json_text({{"runtime", facts}, {"manifest", manifest}}) << '\n';
    return;
  }
  // A human reads this: a long label list (1000 for ImageNet; the manifest has it twice)
  // shrinks to its first few.
  constexpr size_t kLabelsShown = 5;
  json shown = manifest;
  for (const char* where : {"/output/labels", "/arch/config/labels"}) {
    const json::json_pointer pointer(where);
    if (!shown.is_object() || !shown.contains(pointer)) continue;
    const json& labels = shown.at(pointer);
    if (!labels.is_array() || labels.size() <= 2 * kLabelsShown) continue;
    std::string summary = std::to_string(labels.size()) + " labels: ";
    for (size_t i = 0; i < kLabelsShown; ++i)
      summary += (labels[i].is_string() ? labels[i].get<std::string>() : labels[i].dump()) + ", ";
    shown[pointer] = summary + "... (--info --json prints them all)";
  }
  std::cout << "artifact:       " << runtime.path() << '\n'
            << "format version: " << runtime.format_version() << '\n'
            << "device:         " << runtime.device() << " (threads: " << at::get_num_threads()
            << ")\n"
            << "input shape:    " << shape_string(runtime.input_shape()) << " (C, H, W)\n"
            << "compute dtype:  " << runtime.compute_dtype() << '\n'
            << "outputs:        " << runtime.output_kind() << ": " << joined(runtime.output_names())
            << '\n'
            << "classes:        " << runtime.num_classes() << '\n'
            << "image decoding: " << (repmlp_rt::has_image_decoding() ? "yes" : "no") << '\n'
            << "self-check:     " << self_check_text(runtime, opt) << '\n'
            << "gemm plan:      " << (runtime.gemm_plan().empty() ? "none" : runtime.gemm_plan())
            << '\n'
            << "cpu:            " << (cpu.name.empty() ? "unknown" : cpu.name) << ", torch kernels "
            << cpu.kernel_level << ", isa:";
  for (const auto& feature : cpu.isa) std::cout << ' ' << feature;
  std::cout << (cpu.isa.empty() ? " none of avx2/avx512/vnni/bf16/amx\n" : "\n")
            << "manifest.json:\n"
            << json_text(shown, 2) << '\n';
}

int run(int argc, char** argv) {
  Options opt;
  CLI::App app{"Run a RepMLPNet artifact on images (.png/.jpg) or float32 NCHW .npy batches.",
               "repmlp_infer"};
  app.add_option("ARTIFACT", opt.artifact,
                 "artifact written by repmlp-build: TorchScript (.pt) or AOTInductor (.pt2)")
      ->required();
  app.add_option("INPUT", opt.inputs, "image files (RGB, any size) or .npy float32 (N, C, H, W) batches");
  app.add_option("--device", opt.device, "cpu, cuda or cuda:N")->capture_default_str();
  // Option values the runtime takes are checked by the runtime (its messages, exit 2).
  app.add_option("--threads", opt.threads, "intra-op threads (0: torch default)")->capture_default_str();
  app.add_option("--batch", opt.batch, "batch size for inference and --bench")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20))->capture_default_str();
  app.add_option("--topk", opt.topk, "number of classes reported per input (default: 5, or all when fewer)");
  app.add_flag("--json", opt.json, "JSON output: one object per input per line");
  app.add_option("--output", opt.output,
                 "write every output, stacked in input order: FILE.npz (one array per output name, "
                 "numpy.load reads it) or FILE.npy (an artifact with one output)");
  app.add_flag("--bench", opt.bench, "benchmark: load time, first-call latency, p50/p90/p99, images/s");
  app.add_option("--iters", opt.iters, "--bench timed iterations")->check(CLI::Range(1, 1000000))->capture_default_str();
  app.add_option("--warmup", opt.warmup, "--bench untimed iterations before timing")
      ->check(CLI::Range(0, 1000000))->capture_default_str();
  app.add_flag("--info", opt.info, "print the artifact's manifest and what the runtime reads from it");
  app.add_flag("--optimize", opt.optimize, "apply torch::jit::optimize_for_inference after loading");
  app.add_flag("--no-verify", opt.no_verify,
               "skip the load-time self-check (record digest and probe; docs/ARTIFACT.md): "
               "loads a corrupt artifact without a word");
  app.add_flag("--no-verify-digest", opt.no_verify_digest,
               "keep the probe but skip hashing every record (about 30% of a large model's load)");
  app.add_option("--gemm", opt.gemm,
                 "how a TorchScript artifact's matrix products run on CPU: auto, aten, onednn or "
                 "mkl-packed (--info shows the plan)")
      ->capture_default_str();
  app.add_flag("--return-freed-memory", opt.return_freed_memory,
               "leave malloc's defaults: memory freed by a call goes back to the kernel and is "
               "faulted in again by the next (default: kept for reuse)");
  app.add_option("--max-image-pixels", opt.max_image_pixels,
                 "refuse images whose header claims more pixels (width x height); 0: no limit")
      ->check(CLI::Range(int64_t{0}, INT64_MAX))->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "repmlp_infer: error: " << first_line(e.what()) << " (see --help)\n";
    return kExitUsage;
  }
  if (opt.inputs.empty() && !opt.info && !opt.bench)
    throw UsageError("no INPUT given: pass image files or .npy batches (or --info / --bench)");
  if (!opt.output.empty() && !ends_with_ci(opt.output, ".npy") && !ends_with_ci(opt.output, ".npz"))
    throw UsageError("--output must name a .npy or .npz file, got '" + opt.output + "'");
  if (!opt.output.empty() && opt.inputs.empty())
    throw UsageError("--output needs at least one INPUT");
  if (!opt.output.empty()) {  // found now, not after every input has run
    namespace fs = std::filesystem;
    const fs::path folder = fs::absolute(fs::path(opt.output)).parent_path();
    std::error_code ec;
    if (!fs::is_directory(folder, ec))
      throw UsageError("--output folder '" + folder.string() + "' does not exist");
    for (const std::string& input : opt.inputs)
      if (fs::equivalent(input, opt.output, ec))
        throw UsageError("--output '" + opt.output + "' is also an INPUT; it would be overwritten");
  }

  repmlp_rt::RuntimeOptions runtime_options;
  runtime_options.device = opt.device;
  if (opt.threads != 0) runtime_options.threads = opt.threads;
  runtime_options.optimize = opt.optimize;
  runtime_options.verify = !opt.no_verify;
  runtime_options.verify_digest = !opt.no_verify_digest;
  runtime_options.gemm = opt.gemm;
  runtime_options.keep_freed_memory = !opt.return_freed_memory;
  // --bench warms up the batch shape it times, as a server would; a one-shot run skips the
  // warm-up, which would only add to its total time.
  if (opt.bench)
    runtime_options.warmup_batch = opt.batch;
  else
    runtime_options.warmup = 0;
  const auto load_start = Clock::now();
  std::optional<repmlp_rt::Runtime> runtime;
  try {
    runtime.emplace(opt.artifact, runtime_options);
  } catch (const repmlp_rt::InputError& e) {
    throw UsageError(e.what());  // only option values (device, threads, gemm) reach here
  }
  const std::string& kind = runtime->output_kind();
  if (kind == "logits") {
    if (app.count("--topk") == 0) opt.topk = runtime->default_topk();
    try {
      runtime->check_topk(opt.topk);
    } catch (const repmlp_rt::InputError& e) {
      throw UsageError(e.what());
    }
  } else if (app.count("--topk") != 0) {
    throw UsageError("--topk needs an artifact with class logits; '" + opt.artifact + "' outputs " +
                     kind);
  }
  const size_t num_outputs = runtime->output_names().size();
  if (ends_with_ci(opt.output, ".npy") && num_outputs > 1)
    throw UsageError("'" + opt.artifact + "' has " + std::to_string(num_outputs) + " outputs (" +
                     joined(runtime->output_names()) + "): --output needs a .npz file");
  const double load_ms = ms_since(load_start);

  if (opt.info) print_info(*runtime, opt);
  if (!opt.inputs.empty()) run_inputs(*runtime, opt);
  if (opt.bench) run_bench(*runtime, opt, load_ms);
  std::cout.flush();
  if (!std::cout) throw std::runtime_error("cannot write to standard output");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "repmlp_infer: error: " << first_line(e.what()) << '\n';
    return kExitUsage;
  } catch (const c10::Error& e) {
    std::cerr << "repmlp_infer: error: " << first_line(e.what_without_backtrace()) << '\n';
    return kExitError;
  } catch (const std::exception& e) {
    std::cerr << "repmlp_infer: error: " << first_line(e.what()) << '\n';
    return kExitError;
  } catch (...) {
    std::cerr << "repmlp_infer: error: unknown failure\n";
    return kExitError;
  }
}
