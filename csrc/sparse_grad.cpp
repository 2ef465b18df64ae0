// Device-generic implementation of the sparse-update backward (see sparse_grad.h).
//
// Maths. With the tokens flattened, X: [T, d_in], dY: [T, d_out], the weight gradient is dW = dYᵀ X and the bias
// gradient db = Σ_t dY[t]. For a run of active rows [r0, r1): dW[r0:r1] = dY[:, r0:r1]ᵀ X, db[r0:r1] =
// Σ_t dY[t, r0:r1]; for a run of active columns [c0, c1): dW[:, c0:c1] = dYᵀ X[:, c0:c1]. Every operand is a
// strided view of dY, X or dW: no gather, no scatter. Runs of equal length whose starts form an arithmetic
// progression (interleaved heads; head h of a fused QKV weight, rows h·hd + p·H·hd) become one batched GEMM on
// as_strided views; the shared operand is expanded with batch stride 0.
//
// CPU, several runs: one GEMM over a gathered operand instead. CPU BLAS packs both operands of every GEMM (and ATen
// turns a bmm on CPU into one mm per batch entry), so R runs repack the shared operand (X for row blocks) R times;
// copying the active rows/columns into one workspace (one copy per run) and issuing one GEMM costs T·A + A·K
// element copies instead of ·T·K. `prefer_gather` compares the two and gathers only runs shorter than 128 on
// average (longer runs make efficient GEMMs on their own); CUDA keeps the strided GEMMs (cuBLAS reads strided
// operands in place, and each copy would be a launch).
//
// Input gradient of partial backpropagation (sparse_input_grad): dX = dY (M ⊙ W), M the 0/1 mask of the active
// blocks. Row blocks: dX = Σ over active row runs [r0, r1) of dY[:, r0:r1] W[r0:r1, :] (a sum of GEMMs into the
// same output: the first writes, the others accumulate with beta = 1). Column blocks: dX[:, c0:c1] = dY W[:, c0:c1]
// for active column runs (disjoint outputs: one (batched) GEMM per group, as for dW), frozen columns zero.
#include "sparse_grad.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <string>
#include <unordered_map>

#include "checks.h"

