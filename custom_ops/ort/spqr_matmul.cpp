// ONNX Runtime adapter for qcompile.SpQRMatMul: CPU and CUDA kernels for float32 and float16 activations
// (four OrtCustomOp objects sharing one schema). Attributes are validated when the session is created;
// shapes and element types on every call. The outlier table and the permutation (every index a kernel
// reads) are validated once when they are constant initializers (at session creation on CPU, on the first
// run on CUDA), otherwise on every call. Constant codes on CPU are also copied once, at session creation,
// into the kernel's batch-1 lane layout (spqr::PreparedCodes). All failures come back to Python as ORT errors.
#include <mutex>
#include <string>
#include <vector>

#include "ort/ort_op.h"
#include "qcompile/spqr_matmul.h"

namespace qcompile {
namespace ort {
namespace {

enum Input : size_t {
  kX = 0,
  kCodes = 1,
  kStatCodes = 2,
  kStatParams = 3,
  kRowOffsets = 4,
  kColIndices = 5,
  kValues = 6,
  kPerm = 7,
  kBias = 8,
  kNumInputs = 9
};

Status type_is(const Ort::ConstValue& v, const char* name, ONNXTensorElementDataType want, const char* want_name) {
  if (elem_type_of(v) == want) return Status::OK();
  return Status::Error(std::string("SpQRMatMul: ") + name + " must be " + want_name);
}

Status index_type(const Ort::ConstValue& v, const char* name) {
  const auto t = elem_type_of(v);
  if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16 || t == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) return Status::OK();
  return Status::Error(std::string("SpQRMatMul: ") + name + " must be int16 or int32");
}

struct SpqrKernel : KernelBase<SpqrKernel> {
  static constexpr const char* kOpName = "SpQRMatMul";
  static constexpr size_t kNumInputs = Input::kNumInputs;
  static ONNXTensorElementDataType input_type(size_t i, ONNXTensorElementDataType t) {
    switch (i) {
      case kCodes:
      case kStatCodes:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      case kStatParams:
      case kValues:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      case kRowOffsets:
      case kColIndices:
      case kPerm:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // index tensors: int16 or int32, checked in Compute
      default:
        return t;  // X and bias
    }
  }
  static bool input_optional(size_t i) { return i >= kPerm; }
  spqr::Attrs attrs;
  bool on_cuda = false;
  bool indices_constant = false;  // row_offsets, col_indices (and perm if present) are initializers
  std::mutex mu;
  bool validated = false;  // the index tensors below passed validate_indices
  const void *v_ro = nullptr, *v_ci = nullptr, *v_perm = nullptr;
  int64_t v_nnz = -1;

  static bool is_constant_input(const OrtKernelInfo* info, size_t i, Ort::ConstValue* value) {
    try {
      Ort::ConstKernelInfo ki(info);
      if (i >= ki.GetInputCount()) return false;
      int is_const = 0;
      Ort::ConstValue v = ki.GetTensorConstantInput(i, &is_const);
      if (!is_const || !v) return false;
      *value = v;
      return true;
    } catch (const Ort::Exception&) {
      return false;
    }
  }

