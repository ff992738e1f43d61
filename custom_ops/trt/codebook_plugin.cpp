// TensorRT plugin for qcompile.CodebookMatMul (AQLM) over codebook::matmul_cuda. Fields: the attributes
// K, N, num_codebooks, codebook_size, in_group_size and the stored tensors codes, codebooks, scales, bias
// (docs/ops.md "TensorRT plugins"). uint8 codes travel as kINT8 (the ONNX parser has no unsigned field
// types; the bits are the same); 16-bit codes as kINT16 bits, or as kINT32 values, which is how the ONNX
// parser can pass them (it converts no 16-bit weights): those are range-checked, narrowed and kept (and
// serialized) as kINT16. Every code is checked against codebook_size on the host when the plugin is
// created.
#include "qcompile/codebook_matmul.h"
#include "trt/trt_plugin.h"

namespace qcompile {
namespace trt {
namespace {

// 16-bit codes given as int32 values -> kINT16 bits. A value outside [0, codebook_size) is an error (a
// plain narrowing could turn it into a valid-looking code).
Status narrow_codes(const codebook::Attrs& a, const Field& in, Field* out) {
  const int64_t per_row = (a.K / a.in_group_size) * a.num_codebooks;
  out->type = PluginFieldType::kINT16;
  out->bytes.resize(static_cast<std::size_t>(in.count) * 2);
  const int32_t* v = in.as<int32_t>();
  for (int64_t i = 0; i < in.count; ++i) {
    if (v[i] < 0 || v[i] >= a.codebook_size) {
      return Status::Error("CodebookMatMul: code " + std::to_string(v[i]) + " at [" + std::to_string(i / per_row) +
                           ", " + std::to_string((i % per_row) / a.num_codebooks) + ", " +
                           std::to_string(i % a.num_codebooks) + "] is out of range for codebook_size=" +
                           std::to_string(a.codebook_size));
    }
    const uint16_t u = static_cast<uint16_t>(v[i]);
    std::memcpy(&out->bytes[2 * i], &u, 2);
  }
  return Status::OK();
}

struct CodebookOp {
  static constexpr const char* kName = "CodebookMatMul";

  static const std::vector<FieldSpec>& field_specs() {
    static const std::vector<FieldSpec> specs = {
        {"K", PluginFieldType::kINT64},
        {"N", PluginFieldType::kINT64},
        {"num_codebooks", PluginFieldType::kINT64},
        {"codebook_size", PluginFieldType::kINT64},
        {"in_group_size", PluginFieldType::kINT64},
        {"accuracy_level", PluginFieldType::kINT64},
        {"codes", PluginFieldType::kINT8},
        {"codebooks", PluginFieldType::kFLOAT16},
        {"scales", PluginFieldType::kFLOAT16},
        {"bias", PluginFieldType::kFLOAT32},
    };
    return specs;
  }

  struct Config {
    int64_t K = 0, N = 0;
    codebook::Attrs attrs;
    codebook::CodeType code_type = codebook::CodeType::kUint8;
    DType scale_type = DType::kFloat16;
    const Field* codes = nullptr;
    const Field* codebooks = nullptr;
    const Field* scales = nullptr;
    Bias bias;
  };