namespace mat_kernels {
namespace {

bool blas_compatible(const at::Tensor& t) {
  // What BLAS (and ATen's mm/bmm without an internal copy) accepts: row-major or column-major with a leading
  // dimension at least the row length. Sizes of 0/1 make any stride acceptable to ATen, but we keep it simple.
  const int64_t r = t.size(0), c = t.size(1);
  const int64_t s0 = t.stride(0), s1 = t.stride(1);
  return (s1 == 1 && s0 >= std::max<int64_t>(1, c)) || (s0 == 1 && s1 >= std::max<int64_t>(1, r));
}

// [B, T, F] -> [B*T, F] (a view when the strides allow it, otherwise a copy), then one copy if the matrix is not
// BLAS-compatible (e.g. the stride-0 dY of `loss.sum().backward()`): copying once here is cheaper than letting
// every per-run GEMM copy its own slice.
at::Tensor as_blas_matrix(const at::Tensor& t) {
  at::Tensor m = t.dim() == 3 ? t.reshape({-1, t.size(2)}) : t;
  if (m.numel() > 0 && !blas_compatible(m)) {
    m = m.contiguous();
  }
  return m;
}

// The slice of a 2-D (or 1-D) tensor selected by one run group along `axis`, every other dimension full:
// count == 1 -> a narrow; count > 1 -> a [count, ...] view with batch stride `stride * t.stride(axis)`.
at::Tensor group_view(const at::Tensor& t, const RunGroup& g, int64_t axis) {
  if (g.count == 1) {
    return t.narrow(axis, g.start, g.len);
  }
  std::vector<int64_t> sizes{g.count};
  std::vector<int64_t> strides{g.stride * t.stride(axis)};
  for (int64_t d = 0; d < t.dim(); ++d) {
    sizes.push_back(d == axis ? g.len : t.size(d));
    strides.push_back(t.stride(d));
  }
  return t.as_strided(sizes, strides, t.storage_offset() + g.start * t.stride(axis));
}

// Partition sorted starts of equal-length runs into arithmetic progressions, fewest groups first.
// Greedy over consecutive starts finds the common cases (interleaved heads, one head pattern repeated in Q, K
// and V); chains of a fixed stride find the rest (e.g. two head runs of equal length per projection of a fused
// QKV weight: stride = the projection width). Chain search is O(n² log n), so it is capped at 64 starts.
void group_equal_length(const std::vector<int64_t>& s, int64_t len, std::vector<RunGroup>& out) {
  const size_t n = s.size();
  std::vector<RunGroup> best;
  for (size_t i = 0; i < n;) {
    size_t j = i + 1;
    if (j < n) {
      const int64_t d = s[j] - s[i];
      while (j + 1 < n && s[j + 1] - s[j] == d) ++j;
      best.push_back({s[i], d, len, static_cast<int64_t>(j - i + 1)});
      i = j + 1;
    } else {
      best.push_back({s[i], len, len, 1});
      i = j;
    }
  }
  if (best.size() > 1 && n <= 64) {
    std::vector<int64_t> candidates;
    for (size_t j = 1; j < n; ++j) {
      candidates.push_back(s[j] - s[0]);
      candidates.push_back(s[j] - s[j - 1]);
    }
    std::sort(candidates.begin(), candidates.end());
    candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
    std::vector<char> used(n);
    for (int64_t d : candidates) {
      std::fill(used.begin(), used.end(), 0);
      std::vector<RunGroup> groups;
      for (size_t i = 0; i < n && groups.size() < best.size(); ++i) {
        if (used[i]) continue;
        used[i] = 1;
        int64_t count = 1;
        size_t cur = i;
        while (true) {
          auto it = std::lower_bound(s.begin() + cur + 1, s.end(), s[cur] + d);
          if (it == s.end() || *it != s[cur] + d) break;
          cur = static_cast<size_t>(it - s.begin());
          used[cur] = 1;
          ++count;
        }
        groups.push_back({s[i], count > 1 ? d : len, len, count});
      }
      if (groups.size() < best.size() && std::all_of(used.begin(), used.end(), [](char u) { return u; })) {
        best = std::move(groups);
      }
    }
  }
  out.insert(out.end(), best.begin(), best.end());
}

std::vector<RunGroup> group_runs(const std::vector<std::pair<int64_t, int64_t>>& runs) {
  std::map<int64_t, std::vector<int64_t>> by_len;  // ordered: deterministic plans
  for (const auto& r : runs) by_len[r.second].push_back(r.first);
  std::vector<RunGroup> out;
  for (const auto& kv : by_len) group_equal_length(kv.second, kv.first, out);
  return out;
}

// Whether one GEMM over gathered operands beats one GEMM per run: CPU only (see the header), and only when the copies
// (`width` active rows/columns of the `gathered_rows`-long operand, and the result of `other` columns) cost less
// than repacking the `shared_elems`-element shared operand once per extra run.
// MAT_KERNELS_GEMM_PLAN=strided|gather forces one plan on any device (tests of both on CPU; docs/sparse_update.md);
// unset, empty or "auto" lets the cost model choose; anything else is an error.
bool prefer_gather(const at::Tensor& t, const RunPlan& plan, int64_t gathered_rows, int64_t other,
                   int64_t shared_elems) {
  const int64_t R = static_cast<int64_t>(plan.active_runs.size());
  if (R <= 1) return false;  // one run is a view: nothing to gather
  const char* forced = std::getenv("MAT_KERNELS_GEMM_PLAN");
  if (forced != nullptr && forced[0] != '\0' && std::strcmp(forced, "auto") != 0) {
    if (std::strcmp(forced, "strided") == 0) return false;
    if (std::strcmp(forced, "gather") == 0) return true;
    TORCH_CHECK_VALUE(false, "MAT_KERNELS_GEMM_PLAN must be auto, strided or gather (or unset), got '", forced, "'");
  }
  // Runs of >= kMinStridedRun rows/columns keep their own GEMMs: timed side by side on CPU (benchmarks/NOTES.md §10,
  // BERT-base layers at 4,096 tokens), the gather saves 5-18 % with runs of 64 but is even or up to 15 % slower
  // with runs of 192-768 (per-run GEMMs of that size are efficient, and the gather is an extra pass over dY).
  constexpr int64_t kMinStridedRun = 128;
  return t.device().is_cpu() && plan.active_width < kMinStridedRun * R &&
         plan.active_width * (gathered_rows + other) < (R - 1) * shared_elems;
}

// The active columns of a 2-D tensor (along dim 1) or rows (dim 0), in run order, as one contiguous tensor.
at::Tensor gather_runs(const at::Tensor& t, const RunPlan& plan, int64_t dim) {
  std::vector<int64_t> shape{t.size(0), t.size(1)};
  shape[dim] = plan.active_width;
  at::Tensor out = at::empty(shape, t.options());
  int64_t off = 0;
  for (const auto& r : plan.active_runs) {
    out.narrow(dim, off, r.second).copy_(t.narrow(dim, r.first, r.second));
    off += r.second;
  }
  return out;
}

// Scatter (or add) a gathered result back into the runs of `dst` along `dim`.
void scatter_runs(const at::Tensor& dst, const at::Tensor& src, const RunPlan& plan, int64_t dim, bool accumulate) {
  int64_t off = 0;
  for (const auto& r : plan.active_runs) {
    at::Tensor o = dst.narrow(dim, r.first, r.second);
    const at::Tensor v = src.narrow(dim, off, r.second);
    accumulate ? (void)o.add_(v) : (void)o.copy_(v);
    off += r.second;
  }
}

void check_matrices(const at::Tensor& dy, const at::Tensor& x, const char* op) {
  check_defined(dy, op, "dy");
  check_defined(x, op, "x");
  check_dims_2_or_3(dy, op, "dy");
  check_dims_2_or_3(x, op, "x");
  check_tokens_match(dy, x, op);
  check_float_dtype(dy, op, "dy");
  check_same_dtype(dy, "dy", x, "x", op);
  check_same_device(dy, "dy", x, "x", op);
}

void check_axis(int64_t axis, const char* op) {
  TORCH_CHECK_VALUE(axis == 0 || axis == 1, op, ": axis must be 0 (row blocks: output features) or 1 (column blocks: "
              "input features), got ", axis);
}

void check_out(const at::Tensor& out, const char* name, const at::Tensor& dy, at::IntArrayRef shape,
               const char* op) {
  check_defined(out, op, name);
  check_same_dtype(out, name, dy, "dy", op);
  check_same_device(out, name, dy, "dy", op);
  TORCH_CHECK_VALUE(out.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", out.sizes());
  check_no_internal_overlap(out, op, name);
}

void weight_gemms(const at::Tensor& dw, const at::Tensor& dy2, const at::Tensor& x2, const RunPlan& plan,
                  int64_t axis, bool accumulate) {
  const int64_t T = dy2.size(0);
  if (axis == 0 && prefer_gather(dy2, plan, T, x2.size(1), T * x2.size(1))) {
    // dW[runs] = (dY[:, runs])ᵀ X: dY's active columns gathered, one GEMM, rows scattered
    scatter_runs(dw, at::mm(gather_runs(dy2, plan, 1).t(), x2), plan, 0, accumulate);
    return;
  }
  if (axis == 1 && prefer_gather(dy2, plan, T, dy2.size(1), T * dy2.size(1))) {
    // dW[:, runs] = dYᵀ X[:, runs]: X's active columns gathered, one GEMM, columns scattered
    scatter_runs(dw, at::mm(dy2.t(), gather_runs(x2, plan, 1)), plan, 1, accumulate);
    return;
  }
  for (const auto& g : plan.active) {
    at::Tensor o = group_view(dw, g, axis);
    at::Tensor a, b;
    if (axis == 0) {  // dW[rows] = dY[:, rows]ᵀ X
      a = group_view(dy2, g, 1).transpose(-1, -2);
      b = g.count == 1 ? x2 : x2.unsqueeze(0).expand({g.count, x2.size(0), x2.size(1)});
    } else {  // dW[:, cols] = dYᵀ X[:, cols]
      const at::Tensor dyt = dy2.t();
      a = g.count == 1 ? dyt : dyt.unsqueeze(0).expand({g.count, dyt.size(0), dyt.size(1)});
      b = group_view(x2, g, 1);
    }
    if (g.count == 1) {
      accumulate ? (void)o.addmm_(a, b) : (void)at::mm_out(o, a, b);
    } else {
      accumulate ? (void)o.baddbmm_(a, b) : (void)at::bmm_out(o, a, b);
    }
  }
}

void bias_sums(const at::Tensor& db, const at::Tensor& dy2, const std::vector<RunGroup>& groups, bool accumulate) {
  for (const auto& g : groups) {
    at::Tensor o = group_view(db, g, 0);
    const at::Tensor a = group_view(dy2, g, 1);  // [T, len] or [count, T, len]
    if (accumulate) {
      o.add_(a.sum(-2));
    } else {
      at::sum_out(o, a, {-2});
    }
  }
}

void zero_groups(const at::Tensor& t, const std::vector<RunGroup>& groups, int64_t axis) {
  for (const auto& g : groups) group_view(t, g, axis).zero_();
}

// dX = Σ_runs dY[:, run] W[run, :] over the active row runs. Runs of a group of count > 1 get one GEMM each rather
// than one batched GEMM: the batch outputs would all be [T, d_in] partial products of the same dX, so a bmm would
// need a [count, T, d_in] reduction buffer plus a sum over it (count x the memory of dX, and a second pass), while
// the per-run GEMMs accumulate straight into dX (beta = 1) and do the same multiply-adds.
void input_row_gemms(const at::Tensor& dx2, const at::Tensor& dy2, const at::Tensor& w2, const RunPlan& plan) {
  at::Tensor o = dx2;  // a handle on the same storage: the out= overloads take a non-const reference
  const int64_t T = dy2.size(0), K = w2.size(1);
  // per extra run: one more pass over dX (read and write) and one more packing of a T x len slice
  if (prefer_gather(dy2, plan, T, K, 2 * T * K)) {
    // dX = dY[:, runs] W[runs, :]: both operands gathered (dY's columns, W's rows), one GEMM with K = active width
    at::mm_out(o, gather_runs(dy2, plan, 1), gather_runs(w2, plan, 0));
    return;
  }
  bool first = true;
  for (const auto& g : plan.active) {
    for (int64_t i = 0; i < g.count; ++i) {
      const RunGroup run{g.start + i * g.stride, g.len, g.len, 1};
      const at::Tensor a = group_view(dy2, run, 1);  // dY[:, run]: [T, len]
      const at::Tensor b = group_view(w2, run, 0);   // W[run, :]: [len, d_in]
      if (first) {
        at::mm_out(o, a, b);
        first = false;
      } else {
        o.addmm_(a, b);
      }
    }
  }
}

// dX[:, cols] = dY W[:, cols] over the active column runs: disjoint outputs, so one GEMM per group (a batched GEMM
// on as_strided views of dX and W for count > 1, dY expanded with batch stride 0), as in weight_gemms.
void input_col_gemms(const at::Tensor& dx2, const at::Tensor& dy2, const at::Tensor& w2, const RunPlan& plan) {
  const int64_t T = dy2.size(0), N = dy2.size(1);
  if (prefer_gather(dy2, plan, w2.size(0), T, T * N)) {
    // dX[:, runs] = dY W[:, runs]: W's active columns gathered, one GEMM, columns scattered
    scatter_runs(dx2, at::mm(dy2, gather_runs(w2, plan, 1)), plan, 1, /*accumulate=*/false);
    return;
  }
  for (const auto& g : plan.active) {
    at::Tensor o = group_view(dx2, g, 1);  // [T, len] or [count, T, len]
    const at::Tensor a = g.count == 1 ? dy2 : dy2.unsqueeze(0).expand({g.count, dy2.size(0), dy2.size(1)});
    const at::Tensor b = group_view(w2, g, 1);  // [d_out, len] or [count, d_out, len]
    g.count == 1 ? (void)at::mm_out(o, a, b) : (void)at::bmm_out(o, a, b);
  }
}

RunPlan compute_plan(const at::Tensor& active, at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners,
                     int64_t dim, const char* op, const char* dim_name) {
  const size_t S = starts.size();
  TORCH_CHECK_VALUE(sizes.size() == S && owners.size() == S, op,
              ": starts, sizes and owners must have the same length (one entry per block range), got ", S, ", ",
              sizes.size(), " and ", owners.size());
  const int64_t M = active.numel();
  int64_t max_owner = -1;
  for (size_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(sizes[s] > 0, op, ": sizes[", s, "] must be positive, got ", sizes[s]);
    TORCH_CHECK_VALUE(starts[s] >= 0 && starts[s] + sizes[s] <= dim, op, ": block range [", starts[s], ", ",
                starts[s] + sizes[s], ") (starts[", s, "], sizes[", s, "]) is out of bounds for ", dim_name, " = ",
                dim);
    TORCH_CHECK_VALUE(owners[s] >= 0, op, ": owners[", s, "] must be a module index >= 0, got ", owners[s]);
    max_owner = std::max(max_owner, owners[s]);
  }
  TORCH_CHECK_VALUE(M == max_owner + 1, op, ": active has ", M, " entries but the layout has ", max_owner + 1,
              " modules (owners go up to ", max_owner, "); give one entry per module");

  std::vector<size_t> order(S);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return starts[a] < starts[b]; });

