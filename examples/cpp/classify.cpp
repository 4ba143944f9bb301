// repmlp_classify: classify image files with one repmlp_rt::Runtime shared by several threads,
// printing one JSON line per image, as `repmlp_infer --json` does.
//   usage: repmlp_classify [--workers N] ARTIFACT IMAGE...
#include <repmlp_rt/image.hpp>
#include <repmlp_rt/runtime.hpp>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

namespace {

// One image's line: {"input": path, "topk": [{"index", "label", "score"}, ...]}.
nlohmann::json classify_file(const repmlp_rt::Runtime& runtime, const std::string& path) {
  repmlp_rt::Image image = repmlp_rt::decode_image(path);
  // A batch of one uint8 NHWC image, viewing the decoded pixels (no copy).
  const at::Tensor batch =
      at::from_blob(image.rgb.data(), {1, image.height, image.width, 3}, at::kByte);
  const auto [scores, indices] = runtime.classify(batch);  // top default_topk() classes
  nlohmann::json topk = nlohmann::json::array();
  for (int64_t k = 0; k < scores.size(1); ++k) {
    const int64_t index = indices[0][k].item<int64_t>();
    topk.push_back({{"index", index},
                    {"label", runtime.labels().at(index)},
                    {"score", scores[0][k].item<float>()}});
  }
  return {{"input", path}, {"topk", topk}};
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  int workers = 4;
  if (args.size() >= 2 && args[0] == "--workers") {
    workers = std::max(1, std::atoi(args[1].c_str()));
    args.erase(args.begin(), args.begin() + 2);
  }
  if (args.size() < 2) {
    std::cerr << "usage: repmlp_classify [--workers N] ARTIFACT IMAGE...\n";
    return 2;
  }
  try {
    // Runtime's methods are const and thread-safe: one loaded model serves every thread.
    const repmlp_rt::Runtime runtime(args[0]);
    const std::vector<std::string> images(args.begin() + 1, args.end());
    std::vector<nlohmann::json> lines(images.size());
    std::vector<std::exception_ptr> errors(images.size());
    std::atomic<size_t> next{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < workers; ++t)
      threads.emplace_back([&] {
        for (size_t i = next++; i < images.size(); i = next++) {
          try {
            lines[i] = classify_file(runtime, images[i]);
          } catch (...) {
            errors[i] = std::current_exception();
          }
        }
      });
    for (auto& thread : threads) thread.join();
    for (size_t i = 0; i < images.size(); ++i) {  // in input order
      if (errors[i]) std::rethrow_exception(errors[i]);
      std::cout << lines[i].dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
    }
  } catch (const std::exception& e) {
    std::cerr << "repmlp_classify: error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
