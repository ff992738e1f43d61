// TensorRT plugin for qcompile.FP4MatMul over fp4::matmul_cuda. Fields (docs/ops.md "TensorRT plugins"):
// the attributes K, N, group_size, scale_format, hadamard_block and the stored tensors W, scales,
// tensor_scale, bias. uint8 tensors travel as kINT8 (the ONNX parser has no unsigned field type; the
// bytes are the same). Every field is validated with the ORT adapter's validators when the plugin is
// created; the rotated activation lives in TensorRT's workspace.
#include "qcompile/fp4_matmul.h"
#include "trt/trt_plugin.h"

namespace qcompile {
namespace trt {
namespace {

struct Fp4Op {
  static constexpr const char* kName = "FP4MatMul";

  static const std::vector<FieldSpec>& field_specs() {
    static const std::vector<FieldSpec> specs = {
        {"K", PluginFieldType::kINT64},          {"N", PluginFieldType::kINT64},
        {"group_size", PluginFieldType::kINT64}, {"scale_format", PluginFieldType::kCHAR},
        {"hadamard_block", PluginFieldType::kINT64}, {"accuracy_level", PluginFieldType::kINT64},
        {"W", PluginFieldType::kINT8},           {"scales", PluginFieldType::kINT8},
        {"tensor_scale", PluginFieldType::kFLOAT32}, {"bias", PluginFieldType::kFLOAT32},
    };
    return specs;
  }

  struct Config {
    int64_t K = 0, N = 0;
    fp4::Attrs attrs;
    const Field* w = nullptr;
    const Field* scales = nullptr;
    float tensor_scale = 1.0f;
    Bias bias;
  };

  static Status parse(const FieldReader& r, FieldSet* fs, Config* c) {
    fp4::Attrs& a = c->attrs;
    std::string fmt;
    QCOMPILE_RETURN_IF_ERROR(r.get_int("K", &a.K));
    QCOMPILE_RETURN_IF_ERROR(r.get_int("N", &a.N));
    QCOMPILE_RETURN_IF_ERROR(r.get_int("group_size", &a.group_size));
    QCOMPILE_RETURN_IF_ERROR(r.get_string("scale_format", &fmt));
    QCOMPILE_RETURN_IF_ERROR(fp4::parse_scale_format(fmt, &a.scale_format));
    QCOMPILE_RETURN_IF_ERROR(r.get_int_or("hadamard_block", 0, &a.hadamard_block));
    QCOMPILE_RETURN_IF_ERROR(r.get_int_or("accuracy_level", 0, &a.accuracy_level));  // (CUDA: fp32 always)
    QCOMPILE_RETURN_IF_ERROR(fp4::validate_attrs(a));
    fs->add_int("K", a.K);
    fs->add_int("N", a.N);
    fs->add_int("group_size", a.group_size);
    fs->add_string("scale_format", fmt);
    fs->add_int("hadamard_block", a.hadamard_block);
    if (a.accuracy_level) fs->add_int("accuracy_level", a.accuracy_level);

    const Field *ts = nullptr, *bias = nullptr;
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("W", {PluginFieldType::kINT8}, true, fs, &c->w));
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("scales", {PluginFieldType::kINT8}, true, fs, &c->scales));
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("tensor_scale", {PluginFieldType::kFLOAT32}, false, fs, &ts));
    QCOMPILE_RETURN_IF_ERROR(
        r.get_tensor("bias", {PluginFieldType::kFLOAT32, PluginFieldType::kFLOAT16}, false, fs, &bias));

    const int64_t kp = fp4::padded_k(a.K, a.group_size);
    const std::vector<int64_t> ws = field_shape(*c->w, {a.N, kp / 2});
    const std::vector<int64_t> ss = field_shape(*c->scales, {a.N, kp / a.group_size});
    const std::vector<int64_t> tss = ts ? std::vector<int64_t>{ts->count} : std::vector<int64_t>{};
    const std::vector<int64_t> bs = bias ? field_shape(*bias, {a.N}) : std::vector<int64_t>{};
    int64_t rows = 0;
    QCOMPILE_RETURN_IF_ERROR(fp4::validate_shapes(a, {a.K}, ws, ss, ts ? &tss : nullptr, bias ? &bs : nullptr, &rows));
    if (ts) c->tensor_scale = *ts->as<float>();
    c->bias = make_bias(bias);
    c->K = a.K;
    c->N = a.N;
    return Status::OK();
  }

  enum Slot { kW = 0, kScales, kBias32, kBias16 };
  static std::vector<Blob> blobs(const Config& c) {
    return {{c.w->bytes.data(), c.w->bytes.size()},
            {c.scales->bytes.data(), c.scales->bytes.size()},
            {c.bias.f32.data(), c.bias.f32.size() * sizeof(float)},
            {c.bias.f16.data(), c.bias.f16.size() * sizeof(uint16_t)}};
  }

  static int64_t workspace_bytes(const Config& c, int64_t rows) { return fp4::scratch_bytes(c.attrs, rows); }

  static Status run(const Config& c, const std::vector<void*>& dev, DType dtype, int64_t rows, const void* x, void* y,
                    void* workspace, cudaStream_t stream) {
    fp4::Problem p;
    p.attrs = c.attrs;
    p.M = rows;
    p.dtype = dtype;
    p.x = x;
    p.w = static_cast<const uint8_t*>(dev[kW]);
    p.scales = static_cast<const uint8_t*>(dev[kScales]);
    p.tensor_scale = c.tensor_scale;
    if (c.bias.present()) p.bias = dtype == DType::kFloat16 ? dev[kBias16] : dev[kBias32];
    p.y = y;
    p.scratch = workspace;  // getWorkspaceSize asked for scratch_bytes at the profile's largest M
    return fp4::matmul_cuda(p, stream);
  }
};

}  // namespace

QCOMPILE_REGISTER_TRT_CREATOR(Fp4Op);

}  // namespace trt
}  // namespace qcompile
