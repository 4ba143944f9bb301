// The load-time GEMM plan of gemm_plan.hpp (design: docs/PERFORMANCE.md, "GEMM plan").
//
// The frozen graph computes its matrix products with constant weights in three forms:
//   aten::linear(x, W, b)                     global perceptron, head
//   aten::addmm(b, x, Wt, 1, 1)               the FFN's two GEMMs (Wt a transposed view of W)
//   aten::baddbmm(b', W', x^T expanded, 1, 1) fc3 with one shareset, as weight panels, read
//                                             back through reshape + t()
//   aten::baddbmm(b, x_s, W_s^T, 1, 1)        fc3 with S sharesets: S GEMMs in one batch, W_s^T
//                                             a transposed view of each shareset's weight
// Each is a GEMM x (M x K) by W^T (K x N). A site may run as it is (ATen: MKL for float32,
// oneDNN for bfloat16), as oneDNN's linear on a weight reordered once for this CPU
// (mkldnn::_linear_pointwise, with a following GELU fused), or as MKL's packed GEMM on a
// weight packed once (mkl::_mkl_linear; float32 only; a packed copy per row count that a served
// batch size gives the GEMM most often, chosen by row count at run time; other row counts run
// MKL's plain GEMM). Batched fc3 has neither library's packed form; its second
// candidate is ATen's batched GEMM on W_s^T copied once into (S, K, N) rows ("aten-kn"), which
// few-row batches (batch 1) run faster than the transposed view. The int8 artifact's GEMMs,
//   aten::_int_mm(codes, Wt) -> aten::to(float)  int8 codes by an int8 (K x N) weight, int32 sums
// may run as oneDNN's int8 linear on a weight packed once (onednn::qlinear_pointwise with scale
// 1 and float32 out: the same int32 sums, converted as aten::to converts them; the reorder
// torch._int_mm makes on every call is made once). Packed weights are
// machine-specific, so they cannot be saved in the artifact: they are built here, after every
// load.
#include "gemm_plan.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/version.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <unistd.h>

#include "integrity.hpp"
#include "manifest.hpp"
#include "repmlp_rt/errors.hpp"
#include "repmlp_rt/runtime.hpp"

