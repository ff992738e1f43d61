// Test harness for libqcompile_trt_plugins.so without TensorRT: loads the library as
// IPluginRegistry::loadLibrary does (dlopen, setLoggerFinder, getCreators) and drives each plugin through
// the calls TensorRT's builder and runtime make, with test doubles for the logger, IExprBuilder /
// IDimensionExpr, IErrorRecorder and IPluginResourceContext. Cases come from a file that
// tests/test_trt_plugins.py writes from real quantized layers (see read_cases for the format).
//
//   harness LIBRARY CASES [--enqueue]
//
// Prints one line per check ("PASS case: check", "FAIL case: check: why", "SKIP case: check: why") and a
// summary; exits 1 if any check failed. --enqueue also runs enqueue on the first CUDA device and compares
// with the numpy reference written in the case file (a SKIP without a device).
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "qcompile/half.h"

using namespace nvinfer1;

namespace {

// ---- results -------------------------------------------------------------------------------------------
int g_pass = 0, g_fail = 0, g_skip = 0;

void pass(const std::string& c, const std::string& what) {
  ++g_pass;
  std::printf("PASS %s: %s\n", c.c_str(), what.c_str());
}
void fail(const std::string& c, const std::string& what, const std::string& why) {
  ++g_fail;
  std::printf("FAIL %s: %s: %s\n", c.c_str(), what.c_str(), why.c_str());
}
void skip(const std::string& c, const std::string& what, const std::string& why) {
  ++g_skip;
  std::printf("SKIP %s: %s: %s\n", c.c_str(), what.c_str(), why.c_str());
}
void check(bool ok, const std::string& c, const std::string& what, const std::string& why = "") {
  ok ? pass(c, what) : fail(c, what, why.empty() ? "check failed" : why);
}

// ---- test doubles ----------------------------------------------------------------------------------------
// Logger + finder: the library logs every error here (TensorRT passes its own through setLoggerFinder).
class CapturingLogger : public ILogger {
 public:
  void log(Severity s, const char* msg) noexcept override {
    if (s <= Severity::kERROR) errors.emplace_back(msg ? msg : "");
  }
  std::vector<std::string> errors;
};
class Finder : public ILoggerFinder {
 public:
  explicit Finder(ILogger* l) : logger_(l) {}
  ILogger* findLogger() override { return logger_; }

 private:
  ILogger* logger_;
};
CapturingLogger g_logger;
Finder g_finder(&g_logger);

// Error recorder handed to attached clones through the fake resource context.
class Recorder : public IErrorRecorder {
 public:
  int32_t getNbErrors() const noexcept override { return static_cast<int32_t>(errors.size()); }
  ErrorCode getErrorCode(int32_t i) const noexcept override { return codes.at(i); }
  ErrorDesc getErrorDesc(int32_t i) const noexcept override { return errors.at(i).c_str(); }
  bool hasOverflowed() const noexcept override { return false; }
  void clear() noexcept override {
    errors.clear();
    codes.clear();
  }
  bool reportError(ErrorCode c, ErrorDesc d) noexcept override {
    codes.push_back(c);
    errors.emplace_back(d ? d : "");
    return true;
  }
  RefCount incRefCount() noexcept override { return ++refs; }
  RefCount decRefCount() noexcept override { return --refs; }
  std::vector<std::string> errors;
  std::vector<ErrorCode> codes;
  int32_t refs = 0;
};
class ResourceContext : public IPluginResourceContext {
 public:
  IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
  IErrorRecorder* getErrorRecorder() const noexcept override { return &recorder; }
  mutable Recorder recorder;
};

// Dimension expressions: IDimensionExpr and IExprBuilder forward to apiv implementations through their
// protected mImpl, so the doubles subclass them and point mImpl at a local implementation.
class DimImpl : public apiv::VDimensionExpr {
 public:
  DimImpl(bool c, int64_t v) : constant_(c), value_(v) {}
  bool isConstant() const override { return constant_; }
  int64_t getConstantValue() const override { return constant_ ? value_ : INT64_MIN; }
  bool isSizeTensor() const override { return false; }

 private:
  bool constant_;
  int64_t value_;
};
class Dim : public IDimensionExpr {
 public:
  Dim(bool c, int64_t v) : impl_(c, v) { mImpl = &impl_; }
  ~Dim() override = default;