  const at::Tensor& act = active;  // contiguous (plan_runs)
  auto is_active = [&](int64_t m) {
    return act.scalar_type() == at::kBool ? act.const_data_ptr<bool>()[m]
                                          : act.const_data_ptr<uint8_t>()[m] != 0;
  };

  std::vector<std::pair<int64_t, int64_t>> on, off;  // (start, len) maximal runs
  auto push = [](std::vector<std::pair<int64_t, int64_t>>& v, int64_t start, int64_t len) {
    if (len <= 0) return;
    if (!v.empty() && v.back().first + v.back().second == start) {
      v.back().second += len;
    } else {
      v.emplace_back(start, len);
    }
  };
  int64_t covered = 0;  // end of the previous range
  for (size_t k = 0; k < S; ++k) {
    const size_t s = order[k];
    TORCH_CHECK_VALUE(starts[s] >= covered, op, ": block ranges overlap at index ", starts[s],
                " (a parameter would belong to two blocks); ranges must be disjoint");
    push(off, covered, starts[s] - covered);  // indices in no block: never updated
    push(is_active(owners[s]) ? on : off, starts[s], sizes[s]);
    covered = starts[s] + sizes[s];
  }
  push(off, covered, dim - covered);
  int64_t width = 0;
  for (const auto& r : on) width += r.second;
  return RunPlan{group_runs(on), group_runs(off), on, width};
}

}  // namespace

