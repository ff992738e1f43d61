// Shared plumbing for the ONNX Runtime adapters in this folder: the op self-registration registry, the
// Status -> OrtStatus bridge, attribute/tensor helpers and a CustomOp base that never lets an exception
// cross into ONNX Runtime. Adapters are thin: read attributes, check shapes, call a kernel.
#pragma once

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include <onnxruntime_cxx_api.h>

#include "qcompile/parallel.h"
#include "qcompile/status.h"

namespace qcompile {
namespace ort {

inline constexpr const char* kDomain = "qcompile";
inline constexpr const char* kCpuEP = "CPUExecutionProvider";
inline constexpr const char* kCudaEP = "CUDAExecutionProvider";

// ---- registry ---------------------------------------------------------------------------------------
// Each adapter .cpp owns static OrtCustomOp objects and registers a function that appends them:
//   static void AddMyOps(std::vector<const OrtCustomOp*>& ops) { static MyOp<float> f; ops.push_back(&f); }
//   QCOMPILE_REGISTER_ORT_OPS(AddMyOps);
using AddOpsFn = void (*)(std::vector<const OrtCustomOp*>& ops);

struct OpRegistrar {
  explicit OpRegistrar(AddOpsFn fn);
};

// All registered functions, in static-initialisation order.
const std::vector<AddOpsFn>& registered_op_adders();

#define QCOMPILE_ORT_CONCAT2(a, b) a##b
#define QCOMPILE_ORT_CONCAT(a, b) QCOMPILE_ORT_CONCAT2(a, b)
#define QCOMPILE_REGISTER_ORT_OPS(fn) \
  static ::qcompile::ort::OpRegistrar QCOMPILE_ORT_CONCAT(qcompile_ort_registrar_, __LINE__)(fn)

// ---- errors -----------------------------------------------------------------------------------------
inline OrtStatus* make_error(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  return Ort::GetApi().CreateStatus(code, msg.c_str());
}
inline OrtStatus* to_ort(const Status& st, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  return st.ok() ? nullptr : make_error(st.message(), code);
}

// Runs `body` (returning OrtStatus*), turning any C++ exception into an ORT error status.
template <typename F>
OrtStatus* guarded(const char* where, F&& body) noexcept {
  try {
    return body();
  } catch (const Ort::Exception& e) {
    return make_error(std::string(where) + ": " + e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return make_error(std::string(where) + ": " + e.what(), ORT_FAIL);
  } catch (...) {
    return make_error(std::string(where) + ": unknown error", ORT_FAIL);
  }
}

// ---- attributes -------------------------------------------------------------------------------------
// Required int attribute; error names op and attribute when missing or of the wrong type.
Status attr_int(const OrtKernelInfo* info, const char* op, const char* name, int64_t* out);
// Optional int attribute with default.
Status attr_int_or(const OrtKernelInfo* info, const char* op, const char* name, int64_t dflt, int64_t* out);
// Required string attribute.
Status attr_string(const OrtKernelInfo* info, const char* op, const char* name, std::string* out);
// Optional string attribute with default.
Status attr_string_or(const OrtKernelInfo* info, const char* op, const char* name, const std::string& dflt,
                      std::string* out);

// ---- inputs -----------------------------------------------------------------------------------------
// Input `i`, or a null value when the optional input is absent (name "" or trailing and omitted).
inline Ort::ConstValue optional_input(Ort::KernelContext& ctx, size_t i) {
  if (i >= ctx.GetInputCount()) return Ort::ConstValue{nullptr};
  return ctx.GetInput(i);
}

inline std::vector<int64_t> shape_of(const Ort::ConstValue& v) {
  return v.GetTensorTypeAndShapeInfo().GetShape();
}
inline ONNXTensorElementDataType elem_type_of(const Ort::ConstValue& v) {
  return v.GetTensorTypeAndShapeInfo().GetElementType();
}

// ---- threads ----------------------------------------------------------------------------------------
// Parallel backed by the session's intra-op thread pool (KernelContext::ParallelFor).
class OrtParallel final : public Parallel {
 public:
  explicit OrtParallel(const Ort::KernelContext& ctx) : ctx_(ctx) {}
  void for_each(size_t n, const std::function<void(size_t)>& fn) const override {
    if (n == 0) return;
    if (n == 1) {
      fn(0);
      return;
    }
    ctx_.ParallelFor(&trampoline, n, 0, const_cast<void*>(static_cast<const void*>(&fn)));
  }

 private:
  static void trampoline(void* data, size_t i) { (*static_cast<const std::function<void(size_t)>*>(data))(i); }
  const Ort::KernelContext& ctx_;
};

// ---- op base ----------------------------------------------------------------------------------------
// CustomOpBase with status-returning create/compute. TKernel must provide
//   static OrtStatus* Create(const OrtKernelInfo* info, bool on_cuda, TKernel** out)   (may return error)
//   OrtStatus* Compute(Ort::KernelContext& ctx)                                       (may throw)
//
// Errors in the model that Create finds (ORT_INVALID_ARGUMENT: attribute values, malformed constant tensors)
// fail the session creation, so a bad model never loads. ORT reports any failed custom-kernel creation as
// RUNTIME_EXCEPTION, dropping the code; qcompile.runtime.make_session raises those as InvalidArgument.
template <typename TOp, typename TKernel>
struct OpBase : Ort::CustomOpBase<TOp, TKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** op_kernel) const {
    const TOp* self = static_cast<const TOp*>(this);
    return guarded(self->GetName(), [&]() -> OrtStatus* {
      TKernel* k = nullptr;
      OrtStatus* st = TKernel::Create(info, self->on_cuda(), &k);
      if (st) return st;
      *op_kernel = k;
      return nullptr;
    });
  }
};

// Mix-in for kernels: ComputeV2 wraps Compute so that nothing escapes as an exception. A kernel also
// describes its op's schema for TypedOp below:
//   static constexpr const char* kOpName;  static constexpr size_t kNumInputs;
//   static ONNXTensorElementDataType input_type(size_t i, ONNXTensorElementDataType activation_type);
//   static bool input_optional(size_t i);
//   static OrtMemType input_memory(size_t i, bool cuda)   (optional; default: the EP's memory)
template <typename TKernel>
struct KernelBase {
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(TKernel::kOpName, [&]() -> OrtStatus* {
      Ort::KernelContext ctx(context);
      return static_cast<TKernel*>(this)->Compute(ctx);
    });
  }
  static OrtMemType input_memory(size_t /*i*/, bool /*cuda*/) { return OrtMemTypeDefault; }
};