  static Status parse(const FieldReader& r, FieldSet* fs, Config* c) {
    codebook::Attrs& a = c->attrs;
    QCOMPILE_RETURN_IF_ERROR(r.get_int("K", &a.K));
    QCOMPILE_RETURN_IF_ERROR(r.get_int("N", &a.N));
    QCOMPILE_RETURN_IF_ERROR(r.get_int("num_codebooks", &a.num_codebooks));
    QCOMPILE_RETURN_IF_ERROR(r.get_int("codebook_size", &a.codebook_size));
    QCOMPILE_RETURN_IF_ERROR(r.get_int_or("in_group_size", 8, &a.in_group_size));
    QCOMPILE_RETURN_IF_ERROR(r.get_int_or("accuracy_level", 0, &a.accuracy_level));  // (CUDA: fp32 always)
    QCOMPILE_RETURN_IF_ERROR(codebook::validate_attrs(a));
    fs->add_int("K", a.K);
    fs->add_int("N", a.N);
    fs->add_int("num_codebooks", a.num_codebooks);
    fs->add_int("codebook_size", a.codebook_size);
    fs->add_int("in_group_size", a.in_group_size);
    if (a.accuracy_level) fs->add_int("accuracy_level", a.accuracy_level);

    // The code type follows from codebook_size (uint8 up to 256 codewords), as in the ONNX op.
    c->code_type = codebook::required_code_type(a.codebook_size);
    const PluginFieldType code_field =
        c->code_type == codebook::CodeType::kUint8 ? PluginFieldType::kINT8 : PluginFieldType::kINT16;
    const Field* bias = nullptr;
    if (code_field == PluginFieldType::kINT8) {
      QCOMPILE_RETURN_IF_ERROR(r.get_tensor("codes", {code_field}, true, fs, &c->codes));
    } else {
      FieldSet given;  // the field as it came; what the plugin keeps is the kINT16 form
      const Field* raw = nullptr;
      QCOMPILE_RETURN_IF_ERROR(r.get_tensor("codes", {PluginFieldType::kINT16, PluginFieldType::kINT32}, true, &given, &raw));
      Field f = *raw;
      if (raw->type == PluginFieldType::kINT32) QCOMPILE_RETURN_IF_ERROR(narrow_codes(a, *raw, &f));
      c->codes = fs->add(std::move(f));
    }
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("codebooks", {PluginFieldType::kFLOAT16}, true, fs, &c->codebooks));
    QCOMPILE_RETURN_IF_ERROR(
        r.get_tensor("scales", {PluginFieldType::kFLOAT16, PluginFieldType::kFLOAT32}, true, fs, &c->scales));
    QCOMPILE_RETURN_IF_ERROR(
        r.get_tensor("bias", {PluginFieldType::kFLOAT32, PluginFieldType::kFLOAT16}, false, fs, &bias));

    const int64_t g = a.K / a.in_group_size;
    const std::vector<int64_t> cs = field_shape(*c->codes, {a.N, g, a.num_codebooks});
    const std::vector<int64_t> bks = field_shape(*c->codebooks, {a.num_codebooks, a.codebook_size, a.in_group_size});
    const std::vector<int64_t> ss = field_shape(*c->scales, {a.N});
    const std::vector<int64_t> bs = bias ? field_shape(*bias, {a.N}) : std::vector<int64_t>{};
    int64_t rows = 0;
    QCOMPILE_RETURN_IF_ERROR(codebook::validate_shapes(a, {a.K}, cs, bks, ss, bias ? &bs : nullptr, &rows));
    QCOMPILE_RETURN_IF_ERROR(codebook::check_codes_host(a, c->codes->bytes.data(), c->code_type));
    c->scale_type = c->scales->type == PluginFieldType::kFLOAT16 ? DType::kFloat16 : DType::kFloat32;
    c->bias = make_bias(bias);
    c->K = a.K;
    c->N = a.N;
    return Status::OK();
  }

  enum Slot { kCodes = 0, kCodebooks, kScales, kBias32, kBias16 };
  static std::vector<Blob> blobs(const Config& c) {
    return {{c.codes->bytes.data(), c.codes->bytes.size()},
            {c.codebooks->bytes.data(), c.codebooks->bytes.size()},
            {c.scales->bytes.data(), c.scales->bytes.size()},
            {c.bias.f32.data(), c.bias.f32.size() * sizeof(float)},
            {c.bias.f16.data(), c.bias.f16.size() * sizeof(uint16_t)}};
  }

  static int64_t workspace_bytes(const Config&, int64_t) { return 0; }

  static Status run(const Config& c, const std::vector<void*>& dev, DType dtype, int64_t rows, const void* x, void* y,
                    void* /*workspace*/, cudaStream_t stream) {
    codebook::Problem p;
    p.attrs = c.attrs;
    p.rows = rows;
    p.dtype = dtype;
    p.x = x;
    p.codes = dev[kCodes];
    p.code_type = c.code_type;
    p.codebooks = static_cast<const uint16_t*>(dev[kCodebooks]);
    p.scales = dev[kScales];
    p.scale_type = c.scale_type;
    if (c.bias.present()) p.bias = dtype == DType::kFloat16 ? dev[kBias16] : dev[kBias32];
    p.y = y;
    return codebook::matmul_cuda(p, stream);  // codes were checked at creation; the kernel clamps anyway
  }
};

}  // namespace

QCOMPILE_REGISTER_TRT_CREATOR(CodebookOp);

}  // namespace trt
}  // namespace qcompile
