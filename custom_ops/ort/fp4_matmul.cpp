// ONNX Runtime adapter for qcompile.FP4MatMul: CPU and CUDA kernels for float32 and float16 activations
// (four OrtCustomOp objects sharing one schema). Attributes are validated when the session is created,
// shapes on every call; both come back to Python as ORT errors.
#include <vector>

#include "ort/ort_op.h"
#include "qcompile/fp4_matmul.h"

namespace qcompile {
namespace ort {
namespace {

constexpr const char* kOpName = "FP4MatMul";
enum Input : size_t { kX = 0, kW = 1, kScales = 2, kTensorScale = 3, kBias = 4, kNumInputs = 5 };

struct Fp4Kernel : KernelBase<Fp4Kernel> {
  static constexpr const char* kOpName = "FP4MatMul";
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

template <ONNXTensorElementDataType T, bool kCuda>
struct Fp4Op : OpBase<Fp4Op<T, kCuda>, Fp4Kernel> {
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return kCuda ? kCudaEP : kCpuEP; }
  bool on_cuda() const { return kCuda; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case kW:
      case kScales:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case kTensorScale:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      default:
        return T;  // X and bias
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= kTensorScale ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  // The CUDA kernel reads tensor_scale on the host to fold it into its scale table.
  OrtMemType GetInputMemoryType(size_t i) const {
    return (kCuda && i == kTensorScale) ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return T; }
};

void AddFp4Ops(std::vector<const OrtCustomOp*>& ops) {
  static Fp4Op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false> cpu_f32;
  static Fp4Op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, false> cpu_f16;
  ops.push_back(&cpu_f32);
  ops.push_back(&cpu_f16);
#if QCOMPILE_WITH_CUDA
  static Fp4Op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true> cuda_f32;
  static Fp4Op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, true> cuda_f16;
  ops.push_back(&cuda_f32);
  ops.push_back(&cuda_f16);
#endif
}

}  // namespace

QCOMPILE_REGISTER_ORT_OPS(AddFp4Ops);

}  // namespace ort
}  // namespace qcompile