// The OrtCustomOp for one (activation type T, execution provider) of a kernel's schema: one output of
// type T, inputs as the kernel describes them.
template <typename TKernel, ONNXTensorElementDataType T, bool kCuda>
struct TypedOp : OpBase<TypedOp<TKernel, T, kCuda>, TKernel> {
  const char* GetName() const { return TKernel::kOpName; }
  const char* GetExecutionProviderType() const { return kCuda ? kCudaEP : kCpuEP; }
  bool on_cuda() const { return kCuda; }
  size_t GetInputTypeCount() const { return TKernel::kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return TKernel::input_type(i, T); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return TKernel::input_optional(i) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  OrtMemType GetInputMemoryType(size_t i) const { return TKernel::input_memory(i, kCuda); }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return T; }
};

// Appends the kernel's op for float32 and float16 activations on CPU, and on CUDA when built with it.
// Use as QCOMPILE_REGISTER_ORT_OPS(add_typed_ops<MyKernel>).
template <typename TKernel>
void add_typed_ops(std::vector<const OrtCustomOp*>& ops) {
  static TypedOp<TKernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false> cpu_f32;
  static TypedOp<TKernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, false> cpu_f16;
  ops.push_back(&cpu_f32);
  ops.push_back(&cpu_f16);
#if QCOMPILE_WITH_CUDA
  static TypedOp<TKernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true> cuda_f32;
  static TypedOp<TKernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, true> cuda_f16;
  ops.push_back(&cuda_f32);
  ops.push_back(&cuda_f16);
#endif
}

}  // namespace ort
}  // namespace qcompile
