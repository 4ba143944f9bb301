// C++ unit tests of the repmlp_rt core (ctest). Runtime tests need an artifact:
//   cmake -DREPMLP_BUILD_TESTS=ON -DREPMLP_TEST_ARTIFACT=/path/to/artifact.pt ... && ctest
// (or the REPMLP_TEST_ARTIFACT environment variable); without one they are skipped.
#include <gtest/gtest.h>
#include <unistd.h>

#include <ATen/ATen.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <thread>
#include <vector>

#include "manifest.hpp"
#include "npy.hpp"
#include "repmlp_rt/errors.hpp"
#include "repmlp_rt/image.hpp"
#include "repmlp_rt/runtime.hpp"

namespace {

std::string test_artifact() {
  const char* path = std::getenv("REPMLP_TEST_ARTIFACT");
  return path ? path : "";
}

std::filesystem::path temp_path(const std::string& name) {
  // The pid keeps two runs at once (two checkouts, two CI jobs) out of each other's files.
  return std::filesystem::temp_directory_path() /
         ("repmlp_rt_test_" + std::to_string(::getpid()) + "_" + name);
}

// Error messages quote file bytes: valid UTF-8 passes as is, every other byte becomes \xNN.
TEST(Errors, MessagesAreValidUtf8) {
  const std::string valid = "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80";
  EXPECT_EQ(repmlp_rt::ArtifactError(valid).what(), valid);
  EXPECT_STREQ(repmlp_rt::ArtifactError("version \xb6").what(), "version \\xb6");
  EXPECT_STREQ(repmlp_rt::InputError("\xff\x80").what(), "\\xff\\x80");
  // truncated sequence, overlong form, surrogate, past U+10FFFF
  EXPECT_STREQ(repmlp_rt::DeviceError("a\xe2\x82").what(), "a\\xe2\\x82");
  EXPECT_STREQ(repmlp_rt::ArtifactError("\xc0\xaf").what(), "\\xc0\\xaf");
  EXPECT_STREQ(repmlp_rt::ArtifactError("\xed\xa0\x80").what(), "\\xed\\xa0\\x80");
  EXPECT_STREQ(repmlp_rt::ArtifactError("\xf4\x90\x80\x80").what(), "\\xf4\\x90\\x80\\x80");
}

TEST(Npy, RoundTrip) {
  const std::vector<int64_t> shape{2, 3, 4, 5};
  std::vector<float> data(120);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i) * 0.5f - 7.0f;
  const auto path = temp_path("roundtrip.npy").string();
  repmlp_rt::write_npy_f32(path, shape, data.data());
  const repmlp_rt::NpyArray array = repmlp_rt::read_npy_f32(path);
  EXPECT_EQ(array.shape, shape);
  EXPECT_EQ(array.data, data);
  std::filesystem::remove(path);
}

TEST(Npy, RejectsGarbage) {
  const auto path = temp_path("garbage.npy").string();
  std::ofstream(path, std::ios::binary) << "definitely not a numpy file";
  EXPECT_THROW(repmlp_rt::read_npy_f32(path), repmlp_rt::InputError);
  std::filesystem::remove(path);
  EXPECT_THROW(repmlp_rt::read_npy_f32(path), repmlp_rt::InputError);  // missing
}

// The manifest is read once into types: each field absent, of its type, or of another type
// (then quoted as written, for messages).
TEST(Manifest, ReadsTypedFields) {
  using repmlp_rt::detail::parse_manifest;
  EXPECT_FALSE(parse_manifest("[1, 2]"));
  EXPECT_FALSE(parse_manifest("{\"format_version\": 1"));
  const auto m = parse_manifest(R"({"format_version": 1e22,
      "input": {"shape": [3, 32, 32], "compute_dtype": "int8"},
      "output": {"num_classes": "10", "labels": ["a", 2]},
      "probe": {"tolerance": {"cpu": 0.0001, "cuda": "x"}},
      "aoti": {"torch_version": "2.13.0+cpu"}})");
  ASSERT_TRUE(m);
  EXPECT_TRUE(m->format_version.present);
  EXPECT_FALSE(m->format_version.value);
  EXPECT_EQ(m->format_version.text, "10000000000000000000000");
  EXPECT_EQ(m->input_shape.value, (std::vector<int64_t>{3, 32, 32}));
  EXPECT_EQ(m->input_shape.text, "[3, 32, 32]");
  EXPECT_EQ(m->compute_dtype.value, "int8");
  EXPECT_TRUE(m->num_classes.present);
  EXPECT_FALSE(m->num_classes.value);
  EXPECT_TRUE(m->labels.present);
  EXPECT_FALSE(m->labels.value);
  EXPECT_EQ(m->probe_tolerance.at("cpu").value, 0.0001);
  EXPECT_FALSE(m->probe_tolerance.at("cuda").value);
  EXPECT_EQ(m->aoti_torch_version.value, "2.13.0+cpu");
  EXPECT_FALSE(m->aoti_device.present);
  const auto empty = parse_manifest("{}");
  ASSERT_TRUE(empty);
  EXPECT_FALSE(empty->format_version.present);
  EXPECT_TRUE(empty->probe_tolerance.empty());
}

