// ONNX Runtime adapter for qcompile.CodebookMatMul (AQLM): CPU and CUDA kernels for float32 and float16
// activations. codes (uint8 | uint16) and scales (float16 | float32) accept either type and are checked
// here, so one op object per (activation dtype, EP) serves every combination. Attributes are validated
// when the session is created, shapes and code dtypes on every call, and every code index against
// codebook_size (a bad code is an ORT error, never an out-of-bounds read). Constant codes on CPU are
// checked once at session creation and, for layers the batch-1 lookup walk serves, copied once into its
// slice order (codebook::PreparedCodes), which removes a per-call reordering copy.
#include <atomic>
#include <vector>

#include "ort/ort_op.h"
#include "qcompile/codebook_matmul.h"

namespace qcompile {
namespace ort {
namespace {

enum Input : size_t { kX = 0, kCodes = 1, kCodebooks = 2, kScales = 3, kBias = 4, kNumInputs = 5 };

struct CodebookKernel : KernelBase<CodebookKernel> {
  static constexpr const char* kOpName = "CodebookMatMul";
  static constexpr size_t kNumInputs = Input::kNumInputs;
  static ONNXTensorElementDataType input_type(size_t i, ONNXTensorElementDataType t) {
    if (i == kCodes || i == kScales) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // uint8|uint16 / fp16|fp32, checked in Compute
    if (i == kCodebooks) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    return t;  // X and bias
  }
  static bool input_optional(size_t i) { return i == kBias; }
  codebook::Attrs attrs;
  bool on_cuda = false;
  bool codes_constant = false;
  // CUDA: the device address of constant codes once they passed the check (initializers keep their
  // address for the session's lifetime, so they are checked once, not on every call).
  std::atomic<const void*> checked_codes{nullptr};

  static OrtStatus* Create(const OrtKernelInfo* info, bool cuda, CodebookKernel** out) {
    codebook::Attrs a;
    Status st = attr_int(info, kOpName, "K", &a.K);
    if (st.ok()) st = attr_int(info, kOpName, "N", &a.N);
    if (st.ok()) st = attr_int(info, kOpName, "num_codebooks", &a.num_codebooks);
    if (st.ok()) st = attr_int(info, kOpName, "codebook_size", &a.codebook_size);
    if (st.ok()) st = attr_int_or(info, kOpName, "in_group_size", 8, &a.in_group_size);
    if (st.ok()) st = attr_int_or(info, kOpName, "accuracy_level", 0, &a.accuracy_level);
    if (st.ok()) st = codebook::validate_attrs(a);
    if (!st.ok()) return to_ort(st);
    auto* k = new CodebookKernel();
    k->attrs = a;
    k->on_cuda = cuda;
    int is_constant = 0;
    Ort::ConstValue cv{nullptr};
    try {
      Ort::ConstKernelInfo ki(info);
      cv = ki.GetTensorConstantInput(kCodes, &is_constant);
    } catch (const Ort::Exception&) {
      is_constant = 0;  // unknown: check on every call
    }
    k->codes_constant = is_constant != 0 && cv;
    if (k->codes_constant && !cuda) {
      // Host data available now: check every code once (a bad code fails session creation) and prepare the
      // CPU kernel's layout. A wrong shape or type is left to Compute, which reports it.
      const auto ct = elem_type_of(cv);
      const codebook::CodeType want = codebook::required_code_type(a.codebook_size);
      const auto want_t = want == codebook::CodeType::kUint8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                                                              : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16;
      if (ct == want_t && shape_of(cv) == std::vector<int64_t>{a.N, a.K / a.in_group_size, a.num_codebooks}) {
        if (Status s2 = codebook::prepare_constant_codes(a, cv.GetTensorRawData(), want, &k->prepared); !s2.ok()) {
          delete k;
          return to_ort(s2);
        }
      }
    }
    *out = k;
    return nullptr;
  }
  codebook::PreparedCodes prepared;  // CPU, constant codes: checked once, walk layout (see the header)