const RunPlan& plan_runs(const at::Tensor& active, at::IntArrayRef starts, at::IntArrayRef sizes,
                         at::IntArrayRef owners, int64_t dim, const char* op, const char* dim_name) {
  check_active(active, op);
  // The key is everything the plan depends on: the blocked length, the layout lists and the mask's values (a few
  // hundred bytes for a BERT layer). A hit skips validation (the same key was valid), sorting and grouping.
  const at::Tensor act = active.contiguous();
  const int64_t M = act.numel();
  std::string key;
  key.reserve(sizeof(int64_t) * (3 + 3 * starts.size()) + M);
  auto put = [&key](int64_t v) { key.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  put(dim);
  put(static_cast<int64_t>(starts.size()));
  put(static_cast<int64_t>(sizes.size()));
  for (int64_t v : starts) put(v);
  for (int64_t v : sizes) put(v);
  for (int64_t v : owners) put(v);
  key.push_back('|');
  const uint8_t* bits = act.scalar_type() == at::kBool ? reinterpret_cast<const uint8_t*>(act.const_data_ptr<bool>())
                                                        : act.const_data_ptr<uint8_t>();
  for (int64_t m = 0; m < M; ++m) key.push_back(bits[m] != 0 ? '1' : '0');
  // Per thread (autograd runs backwards on its own threads), bounded: a training run sees a handful of masks per
  // layer; a sweep over thousands of masks just starts the cache over.
  thread_local std::unordered_map<std::string, RunPlan> cache;
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  RunPlan plan = compute_plan(act, starts, sizes, owners, dim, op, dim_name);  // throws before caching
  if (cache.size() >= 4096) cache.clear();
  return cache.emplace(std::move(key), std::move(plan)).first->second;
}

at::Tensor sparse_weight_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& active,
                              at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners, int64_t axis) {
  constexpr const char* op = "mat_kernels::sparse_weight_grad";
  check_matrices(dy, x, op);
  check_axis(axis, op);
  const int64_t N = dy.size(-1), K = x.size(-1);
  const RunPlan& plan = plan_runs(active, starts, sizes, owners, axis == 0 ? N : K, op,
                                 axis == 0 ? "d_out = dy.size(-1)" : "d_in = x.size(-1)");
  at::Tensor dw = at::empty({N, K}, dy.options());
  if (plan.active.empty()) {
    return dw.zero_();  // nothing active: no GEMM, no reshape, no copy
  }
  zero_groups(dw, plan.frozen, axis);
  weight_gemms(dw, as_blas_matrix(dy), as_blas_matrix(x), plan, axis, /*accumulate=*/false);
  return dw;
}