 private:
  DimImpl impl_;
};
class BuilderImpl : public apiv::VExprBuilder {
 public:
  const IDimensionExpr* constant(int64_t v) override { return make(true, v); }
  const IDimensionExpr* operation(DimensionOperation op, const IDimensionExpr& a, const IDimensionExpr& b) override {
    if (!a.isConstant() || !b.isConstant()) return make(false, 0);
    const int64_t x = a.getConstantValue(), y = b.getConstantValue();
    switch (op) {
      case DimensionOperation::kSUM: return make(true, x + y);
      case DimensionOperation::kPROD: return make(true, x * y);
      case DimensionOperation::kMAX: return make(true, x > y ? x : y);
      case DimensionOperation::kMIN: return make(true, x < y ? x : y);
      case DimensionOperation::kSUB: return make(true, x - y);
      case DimensionOperation::kEQUAL: return make(true, x == y);
      case DimensionOperation::kLESS: return make(true, x < y);
      case DimensionOperation::kFLOOR_DIV: return y ? make(true, x / y) : nullptr;
      case DimensionOperation::kCEIL_DIV: return y ? make(true, (x + y - 1) / y) : nullptr;
    }
    return nullptr;
  }
  const IDimensionExpr* declareSizeTensor(int32_t, const IDimensionExpr&, const IDimensionExpr&) override { return nullptr; }
  const IDimensionExpr* make(bool c, int64_t v) {
    pool_.push_back(std::make_unique<Dim>(c, v));
    return pool_.back().get();
  }

 private:
  std::vector<std::unique_ptr<Dim>> pool_;
};
class Builder : public IExprBuilder {
 public:
  Builder() { mImpl = &impl_; }
  ~Builder() override = default;
  BuilderImpl impl_;
};

// ---- cases ----------------------------------------------------------------------------------------------
struct OwnedField {
  std::string name;
  PluginFieldType type;
  int32_t length;
  std::vector<uint8_t> bytes;
};
struct Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<float> v;
};
struct Case {
  std::string name, plugin;
  std::vector<std::string> required;  // fields whose absence must be an error
  std::vector<OwnedField> fields;
  int64_t K = 0, N = 0;
  int64_t ws_rows = 0, ws_bytes = -1;  // expected getWorkspaceSize for X max [ws_rows, K]
  Matrix x, y, y16;                    // enqueue inputs/expectations (optional)
  std::string expect_error;            // non-empty: creation must fail with a message containing this
};

// File format (text header lines, raw little-endian blocks each followed by one '\n'):
//   case NAME PLUGIN K N            begins a case
//   required NAME...                required fields
//   field NAME TYPE LENGTH NBYTES   then NBYTES raw bytes (TYPE = PluginFieldType as an int)
//   workspace ROWS BYTES
//   x|y|y16 ROWS COLS               then ROWS*COLS float32
//   expect_error TEXT               (rest of the line)
//   end
bool read_cases(const std::string& path, std::vector<Case>* out, std::string* err) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return *err = "cannot open " + path, false;
  std::string line;
  Case cur;
  bool open = false;
  auto raw = [&](std::size_t n, void* dst) {
    if (n && !in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n))) return false;
    return in.get() == '\n';
  };
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string tag;
    ls >> tag;
    if (tag == "case") {
      cur = Case();
      ls >> cur.name >> cur.plugin >> cur.K >> cur.N;
      open = true;
    } else if (tag == "required") {
      std::string n;
      while (ls >> n) cur.required.push_back(n);
    } else if (tag == "field") {
      OwnedField f;
      int type = 0;
      std::size_t nbytes = 0;
      ls >> f.name >> type >> f.length >> nbytes;
      f.type = static_cast<PluginFieldType>(type);
      f.bytes.resize(nbytes);
      if (!raw(nbytes, f.bytes.data())) return *err = "truncated field " + f.name, false;
      cur.fields.push_back(std::move(f));
    } else if (tag == "workspace") {
      ls >> cur.ws_rows >> cur.ws_bytes;
    } else if (tag == "x" || tag == "y" || tag == "y16") {
      Matrix& m = tag == "x" ? cur.x : tag == "y" ? cur.y : cur.y16;
      ls >> m.rows >> m.cols;
      m.v.resize(static_cast<std::size_t>(m.rows * m.cols));
      if (!raw(m.v.size() * 4, m.v.data())) return *err = "truncated " + tag, false;
    } else if (tag == "expect_error") {
      std::getline(ls >> std::ws, cur.expect_error);
    } else if (tag == "end") {
      if (!open) return *err = "'end' without 'case'", false;
      out->push_back(std::move(cur));
      open = false;
    } else if (!tag.empty()) {
      return *err = "unknown line: " + line, false;
    }
  }
  if (open) return *err = "missing 'end'", false;
  return true;
}

// ---- library -------------------------------------------------------------------------------------------
using GetCreatorsFn = IPluginCreatorInterface* const* (*)(int32_t&);
using SetLoggerFinderFn = void (*)(ILoggerFinder*);
std::map<std::string, IPluginCreatorV3One*> g_creators;