  OrtStatus* Compute(Ort::KernelContext& ctx) {
    Ort::ConstValue x = ctx.GetInput(kX);
    Ort::ConstValue codes = ctx.GetInput(kCodes);
    Ort::ConstValue books = ctx.GetInput(kCodebooks);
    Ort::ConstValue sc = ctx.GetInput(kScales);
    Ort::ConstValue bias = optional_input(ctx, kBias);
    if (!x || !codes || !books || !sc) return make_error("CodebookMatMul: inputs X, codes, codebooks and scales are required");

    const std::vector<int64_t> xs = shape_of(x), cs = shape_of(codes), bs = shape_of(books), ss = shape_of(sc);
    std::vector<int64_t> bis;
    if (bias) bis = shape_of(bias);
    codebook::Problem p;
    p.attrs = attrs;
    if (Status st = codebook::validate_shapes(attrs, xs, cs, bs, ss, bias ? &bis : nullptr, &p.rows); !st.ok())
      return to_ort(st);

    const auto xt = elem_type_of(x);
    p.dtype = xt == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? DType::kFloat16 : DType::kFloat32;
    if (bias && elem_type_of(bias) != xt) return make_error("CodebookMatMul: bias must have the same type as X");
    const auto ct = elem_type_of(codes);
    const codebook::CodeType want = codebook::required_code_type(attrs.codebook_size);
    if (ct != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && ct != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16)
      return make_error("CodebookMatMul: codes must be uint8 or uint16");
    p.code_type = ct == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ? codebook::CodeType::kUint8 : codebook::CodeType::kUint16;
    if (p.code_type != want)
      return make_error(std::string("CodebookMatMul: codes must be ") +
                        (want == codebook::CodeType::kUint8 ? "uint8" : "uint16") + " for codebook_size=" +
                        std::to_string(attrs.codebook_size));
    if (elem_type_of(books) != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      return make_error("CodebookMatMul: codebooks must be float16");
    const auto st_ = elem_type_of(sc);
    if (st_ != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 && st_ != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      return make_error("CodebookMatMul: scales must be float16 or float32");
    p.scale_type = st_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? DType::kFloat16 : DType::kFloat32;

    std::vector<int64_t> ys(xs);
    ys.back() = attrs.N;
    Ort::UnownedValue y = ctx.GetOutput(0, ys);
    if (p.rows == 0) {  // no row reads the codes: still, every code fed at run time must be in range
      if (codes_constant || on_cuda) return nullptr;  // constant codes were checked at session creation
      return to_ort(codebook::check_codes_host(attrs, codes.GetTensorRawData(), p.code_type));
    }
    p.x = x.GetTensorRawData();
    p.codes = codes.GetTensorRawData();
    p.codebooks = static_cast<const uint16_t*>(books.GetTensorRawData());
    p.scales = sc.GetTensorRawData();
    p.bias = bias ? bias.GetTensorRawData() : nullptr;
    p.y = y.GetTensorMutableRawData();
    if (on_cuda) {
#if QCOMPILE_WITH_CUDA
      void* stream = ctx.GetGPUComputeStream();
      if (!codes_constant || checked_codes.load() != p.codes) {
        if (Status st = codebook::check_codes_cuda(attrs, p.codes, p.code_type, stream); !st.ok()) return to_ort(st);
        if (codes_constant) checked_codes.store(p.codes);
      }
      return to_ort(codebook::matmul_cuda(p, stream), ORT_FAIL);
#else
      return make_error("CodebookMatMul: library built without CUDA", ORT_FAIL);
#endif
    }
    // The CPU kernel checks every code as it reads it (clamped index + error), at no extra pass, unless
    // these are the constant codes checked at session creation.
    if (prepared.source) p.prepared = &prepared;
    return to_ort(codebook::matmul_cpu(p, OrtParallel(ctx)));
  }
};

}  // namespace

QCOMPILE_REGISTER_ORT_OPS(add_typed_ops<CodebookKernel>);

}  // namespace ort
}  // namespace qcompile