namespace repmlp_rt::detail {
namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;
using nlohmann::json;

constexpr int kPlanFormat = 3;
// What RuntimeOptions::gemm may pin; "aten-kn" (batched fc3 only) is one more path auto may pick.
const char* const kPaths[] = {"aten", "onednn", "mkl-packed"};
const char* const kPlanPaths[] = {"aten", "onednn", "mkl-packed", "aten-kn"};

// How a site's GEMM appears in the graph.
enum class Form {
  kMatrix,   // linear / addmm: x (M, K)
  kPanels,   // fc3 with one shareset: x (M, K), computed as W @ x^T in panels
  kBatched,  // fc3 with S sharesets: x (S, M, K), W (S, N, K)
  kInt8,     // torch._int_mm: x (M, K) int8 codes, W (N, K) int8, int32 sums read as float32
};

// One matrix product of a graph whose weight is a constant.
struct Site {
  Form form = Form::kMatrix;
  Node* node = nullptr;          // linear / addmm / baddbmm
  Node* gelu = nullptr;          // the aten::gelu that is its only reader, if any
  Value* result = nullptr;       // the value the rewrite replaces (fc3: the t() after it)
  Value* input = nullptr;        // x, (M, K); batched: (S, M, K)
  at::Tensor weight;             // W, (N, K) contiguous; batched: (S, N, K)
  at::Tensor graph_weight;       // int8: the (K, N) operand as the graph passes it
  std::optional<at::Tensor> bias;  // (N); batched: (S, 1, N)
  const void* key = nullptr;     // the weight's data: the same in every method of the module
  std::string group;             // sites of one group share shapes and so the plan
};

std::optional<at::Tensor> constant_tensor(Value* value) {
  if (value->node()->kind() != c10::prim::Constant) return std::nullopt;
  auto ivalue = torch::jit::toIValue(value);
  if (!ivalue || !ivalue->isTensor()) return std::nullopt;
  return ivalue->toTensor();
}

bool constant_is_one(Value* value) {
  auto ivalue = torch::jit::toIValue(value);
  if (!ivalue) return false;
  if (ivalue->isInt()) return ivalue->toInt() == 1;
  if (ivalue->isDouble()) return ivalue->toDouble() == 1.0;
  return false;
}

// The tensor a chain of reshapes starts from, when it is a constant.
std::optional<at::Tensor> constant_through_reshapes(Value* value) {
  while (value->node()->kind() == c10::aten::reshape) value = value->node()->input(0);
  return constant_tensor(value);
}

Node* only_use(Value* value, c10::Symbol kind) {
  if (value->uses().size() != 1) return nullptr;
  Node* user = value->uses()[0].user;
  return user->kind() == kind && user->inputs()[0] == value ? user : nullptr;
}

std::string group_name(const char* kind, const Site& site, c10::ScalarType dtype) {
  const int64_t n = site.weight.dim();
  std::string name = std::string(kind) + " " + std::to_string(site.weight.size(n - 1)) + "x" +
                     std::to_string(site.weight.size(n - 2));
  if (site.form == Form::kBatched) name += " x" + std::to_string(site.weight.size(0));
  if (site.gelu) name += "+gelu";
  return name + " " + c10::toString(dtype);
}

// aten::linear(x, W, b) and aten::addmm(b, x, Wt, 1, 1) with constant weights.
std::optional<Site> match_linear(Node* node, c10::ScalarType dtype) {
  Site site;
  site.node = node;
  const char* kind = nullptr;
  if (node->kind() == c10::aten::linear && node->inputs().size() == 3) {
    auto weight = constant_tensor(node->input(1));
    if (!weight || weight->dim() != 2) return std::nullopt;
    site.input = node->input(0);
    site.weight = *weight;
    auto bias = constant_tensor(node->input(2));
    if (bias) site.bias = *bias;
    else if (!node->input(2)->type()->cast<c10::NoneType>()) return std::nullopt;
    kind = "linear";
  } else if (node->kind() == c10::aten::addmm && node->inputs().size() == 5) {
    auto bias = constant_tensor(node->input(0));
    auto weight_t = constant_tensor(node->input(2));
    if (!bias || !weight_t || weight_t->dim() != 2 || bias->dim() != 1 ||
        bias->size(0) != weight_t->size(1) || !constant_is_one(node->input(3)) ||
        !constant_is_one(node->input(4)))
      return std::nullopt;
    site.input = node->input(1);
    site.weight = weight_t->t();
    site.bias = *bias;
    kind = "gemm";
  } else {
    return std::nullopt;
  }
  if (site.weight.scalar_type() != dtype || !site.weight.device().is_cpu()) return std::nullopt;
  site.key = site.weight.data_ptr();
  site.weight = site.weight.contiguous();
  site.result = node->output();
  site.gelu = only_use(node->output(), c10::aten::gelu);
  site.group = group_name(kind, site, dtype);
  return site;
}

// fc3 with one shareset (python/repmlp/model.py): baddbmm(reshape(b), reshape(W),
// expand(t(x2d))) -> reshape -> t() is x2d @ W^T + b, one (N*C x area) by (area x area) GEMM.
std::optional<Site> match_fc3(Node* node, c10::ScalarType dtype) {
  if (node->kind() != c10::aten::baddbmm || node->inputs().size() != 5) return std::nullopt;
  auto bias = constant_through_reshapes(node->input(0));
  auto weight = constant_through_reshapes(node->input(1));
  if (!bias || !weight || !constant_is_one(node->input(3)) || !constant_is_one(node->input(4)))
    return std::nullopt;
  const int64_t area = bias->numel();
  if (weight->numel() != area * area || weight->scalar_type() != dtype) return std::nullopt;
  Node* expand = node->input(2)->node();
  if (expand->kind() != c10::aten::expand) return std::nullopt;
  Node* transpose = expand->input(0)->node();
  if (transpose->kind() != c10::aten::t) return std::nullopt;
  Node* back = only_use(node->output(), c10::aten::reshape);
  Node* back_t = back ? only_use(back->output(), c10::aten::t) : nullptr;
  if (!back_t) return std::nullopt;
  Site site;
  site.form = Form::kPanels;
  site.node = node;
  site.input = transpose->input(0);
  site.key = weight->data_ptr();
  site.weight = weight->reshape({area, area}).contiguous();
  site.bias = bias->reshape({area}).contiguous();
  site.result = back_t->output();
  site.group = group_name("fc3", site, dtype);
  return site;
}

bool constant_int_is(Value* value, int64_t expected) {
  auto ivalue = torch::jit::toIValue(value);
  return ivalue && ivalue->isInt() && ivalue->toInt() == expected;
}

// fc3 with S sharesets (python/repmlp/model.py): baddbmm(reshape(b), x_s,
// transpose(reshape(W), 1, 2)) with W the (S*N, K) fc3 weight, x_s (S, M, K) of any layout.
std::optional<Site> match_batched_fc3(Node* node, c10::ScalarType dtype) {
  if (node->kind() != c10::aten::baddbmm || node->inputs().size() != 5) return std::nullopt;
  Node* transpose = node->input(2)->node();
  if (transpose->kind() != c10::aten::transpose || !constant_int_is(transpose->input(1), 1) ||
      !constant_int_is(transpose->input(2), 2))
    return std::nullopt;
  auto bias = constant_through_reshapes(node->input(0));
  auto weight = constant_through_reshapes(transpose->input(0));
  if (!bias || !weight || !constant_is_one(node->input(3)) || !constant_is_one(node->input(4)) ||
      weight->scalar_type() != dtype || bias->numel() == 0 || weight->numel() % bias->numel())
    return std::nullopt;
  const int64_t area = weight->numel() / bias->numel();  // K = N
  if (bias->numel() % area) return std::nullopt;
  const int64_t sets = bias->numel() / area;
  if (sets < 2) return std::nullopt;
  Site site;
  site.form = Form::kBatched;
  site.node = node;
  site.input = node->input(1);
  site.key = weight->data_ptr();
  site.weight = weight->reshape({sets, area, area}).contiguous();
  site.bias = bias->reshape({sets, 1, area}).contiguous();
  site.result = node->output();
  site.group = group_name("fc3", site, dtype);
  return site;
}

// The int8 artifact's GEMM (python/repmlp/quantize.py): _int_mm(codes, Wt) read back once by
// aten::to(float32).
std::optional<Site> match_int8(Node* node) {
  if (node->kind() != c10::aten::_int_mm || node->inputs().size() != 2) return std::nullopt;
  auto weight_t = constant_tensor(node->input(1));
  if (!weight_t || weight_t->dim() != 2 || weight_t->scalar_type() != at::kChar ||
      !weight_t->device().is_cpu())
    return std::nullopt;
  Node* cast = only_use(node->output(), c10::aten::to);
  if (!cast || cast->inputs().size() < 2 ||
      !constant_int_is(cast->input(1), static_cast<int64_t>(at::kFloat)))
    return std::nullopt;
  Site site;
  site.form = Form::kInt8;
  site.node = node;
  site.input = node->input(0);
  site.key = weight_t->data_ptr();
  site.graph_weight = *weight_t;
  site.weight = weight_t->t().contiguous();
  site.result = cast->output();
  site.group = "int8 " + std::to_string(site.weight.size(1)) + "x" + std::to_string(site.weight.size(0));
  return site;
}

void find_sites(torch::jit::Block* block, c10::ScalarType dtype, std::vector<Site>& sites) {
  for (Node* node : block->nodes()) {
    for (torch::jit::Block* inner : node->blocks()) find_sites(inner, dtype, sites);
    std::optional<Site> site = match_linear(node, dtype);
    if (!site) site = match_fc3(node, dtype);
    if (!site) site = match_batched_fc3(node, dtype);
    if (!site) site = match_int8(node);
    if (site) sites.push_back(std::move(*site));
  }
}

// ---- Which row counts each group sees: one forward per batch size on a copy of the graph in
// which every site first appends (its index, its row count) to a list that the copy also
// returns. (RecordFunction's view of the interpreter's inputs is not reliable for this.)

// group -> batch -> row counts M of its calls.
using RowCounts = std::map<std::string, std::map<int64_t, std::vector<int64_t>>>;

std::shared_ptr<Graph> counting_copy(Graph& forward, c10::ScalarType dtype) {
  std::shared_ptr<Graph> graph = forward.copy();
  std::vector<Site> sites;
  find_sites(graph->block(), dtype, sites);
  Value* calls = nullptr;
  {
    torch::jit::WithInsertPoint point(graph->param_node()->next());
    calls = graph->insertNode(graph->createList(c10::IntType::get(), {}))->output();
  }
  for (size_t i = 0; i < sites.size(); ++i) {
    torch::jit::WithInsertPoint point(sites[i].node);
    const int64_t dim = sites[i].form == Form::kBatched ? 1 : 0;
    Value* rows = graph->insert(c10::aten::size, {sites[i].input, dim});
    graph->insert(c10::aten::append, {calls, static_cast<int64_t>(i)});
    graph->insert(c10::aten::append, {calls, rows});
  }
  torch::jit::WithInsertPoint point(graph->return_node());
  Value* both = graph->insertNode(graph->createTuple({graph->outputs()[0], calls}))->output();
  graph->return_node()->replaceInput(0, both);
  return graph;
}

RowCounts observe_rows(torch::jit::Module& module, const std::shared_ptr<Graph>& forward,
                       const std::vector<Site>& forward_sites, c10::ScalarType dtype,
                       const std::vector<int64_t>& batches) {
  RowCounts counts;
  const auto shape = module.get_method("input_shape")({}).toIntVector();
  // A copy, so that the module's own methods keep no executor from this run.
  torch::jit::GraphFunction function("gemm_plan_observe", counting_copy(*forward, dtype), nullptr);
  c10::InferenceMode inference_mode;
  torch::jit::GraphOptimizerEnabledGuard plain_interpreter(false);
  at::Generator generator = at::detail::createCPUGenerator(0);
  for (int64_t batch : batches) {
    at::Tensor x = at::randn({batch, shape[0], shape[1], shape[2]}, generator, at::kFloat);
    const auto calls = function({module._ivalue(), x}).toTupleRef().elements()[1].toIntVector();
    for (size_t i = 0; i + 1 < calls.size(); i += 2) {
      const auto site = static_cast<size_t>(calls[i]);
      if (site < forward_sites.size())
        counts[forward_sites[site].group][batch].push_back(calls[i + 1]);
    }
  }
  return counts;
}

// ---- The paths, as calls on a site's tensors.

at::Tensor call_op(const char* name, std::vector<c10::IValue> args) {
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  torch::jit::Stack stack(std::move(args));
  handle.callBoxed(stack);
  return stack.at(0).toTensor();
}

at::Tensor onednn_pack(const at::Tensor& weight, int64_t rows) {
  if (weight.scalar_type() == at::kChar)
    return call_op("onednn::qlinear_prepack", {weight, std::vector<int64_t>{rows, weight.size(1)}});
  return call_op("mkldnn::_reorder_linear_weight", {weight, rows});
}

// The per-column scales and zero points of an int8 GEMM that is only to sum: ones and zeros.
std::pair<at::Tensor, at::Tensor> unit_scales(const Site& site) {
  const int64_t n = site.weight.size(0);
  return {at::ones({n}, at::kFloat), at::zeros({n}, at::kLong)};
}
at::Tensor mkl_pack(const at::Tensor& weight, int64_t rows) {
  return call_op("mkl::_mkl_reorder_linear_weight", {weight, rows});
}

// Batched fc3's W_s^T as (S, K, N) rows of its own, for "aten-kn".
at::Tensor kn_layout(const at::Tensor& weight) { return weight.transpose(1, 2).contiguous(); }

// The weight as `path` reads it, built once: oneDNN's reorder (for `rows` rows, a hint), MKL's
// pack (for exactly `rows` rows), or aten-kn's (S, K, N) copy.
at::Tensor pack_weight(const std::string& path, const at::Tensor& weight, int64_t rows) {
  if (path == "onednn") return onednn_pack(weight, rows);
  if (path == "mkl-packed") return mkl_pack(weight, rows);
  return kn_layout(weight);
}

struct Packed {
  at::Tensor onednn, mkl, kn;
  int64_t mkl_rows = 0;
};

// One call of `path` for a (rows x K) input, as the rewritten graph would make it.
at::Tensor run_path(const std::string& path, const Site& site, const Packed& packed,
                    const at::Tensor& x, const std::string& gelu) {
  if (site.form == Form::kInt8) {
    if (path != "onednn") return at::_int_mm(x, site.graph_weight).to(at::kFloat);
    const auto [scales, zeros] = unit_scales(site);
    return call_op("onednn::qlinear_pointwise",
                   {x, 1.0, int64_t{0}, packed.onednn, scales, zeros, c10::IValue(), 1.0,
                    int64_t{0}, static_cast<int64_t>(at::kFloat), std::string("none"),
                    c10::List<std::optional<at::Scalar>>(), std::string()});
  }
  const c10::IValue bias = site.bias ? c10::IValue(*site.bias) : c10::IValue();
  if (path == "onednn") {
    c10::List<std::optional<at::Scalar>> scalars;
    return call_op("mkldnn::_linear_pointwise",
                   {x, packed.onednn, bias, std::string(site.gelu ? "gelu" : "none"), scalars,
                    site.gelu ? c10::IValue(gelu) : c10::IValue(std::string())});
  }
  if (site.form == Form::kBatched)  // as the artifact computes it, or on the (S, K, N) copy
    return at::baddbmm(*site.bias, x, path == "aten-kn" ? packed.kn : site.weight.transpose(1, 2));
  at::Tensor y;
  if (path == "mkl-packed")
    y = call_op("mkl::_mkl_linear", {x, packed.mkl, site.weight, bias, packed.mkl_rows});
  else if (site.node->kind() == c10::aten::baddbmm) {
    // As the artifact computes it: weight panels, one batched GEMM (see match_fc3).
    const int64_t area = site.weight.size(0);
    const int64_t panels = area % 2 == 0 ? 2 : 1;
    y = at::baddbmm(site.bias->reshape({panels, area / panels, 1}),
                    site.weight.reshape({panels, area / panels, area}),
                    x.t().expand({panels, area, x.size(0)}))
            .reshape({area, -1})
            .t();
  } else {
    y = at::linear(x, site.weight, bias.isTensor() ? std::optional<at::Tensor>(bias.toTensor())
                                                   : std::nullopt);
  }
  return site.gelu ? at::gelu(y, gelu) : y;
}

std::string gelu_approximation(const Site& site) {
  if (!site.gelu) return "none";
  auto value = torch::jit::toIValue(site.gelu->input(1));
  return value && value->isString() ? value->toStringRef() : "";
}

// ---- The plan: group -> (path, rows to pack for).

struct Choice {
  std::string path = "aten";
  // Row counts to pack for (mkl-packed: one packed copy each; onednn: the first is a hint).
  std::vector<int64_t> rows{1};
};
using Plan = std::map<std::string, Choice>;

// The most frequent row count of a group's calls (ties: the larger).
int64_t usual_rows(const std::vector<int64_t>& rows) {
  std::map<int64_t, int64_t> count;
  for (int64_t m : rows) ++count[m];
  int64_t best = rows.empty() ? 1 : rows.front(), best_count = 0;
  for (const auto& [m, n] : count)
    if (n >= best_count) best = m, best_count = n;
  return best;
}

// The row counts to pack a group for: each served batch size's most frequent one, batch 1's
// first (at most one per batch size: each is one more copy of the weight under mkl-packed).
std::vector<int64_t> pack_rows_of(const std::map<int64_t, std::vector<int64_t>>& by_batch) {
  std::vector<int64_t> out;
  for (const auto& [batch, ms] : by_batch) {
    const int64_t m = usual_rows(ms);
    if (std::find(out.begin(), out.end(), m) == out.end()) out.push_back(m);
  }
  return out.empty() ? std::vector<int64_t>{1} : out;
}

// Whether `path` can run `form` (nullopt form: any site of the graph).
bool path_available(const std::string& path, c10::ScalarType dtype,
                    std::optional<Form> form = std::nullopt) {
  if (path == "aten") return true;
  if (path == "aten-kn") return !form || *form == Form::kBatched;
  if (form && *form == Form::kBatched) return false;
  if (form && *form == Form::kInt8) return path == "onednn" && at::hasMKLDNN();
  if (path == "onednn") return at::hasMKLDNN() && (dtype == at::kFloat || dtype == at::kBFloat16);
  return at::hasMKL() && dtype == at::kFloat;
}

class Clock {
 public:
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

// A group's packed weights while it is timed, by path and row count packed for: packed once,
// however many row counts are timed on them.
using TimingPacks = std::map<std::pair<std::string, int64_t>, at::Tensor>;

// The row count of the MKL packed copy that a call of `rows` rows runs on: its own where it is
// one of the counts packed for, else the first (which falls back to MKL's plain GEMM).
int64_t mkl_rows_for(int64_t rows, const std::vector<int64_t>& pack_rows) {
  return std::find(pack_rows.begin(), pack_rows.end(), rows) != pack_rows.end() ? rows
                                                                                 : pack_rows.front();
}

// The weight of `path` as the rewrite will build it for a call of `rows` rows; oneDNN's is
// packed for the first count (a hint, not a requirement: one copy serves every count).
at::Tensor timing_pack(TimingPacks& packs, const Site& site, const std::string& path,
                       int64_t rows, const std::vector<int64_t>& pack_rows) {
  const int64_t key = path == "mkl-packed" ? mkl_rows_for(rows, pack_rows) : pack_rows.front();
  at::Tensor& packed = packs[{path, key}];
  if (!packed.defined()) packed = pack_weight(path, site.weight, key);
  return packed;
}

// Seconds per call of each available path for one group at one row count: interleaved rounds,
// the fastest round of each.
std::map<std::string, double> time_paths(const Site& site, int64_t rows,
                                         const std::vector<int64_t>& pack_rows,
                                         const std::vector<std::string>& paths,
                                         TimingPacks& packs) {
  at::Generator generator = at::detail::createCPUGenerator(rows);
  const int64_t k = site.weight.size(-1);
  // Batched fc3 reads its shareset rows as a transposed view, as the graph passes them.
  const at::Tensor x =
      site.form == Form::kBatched
          ? at::randn({rows, site.weight.size(0), k}, generator, at::kFloat).transpose(0, 1)
          : at::randn({rows, k}, generator, at::kFloat);
  const at::Tensor input = site.form == Form::kInt8
                               ? x.mul(40).round_().clamp_(-127, 127).to(at::kChar)
                               : x.to(site.weight.scalar_type());
  Packed packed;
  packed.mkl_rows = mkl_rows_for(rows, pack_rows);
  std::map<std::string, double> best;
  const std::string gelu = gelu_approximation(site);
  std::vector<std::string> usable;
  for (const std::string& path : paths) {
    try {
      if (path == "onednn") packed.onednn = timing_pack(packs, site, path, rows, pack_rows);
      if (path == "mkl-packed") packed.mkl = timing_pack(packs, site, path, rows, pack_rows);
      if (path == "aten-kn") packed.kn = timing_pack(packs, site, path, rows, pack_rows);
      run_path(path, site, packed, input, gelu);  // first call: primitive creation, first touch
      usable.push_back(path);
      best[path] = 1e30;
    } catch (const std::exception&) {
      // This CPU or build cannot run the path for this GEMM (c10::Error, or oneDNN's own
      // error type from ideep): it is not a candidate.
    }
  }
  Clock clock;
  for (int round = 0; round < 7; ++round) {
    for (const std::string& path : usable) {
      Clock call;
      run_path(path, site, packed, input, gelu);
      best[path] = std::min(best[path], call.seconds());
    }
    // Large products need fewer rounds to be measured well.
    if (round >= 2 && clock.seconds() > 0.25) break;
  }
  return best;
}

// auto: for each group, the path with the least time per image over the batch sizes served.
Plan measure_plan(const std::vector<Site>& sites, const RowCounts& counts,
                  c10::ScalarType dtype, const std::string& cache_note) {
  Plan plan;
  Clock clock;
  bool announced = false;
  const RowCounts& rows = counts;
  std::set<std::string> done;
  for (const Site& site : sites) {
    if (!done.insert(site.group).second) continue;
    std::vector<std::string> paths;
    for (const char* path : kPlanPaths)
      if (path_available(path, dtype, site.form)) paths.push_back(path);
    auto it = rows.find(site.group);
    if (it == rows.end()) {  // never called by forward(): left as it is
      plan[site.group] = Choice{};
      continue;
    }
    const std::vector<int64_t> pack_rows = pack_rows_of(it->second);
    std::map<int64_t, std::map<std::string, double>> by_rows;
    std::map<std::string, double> per_image;
    TimingPacks packs;
    for (const auto& [batch, ms] : it->second)
      for (int64_t m : ms) {
        // Timed as the rewrite will run it (see timing_pack).
        if (!by_rows.count(m)) by_rows[m] = time_paths(site, m, pack_rows, paths, packs);
        for (const auto& [path, seconds] : by_rows[m]) per_image[path] += seconds / batch;
      }
    Choice choice;
    choice.rows = pack_rows;
    // Another path must gain at least 1% over ATen to be taken: noise must not flip a tie.
    double best = per_image.count("aten") ? per_image["aten"] * 0.99 : 1e30;
    for (const auto& [path, seconds] : per_image)
      if (path != "aten" && seconds < best) choice.path = path, best = seconds;
    plan[site.group] = choice;
    if (!announced && clock.seconds() > 1.0) {
      std::cerr << "repmlp_rt: measuring GEMM paths on this CPU (once per host, artifact and "
                   "thread count; cached in "
                << cache_note << ")..." << std::endl;
      announced = true;
    }
  }
  if (announced)
    std::fprintf(stderr, "repmlp_rt: GEMM plan measured in %.1f s\n", clock.seconds());
  return plan;
}

// ---- The rewrite.

Value* insert_tensor_constant(Graph& graph, const at::Tensor& tensor) {
  // An opaque oneDNN tensor has no strides, which Graph::insertConstant's type inference reads.
  Node* node = graph.create(c10::prim::Constant);
  node->t_(c10::attr::value, tensor);
  node->output()->setType(c10::TensorType::get());
  node->insertBefore(graph.param_node()->next());
  return node->output();
}

Value* insert_constant(Graph& graph, const c10::IValue& value) {
  torch::jit::WithInsertPoint point(graph.param_node()->next());
  return graph.insertConstant(value);
}

// Packed weights, shared by every method that reads the same weight.
using PackCache = std::map<std::pair<const void*, std::string>, at::Tensor>;

// mkl::_mkl_linear on the copy packed for the call's row count: with one count, one call
// (other counts run MKL's plain GEMM inside it); with more, prim::If on the row count, the last
// branch also taking every count not packed for. Returns the node, not yet inserted.
Node* mkl_linear_by_rows(Graph& graph, const Site& site, const std::vector<int64_t>& rows,
                         Value* first_packed, Value* bias, PackCache& packs) {
  Value* original = insert_tensor_constant(graph, site.weight);
  auto packed_for = [&](size_t i) {
    if (i == 0) return first_packed;
    at::Tensor& copy = packs[{site.key, "mkl-packed " + std::to_string(rows[i])}];
    if (!copy.defined()) copy = pack_weight("mkl-packed", site.weight, rows[i]);
    return insert_tensor_constant(graph, copy);
  };
  auto linear = [&](size_t i) {
    return graph.create(c10::Symbol::fromQualString("mkl::_mkl_linear"),
                        {site.input, packed_for(i), original, bias, insert_constant(graph, rows[i])});
  };
  if (rows.size() == 1) return linear(0);
  // if m == rows[1]: packed for rows[1] elif m == rows[2]: ... else: packed for rows[0]
  Value* m = graph.insert(c10::aten::size, {site.input, int64_t{0}});
  std::function<Node*(size_t)> branch = [&](size_t i) -> Node* {
    if (i == rows.size()) return linear(0);
    Value* is_i = graph.insert(c10::aten::eq, {m, rows[i]});
    Node* choose = graph.create(c10::prim::If, {is_i}, 1);
    choose->output()->setType(c10::TensorType::get());
    for (size_t side = 0; side < 2; ++side) {
      torch::jit::Block* block = choose->addBlock();
      torch::jit::WithInsertPoint inside(block);
      Node* call = side == 0 ? linear(i) : branch(i + 1);
      call->output()->setType(c10::TensorType::get());
      block->appendNode(call);
      block->registerOutput(call->output());
    }
    return choose;
  };
  return branch(1);
}

// _int_mm + aten::to(float) -> oneDNN's int8 linear on the packed weight, float32 out.
Value* rewrite_int8(Graph& graph, const Site& site, Value* packed) {
  const auto [scales, zeros] = unit_scales(site);
  Value* scale_values = insert_tensor_constant(graph, scales);
  Value* zero_values = insert_tensor_constant(graph, zeros);
  torch::jit::WithInsertPoint point(site.node);
  Node* no_scalars =
      graph.insertNode(graph.createList(c10::OptionalType::create(c10::NumberType::get()), {}));
  Node* call = graph.create(
      c10::Symbol::fromQualString("onednn::qlinear_pointwise"),
      {site.input, insert_constant(graph, 1.0), insert_constant(graph, int64_t{0}), packed,
       scale_values, zero_values, insert_constant(graph, c10::IValue()),
       insert_constant(graph, 1.0), insert_constant(graph, int64_t{0}),
       insert_constant(graph, static_cast<int64_t>(at::kFloat)),
       insert_constant(graph, std::string("none")), no_scalars->output(),
       insert_constant(graph, std::string())});
  call->output()->setType(c10::TensorType::get());
  graph.insertNode(call);
  site.result->replaceAllUsesWith(call->output());  // the int32 sums and their cast go
  return call->output();
}

// The value that the site's rewrite replaced and its replacement (nothing: the site was left as
// built, because this torch build cannot pack its weight for the path: a pinned mode, or a
// cache written by another build).
using Replacement = std::optional<std::pair<Value*, Value*>>;
Replacement rewrite_site(Graph& graph, const Site& site, const Choice& choice, PackCache& packs) {
  at::Tensor& packed = packs[{site.key, choice.path + " " + std::to_string(choice.rows.front())}];
  if (choice.path == "aten-kn") {  // the same batched GEMM, reading the (S, K, N) copy
    if (!packed.defined()) packed = pack_weight(choice.path, site.weight, choice.rows.front());
    site.node->replaceInput(2, insert_tensor_constant(graph, packed));
    return std::make_pair(site.node->output(), site.node->output());
  }
  const bool onednn = choice.path == "onednn";
  try {
    if (!packed.defined()) packed = pack_weight(choice.path, site.weight, choice.rows.front());
  } catch (const std::exception&) {
    return std::nullopt;
  }
  Value* weight = insert_tensor_constant(graph, packed);
  if (site.form == Form::kInt8) return std::make_pair(site.result, rewrite_int8(graph, site, weight));
  Value* bias = site.bias ? insert_tensor_constant(graph, *site.bias)
                          : insert_constant(graph, c10::IValue());
  // After the site's own node, before its readers (fc3: before the reshape that reads it).
  torch::jit::WithInsertPoint point(site.node);
  Node* call = nullptr;
  Value* replaced = site.result;
  if (onednn) {
    const bool fuse = site.gelu != nullptr;
    Node* scalars = graph.insertNode(graph.createList(
        c10::OptionalType::create(c10::NumberType::get()), {}));
    call = graph.create(c10::Symbol::fromQualString("mkldnn::_linear_pointwise"),
                        {site.input, weight, bias,
                         insert_constant(graph, std::string(fuse ? "gelu" : "none")),
                         scalars->output(),
                         fuse ? site.gelu->input(1) : insert_constant(graph, std::string())});
    if (fuse) replaced = site.gelu->output();
  } else {
    call = mkl_linear_by_rows(graph, site, choice.rows, weight, bias, packs);
  }
  call->output()->setType(c10::TensorType::get());
  graph.insertNode(call);
  // fc3's read-back and a fused GELU lose their readers; dead code elimination drops them.
  replaced->replaceAllUsesWith(call->output());
  return std::make_pair(replaced, call->output());
}

// ---- The cache.

std::filesystem::path cache_folder() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg && *xdg) return std::filesystem::path(xdg) / "repmlp_rt";
  const char* home = std::getenv("HOME");
  return std::filesystem::path(home && *home ? home : ".") / ".cache" / "repmlp_rt";
}