TEST(Manifest, DigestRecord) {
  using repmlp_rt::detail::parse_digest;
  const auto digest =
      parse_digest("a.pt", R"({"algorithm": "sha256", "records": {"x": "ab", "y": 3}})");
  EXPECT_EQ(digest.records.at("x"), "ab");
  EXPECT_FALSE(digest.records.at("y"));
  EXPECT_THROW(parse_digest("a.pt", "{"), repmlp_rt::ArtifactError);
  EXPECT_THROW(parse_digest("a.pt", R"({"algorithm": "md5", "records": {}})"),
               repmlp_rt::ArtifactError);
}

TEST(Manifest, PlanCache) {
  using repmlp_rt::detail::parse_plan_cache;
  const auto cache = parse_plan_cache(
      R"({"key": {"threads": 2, "cpu": {"name": "x"}}, "plan": {"gemm 96x384 float": {"path": "onednn", "rows": [512, 64]}}})");
  EXPECT_EQ(cache.key, R"({"cpu":{"name":"x"},"threads":2})");  // compact, keys sorted
  ASSERT_EQ(cache.plan.size(), 1u);
  EXPECT_EQ(cache.plan.at("gemm 96x384 float").path, "onednn");
  EXPECT_EQ(cache.plan.at("gemm 96x384 float").rows, (std::vector<int64_t>{512, 64}));
  EXPECT_THROW(parse_plan_cache(""), std::runtime_error);
  EXPECT_THROW(parse_plan_cache(R"({"key": 1})"), std::runtime_error);
  EXPECT_THROW(parse_plan_cache(R"({"key": 1, "plan": {"g": {"path": "aten", "rows": 8}}})"),
               std::runtime_error);
  EXPECT_THROW(parse_plan_cache(R"({"key": 1, "plan": {"g": 3}})"), std::runtime_error);
}

TEST(Image, MissingFileThrows) {
  EXPECT_THROW(repmlp_rt::decode_image(temp_path("missing.png").string()), repmlp_rt::InputError);
}

TEST(Runtime, MissingArtifactThrows) {
  EXPECT_THROW(repmlp_rt::Runtime(temp_path("missing.pt").string()), repmlp_rt::ArtifactError);
}

TEST(Runtime, ChecksOptionsBeforeLoading) {
  // Options are checked first: a bad value is an InputError even for a missing file.
  const std::string missing = temp_path("missing.pt").string();
  EXPECT_THROW(repmlp_rt::Runtime(missing, {.threads = 0}), repmlp_rt::InputError);
  EXPECT_THROW(repmlp_rt::Runtime(missing, {.threads = repmlp_rt::kMaxThreads + 1}),
               repmlp_rt::InputError);
  EXPECT_THROW(repmlp_rt::Runtime(missing, {.warmup = -1}), repmlp_rt::InputError);
  EXPECT_THROW(repmlp_rt::Runtime(missing, {.warmup_batch = 0}), repmlp_rt::InputError);
  EXPECT_THROW(repmlp_rt::Runtime(missing, {.device = "tpu"}), repmlp_rt::InputError);
  EXPECT_THROW(repmlp_rt::Runtime(missing, {.gemm = "blas"}), repmlp_rt::InputError);
  EXPECT_THROW(repmlp_rt::Runtime(missing, {.threads = 1}), repmlp_rt::ArtifactError);
}

