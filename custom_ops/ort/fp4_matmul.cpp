// ONNX Runtime adapter for qcompile.FP4MatMul: CPU and CUDA kernels for float32 and float16 activations
// (four OrtCustomOp objects sharing one schema). Attributes are validated when the session is created,
// shapes on every call; both come back to Python as ORT errors.
#include <vector>

#include "ort/ort_op.h"
#include "qcompile/fp4_matmul.h"

namespace qcompile {
namespace ort {
namespace {

enum Input : size_t { kX = 0, kW = 1, kScales = 2, kTensorScale = 3, kBias = 4, kNumInputs = 5 };

struct Fp4Kernel : KernelBase<Fp4Kernel> {
  static constexpr const char* kOpName = "FP4MatMul";
  static constexpr size_t kNumInputs = Input::kNumInputs;
  static ONNXTensorElementDataType input_type(size_t i, ONNXTensorElementDataType t) {
    if (i == kW || i == kScales) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (i == kTensorScale) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    return t;  // X and bias
  }
  static bool input_optional(size_t i) { return i >= kTensorScale; }
  // The CUDA kernel reads tensor_scale on the host to fold it into its scale table.
  static OrtMemType input_memory(size_t i, bool cuda) {
    return (cuda && i == kTensorScale) ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  fp4::Attrs attrs;
  bool on_cuda = false;

  static OrtStatus* Create(const OrtKernelInfo* info, bool cuda, Fp4Kernel** out) {
    fp4::Attrs a;
    std::string fmt;
    Status st = attr_int(info, kOpName, "K", &a.K);
    if (st.ok()) st = attr_int(info, kOpName, "N", &a.N);
    if (st.ok()) st = attr_int(info, kOpName, "group_size", &a.group_size);
    if (st.ok()) st = attr_string(info, kOpName, "scale_format", &fmt);
    if (st.ok()) st = fp4::parse_scale_format(fmt, &a.scale_format);
    if (st.ok()) st = attr_int_or(info, kOpName, "hadamard_block", 0, &a.hadamard_block);
    if (st.ok()) st = attr_int_or(info, kOpName, "accuracy_level", 0, &a.accuracy_level);
    if (st.ok()) st = fp4::validate_attrs(a);
    if (!st.ok()) return to_ort(st);
    auto* k = new Fp4Kernel();
    k->attrs = a;
    k->on_cuda = cuda;
    *out = k;
    return nullptr;
  }

  OrtStatus* Compute(Ort::KernelContext& ctx) {
    Ort::ConstValue x = ctx.GetInput(kX);
    Ort::ConstValue w = ctx.GetInput(kW);
    Ort::ConstValue sc = ctx.GetInput(kScales);
    Ort::ConstValue ts = optional_input(ctx, kTensorScale);
    Ort::ConstValue bias = optional_input(ctx, kBias);
    if (!x || !w || !sc) return make_error("FP4MatMul: inputs X, W and scales are required");

    const std::vector<int64_t> xs = shape_of(x), ws = shape_of(w), ss = shape_of(sc);
    std::vector<int64_t> tss, bs;
    if (ts) tss = shape_of(ts);
    if (bias) bs = shape_of(bias);
    fp4::Problem p;
    p.attrs = attrs;
    if (Status st = fp4::validate_shapes(attrs, xs, ws, ss, ts ? &tss : nullptr, bias ? &bs : nullptr, &p.M);
        !st.ok())
      return to_ort(st);
    const auto xt = elem_type_of(x);
    p.dtype = xt == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? DType::kFloat16 : DType::kFloat32;
    if (bias && elem_type_of(bias) != xt) return make_error("FP4MatMul: bias must have the same type as X");

    std::vector<int64_t> ys(xs);
    ys.back() = attrs.N;
    Ort::UnownedValue y = ctx.GetOutput(0, ys);
    if (p.M == 0) return nullptr;
    p.x = x.GetTensorRawData();
    p.w = static_cast<const uint8_t*>(w.GetTensorRawData());
    p.scales = static_cast<const uint8_t*>(sc.GetTensorRawData());
    p.tensor_scale = ts ? *static_cast<const float*>(ts.GetTensorRawData()) : 1.0f;  // host memory on CUDA too
    p.bias = bias ? bias.GetTensorRawData() : nullptr;
    p.y = y.GetTensorMutableRawData();
    if (on_cuda) {
#if QCOMPILE_WITH_CUDA
      return to_ort(fp4::matmul_cuda(p, ctx.GetGPUComputeStream()), ORT_FAIL);
#else
      return make_error("FP4MatMul: library built without CUDA", ORT_FAIL);
#endif
    }
    return to_ort(fp4::matmul_cpu(p, OrtParallel(ctx)), ORT_FAIL);
  }
};

}  // namespace

QCOMPILE_REGISTER_ORT_OPS(add_typed_ops<Fp4Kernel>);

}  // namespace ort
}  // namespace qcompile