json cache_key(const GemmPlanRequest& request, const std::vector<int64_t>& batches,
               const std::vector<Site>& sites) {
  const CpuFeatures cpu = cpu_features();
  // The graph's GEMMs themselves, so that artifacts without a digest never share a plan.
  std::map<std::string, int64_t> groups;
  for (const Site& site : sites) ++groups[site.group];
  return {{"format", kPlanFormat},
          {"cpu", {{"name", cpu.name}, {"kernel_level", cpu.kernel_level}, {"isa", cpu.isa}}},
          {"torch", TORCH_VERSION},
          {"artifact_digest", request.artifact_digest},
          {"threads", request.threads},
          {"mode", request.mode},
          {"dtype", c10::toString(request.compute_dtype)},
          {"batch_sizes", batches},
          {"gemms", groups}};
}

std::string warn_prefix(const std::filesystem::path& file) {
  return "repmlp_rt: warning: GEMM plan cache '" + file.string() + "' ";
}

// The cached plan for `key`, or nothing (with a warning when the file exists but is unusable).
std::optional<Plan> read_cache(const std::filesystem::path& file, const json& key,
                               const std::vector<Site>& sites, c10::ScalarType dtype) {
  std::error_code ec;
  if (!std::filesystem::exists(file, ec)) return std::nullopt;
  std::string why;
  try {
    std::ifstream in(file, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    if (!in) throw std::runtime_error("cannot be read");
    const PlanCache cache = parse_plan_cache(text.str());
    if (cache.key != key.dump()) throw std::runtime_error("was written for another key");
    Plan plan;
    for (const auto& [group, entry] : cache.plan) {
      const bool rows_ok = !entry.rows.empty() && entry.rows.size() <= 8 &&
                           std::all_of(entry.rows.begin(), entry.rows.end(), [](int64_t r) {
                             return r >= 1 && r <= (int64_t{1} << 32);
                           });
      if (std::find(std::begin(kPlanPaths), std::end(kPlanPaths), entry.path) ==
              std::end(kPlanPaths) || !rows_ok)
        throw std::runtime_error("names an unknown path or row count");
      plan[group] = Choice{entry.path, entry.rows};
    }
    for (const Site& site : sites) {
      auto it = plan.find(site.group);
      if (it == plan.end()) throw std::runtime_error("lacks a GEMM of this graph");
      if (!path_available(it->second.path, dtype, site.form))
        throw std::runtime_error("puts a GEMM on a path that cannot run it");
    }
    return plan;
  } catch (const std::exception& e) {
    why = e.what();
  }
  std::cerr << warn_prefix(file) << "is unusable (" << utf8_text(why)
            << "); planning again" << std::endl;
  return std::nullopt;
}

// Written to a temporary file next to it, then renamed: readers see the old or the new file.
void write_cache(const std::filesystem::path& file, const json& key, const Plan& plan) {
  json entries = json::object();
  for (const auto& [group, choice] : plan)
    entries[group] = {{"path", choice.path}, {"rows", choice.rows}};
  const std::string text = json({{"key", key}, {"plan", entries}}).dump(1) + "\n";
  std::error_code ec;
  std::filesystem::create_directories(file.parent_path(), ec);
  const std::filesystem::path temp =
      file.string() + ".tmp" + std::to_string(::getpid()) + "-" +
      std::to_string(std::hash<std::thread::id>{}(std::this_thread::get_id()));
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) {
      std::filesystem::remove(temp, ec);
      std::cerr << warn_prefix(file) << "could not be written; the plan is used, not cached"
                << std::endl;
      return;
    }
  }
  std::filesystem::rename(temp, file, ec);
  if (ec) {
    std::filesystem::remove(temp, ec);
    std::cerr << warn_prefix(file) << "could not be written; the plan is used, not cached"
              << std::endl;
  }
}