TEST(Runtime, InferTakesEitherKindOfInput) {
  if (test_artifact().empty()) GTEST_SKIP() << "REPMLP_TEST_ARTIFACT is not set";
  const repmlp_rt::Runtime runtime(test_artifact());
  const auto& s = runtime.input_shape();
  at::manual_seed(1);
  const at::Tensor x = at::randn({2, s[0], s[1], s[2]});
  const at::Tensor images = at::randint(0, 256, {2, s[1] + 3, s[2] + 5, 3}).to(at::kByte);
  EXPECT_TRUE(at::equal(runtime.infer(x), runtime.infer_normalized(x)));
  EXPECT_TRUE(at::equal(runtime.infer(images), runtime.infer_images(images)));
  EXPECT_THROW(runtime.infer_normalized(images), repmlp_rt::InputError);
  EXPECT_THROW(runtime.infer_images(x), repmlp_rt::InputError);
  EXPECT_THROW(runtime.check_topk(runtime.num_classes() + 1), repmlp_rt::InputError);
  auto [scores, indices] = runtime.classify(images, 2);
  auto [expected_scores, expected_indices] = repmlp_rt::softmax_topk(runtime.infer_images(images), 2);
  EXPECT_TRUE(at::equal(scores, expected_scores));
  EXPECT_TRUE(at::equal(indices, expected_indices));
}

TEST(Runtime, ValidatesInputs) {
  if (test_artifact().empty()) GTEST_SKIP() << "REPMLP_TEST_ARTIFACT is not set";
  repmlp_rt::Runtime runtime(test_artifact());
  const auto& s = runtime.input_shape();
  ASSERT_EQ(s.size(), 3u);
  at::Tensor logits = runtime.infer(at::zeros({2, s[0], s[1], s[2]}));
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{2, runtime.num_classes()}));
  EXPECT_THROW(runtime.infer(at::zeros({2, s[0] + 1, s[1], s[2]})), repmlp_rt::InputError);
  EXPECT_THROW(runtime.infer(at::zeros({0, s[0], s[1], s[2]})), repmlp_rt::InputError);
  EXPECT_THROW(runtime.infer(at::zeros({2, s[0], s[1], s[2]}, at::kDouble)), repmlp_rt::InputError);
  EXPECT_THROW(runtime.classify(at::zeros({1, 8, 8, 3}, at::kByte), 0), repmlp_rt::InputError);
  if (!repmlp_rt::built_with_cuda())
    EXPECT_THROW(repmlp_rt::Runtime(test_artifact(), {.device = "cuda"}), repmlp_rt::DeviceError);
}

TEST(Runtime, EightThreadsMatchSerialBitwise) {
  if (test_artifact().empty()) GTEST_SKIP() << "REPMLP_TEST_ARTIFACT is not set";
  constexpr int kThreads = 8;
  const repmlp_rt::Runtime runtime(test_artifact());
  const auto& s = runtime.input_shape();
  at::manual_seed(0);
  std::vector<at::Tensor> inputs, expected;
  for (int i = 0; i < kThreads; ++i) {
    if (i % 2)
      inputs.push_back(at::randint(0, 256, {1 + i % 3, s[1] + i, s[2] + 3, 3}, at::kByte));
    else
      inputs.push_back(at::randn({1 + i % 3, s[0], s[1], s[2]}));
    expected.push_back(i % 2 ? runtime.infer_images(inputs.back()) : runtime.infer(inputs.back()));
  }
  std::vector<int> mismatches(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 10; ++rep) {
        const size_t i = (t + rep) % inputs.size();
        const at::Tensor out = i % 2 ? runtime.infer_images(inputs[i]) : runtime.infer(inputs[i]);
        if (!at::equal(out, expected[i])) ++mismatches[t];
      }
    });
  for (auto& thread : threads) thread.join();
  for (int m : mismatches) EXPECT_EQ(m, 0);
}

TEST(Runtime, SelfCheckRefusesAFlippedByte) {
  if (test_artifact().empty()) GTEST_SKIP() << "REPMLP_TEST_ARTIFACT is not set";
  std::ifstream in(test_artifact(), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // The file is mostly weights: its middle byte lies inside a weight record.
  bytes[bytes.size() / 2] ^= 0x01;
  const auto path = temp_path("flipped.pt").string();
  std::ofstream(path, std::ios::binary) << bytes;
  try {
    repmlp_rt::Runtime runtime(path);
    ADD_FAILURE() << "a flipped byte loaded";
  } catch (const repmlp_rt::ArtifactError& e) {
    EXPECT_NE(std::string(e.what()).find("self-check failed"), std::string::npos) << e.what();
  }
  repmlp_rt::RuntimeOptions unverified;
  unverified.verify = false;
  EXPECT_FALSE(repmlp_rt::Runtime(path, unverified).verified());
  std::filesystem::remove(path);
}

}  // namespace
