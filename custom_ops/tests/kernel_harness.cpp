// Runs the CPU kernels of the three ops without ONNX Runtime, for platforms the test machine can only
// emulate (tests/test_kernel_harness.py cross-builds it for aarch64 and runs it under qemu-user against the
// numpy references). Reads one case file and writes the op's fp32 output.
//
// Case file (little-endian): "QCKH", then entries until the end: u32 name length, name, u32 kind
// (0 int64, 1 float32, 2 uint8, 3 uint16, 4 int16, 5 int32, 6 string), u64 element count, the elements.
// The entry "op" (string) names the op; the others are its attributes (int64 / string) and inputs (arrays)
// by the names of docs/ops.md, plus "M" (rows of X) and "threads".
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "qcompile/codebook_matmul.h"
#include "qcompile/fp4_matmul.h"
#include "qcompile/parallel.h"
#include "qcompile/spqr_matmul.h"

using namespace qcompile;

namespace {

struct Entry {
  uint32_t kind = 0;
  uint64_t count = 0;
  std::vector<uint8_t> bytes;
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(bytes.data());
  }
};

constexpr size_t kElem[] = {8, 4, 1, 2, 2, 4, 1};

bool read_case(const char* path, std::map<std::string, Entry>* out) {
  std::ifstream f(path, std::ios::binary);
  std::vector<uint8_t> d((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (d.size() < 4 || std::memcmp(d.data(), "QCKH", 4) != 0) return false;
  size_t at = 4;
  auto take = [&](void* dst, size_t n) {
    if (at + n > d.size()) return false;
    std::memcpy(dst, d.data() + at, n);
    at += n;
    return true;
  };
  while (at < d.size()) {
    uint32_t len = 0;
    if (!take(&len, 4) || len > 256) return false;
    std::string name(len, '\0');
    Entry e;
    if (!take(&name[0], len) || !take(&e.kind, 4) || e.kind > 6 || !take(&e.count, 8)) return false;
    if (e.count > (uint64_t{1} << 32)) return false;
    e.bytes.resize(e.count * kElem[e.kind]);
    if (!take(e.bytes.data(), e.bytes.size())) return false;
    (*out)[name] = std::move(e);
  }
  return true;
}

struct Case {
  std::map<std::string, Entry> e;
  bool has(const char* k) const { return e.count(k) != 0; }
  int64_t i(const char* k, int64_t dflt = 0) const { return has(k) ? *e.at(k).as<int64_t>() : dflt; }
  std::string s(const char* k) const {
    const Entry& v = e.at(k);
    return std::string(v.as<char>(), v.count);
  }
  const Entry* t(const char* k) const { return has(k) ? &e.at(k) : nullptr; }
};

Status run_fp4(const Case& c, int64_t M, std::vector<float>& y, const Parallel& par) {
  fp4::Problem p;
  p.attrs.K = c.i("K");
  p.attrs.N = c.i("N");
  p.attrs.group_size = c.i("group_size");
  p.attrs.hadamard_block = c.i("hadamard_block");
  p.attrs.accuracy_level = c.i("accuracy_level");
  QCOMPILE_RETURN_IF_ERROR(fp4::parse_scale_format(c.s("scale_format"), &p.attrs.scale_format));
  QCOMPILE_RETURN_IF_ERROR(fp4::validate_attrs(p.attrs));
  y.assign(static_cast<size_t>(M * p.attrs.N), 0.f);
  p.M = M;
  p.x = c.t("X")->as<float>();
  p.w = c.t("W")->as<uint8_t>();
  p.scales = c.t("scales")->as<uint8_t>();
  p.tensor_scale = c.has("tensor_scale") ? *c.t("tensor_scale")->as<float>() : 1.0f;
  p.bias = c.has("bias") ? c.t("bias")->as<float>() : nullptr;
  p.y = y.data();
  return fp4::matmul_cpu(p, par);
}

Status run_spqr(const Case& c, int64_t M, std::vector<float>& y, const Parallel& par) {
  spqr::Attrs a;
  a.K = c.i("K");
  a.N = c.i("N");
  a.bits = static_cast<int>(c.i("bits"));
  a.group_size = static_cast<int>(c.i("group_size", 16));
  a.stat_bits = static_cast<int>(c.i("stat_bits", 3));
  a.stat_group = static_cast<int>(c.i("stat_group", 16));
  a.accuracy_level = static_cast<int>(c.i("accuracy_level"));
  QCOMPILE_RETURN_IF_ERROR(spqr::validate_attrs(a));
  spqr::Weights w;
  w.codes = c.t("codes")->as<uint32_t>();
  w.stat_codes = c.t("stat_codes")->as<uint32_t>();
  w.stat_params = c.t("stat_params")->as<uint16_t>();
  w.row_offsets = c.t("row_offsets")->bytes.data();
  w.offsets_int16 = c.t("row_offsets")->kind == 4;
  w.col_indices = c.t("col_indices")->bytes.data();
  w.col_int16 = c.t("col_indices")->kind == 4;
  w.values = c.t("values")->as<uint16_t>();
  w.nnz = static_cast<int64_t>(c.t("values")->count);
  if (c.has("perm")) {
    w.perm = c.t("perm")->bytes.data();
    w.perm_int16 = c.t("perm")->kind == 4;
  }
  QCOMPILE_RETURN_IF_ERROR(spqr::validate_indices(a, w));
  spqr::PreparedCodes prep;  // as the ORT adapter does for constant codes
  QCOMPILE_RETURN_IF_ERROR(spqr::prepare_constant_codes(a, w.codes, w.stat_codes, &prep));
  spqr::Problem p;
  p.attrs = a;
  p.M = M;
  p.x = c.t("X")->as<float>();
  p.w = w;
  p.bias = c.has("bias") ? c.t("bias")->as<float>() : nullptr;
  y.assign(static_cast<size_t>(M * a.N), 0.f);
  p.y = y.data();
  p.prepared = &prep;
  return spqr::matmul_cpu(p, par);
}

Status run_codebook(const Case& c, int64_t M, std::vector<float>& y, const Parallel& par) {
  codebook::Attrs a;
  a.K = c.i("K");
  a.N = c.i("N");
  a.num_codebooks = c.i("num_codebooks");
  a.codebook_size = c.i("codebook_size");
  a.in_group_size = c.i("in_group_size", 8);
  a.accuracy_level = c.i("accuracy_level");
  QCOMPILE_RETURN_IF_ERROR(codebook::validate_attrs(a));
  codebook::Problem p;
  p.attrs = a;
  p.rows = M;
  p.x = c.t("X")->as<float>();
  p.codes = c.t("codes")->bytes.data();
  p.code_type = c.t("codes")->kind == 2 ? codebook::CodeType::kUint8 : codebook::CodeType::kUint16;
  p.codebooks = c.t("codebooks")->as<uint16_t>();
  p.scales = c.t("scales")->bytes.data();
  p.scale_type = c.t("scales")->kind == 1 ? DType::kFloat32 : DType::kFloat16;
  p.bias = c.has("bias") ? c.t("bias")->as<float>() : nullptr;
  codebook::PreparedCodes prep;  // as the ORT adapter does for constant codes
  QCOMPILE_RETURN_IF_ERROR(codebook::prepare_constant_codes(a, p.codes, p.code_type, &prep));
  p.prepared = &prep;
  y.assign(static_cast<size_t>(M * a.N), 0.f);
  p.y = y.data();
  return codebook::matmul_cpu(p, par);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASE OUT\n", argv[0]);
    return 2;
  }
  Case c;
  if (!read_case(argv[1], &c.e) || !c.has("op") || !c.has("X")) {
    std::fprintf(stderr, "malformed case file %s\n", argv[1]);
    return 2;
  }
  const std::string op = c.s("op");
  const int64_t M = c.i("M", 1);
  const ThreadParallel par(static_cast<int>(c.i("threads", 1)));
  std::vector<float> y;
  Status st = Status::Error("unknown op " + op);
  if (op == "FP4MatMul") st = run_fp4(c, M, y, par);
  if (op == "SpQRMatMul") st = run_spqr(c, M, y, par);
  if (op == "CodebookMatMul") st = run_codebook(c, M, y, par);
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.message().c_str());
    return 1;
  }
  std::ofstream out(argv[2], std::ios::binary);
  out.write(reinterpret_cast<const char*>(y.data()), static_cast<std::streamsize>(y.size() * sizeof(float)));
  return out.good() ? 0 : 1;
}