bool load_library(const char* path) {
  void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    fail("library", "dlopen", dlerror());
    return false;
  }
  auto set_finder = reinterpret_cast<SetLoggerFinderFn>(dlsym(h, "setLoggerFinder"));
  auto get_creators = reinterpret_cast<GetCreatorsFn>(dlsym(h, "getCreators"));
  check(set_finder != nullptr, "library", "exports setLoggerFinder");
  check(get_creators != nullptr, "library", "exports getCreators");
  if (!set_finder || !get_creators) return false;
  set_finder(&g_finder);
  int32_t n = -1;
  IPluginCreatorInterface* const* list = get_creators(n);
  check(n == 3 && list != nullptr, "library", "getCreators lists 3 creators", "got " + std::to_string(n));
  for (int32_t i = 0; list && i < n; ++i) {
    const InterfaceInfo info = list[i]->getInterfaceInfo();
    const bool v3 = info.kind && std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1;
    check(v3, "library", "creator " + std::to_string(i) + " is an IPluginCreatorV3One");
    if (!v3) continue;
    auto* c = static_cast<IPluginCreatorV3One*>(list[i]);
    const std::string name = c->getPluginName();
    check(std::strcmp(c->getPluginVersion(), "1") == 0 && std::strcmp(c->getPluginNamespace(), "qcompile") == 0,
          "library", name + " has version 1, namespace qcompile");
    g_creators[name] = c;
  }
  for (const char* want : {"CodebookMatMul", "FP4MatMul", "SpQRMatMul"})
    check(g_creators.count(want) == 1, "library", std::string("creator ") + want);
  return true;
}

// ---- helpers -------------------------------------------------------------------------------------------
struct Plugin {
  IPluginV3* p = nullptr;
  IPluginV3OneCore* core = nullptr;
  IPluginV3OneBuild* build = nullptr;
  IPluginV3OneRuntime* runtime = nullptr;
  explicit Plugin(IPluginV3* q) : p(q) {
    if (!p) return;
    core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
    build = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
    runtime = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  }
  ~Plugin() { delete p; }
  Plugin(const Plugin&) = delete;
  Plugin& operator=(const Plugin&) = delete;
};

std::vector<PluginField> view(const std::vector<OwnedField>& fs) {
  std::vector<PluginField> v;
  for (const OwnedField& f : fs) v.emplace_back(f.name.c_str(), f.bytes.empty() ? nullptr : f.bytes.data(), f.type, f.length);
  return v;
}

IPluginV3* create(const Case& c, const std::vector<PluginField>& fields, TensorRTPhase phase = TensorRTPhase::kBUILD) {
  PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
  return g_creators.at(c.plugin)->createPlugin("layer0", &fc, phase);
}

std::vector<OwnedField> copy_fields(const PluginFieldCollection* fc, std::string* err) {
  std::vector<OwnedField> out;
  if (!fc || fc->nbFields < 0 || (fc->nbFields && !fc->fields)) return *err = "malformed collection", out;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    const PluginField& f = fc->fields[i];
    std::size_t es = 0;
    switch (f.type) {
      case PluginFieldType::kINT8: case PluginFieldType::kCHAR: es = 1; break;
      case PluginFieldType::kINT16: case PluginFieldType::kFLOAT16: es = 2; break;
      case PluginFieldType::kINT32: case PluginFieldType::kFLOAT32: es = 4; break;
      case PluginFieldType::kINT64: case PluginFieldType::kFLOAT64: es = 8; break;
      default: *err = std::string("unexpected field type in ") + (f.name ? f.name : "?"); return {};
    }
    if (!f.name || f.length < 0 || (f.length && !f.data)) return *err = "malformed field", out;
    OwnedField o{f.name, f.type, f.length, {}};
    o.bytes.assign(static_cast<const uint8_t*>(f.data), static_cast<const uint8_t*>(f.data) + es * f.length);
    out.push_back(std::move(o));
  }
  return out;
}

bool same_fields(const std::vector<OwnedField>& a, const std::vector<OwnedField>& b, std::string* why) {
  if (a.size() != b.size()) return *why = std::to_string(a.size()) + " vs " + std::to_string(b.size()) + " fields", false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].type != b[i].type || a[i].length != b[i].length || a[i].bytes != b[i].bytes)
      return *why = "field " + a[i].name + " differs", false;
  }
  return true;
}

int64_t as_int(const OwnedField& f) {
  if (f.type == PluginFieldType::kINT32) {
    int32_t v;
    std::memcpy(&v, f.bytes.data(), 4);
    return v;
  }
  int64_t v;
  std::memcpy(&v, f.bytes.data(), 8);
  return v;
}