  static OrtStatus* Create(const OrtKernelInfo* info, bool cuda, SpqrKernel** out) {
    spqr::Attrs a;
    int64_t K = 0, N = 0, bits = 0, gs = 0, sb = 0, sg = 0, level = 0;
    Status st = attr_int(info, kOpName, "K", &K);
    if (st.ok()) st = attr_int(info, kOpName, "N", &N);
    if (st.ok()) st = attr_int(info, kOpName, "bits", &bits);
    if (st.ok()) st = attr_int_or(info, kOpName, "group_size", 16, &gs);
    if (st.ok()) st = attr_int_or(info, kOpName, "stat_bits", 3, &sb);
    if (st.ok()) st = attr_int_or(info, kOpName, "stat_group", 16, &sg);
    if (st.ok()) st = attr_int_or(info, kOpName, "accuracy_level", 0, &level);
    if (st.ok()) st = validate_accuracy_level(kOpName, level);
    if (!st.ok()) return to_ort(st);
    // A row block or group wider than the tensor is one block / one group: the same layout as the tensor's own
    // size, so any positive value the contract allows maps to one the kernels' int fields hold.
    if (N > 0 && sg > N) sg = N;
    if (K > 0 && gs > K && gs % 16 == 0) gs = (K + 15) / 16 * 16;
    const auto small = [](int64_t v) { return v >= -(int64_t{1} << 30) && v <= (int64_t{1} << 30); };
    if (!small(bits) || !small(gs) || !small(sb) || !small(sg))
      return make_error("SpQRMatMul: bits/group_size/stat_bits/stat_group out of range");
    a.K = K, a.N = N, a.bits = (int)bits, a.group_size = (int)gs, a.stat_bits = (int)sb, a.stat_group = (int)sg;
    a.accuracy_level = (int)level;
    if (Status s2 = spqr::validate_attrs(a); !s2.ok()) return to_ort(s2);

    auto* k = new SpqrKernel();
    k->attrs = a;
    k->on_cuda = cuda;
    Ort::ConstValue ro{nullptr}, ci{nullptr}, va{nullptr}, pe{nullptr};
    const bool has_perm_input = [&] {
      try {
        Ort::ConstKernelInfo ki(info);
        return ki.GetInputCount() > kPerm && !ki.GetInputName(kPerm).empty();
      } catch (const Ort::Exception&) {
        return false;
      }
    }();
    k->indices_constant = is_constant_input(info, kRowOffsets, &ro) && is_constant_input(info, kColIndices, &ci) &&
                          is_constant_input(info, kValues, &va) &&
                          (!has_perm_input || is_constant_input(info, kPerm, &pe));
    if (k->indices_constant && !cuda) {  // host data available now: a malformed file fails session creation
      OrtStatus* e = k->check_indices_host(ro, ci, va, has_perm_input ? pe : Ort::ConstValue{nullptr});
      if (e) {
        delete k;
        return e;
      }
    }
    Ort::ConstValue cv{nullptr}, scv{nullptr};
    if (!cuda && is_constant_input(info, kCodes, &cv) && is_constant_input(info, kStatCodes, &scv) &&
        elem_type_of(cv) == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 &&
        shape_of(cv) == std::vector<int64_t>{a.N, a.code_words()} &&
        elem_type_of(scv) == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 &&
        shape_of(scv) == std::vector<int64_t>{a.N, 2 * a.stat_words()}) {  // else Compute reports the shape
      if (Status s2 = spqr::prepare_constant_codes(a, static_cast<const uint32_t*>(cv.GetTensorRawData()),
                                                   static_cast<const uint32_t*>(scv.GetTensorRawData()),
                                                   &k->prepared);
          !s2.ok()) {
        delete k;
        return to_ort(s2);
      }
    }
    *out = k;
    return nullptr;
  }
  spqr::PreparedCodes prepared;  // CPU, constant codes: the batch-1 lane layout (see the header)

  // Shapes/types of the index tensors plus validate_indices on host data; records them as validated.
  OrtStatus* check_indices_host(const Ort::ConstValue& ro, const Ort::ConstValue& ci, const Ort::ConstValue& va,
                                const Ort::ConstValue& pe) {
    if (Status st = index_types(ro, ci, va, pe); !st.ok()) return to_ort(st);
    const std::vector<int64_t> ros = shape_of(ro), cis = shape_of(ci), vas = shape_of(va);
    if (ros != std::vector<int64_t>{attrs.N + 1})
      return make_error("SpQRMatMul: row_offsets shape must be [N+1] = [" + std::to_string(attrs.N + 1) + "]");
    if (cis.size() != 1 || vas != cis) return make_error("SpQRMatMul: col_indices and values must be 1-D of equal length");
    if (pe && shape_of(pe) != std::vector<int64_t>{attrs.K})
      return make_error("SpQRMatMul: perm shape must be [K] = [" + std::to_string(attrs.K) + "]");
    spqr::Weights w = index_weights(ro, ci, pe, cis[0]);
    if (Status st = spqr::validate_indices(attrs, w); !st.ok()) return to_ort(st);
    remember(w);
    return nullptr;
  }

  static Status index_types(const Ort::ConstValue& ro, const Ort::ConstValue& ci, const Ort::ConstValue& va,
                            const Ort::ConstValue& pe) {
    QCOMPILE_RETURN_IF_ERROR(index_type(ro, "row_offsets"));
    QCOMPILE_RETURN_IF_ERROR(index_type(ci, "col_indices"));
    QCOMPILE_RETURN_IF_ERROR(type_is(va, "values", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, "float16"));
    if (pe) QCOMPILE_RETURN_IF_ERROR(index_type(pe, "perm"));
    return Status::OK();
  }

  static spqr::Weights index_weights(const Ort::ConstValue& ro, const Ort::ConstValue& ci, const Ort::ConstValue& pe,
                                     int64_t nnz) {
    spqr::Weights w;
    w.row_offsets = ro.GetTensorRawData();
    w.offsets_int16 = elem_type_of(ro) == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16;
    w.col_indices = ci.GetTensorRawData();
    w.col_int16 = elem_type_of(ci) == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16;
    w.nnz = nnz;
    w.perm = pe ? pe.GetTensorRawData() : nullptr;
    w.perm_int16 = pe && elem_type_of(pe) == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16;
    return w;
  }

