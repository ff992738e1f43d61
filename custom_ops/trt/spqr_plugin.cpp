// TensorRT plugin for qcompile.SpQRMatMul over spqr::matmul_cuda. Fields: the attributes K, N, bits,
// group_size, stat_bits, stat_group and the stored tensors codes, stat_codes, stat_params, row_offsets,
// col_indices, values, perm, bias (docs/ops.md "TensorRT plugins"). The index tensors may be kINT16 or
// kINT32 each, as in the ONNX op. Shapes and every index (CSR rows, outlier columns, the permutation) are
// validated on the host when the plugin is created, so enqueue never meets a bad index.
#include "qcompile/spqr_matmul.h"
#include "trt/trt_plugin.h"

namespace qcompile {
namespace trt {
namespace {

struct SpqrOp {
  static constexpr const char* kName = "SpQRMatMul";

  static const std::vector<FieldSpec>& field_specs() {
    static const std::vector<FieldSpec> specs = {
        {"K", PluginFieldType::kINT64},           {"N", PluginFieldType::kINT64},
        {"bits", PluginFieldType::kINT64},        {"group_size", PluginFieldType::kINT64},
        {"stat_bits", PluginFieldType::kINT64},   {"stat_group", PluginFieldType::kINT64},
        {"accuracy_level", PluginFieldType::kINT64},
        {"codes", PluginFieldType::kINT32},       {"stat_codes", PluginFieldType::kINT32},
        {"stat_params", PluginFieldType::kFLOAT16}, {"row_offsets", PluginFieldType::kINT32},
        {"col_indices", PluginFieldType::kINT16}, {"values", PluginFieldType::kFLOAT16},
        {"perm", PluginFieldType::kINT16},        {"bias", PluginFieldType::kFLOAT32},
    };
    return specs;
  }

  struct Config {
    int64_t K = 0, N = 0;
    spqr::Attrs attrs;
    spqr::Weights host;  // pointers into the fields (host memory)
    Bias bias;
  };