// The serialized fields carry every given field's value: tensors byte for byte in their type (int32
// codebook codes as their 16 bits), ints by value (serialized as kINT64), strings up to the NUL.
bool carries_inputs(const std::vector<OwnedField>& given, const std::vector<OwnedField>& ser, std::string* why) {
  for (const OwnedField& g : given) {
    const OwnedField* s = nullptr;
    for (const OwnedField& f : ser)
      if (f.name == g.name) s = &f;
    if (!s) return *why = "serialized fields lack " + g.name, false;
    const bool is_int = (g.type == PluginFieldType::kINT32 || g.type == PluginFieldType::kINT64) && g.length == 1 &&
                        s->type == PluginFieldType::kINT64 && s->length == 1;
    if (g.type == PluginFieldType::kCHAR) {
      if (std::string(reinterpret_cast<const char*>(g.bytes.data()), strnlen(reinterpret_cast<const char*>(g.bytes.data()), g.bytes.size())) !=
          std::string(reinterpret_cast<const char*>(s->bytes.data())))
        return *why = "string " + g.name + " changed", false;
    } else if (is_int) {
      if (s->length != 1 || as_int(*s) != as_int(g)) return *why = "int " + g.name + " changed", false;
    } else if (g.type == PluginFieldType::kINT32 && s->type == PluginFieldType::kINT16) {
      // 16-bit codebook codes given as int32 values are kept as their 16 bits
      if (s->length != g.length) return *why = "tensor " + g.name + " changed length", false;
      for (int32_t i = 0; i < g.length; ++i) {
        int32_t v;
        uint16_t u;
        std::memcpy(&v, &g.bytes[4 * i], 4);
        std::memcpy(&u, &s->bytes[2 * i], 2);
        if (v != u) return *why = "tensor " + g.name + " changed at " + std::to_string(i), false;
      }
    } else if (s->type != g.type || s->length != g.length || s->bytes != g.bytes) {
      return *why = "tensor " + g.name + " changed", false;
    }
  }
  return true;
}

bool logged_error_containing(const std::string& text, std::string* got) {
  for (const std::string& e : g_logger.errors)
    if (e.find(text) != std::string::npos) return true;
  *got = g_logger.errors.empty() ? "(nothing logged)" : g_logger.errors.back();
  return false;
}

DynamicPluginTensorDesc dyn(DataType t, std::vector<int64_t> d, TensorFormat f = TensorFormat::kLINEAR) {
  DynamicPluginTensorDesc x{};
  x.desc.type = t;
  x.desc.format = f;
  x.desc.scale = -1.0f;
  x.desc.dims.nbDims = static_cast<int32_t>(d.size());
  for (std::size_t i = 0; i < d.size(); ++i) x.desc.dims.d[i] = d[i];
  x.min = x.opt = x.max = x.desc.dims;
  return x;
}
PluginTensorDesc desc(DataType t, std::vector<int64_t> d) { return dyn(t, std::move(d)).desc; }