std::string counts_text(const std::string& mode, const std::vector<Site>& sites, const Plan& plan,
                        size_t methods) {
  std::map<std::string, int64_t> count;
  std::set<const void*> seen;
  int64_t total = 0;
  for (const Site& site : sites) {
    if (!seen.insert(site.key).second) continue;
    auto it = plan.find(site.group);
    ++count[it == plan.end() ? "aten" : it->second.path];
    ++total;
  }
  std::string text = mode + ":";
  bool first = true;
  for (const char* path : kPlanPaths)
    if (count[path]) {
      text += std::string(first ? " " : ", ") + path + " " + std::to_string(count[path]);
      first = false;
    }
  return text + " of " + std::to_string(total) + " GEMMs (" + std::to_string(methods) +
         " methods)";
}

}  // namespace

GemmPlan apply_gemm_plan(torch::jit::Module& module, const GemmPlanRequest& request) {
  if (std::find(std::begin(kPaths), std::end(kPaths), request.mode) == std::end(kPaths) &&
      request.mode != "auto")
    throw InputError("gemm must be one of auto, aten, onednn, mkl-packed, got '" + request.mode +
                     "'");
  const c10::ScalarType dtype = request.compute_dtype;
  if (request.mode == "aten") return {"aten: as built"};
  if (request.mode != "auto" && !path_available(request.mode, dtype))
    return {request.mode + ": not for " + c10::toString(dtype) +
            " GEMMs in this build (MKL packs float32 only), left as built"};

  // Every method with GEMMs on constant weights: forward, forward_images, and any other.
  std::vector<std::pair<std::shared_ptr<Graph>, std::vector<Site>>> methods;
  std::vector<Site> all;
  std::shared_ptr<Graph> forward;
  std::vector<Site> forward_sites;
  for (const auto& method : module.get_methods()) {
    auto* function = dynamic_cast<torch::jit::GraphFunction*>(&method.function());
    if (!function) continue;
    std::shared_ptr<Graph> graph = function->graph();
    std::vector<Site> sites;
    find_sites(graph->block(), dtype, sites);
    if (sites.empty()) continue;
    if (method.name() == "forward") forward = graph, forward_sites = sites;
    all.insert(all.end(), sites.begin(), sites.end());
    methods.emplace_back(graph, std::move(sites));
  }
  if (all.empty() || !forward) return {request.mode + ": no GEMMs to plan"};

  std::vector<int64_t> batches{1, 8};
  for (int64_t b : request.batch_sizes)
    if (std::find(batches.begin(), batches.end(), b) == batches.end()) batches.push_back(b);
  std::sort(batches.begin(), batches.end());

  Plan plan;
  std::string source;
  const json key = cache_key(request, batches, all);
  if (request.mode == "auto") {
    integrity::Sha256 hash;
    const std::string key_text = key.dump();
    hash.update(key_text.data(), key_text.size());
    const std::filesystem::path file = cache_folder() / ("gemm-plan-" + hash.hex_digest().substr(0, 24) + ".json");
    if (auto cached = read_cache(file, key, all, dtype)) {
      plan = *cached;
      source = "from cache " + file.string();
    } else {
      Clock clock;
      plan = measure_plan(all, observe_rows(module, forward, forward_sites, dtype, batches), dtype,
                          file.string());
      write_cache(file, key, plan);
      char text[64];
      std::snprintf(text, sizeof text, "measured in %.1f s, ", clock.seconds());
      source = text + ("cached in " + file.string());
    }
  } else {
    // A pinned path: every GEMM that it can run on it (batched fc3 has no packed form and
    // stays as built), packed for the row count it sees most often.
    std::map<std::string, Form> groups;
    for (const Site& site : all) groups[site.group] = site.form;
    std::map<std::string, std::vector<int64_t>> rows;
    if (request.mode == "mkl-packed")
      for (const auto& [group, by_batch] :
           observe_rows(module, forward, forward_sites, dtype, batches))
        rows[group] = pack_rows_of(by_batch);
    for (const auto& [group, form] : groups)
      plan[group] = path_available(request.mode, dtype, form)
                        ? Choice{request.mode, rows.count(group) ? rows[group] : std::vector<int64_t>{1}}
                        : Choice{};
    source = "pinned";
  }

  PackCache packs;
  for (auto& [graph, sites] : methods) {
    // A site may read a value that an earlier rewrite replaced: the FFN's second GEMM reads the
    // GELU that the first one's oneDNN call took in. It must read the replacement, or the old
    // GEMM and GELU stay alive and run in place of the fused call.
    std::map<Value*, Value*> replaced;
    for (Site site : sites) {
      if (auto moved = replaced.find(site.input); moved != replaced.end())
        site.input = moved->second;
      auto it = plan.find(site.group);
      if (it == plan.end() || it->second.path == "aten") continue;
      if (Replacement done = rewrite_site(*graph, site, it->second, packs))
        replaced[done->first] = done->second;
      else
        it->second = Choice{};  // every site of a group shares its weight's packability
    }
    torch::jit::EliminateDeadCode(graph);
  }
  return {counts_text(request.mode, all, plan, methods.size()) + "; " + source};
}

}  // namespace repmlp_rt::detail