void sparse_weight_grad_accumulate(const at::Tensor& grad_weight, const at::Tensor& dy, const at::Tensor& x,
                                   const at::Tensor& active, at::IntArrayRef starts, at::IntArrayRef sizes,
                                   at::IntArrayRef owners, int64_t axis) {
  constexpr const char* op = "mat_kernels::sparse_weight_grad_accumulate";
  check_matrices(dy, x, op);
  check_axis(axis, op);
  const int64_t N = dy.size(-1), K = x.size(-1);
  check_out(grad_weight, "grad_weight", dy, {N, K}, op);
  const RunPlan& plan = plan_runs(active, starts, sizes, owners, axis == 0 ? N : K, op,
                                 axis == 0 ? "d_out = dy.size(-1)" : "d_in = x.size(-1)");
  if (plan.active.empty()) return;
  weight_gemms(grad_weight, as_blas_matrix(dy), as_blas_matrix(x), plan, axis, /*accumulate=*/true);
}

at::Tensor sparse_bias_grad(const at::Tensor& dy, const at::Tensor& active, at::IntArrayRef starts,
                            at::IntArrayRef sizes, at::IntArrayRef owners) {
  constexpr const char* op = "mat_kernels::sparse_bias_grad";
  check_defined(dy, op, "dy");
  check_dims_2_or_3(dy, op, "dy");
  check_float_dtype(dy, op, "dy");
  const int64_t N = dy.size(-1);
  const RunPlan& plan = plan_runs(active, starts, sizes, owners, N, op, "d_out = dy.size(-1)");
  at::Tensor db = at::empty({N}, dy.options());
  if (plan.active.empty()) return db.zero_();
  zero_groups(db, plan.frozen, 0);
  bias_sums(db, as_blas_matrix(dy), plan.active, /*accumulate=*/false);
  return db;
}