// ---- checks on a well-formed case ----------------------------------------------------------------------
void check_build_interface(const Case& c, Plugin& pl) {
  const std::string n = c.name;
  check(pl.core && pl.build && pl.runtime, n, "core, build and runtime capabilities");
  if (!pl.core || !pl.build || !pl.runtime) return;
  check(std::strcmp(pl.core->getPluginName(), c.plugin.c_str()) == 0 && std::strcmp(pl.core->getPluginVersion(), "1") == 0 &&
            std::strcmp(pl.core->getPluginNamespace(), "qcompile") == 0,
        n, "core name / version / namespace");
  check(std::strcmp(pl.p->getInterfaceInfo().kind, "PLUGIN") == 0 &&
            std::strcmp(pl.core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0 &&
            std::strcmp(pl.build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0 &&
            std::strcmp(pl.runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        n, "interface kinds");
  check(pl.build->getNbOutputs() == 1, n, "one output");

  // output types follow X; other types are refused with an error
  for (DataType t : {DataType::kFLOAT, DataType::kHALF}) {
    DataType o = DataType::kINT8;
    const int32_t rc = pl.build->getOutputDataTypes(&o, 1, &t, 1);
    check(rc == 0 && o == t, n, std::string("output type follows X ") + (t == DataType::kHALF ? "fp16" : "fp32"));
  }
  for (DataType t : {DataType::kINT8, DataType::kINT32, DataType::kBF16}) {
    g_logger.errors.clear();
    DataType o = DataType::kFLOAT;
    check(pl.build->getOutputDataTypes(&o, 1, &t, 1) != 0 && !g_logger.errors.empty(), n,
          "output type refused for X type " + std::to_string(static_cast<int>(t)));
  }
  {
    DataType in2[2] = {DataType::kFLOAT, DataType::kFLOAT};
    DataType o;
    check(pl.build->getOutputDataTypes(&o, 1, in2, 2) != 0, n, "output type refused for 2 inputs");
  }

  // output shapes: leading dims pass through (constant or symbolic), last becomes N
  for (int64_t m : {1, 7, 64}) {
    for (int rank : {1, 2, 3}) {
      if (rank == 1 && m != 1) continue;
      Builder b;
      DimsExprs in{};
      in.nbDims = rank;
      const IDimensionExpr* sym = b.impl_.make(false, 0);
      for (int i = 0; i + 1 < rank; ++i) in.d[i] = (rank == 3 && i == 0) ? sym : b.constant(m);
      in.d[rank - 1] = b.constant(c.K);
      DimsExprs out{};
      const int32_t rc = pl.build->getOutputShapes(&in, 1, nullptr, 0, &out, 1, b);
      bool ok = rc == 0 && out.nbDims == rank && out.d[rank - 1] && out.d[rank - 1]->isConstant() &&
                out.d[rank - 1]->getConstantValue() == c.N;
      for (int i = 0; ok && i + 1 < rank; ++i) ok = out.d[i] == in.d[i];
      check(ok, n, "output shape rank " + std::to_string(rank) + " M=" + std::to_string(m) + (rank == 3 ? " (symbolic batch)" : ""));
    }
  }
  {
    Builder b;
    DimsExprs in{};
    in.nbDims = 2;
    in.d[0] = b.impl_.make(false, 0);
    in.d[1] = b.impl_.make(false, 0);  // K unknown at build: accepted, Y's last dim is N
    DimsExprs out{};
    check(pl.build->getOutputShapes(&in, 1, nullptr, 0, &out, 1, b) == 0 && out.d[1]->getConstantValue() == c.N, n,
          "output shape with symbolic last dim");
    in.d[1] = b.constant(c.K + 1);
    g_logger.errors.clear();
    std::string got;
    check(pl.build->getOutputShapes(&in, 1, nullptr, 0, &out, 1, b) != 0 && logged_error_containing("K=", &got), n,
          "output shape refused for last dim K+1", got);
    in.nbDims = 0;
    check(pl.build->getOutputShapes(&in, 1, nullptr, 0, &out, 1, b) != 0, n, "output shape refused for rank 0");
    in.nbDims = 2;
    in.d[1] = b.constant(c.K);
    DimsExprs shape_in{};
    check(pl.build->getOutputShapes(&in, 1, &shape_in, 1, &out, 1, b) != 0, n, "output shape refused with a shape input");
  }

  // formats: fp32/fp16 linear for X, Y of X's type
  auto supports = [&](DynamicPluginTensorDesc x, DynamicPluginTensorDesc y, int pos) {
    DynamicPluginTensorDesc io[2] = {x, y};
    return pl.build->supportsFormatCombination(pos, io, 1, 1);
  };
  const std::vector<int64_t> xd = {-1, c.K}, yd = {-1, c.N};
  check(supports(dyn(DataType::kFLOAT, xd), dyn(DataType::kFLOAT, yd), 0), n, "X fp32 linear supported");
  check(supports(dyn(DataType::kHALF, xd), dyn(DataType::kHALF, yd), 0), n, "X fp16 linear supported");
  check(supports(dyn(DataType::kFLOAT, xd), dyn(DataType::kFLOAT, yd), 1), n, "Y fp32 after X fp32 supported");
  check(supports(dyn(DataType::kHALF, xd), dyn(DataType::kHALF, yd), 1), n, "Y fp16 after X fp16 supported");
  for (DataType t : {DataType::kINT8, DataType::kINT32, DataType::kBF16, DataType::kFP8, DataType::kBOOL})
    check(!supports(dyn(t, xd), dyn(t, yd), 0), n, "X type " + std::to_string(static_cast<int>(t)) + " rejected");
  check(!supports(dyn(DataType::kHALF, xd, TensorFormat::kHWC8), dyn(DataType::kHALF, yd), 0), n, "X kHWC8 rejected");
  check(!supports(dyn(DataType::kFLOAT, xd, TensorFormat::kCHW32), dyn(DataType::kFLOAT, yd), 0), n, "X kCHW32 rejected");
  check(!supports(dyn(DataType::kFLOAT, xd), dyn(DataType::kHALF, yd), 1), n, "Y fp16 after X fp32 rejected");
  check(!supports(dyn(DataType::kHALF, xd), dyn(DataType::kFLOAT, yd), 1), n, "Y fp32 after X fp16 rejected");
  check(!supports(dyn(DataType::kFLOAT, xd), dyn(DataType::kFLOAT, yd), 2), n, "position 2 rejected");

  // configure and workspace
  {
    DynamicPluginTensorDesc x = dyn(DataType::kFLOAT, xd), y = dyn(DataType::kFLOAT, yd);
    x.min.d[0] = 1;
    x.max.d[0] = c.ws_rows > 0 ? c.ws_rows : 64;
    x.opt.d[0] = 8;
    check(pl.build->configurePlugin(&x, 1, &y, 1) == 0, n, "configurePlugin accepts [-1, K]");
    if (c.ws_bytes >= 0) {
      const std::size_t ws = pl.build->getWorkspaceSize(&x, 1, &y, 1);
      check(ws == static_cast<std::size_t>(c.ws_bytes), n, "workspace for " + std::to_string(x.max.d[0]) + " rows",
            "got " + std::to_string(ws) + ", want " + std::to_string(c.ws_bytes));
    }
    DynamicPluginTensorDesc bad = dyn(DataType::kFLOAT, {-1, c.K + 1});
    g_logger.errors.clear();
    check(pl.build->configurePlugin(&bad, 1, &y, 1) != 0 && !g_logger.errors.empty(), n, "configurePlugin refuses [-1, K+1]");
    check(pl.build->configurePlugin(&x, 1, &y, 0) != 0, n, "configurePlugin refuses 0 outputs");
  }

  // runtime shape checks that come before any device work
  {
    g_logger.errors.clear();
    PluginTensorDesc x = desc(DataType::kFLOAT, {3, c.K + 1}), y = desc(DataType::kFLOAT, {3, c.N});
    std::string got;
    check(pl.runtime->onShapeChange(&x, 1, &y, 1) != 0 && logged_error_containing("X last dim must be K=", &got), n,
          "onShapeChange refuses X [3, K+1]", got);
    x = desc(DataType::kFLOAT, {3, c.K});
    y = desc(DataType::kFLOAT, {3, c.N + 1});
    check(pl.runtime->onShapeChange(&x, 1, &y, 1) != 0 && logged_error_containing("Y shape must be", &got), n,
          "onShapeChange refuses Y [3, N+1]", got);
    y = desc(DataType::kHALF, {3, c.N});
    check(pl.runtime->onShapeChange(&x, 1, &y, 1) != 0 && logged_error_containing("Y must have X's type", &got), n,
          "onShapeChange refuses Y of another type", got);
    y = desc(DataType::kFLOAT, {3, c.N});
    const int dummy = 0;
    const void* ins[1] = {&dummy};
    void* outs[1] = {nullptr};
    x = desc(DataType::kFLOAT, {3, c.K + 1});
    check(pl.runtime->enqueue(&x, &y, ins, outs, nullptr, nullptr) != 0, n, "enqueue refuses X [3, K+1] before any launch");
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      // a well-formed shape reaches the weight upload, which must fail cleanly without a device
      Plugin other(pl.p->clone());
      x = desc(DataType::kFLOAT, {3, c.K});
      g_logger.errors.clear();
      check(other.runtime->onShapeChange(&x, 1, &y, 1) != 0 && logged_error_containing("CUDA", &got), n,
            "onShapeChange without a CUDA device fails with an error", got);
      g_logger.errors.clear();
      int never_written = 0;  // not device memory: the upload fails before anything is launched
      void* outs2[1] = {&never_written};
      check(other.runtime->enqueue(&x, &y, ins, outs2, nullptr, nullptr) != 0 && logged_error_containing("CUDA", &got),
            n, "enqueue without a CUDA device fails with an error", got);
    }
  }
}

void check_serialization(const Case& c, Plugin& pl) {
  const std::string n = c.name;
  std::string err;
  const std::vector<OwnedField> ser = copy_fields(pl.runtime->getFieldsToSerialize(), &err);
  check(err.empty() && !ser.empty(), n, "getFieldsToSerialize", err);
  std::string why;
  check(carries_inputs(c.fields, ser, &why), n, "serialized fields carry every given field", why);

  const std::vector<PluginField> v = view(ser);
  Plugin back(create(c, v, TensorRTPhase::kRUNTIME));
  check(back.p != nullptr, n, "deserialize (createPlugin at kRUNTIME from the serialized fields)");
  if (back.p) {
    const std::vector<OwnedField> again = copy_fields(back.runtime->getFieldsToSerialize(), &err);
    check(same_fields(ser, again, &why), n, "serialize -> deserialize -> identical fields", why);
  }

  Plugin cl(pl.p->clone());
  check(cl.p != nullptr && cl.p != pl.p, n, "clone");
  if (cl.p) {
    const std::vector<OwnedField> cf = copy_fields(cl.runtime->getFieldsToSerialize(), &err);
    check(same_fields(ser, cf, &why), n, "clone has identical fields", why);
  }

  ResourceContext ctx;
  Plugin at(pl.runtime->attachToContext(&ctx));
  check(at.p != nullptr && at.p != pl.p, n, "attachToContext");
  if (at.p) {
    const std::vector<OwnedField> af = copy_fields(at.runtime->getFieldsToSerialize(), &err);
    check(same_fields(ser, af, &why), n, "attached clone has identical fields", why);
    PluginTensorDesc x = desc(DataType::kFLOAT, {2, c.K + 3}), y = desc(DataType::kFLOAT, {2, c.N});
    const int rc = at.runtime->onShapeChange(&x, 1, &y, 1);
    check(rc != 0 && ctx.recorder.getNbErrors() == 1 && ctx.recorder.codes[0] == ErrorCode::kINVALID_ARGUMENT, n,
          "attached clone reports errors to the context's error recorder");
  }
  // clones outlive the original: delete it first, the clone must still work
  Plugin* orphan = new Plugin(pl.p->clone());
  { Plugin other(create(c, view(c.fields))); }  // an unrelated plugin created and destroyed meanwhile
  const std::vector<OwnedField> of = copy_fields(orphan->runtime->getFieldsToSerialize(), &err);
  check(same_fields(ser, of, &why), n, "a clone keeps its fields while others are destroyed", why);
  delete orphan;
}

// Generic malformed variants of a good case's fields; each must be refused with a logged error.
void check_malformed(const Case& c) {
  const std::string n = c.name;
  auto refused = [&](const std::string& what, std::vector<PluginField> fields, int32_t nb = -2) {
    g_logger.errors.clear();
    PluginFieldCollection fc{nb == -2 ? static_cast<int32_t>(fields.size()) : nb, fields.empty() ? nullptr : fields.data()};
    IPluginV3* p = g_creators.at(c.plugin)->createPlugin("bad", &fc, TensorRTPhase::kBUILD);
    const bool ok = p == nullptr && !g_logger.errors.empty();
    delete p;
    check(ok, n, "refuses " + what, p ? "a plugin was created" : "no error was logged");
  };
  const std::vector<PluginField> good = view(c.fields);
  // pad every buffer so that a "longer" field does not make the plugin read past what we own
  std::vector<std::vector<uint8_t>> padded;
  for (const OwnedField& f : c.fields) {
    padded.push_back(f.bytes);
    padded.back().resize(f.bytes.size() + 64, 0);
  }
  for (const std::string& r : c.required) {
    std::vector<PluginField> v;
    for (const PluginField& f : good)
      if (r != f.name) v.push_back(f);
    refused("missing " + r, v);
  }
  for (std::size_t i = 0; i < good.size(); ++i) {
    const std::string fname = good[i].name;
    std::vector<PluginField> v = good;
    v[i].type = PluginFieldType::kFLOAT64;
    refused(fname + " as kFLOAT64", v);
    v = good;
    v[i].type = PluginFieldType::kUNKNOWN;
    refused(fname + " as kUNKNOWN", v);
    v = good;
    v[i].length = -1;
    refused(fname + " with length -1", v);
    if (good[i].length > 0) {
      v = good;
      v[i].data = nullptr;
      refused(fname + " without data", v);
    }
    v = good;
    v[i].data = padded[i].data();
    if (good[i].type == PluginFieldType::kCHAR) {
      v[i].length = 0;  // an empty string is no valid value of any string field
      refused(fname + " empty", v);
    } else {
      if (good[i].length > 0) {
        v[i].length = good[i].length - 1;
        refused(fname + " one element short", v);
      }
      v[i].length = good[i].length + 1;
      refused(fname + " one element long", v);
    }
  }
  std::vector<PluginField> v = good;
  v.push_back(good[0]);
  refused("a repeated field", v);
  v = good;
  v.emplace_back("no_such_field", good[0].data, good[0].type, good[0].length);
  refused("an unknown field", v);
  v = good;
  v[0].name = nullptr;
  refused("an unnamed field", v);
  refused("a negative field count", good, -1);
  refused("fields missing from a non-empty collection", {}, 3);
  g_logger.errors.clear();
  IPluginV3* p = g_creators.at(c.plugin)->createPlugin("bad", nullptr, TensorRTPhase::kBUILD);
  check(p == nullptr && !g_logger.errors.empty(), n, "refuses a null field collection");
  delete p;
}

// ---- enqueue (needs a CUDA device) ------------------------------------------------------------------------
// Runs rows [0, rows) of the case's X through enqueue in `type` and compares with the reference.
void run_enqueue(const Case& c, Plugin& pl, DataType type, int64_t rows) {
  const std::string what = std::string("enqueue ") + (type == DataType::kHALF ? "fp16" : "fp32") + " M=" + std::to_string(rows);
  const Matrix& ref = type == DataType::kHALF ? c.y16 : c.y;
  const std::size_t es = type == DataType::kHALF ? 2 : 4;
  std::vector<uint8_t> hx(static_cast<std::size_t>(rows * c.K) * es), hy(static_cast<std::size_t>(rows * c.N) * es);
  for (int64_t i = 0; i < rows * c.K; ++i) {
    if (type == DataType::kHALF) {
      const uint16_t h = qcompile::float_to_half(c.x.v[i]);
      std::memcpy(&hx[2 * i], &h, 2);
    } else {
      std::memcpy(&hx[4 * i], &c.x.v[i], 4);
    }
  }
  DynamicPluginTensorDesc dx = dyn(type, {rows, c.K}), dy = dyn(type, {rows, c.N});
  const std::size_t ws = pl.build->getWorkspaceSize(&dx, 1, &dy, 1);
  void *x = nullptr, *y = nullptr, *w = nullptr;
  cudaStream_t s = nullptr;
  bool ok = cudaMalloc(&x, hx.size()) == cudaSuccess && cudaMalloc(&y, hy.size()) == cudaSuccess &&
            (ws == 0 || cudaMalloc(&w, ws) == cudaSuccess) && cudaStreamCreate(&s) == cudaSuccess &&
            cudaMemcpy(x, hx.data(), hx.size(), cudaMemcpyHostToDevice) == cudaSuccess;
  if (!ok) {
    fail(c.name, what, "CUDA setup failed");
  } else {
    g_logger.errors.clear();
    const int rc1 = pl.runtime->onShapeChange(&dx.desc, 1, &dy.desc, 1);
    const void* ins[1] = {x};
    void* outs[1] = {y};
    const int rc2 = rc1 ? rc1 : pl.runtime->enqueue(&dx.desc, &dy.desc, ins, outs, w, s);
    const bool synced = cudaStreamSynchronize(s) == cudaSuccess &&
                        cudaMemcpy(hy.data(), y, hy.size(), cudaMemcpyDeviceToHost) == cudaSuccess;
    if (rc1 || rc2 || !synced) {
      fail(c.name, what, g_logger.errors.empty() ? "CUDA error" : g_logger.errors.back());
    } else {
      double max_ref = 0, max_err = 0;
      for (int64_t i = 0; i < rows * c.N; ++i) {
        float got;
        if (type == DataType::kHALF) {
          uint16_t h;
          std::memcpy(&h, &hy[2 * i], 2);
          got = qcompile::half_to_float(h);
        } else {
          std::memcpy(&got, &hy[4 * i], 4);
        }
        max_ref = std::fmax(max_ref, std::fabs(ref.v[i]));
        max_err = std::fmax(max_err, std::fabs(static_cast<double>(got) - ref.v[i]));
        if (!std::isfinite(got)) max_err = INFINITY;
      }
      // fp32 accumulation vs the float64 reference; fp16 adds the output rounding (X was rounded to fp16
      // before the reference was computed)
      const double tol = (type == DataType::kHALF ? 4e-3 : 1e-4) * max_ref + 1e-5;
      std::ostringstream why;
      why << "max |err| " << max_err << " > " << tol << " (max |ref| " << max_ref << ")";
      check(max_err <= tol, c.name, what, why.str());
    }
  }
  if (x) cudaFree(x);
  if (y) cudaFree(y);
  if (w) cudaFree(w);
  if (s) cudaStreamDestroy(s);
}

void check_enqueue(const Case& c, Plugin& pl) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    skip(c.name, "enqueue vs numpy reference", "no CUDA device");
    return;
  }
  if (c.x.rows == 0 || c.y.rows != c.x.rows || c.y16.rows != c.x.rows) {
    fail(c.name, "enqueue", "case has no X / Y");
    return;
  }
  for (DataType t : {DataType::kFLOAT, DataType::kHALF}) {
    run_enqueue(c, pl, t, 1);         // the GEMV path
    run_enqueue(c, pl, t, c.x.rows);  // the tiled path (more than 8 rows)
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s LIBRARY CASES [--enqueue]\n", argv[0]);
    return 2;
  }
  const bool enqueue = argc > 3 && std::strcmp(argv[3], "--enqueue") == 0;
  std::vector<Case> cases;
  std::string err;
  if (!read_cases(argv[2], &cases, &err)) {
    std::fprintf(stderr, "cannot read cases: %s\n", err.c_str());
    return 2;
  }
  if (load_library(argv[1])) {
    for (const Case& c : cases) {
      if (!g_creators.count(c.plugin)) {
        fail(c.name, "creator", "no creator named " + c.plugin);
        continue;
      }
      if (!c.expect_error.empty()) {  // a malformed case from the test: refused, and the message says why
        g_logger.errors.clear();
        Plugin p(create(c, view(c.fields)));
        std::string got;
        check(p.p == nullptr && logged_error_containing(c.expect_error, &got), c.name,
              "refused with \"" + c.expect_error + "\"", p.p ? "a plugin was created" : "logged: " + got);
        continue;
      }
      // the creator advertises every field the case uses
      PluginFieldCollection const* names = g_creators.at(c.plugin)->getFieldNames();
      for (const OwnedField& f : c.fields) {
        bool found = false;
        for (int32_t i = 0; names && i < names->nbFields; ++i) found = found || f.name == names->fields[i].name;
        check(found, c.name, "getFieldNames lists " + f.name);
      }
      g_logger.errors.clear();
      Plugin pl(create(c, view(c.fields)));
      check(pl.p != nullptr && g_logger.errors.empty(), c.name, "createPlugin from the node's fields",
            g_logger.errors.empty() ? "null plugin" : g_logger.errors.back());
      if (!pl.p) continue;
      check_build_interface(c, pl);
      check_serialization(c, pl);
      check_malformed(c);
      if (enqueue) check_enqueue(c, pl);
    }
  }
  std::printf("harness: %d passed, %d failed, %d skipped\n", g_pass, g_fail, g_skip);
  return g_fail ? 1 : 0;
}