  void remember(const spqr::Weights& w) {
    std::lock_guard<std::mutex> lock(mu);
    validated = true;
    v_ro = w.row_offsets, v_ci = w.col_indices, v_perm = w.perm, v_nnz = w.nnz;
  }

  bool already_validated(const spqr::Weights& w) {
    std::lock_guard<std::mutex> lock(mu);
    return validated && v_ro == w.row_offsets && v_ci == w.col_indices && v_perm == w.perm && v_nnz == w.nnz;
  }

  OrtStatus* Compute(Ort::KernelContext& ctx) {
    Ort::ConstValue x = ctx.GetInput(kX);
    Ort::ConstValue codes = ctx.GetInput(kCodes), sc = ctx.GetInput(kStatCodes), sp = ctx.GetInput(kStatParams);
    Ort::ConstValue ro = ctx.GetInput(kRowOffsets), ci = ctx.GetInput(kColIndices), va = ctx.GetInput(kValues);
    Ort::ConstValue pe = optional_input(ctx, kPerm);
    Ort::ConstValue bias = optional_input(ctx, kBias);
    if (!x || !codes || !sc || !sp || !ro || !ci || !va)
      return make_error("SpQRMatMul: inputs X, codes, stat_codes, stat_params, row_offsets, col_indices and values "
                        "are required");
    if (Status st = index_types(ro, ci, va, pe); !st.ok()) return to_ort(st);
    if (Status st = type_is(codes, "codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, "int32"); !st.ok()) return to_ort(st);
    if (Status st = type_is(sc, "stat_codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, "int32"); !st.ok()) return to_ort(st);
    if (Status st = type_is(sp, "stat_params", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, "float16"); !st.ok())
      return to_ort(st);
    const auto xt = elem_type_of(x);
    if (bias && elem_type_of(bias) != xt) return make_error("SpQRMatMul: bias must have the same type as X");

    const std::vector<int64_t> xs = shape_of(x), cs = shape_of(codes), scs = shape_of(sc), sps = shape_of(sp),
                               ros = shape_of(ro), cis = shape_of(ci), vas = shape_of(va);
    std::vector<int64_t> ps, bs;
    if (pe) ps = shape_of(pe);
    if (bias) bs = shape_of(bias);
    spqr::Problem p;
    p.attrs = attrs;
    if (Status st = spqr::validate_shapes(attrs, xs, cs, scs, sps, ros, cis, vas, pe ? &ps : nullptr,
                                          bias ? &bs : nullptr, &p.M);
        !st.ok())
      return to_ort(st);
    p.dtype = xt == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? DType::kFloat16 : DType::kFloat32;
    p.w = index_weights(ro, ci, pe, cis[0]);
    p.w.codes = static_cast<const uint32_t*>(codes.GetTensorRawData());
    p.w.stat_codes = static_cast<const uint32_t*>(sc.GetTensorRawData());
    p.w.stat_params = static_cast<const uint16_t*>(sp.GetTensorRawData());
    p.w.values = static_cast<const uint16_t*>(va.GetTensorRawData());

    if (!already_validated(p.w)) {
      Status st;
      if (on_cuda) {
#if QCOMPILE_WITH_CUDA
        st = spqr::validate_indices_cuda(attrs, p.w, ctx.GetGPUComputeStream());
#else
        return make_error("SpQRMatMul: library built without CUDA", ORT_FAIL);
#endif
      } else {
        st = spqr::validate_indices(attrs, p.w);
      }
      if (!st.ok()) return to_ort(st);
      if (indices_constant) remember(p.w);
    }

    std::vector<int64_t> ys(xs);
    ys.back() = attrs.N;
    Ort::UnownedValue y = ctx.GetOutput(0, ys);
    if (p.M == 0) return nullptr;
    p.x = x.GetTensorRawData();
    p.bias = bias ? bias.GetTensorRawData() : nullptr;
    p.y = y.GetTensorMutableRawData();
    if (on_cuda) {
#if QCOMPILE_WITH_CUDA
      return to_ort(spqr::matmul_cuda(p, ctx.GetGPUComputeStream()), ORT_FAIL);
#else
      return make_error("SpQRMatMul: library built without CUDA", ORT_FAIL);
#endif
    }
    if (prepared.source) p.prepared = &prepared;
    return to_ort(spqr::matmul_cpu(p, OrtParallel(ctx)), ORT_FAIL);
  }
};

}  // namespace

QCOMPILE_REGISTER_ORT_OPS(add_typed_ops<SpqrKernel>);

}  // namespace ort
}  // namespace qcompile
