// Shared plumbing of the TensorRT plugins: error reporting, field checking and copying, the device copy
// of the weights, I/O shape checks and the creator registry (see trt_plugin.h).
#include "trt/trt_plugin.h"

#include <atomic>
#include <cstdio>
#include <sstream>

namespace qcompile {
namespace trt {

// ---- errors -------------------------------------------------------------------------------------------
namespace {
std::atomic<nvinfer1::ILoggerFinder*> g_logger_finder{nullptr};
}  // namespace

void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept { g_logger_finder.store(finder); }

void report_error(const std::string& msg, nvinfer1::IErrorRecorder* recorder, nvinfer1::ErrorCode code) noexcept {
  // findLogger must be called on the thread of the plugin call that failed, which this is.
  nvinfer1::ILoggerFinder* finder = g_logger_finder.load();
  nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
  if (logger) {
    logger->log(nvinfer1::ILogger::Severity::kERROR, msg.c_str());
  } else {
    std::fprintf(stderr, "[qcompile TensorRT plugins] error: %s\n", msg.c_str());
  }
  if (recorder) recorder->reportError(code, msg.c_str());
}

// ---- fields -------------------------------------------------------------------------------------------
std::size_t field_type_size(PluginFieldType t) {
  switch (t) {
    case PluginFieldType::kFLOAT16:
    case PluginFieldType::kINT16:
    case PluginFieldType::kBF16:
      return 2;
    case PluginFieldType::kFLOAT32:
    case PluginFieldType::kINT32:
      return 4;
    case PluginFieldType::kFLOAT64:
    case PluginFieldType::kINT64:
      return 8;
    case PluginFieldType::kINT8:
    case PluginFieldType::kCHAR:
    case PluginFieldType::kFP8:
      return 1;
    default:
      return 0;  // kDIMS, kUNKNOWN, kINT4, kFP4: no qcompile field has these types
  }
}

const char* field_type_name(PluginFieldType t) {
  switch (t) {
    case PluginFieldType::kFLOAT16: return "kFLOAT16";
    case PluginFieldType::kFLOAT32: return "kFLOAT32";
    case PluginFieldType::kFLOAT64: return "kFLOAT64";
    case PluginFieldType::kINT8: return "kINT8";
    case PluginFieldType::kINT16: return "kINT16";
    case PluginFieldType::kINT32: return "kINT32";
    case PluginFieldType::kCHAR: return "kCHAR";
    case PluginFieldType::kDIMS: return "kDIMS";
    case PluginFieldType::kUNKNOWN: return "kUNKNOWN";
    case PluginFieldType::kBF16: return "kBF16";
    case PluginFieldType::kINT64: return "kINT64";
    case PluginFieldType::kFP8: return "kFP8";
    case PluginFieldType::kINT4: return "kINT4";
    case PluginFieldType::kFP4: return "kFP4";
  }
  return "(invalid type)";
}

void FieldSet::add_int(const char* name, int64_t v) {
  Field f;
  f.name = name;
  f.type = PluginFieldType::kINT64;
  f.count = 1;
  f.bytes.resize(sizeof v);
  std::memcpy(f.bytes.data(), &v, sizeof v);
  fields_.push_back(std::move(f));
}

void FieldSet::add_string(const char* name, const std::string& s) {
  Field f;
  f.name = name;
  f.type = PluginFieldType::kCHAR;
  f.bytes.assign(s.begin(), s.end());
  f.bytes.push_back(0);
  f.count = static_cast<int64_t>(f.bytes.size());
  fields_.push_back(std::move(f));
}

const Field* FieldSet::add(Field f) {
  fields_.push_back(std::move(f));
  return &fields_.back();
}

const Field* FieldSet::find(const std::string& name) const {
  for (const Field& f : fields_)
    if (f.name == name) return &f;
  return nullptr;
}

void FieldSet::finish() {
  view_.clear();
  for (const Field& f : fields_)
    view_.emplace_back(f.name.c_str(), f.bytes.empty() ? nullptr : f.bytes.data(), f.type, static_cast<int32_t>(f.count));
  fc_.nbFields = static_cast<int32_t>(view_.size());
  fc_.fields = view_.data();
}

Status FieldReader::open(const char* op, const nvinfer1::PluginFieldCollection* fc, const std::vector<FieldSpec>& known,
                         FieldReader* out) {
  out->op_ = op;
  out->fc_ = fc;
  if (!fc) return out->error("no field collection");
  if (fc->nbFields < 0) return out->error("negative field count " + std::to_string(fc->nbFields));
  if (fc->nbFields > 0 && !fc->fields) return out->error("field collection without fields");
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    const char* name = fc->fields[i].name;
    if (!name) return out->error("field " + std::to_string(i) + " has no name");
    bool ok = false;
    for (const FieldSpec& s : known) ok = ok || std::strcmp(s.name, name) == 0;
    if (!ok) {
      std::string names;
      for (const FieldSpec& s : known) names += std::string(names.empty() ? "" : ", ") + s.name;
      return out->error(std::string("unknown field '") + name + "' (accepted: " + names + ")");
    }
    for (int32_t j = 0; j < i; ++j)
      if (std::strcmp(fc->fields[j].name, name) == 0) return out->error(std::string("field ") + name + " appears twice");
  }
  return Status::OK();
}

const nvinfer1::PluginField* FieldReader::find(const char* name) const {
  for (int32_t i = 0; i < fc_->nbFields; ++i)
    if (std::strcmp(fc_->fields[i].name, name) == 0) return &fc_->fields[i];
  return nullptr;
}

Status FieldReader::check_data(const nvinfer1::PluginField& f) const {
  if (f.length < 0) return error(std::string("field ") + f.name + " has a negative length " + std::to_string(f.length));
  if (f.length > 0 && !f.data) return error(std::string("field ") + f.name + " has length " + std::to_string(f.length) + " but no data");
  return Status::OK();
}

Status FieldReader::get_int(const char* name, int64_t* out) const {
  const nvinfer1::PluginField* f = find(name);
  if (!f) return error(std::string("required field ") + name + " is missing");
  return get_int_or(name, 0, out);
}

Status FieldReader::get_int_or(const char* name, int64_t dflt, int64_t* out) const {
  const nvinfer1::PluginField* f = find(name);
  if (!f) {
    *out = dflt;
    return Status::OK();
  }
  if (f->type != PluginFieldType::kINT32 && f->type != PluginFieldType::kINT64)
    return error(std::string("field ") + name + " must be kINT32 or kINT64, got " + field_type_name(f->type));
  QCOMPILE_RETURN_IF_ERROR(check_data(*f));
  if (f->length != 1)
    return error(std::string("field ") + name + " must hold exactly 1 value, got " + std::to_string(f->length));
  if (f->type == PluginFieldType::kINT32) {
    int32_t v;
    std::memcpy(&v, f->data, sizeof v);  // memcpy: the data need not be aligned
    *out = v;
  } else {
    std::memcpy(out, f->data, sizeof *out);
  }
  return Status::OK();
}

Status FieldReader::get_int32(const char* name, int* out) const {
  if (!find(name)) return error(std::string("required field ") + name + " is missing");
  return get_int32_or(name, 0, out);
}

Status FieldReader::get_int32_or(const char* name, int dflt, int* out) const {
  int64_t v = 0;
  QCOMPILE_RETURN_IF_ERROR(get_int_or(name, dflt, &v));
  if (v < INT32_MIN || v > INT32_MAX) return error(std::string("field ") + name + " = " + std::to_string(v) + " is outside int32");
  *out = static_cast<int>(v);
  return Status::OK();
}

Status FieldReader::get_string(const char* name, std::string* out) const {
  const nvinfer1::PluginField* f = find(name);
  if (!f) return error(std::string("required field ") + name + " is missing");
  if (f->type != PluginFieldType::kCHAR)
    return error(std::string("field ") + name + " must be kCHAR, got " + field_type_name(f->type));
  QCOMPILE_RETURN_IF_ERROR(check_data(*f));
  const char* s = static_cast<const char*>(f->data);
  std::size_t n = 0;
  while (n < static_cast<std::size_t>(f->length) && s[n] != '\0') ++n;  // the ONNX parser appends a NUL
  out->assign(s, n);
  return Status::OK();
}

Status FieldReader::get_tensor(const char* name, std::initializer_list<PluginFieldType> types, bool required,
                               FieldSet* into, const Field** out) const {
  *out = nullptr;
  const nvinfer1::PluginField* f = find(name);
  if (!f) {
    if (required) return error(std::string("required field ") + name + " is missing");
    return Status::OK();
  }
  bool ok = false;
  std::string names;
  for (PluginFieldType t : types) {
    ok = ok || f->type == t;
    names += std::string(names.empty() ? "" : " or ") + field_type_name(t);
  }
  if (!ok) return error(std::string("field ") + name + " must be " + names + ", got " + field_type_name(f->type));
  QCOMPILE_RETURN_IF_ERROR(check_data(*f));
  Field copy;
  copy.name = name;
  copy.type = f->type;
  copy.count = f->length;
  const std::size_t bytes = static_cast<std::size_t>(f->length) * field_type_size(f->type);
  if (bytes) copy.bytes.assign(static_cast<const uint8_t*>(f->data), static_cast<const uint8_t*>(f->data) + bytes);
  *out = into->add(std::move(copy));
  return Status::OK();
}

std::vector<int64_t> field_shape(const Field& f, const std::vector<int64_t>& want) {
  int64_t n = 1;
  for (int64_t d : want) {
    if (d < 0 || (d != 0 && n > INT64_MAX / d)) return {f.count};  // no count can match
    n *= d;
  }
  if (n == f.count) return want;
  return {f.count};
}

Bias make_bias(const Field* f) {
  Bias b;
  if (!f) return b;
  b.f32.resize(static_cast<std::size_t>(f->count));
  b.f16.resize(static_cast<std::size_t>(f->count));
  for (int64_t i = 0; i < f->count; ++i) {
    float v;
    if (f->type == PluginFieldType::kFLOAT16) {
      uint16_t h;
      std::memcpy(&h, f->bytes.data() + 2 * i, 2);
      v = half_to_float(h);
    } else {
      std::memcpy(&v, f->bytes.data() + 4 * i, 4);
    }
    b.f32[i] = v;
    b.f16[i] = float_to_half(v);
  }
  return b;
}

// ---- device copy ----------------------------------------------------------------------------------------
namespace {
constexpr std::size_t kAlign = 256;  // as cudaMalloc: keeps every tensor aligned for vector loads
std::size_t aligned(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
Status cuda_error(const char* op, const char* what, cudaError_t e) {
  return Status::Error(std::string(op) + " (TensorRT plugin): " + what + ": " + cudaGetErrorString(e));
}
}  // namespace

DeviceCopy::~DeviceCopy() {
  if (base_) cudaFree(base_);  // errors ignored: at process exit the context may already be gone
}

Status DeviceCopy::ensure(const char* op, const std::vector<Blob>& blobs, std::vector<void*>* ptrs) {
  std::lock_guard<std::mutex> lock(mu_);
  int device = -1;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return cuda_error(op, "no usable CUDA device", e);
  if (base_) {
    if (device != device_)
      return Status::Error(std::string(op) + " (TensorRT plugin): weights were uploaded to CUDA device " +
                           std::to_string(device_) + ", now called on device " + std::to_string(device));
    *ptrs = ptrs_;
    return Status::OK();
  }
  std::size_t total = 0;
  for (const Blob& b : blobs) total += aligned(b.bytes);
  void* base = nullptr;
  e = cudaMalloc(&base, total ? total : kAlign);
  if (e != cudaSuccess) return cuda_error(op, "allocating the weights on the device", e);
  std::vector<void*> out;
  std::size_t off = 0;
  for (const Blob& b : blobs) {
    void* dst = static_cast<uint8_t*>(base) + off;
    if (b.bytes) e = cudaMemcpy(dst, b.data, b.bytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
      cudaFree(base);
      return cuda_error(op, "copying the weights to the device", e);
    }
    out.push_back(dst);
    off += aligned(b.bytes);
  }
  base_ = base;
  device_ = device;
  ptrs_ = out;
  *ptrs = std::move(out);
  return Status::OK();
}

// ---- shapes ------------------------------------------------------------------------------------------
bool is_activation_type(nvinfer1::DataType t) { return t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF; }

Status check_io(const char* op, int64_t K, int64_t N, const nvinfer1::PluginTensorDesc& x,
                const nvinfer1::PluginTensorDesc* y, int64_t* rows) {
  const std::string who = op;
  if (!is_activation_type(x.type)) return Status::Error(who + ": X must be float32 or float16");
  if (x.format != nvinfer1::TensorFormat::kLINEAR) return Status::Error(who + ": X must be in linear format");
  if (x.dims.nbDims < 1 || x.dims.nbDims > nvinfer1::Dims::MAX_DIMS)
    return Status::Error(who + ": X must have 1 to 8 dims, got " + std::to_string(x.dims.nbDims));
  std::vector<int64_t> xs(x.dims.d, x.dims.d + x.dims.nbDims);
  QCOMPILE_RETURN_IF_ERROR(activation_rows(op, xs, K, rows));
  if (y) {
    if (y->type != x.type) return Status::Error(who + ": Y must have X's type");
    if (y->format != nvinfer1::TensorFormat::kLINEAR) return Status::Error(who + ": Y must be in linear format");
    std::vector<int64_t> want = xs;
    want.back() = N;
    std::vector<int64_t> ys(y->dims.d, y->dims.d + (y->dims.nbDims > 0 && y->dims.nbDims <= nvinfer1::Dims::MAX_DIMS ? y->dims.nbDims : 0));
    if (ys != want) return Status::Error(who + ": Y shape must be " + shape_str(want) + ", got " + shape_str(ys));
  }
  return Status::OK();
}

// ---- registry ------------------------------------------------------------------------------------------
namespace {
std::vector<nvinfer1::IPluginCreatorInterface*>& creators() {
  static std::vector<nvinfer1::IPluginCreatorInterface*> v;  // function-local: safe from static-init order
  return v;
}
}  // namespace

CreatorRegistrar::CreatorRegistrar(nvinfer1::IPluginCreatorV3One* creator) { creators().push_back(creator); }

const std::vector<nvinfer1::IPluginCreatorInterface*>& registered_creators() { return creators(); }

}  // namespace trt
}  // namespace qcompile