void sparse_bias_grad_accumulate(const at::Tensor& grad_bias, const at::Tensor& dy, const at::Tensor& active,
                                 at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners) {
  constexpr const char* op = "mat_kernels::sparse_bias_grad_accumulate";
  check_defined(dy, op, "dy");
  check_dims_2_or_3(dy, op, "dy");
  check_float_dtype(dy, op, "dy");
  const int64_t N = dy.size(-1);
  check_out(grad_bias, "grad_bias", dy, {N}, op);
  const RunPlan& plan = plan_runs(active, starts, sizes, owners, N, op, "d_out = dy.size(-1)");
  if (plan.active.empty()) return;
  bias_sums(grad_bias, as_blas_matrix(dy), plan.active, /*accumulate=*/true);
}

at::Tensor sparse_input_grad(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& active,
                             at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners, int64_t axis) {
  constexpr const char* op = "mat_kernels::sparse_input_grad";
  check_defined(dy, op, "dy");
  check_defined(weight, op, "weight");
  check_dims_2_or_3(dy, op, "dy");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [d_out, d_in], got shape ", weight.sizes());
  check_float_dtype(dy, op, "dy");
  check_same_dtype(dy, "dy", weight, "weight", op);
  check_same_device(dy, "dy", weight, "weight", op);
  TORCH_CHECK_VALUE(dy.size(-1) == weight.size(0), op, ": dy.size(-1) must equal d_out = weight.size(0), got dy ",
              dy.sizes(), " and weight ", weight.sizes());
  check_axis(axis, op);
  const int64_t N = weight.size(0), K = weight.size(1);
  const RunPlan& plan = plan_runs(active, starts, sizes, owners, axis == 0 ? N : K, op,
                                 axis == 0 ? "d_out = weight.size(0)" : "d_in = weight.size(1)");
  std::vector<int64_t> shape(dy.sizes().begin(), dy.sizes().end());
  shape.back() = K;
  at::Tensor dx = at::empty(shape, dy.options());
  if (plan.active.empty()) {
    return dx.zero_();  // nothing active: no gradient flows, no GEMM, no reshape, no copy
  }
  const int64_t tokens = dy.dim() == 3 ? dy.size(0) * dy.size(1) : dy.size(0);
  const at::Tensor dx2 = dx.view({tokens, K});  // dx is contiguous: always a view
  const at::Tensor dy2 = as_blas_matrix(dy), w2 = as_blas_matrix(weight);
  if (axis == 0) {
    input_row_gemms(dx2, dy2, w2, plan);
  } else {
    zero_groups(dx2, plan.frozen, 1);
    input_col_gemms(dx2, dy2, w2, plan);
  }
  return dx;
}

}  // namespace mat_kernels