  static Status parse(const FieldReader& r, FieldSet* fs, Config* c) {
    spqr::Attrs& a = c->attrs;
    QCOMPILE_RETURN_IF_ERROR(r.get_int("K", &a.K));
    QCOMPILE_RETURN_IF_ERROR(r.get_int("N", &a.N));
    QCOMPILE_RETURN_IF_ERROR(r.get_int32("bits", &a.bits));
    QCOMPILE_RETURN_IF_ERROR(r.get_int32_or("group_size", 16, &a.group_size));
    QCOMPILE_RETURN_IF_ERROR(r.get_int32_or("stat_bits", 3, &a.stat_bits));
    QCOMPILE_RETURN_IF_ERROR(r.get_int32_or("stat_group", 16, &a.stat_group));
    QCOMPILE_RETURN_IF_ERROR(r.get_int32_or("accuracy_level", 0, &a.accuracy_level));  // (CUDA: fp32 always)
    QCOMPILE_RETURN_IF_ERROR(spqr::validate_attrs(a));
    fs->add_int("K", a.K);
    fs->add_int("N", a.N);
    fs->add_int("bits", a.bits);
    fs->add_int("group_size", a.group_size);
    fs->add_int("stat_bits", a.stat_bits);
    fs->add_int("stat_group", a.stat_group);
    if (a.accuracy_level) fs->add_int("accuracy_level", a.accuracy_level);

    const auto i16_or_i32 = {PluginFieldType::kINT16, PluginFieldType::kINT32};
    const Field *codes, *stat_codes, *stat_params, *ro, *ci, *va, *perm, *bias;
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("codes", {PluginFieldType::kINT32}, true, fs, &codes));
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("stat_codes", {PluginFieldType::kINT32}, true, fs, &stat_codes));
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("stat_params", {PluginFieldType::kFLOAT16}, true, fs, &stat_params));
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("row_offsets", i16_or_i32, true, fs, &ro));
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("col_indices", i16_or_i32, true, fs, &ci));
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("values", {PluginFieldType::kFLOAT16}, true, fs, &va));
    QCOMPILE_RETURN_IF_ERROR(r.get_tensor("perm", i16_or_i32, false, fs, &perm));
    QCOMPILE_RETURN_IF_ERROR(
        r.get_tensor("bias", {PluginFieldType::kFLOAT32, PluginFieldType::kFLOAT16}, false, fs, &bias));

    const std::vector<int64_t> cs = field_shape(*codes, {a.N, a.code_words()});
    const std::vector<int64_t> scs = field_shape(*stat_codes, {a.N, 2 * a.stat_words()});
    const std::vector<int64_t> sps = field_shape(*stat_params, {a.row_blocks(), 4, a.groups()});
    const std::vector<int64_t> ros = field_shape(*ro, {a.N + 1});
    const std::vector<int64_t> cis = {ci->count}, vas = {va->count};
    const std::vector<int64_t> ps = perm ? field_shape(*perm, {a.K}) : std::vector<int64_t>{};
    const std::vector<int64_t> bs = bias ? field_shape(*bias, {a.N}) : std::vector<int64_t>{};
    int64_t rows = 0;
    QCOMPILE_RETURN_IF_ERROR(spqr::validate_shapes(a, {a.K}, cs, scs, sps, ros, cis, vas, perm ? &ps : nullptr,
                                                   bias ? &bs : nullptr, &rows));

    spqr::Weights& w = c->host;
    w.codes = codes->as<uint32_t>();
    w.stat_codes = stat_codes->as<uint32_t>();
    w.stat_params = stat_params->as<uint16_t>();
    w.row_offsets = ro->bytes.data();
    w.offsets_int16 = ro->type == PluginFieldType::kINT16;
    w.col_indices = ci->bytes.data();
    w.col_int16 = ci->type == PluginFieldType::kINT16;
    w.values = va->as<uint16_t>();
    w.nnz = ci->count;
    w.perm = perm ? perm->bytes.data() : nullptr;
    w.perm_int16 = perm && perm->type == PluginFieldType::kINT16;
    QCOMPILE_RETURN_IF_ERROR(spqr::validate_indices(a, w));
    c->bias = make_bias(bias);
    c->K = a.K;
    c->N = a.N;
    return Status::OK();
  }

  enum Slot { kCodes = 0, kStatCodes, kStatParams, kRowOffsets, kColIndices, kValues, kPerm, kBias32, kBias16 };
  static std::vector<Blob> blobs(const Config& c) {
    const spqr::Weights& w = c.host;
    const spqr::Attrs& a = c.attrs;
    const std::size_t ro = w.offsets_int16 ? 2 : 4, col = w.col_int16 ? 2 : 4, pe = w.perm_int16 ? 2 : 4;
    return {{w.codes, static_cast<std::size_t>(a.N * a.code_words()) * 4},
            {w.stat_codes, static_cast<std::size_t>(a.N * 2 * a.stat_words()) * 4},
            {w.stat_params, static_cast<std::size_t>(a.row_blocks() * 4 * a.groups()) * 2},
            {w.row_offsets, static_cast<std::size_t>(a.N + 1) * ro},
            {w.col_indices, static_cast<std::size_t>(w.nnz) * col},
            {w.values, static_cast<std::size_t>(w.nnz) * 2},
            {w.perm, w.perm ? static_cast<std::size_t>(a.K) * pe : 0},
            {c.bias.f32.data(), c.bias.f32.size() * sizeof(float)},
            {c.bias.f16.data(), c.bias.f16.size() * sizeof(uint16_t)}};
  }

  static int64_t workspace_bytes(const Config&, int64_t) { return 0; }

  static Status run(const Config& c, const std::vector<void*>& dev, DType dtype, int64_t rows, const void* x, void* y,
                    void* /*workspace*/, cudaStream_t stream) {
    spqr::Problem p;
    p.attrs = c.attrs;
    p.M = rows;
    p.dtype = dtype;
    p.x = x;
    p.w = c.host;  // flags and nnz; the pointers are replaced by the device copies
    p.w.codes = static_cast<const uint32_t*>(dev[kCodes]);
    p.w.stat_codes = static_cast<const uint32_t*>(dev[kStatCodes]);
    p.w.stat_params = static_cast<const uint16_t*>(dev[kStatParams]);
    p.w.row_offsets = dev[kRowOffsets];
    p.w.col_indices = dev[kColIndices];
    p.w.values = static_cast<const uint16_t*>(dev[kValues]);
    p.w.perm = c.host.perm ? dev[kPerm] : nullptr;
    if (c.bias.present()) p.bias = dtype == DType::kFloat16 ? dev[kBias16] : dev[kBias32];
    p.y = y;
    return spqr::matmul_cuda(p, stream);
  }
};

}  // namespace

QCOMPILE_REGISTER_TRT_CREATOR(SpqrOp);

}  // namespace trt
}  // namespace qcompile
