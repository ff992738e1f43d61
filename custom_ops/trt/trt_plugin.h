// Shared plumbing for the TensorRT plugins in this folder (one IPluginV3 per qcompile op, over the CUDA
// kernels of kernels/cuda):
//  * fields: every PluginField is checked for name, type, length and data before a byte is read, then
//    copied into a FieldSet, the plugin's canonical (and serialized) form;
//  * one device copy of the weights, made on first use and shared by a plugin's clones (TensorRT clones a
//    plugin per execution context; the weights are immutable);
//  * errors: a failed Status is logged through TensorRT's logger (and the execution context's error
//    recorder when there is one) and turned into a null plugin or a non-zero return code;
//  * Plugin<Op> / Creator<Op>: IPluginV3 with its core, build and runtime capabilities for any op of the
//    form Y[..., N] = f(X[..., K]) with X float32 or float16, described by an Op traits struct (see
//    fp4_plugin.cpp for the shape of one).
// Nothing here throws into TensorRT: every interface method is noexcept and catches what it calls.
#pragma once

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "qcompile/dtype.h"
#include "qcompile/half.h"
#include "qcompile/shape_check.h"
#include "qcompile/status.h"

namespace qcompile {
namespace trt {

using nvinfer1::PluginFieldType;

inline constexpr const char* kPluginNamespace = "qcompile";
inline constexpr const char* kPluginVersion = "1";

// ---- errors -------------------------------------------------------------------------------------------
// Remembers the logger finder TensorRT hands the library when it loads it (setLoggerFinder).
void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept;
// Logs `msg` as an error through TensorRT's logger (stderr when TensorRT gave none) and, when given,
// records it in the execution context's error recorder.
void report_error(const std::string& msg, nvinfer1::IErrorRecorder* recorder = nullptr,
                  nvinfer1::ErrorCode code = nvinfer1::ErrorCode::kINVALID_ARGUMENT) noexcept;

// ---- fields -------------------------------------------------------------------------------------------
// Bytes per element of a field type; 0 for the types no qcompile field uses.
std::size_t field_type_size(PluginFieldType t);
const char* field_type_name(PluginFieldType t);

// One owned field: what a PluginField points at, copied.
struct Field {
  std::string name;
  PluginFieldType type = PluginFieldType::kUNKNOWN;
  int64_t count = 0;  // elements
  std::vector<uint8_t> bytes;
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(bytes.data());
  }
};

// The fields of one plugin in a fixed order: ints as kINT64 (lossless), strings as kCHAR with a trailing
// NUL (as the ONNX parser passes them), tensors in the type they came in. Built once, then shared
// read-only by the plugin and its clones; collection() points into it.
class FieldSet {
 public:
  FieldSet() = default;
  FieldSet(const FieldSet&) = delete;
  FieldSet& operator=(const FieldSet&) = delete;

  void add_int(const char* name, int64_t v);
  void add_string(const char* name, const std::string& s);
  const Field* add(Field f);  // a tensor field, already checked
  const Field* find(const std::string& name) const;
  // Call once after the last add: builds the PluginFieldCollection getFieldsToSerialize returns.
  void finish();
  const nvinfer1::PluginFieldCollection* collection() const { return &fc_; }

 private:
  std::deque<Field> fields_;  // a deque: adding never moves the fields the collection points at
  std::vector<nvinfer1::PluginField> view_;
  nvinfer1::PluginFieldCollection fc_{};
};

// How a field appears in the creator's getFieldNames.
struct FieldSpec {
  const char* name;
  PluginFieldType type;
};

// Checked access to a PluginFieldCollection. open() rejects a malformed collection (null arrays, unnamed,
// repeated or unknown fields); each getter checks type, length and data of one field.
class FieldReader {
 public:
  static Status open(const char* op, const nvinfer1::PluginFieldCollection* fc, const std::vector<FieldSpec>& known,
                     FieldReader* out);
  // A scalar integer (kINT32 or kINT64, exactly one element).
  Status get_int(const char* name, int64_t* out) const;
  Status get_int_or(const char* name, int64_t dflt, int64_t* out) const;
  // Same, for attributes the kernels keep as `int`: values outside int32 are an error, not truncated.
  Status get_int32(const char* name, int* out) const;
  Status get_int32_or(const char* name, int dflt, int* out) const;
  // A kCHAR string (up to its first NUL).
  Status get_string(const char* name, std::string* out) const;
  // A tensor of one of `types` (its element count is checked by the op's shape validator). An absent
  // optional field leaves *out null; a present one is copied into `into`.
  Status get_tensor(const char* name, std::initializer_list<PluginFieldType> types, bool required, FieldSet* into,
                    const Field** out) const;

 private:
  Status error(const std::string& msg) const { return Status::Error(op_ + ": " + msg); }
  const nvinfer1::PluginField* find(const char* name) const;
  Status check_data(const nvinfer1::PluginField& f) const;
  std::string op_;
  const nvinfer1::PluginFieldCollection* fc_ = nullptr;
};

// The shape a validator should see for a tensor field: `want` when the element count matches it, else
// the field as 1-D (so the validator's message names the expected shape and the count that came).
std::vector<int64_t> field_shape(const Field& f, const std::vector<int64_t>& want);

// Bias as both activation types (the plugin's activation type is only fixed at build time).
struct Bias {
  std::vector<float> f32;
  std::vector<uint16_t> f16;
  bool present() const { return !f32.empty(); }
};
Bias make_bias(const Field* f);  // kFLOAT32 or kFLOAT16 field, or null

// ---- device copy ----------------------------------------------------------------------------------------
struct Blob {
  const void* data;
  std::size_t bytes;
};

// The weights in device memory: one allocation, uploaded on first use (synchronously, outside enqueue
// where possible: TensorRT calls onShapeChange before the first enqueue), freed with the last plugin.
class DeviceCopy {
 public:
  DeviceCopy() = default;
  DeviceCopy(const DeviceCopy&) = delete;
  DeviceCopy& operator=(const DeviceCopy&) = delete;
  ~DeviceCopy();
  // Device pointers of `blobs` (in order), uploading them on the first call. Fails (never crashes)
  // without a CUDA device, or when called on another device than the first upload.
  Status ensure(const char* op, const std::vector<Blob>& blobs, std::vector<void*>* ptrs);

 private:
  std::mutex mu_;
  int device_ = -1;
  void* base_ = nullptr;
  std::vector<void*> ptrs_;
};

// ---- shapes ------------------------------------------------------------------------------------------
// X: [..., K] of float32/float16 in linear format; Y: X's shape with the last dim replaced by N, same
// type. On success *rows = product of X's leading dims.
Status check_io(const char* op, int64_t K, int64_t N, const nvinfer1::PluginTensorDesc& x,
                const nvinfer1::PluginTensorDesc* y, int64_t* rows);
bool is_activation_type(nvinfer1::DataType t);
inline DType to_dtype(nvinfer1::DataType t) { return t == nvinfer1::DataType::kHALF ? DType::kFloat16 : DType::kFloat32; }

// ---- plugin --------------------------------------------------------------------------------------------
// An Op traits struct provides:
//   static constexpr const char* kName;                       the ONNX op type and plugin name
//   static const std::vector<FieldSpec>& field_specs();       every field it accepts
//   struct Config { int64_t K, N; ... };                      parsed, validated fields
//   static Status parse(const FieldReader&, FieldSet*, Config*);   reads + validates every field
//   static std::vector<Blob> blobs(const Config&);            host data to keep on the device
//   static int64_t workspace_bytes(const Config&, int64_t rows);
//   static Status run(const Config&, const std::vector<void*>& device, DType, int64_t rows, const void* x,
//                     void* y, void* workspace, cudaStream_t);
template <class Op>
struct Parsed {
  FieldSet fields;
  typename Op::Config cfg;
};

template <class Op>
class Plugin final : public nvinfer1::IPluginV3,
                     public nvinfer1::IPluginV3OneCore,
                     public nvinfer1::IPluginV3OneBuild,
                     public nvinfer1::IPluginV3OneRuntime {
 public:
  // Null (and the error reported) when a field is malformed.
  static Plugin* create(const char* layer, const nvinfer1::PluginFieldCollection* fc) noexcept {
    try {
      auto parsed = std::make_shared<Parsed<Op>>();
      FieldReader reader;
      Status st = FieldReader::open(Op::kName, fc, Op::field_specs(), &reader);
      if (st.ok()) st = Op::parse(reader, &parsed->fields, &parsed->cfg);
      if (!st.ok()) {
        report_error(with_layer(st.message(), layer));
        return nullptr;
      }
      parsed->fields.finish();
      return new Plugin(layer ? layer : "", std::move(parsed), std::make_shared<DeviceCopy>());
    } catch (const std::bad_alloc&) {
      report_error(with_layer(std::string(Op::kName) + ": out of host memory copying the fields", layer),
                   nullptr, nvinfer1::ErrorCode::kFAILED_ALLOCATION);
    } catch (...) {
      report_error(with_layer(std::string(Op::kName) + ": unexpected error creating the plugin", layer), nullptr,
                   nvinfer1::ErrorCode::kINTERNAL_ERROR);
    }
    return nullptr;
  }

  const typename Op::Config& config() const { return parsed_->cfg; }

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
    switch (type) {
      case nvinfer1::PluginCapabilityType::kCORE:
        return static_cast<nvinfer1::IPluginV3OneCore*>(this);
      case nvinfer1::PluginCapabilityType::kBUILD:
        return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
      case nvinfer1::PluginCapabilityType::kRUNTIME:
        return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  nvinfer1::IPluginV3* clone() noexcept override { return copy(recorder_); }

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return Op::kName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 1; }

  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* out, int32_t nb_outputs) noexcept override {
    if (nb_inputs != 1 || nb_outputs != 1 || !in || !out) return fail(io_count_message(nb_inputs, nb_outputs));
    return check_build_dims(in[0].desc.dims);
  }

  int32_t getOutputDataTypes(nvinfer1::DataType* types, int32_t nb_outputs, const nvinfer1::DataType* in_types,
                             int32_t nb_inputs) const noexcept override {
    if (nb_inputs != 1 || nb_outputs != 1 || !types || !in_types) return fail(io_count_message(nb_inputs, nb_outputs));
    if (!is_activation_type(in_types[0]))
      return fail(std::string(Op::kName) + ": X must be float32 or float16");
    types[0] = in_types[0];
    return 0;
  }

  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs* shape_inputs,
                          int32_t nb_shape_inputs, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& builder) noexcept override {
    if (nb_inputs != 1 || nb_outputs != 1 || !inputs || !outputs) return fail(io_count_message(nb_inputs, nb_outputs));
    if (nb_shape_inputs != 0) return fail(std::string(Op::kName) + ": takes no shape inputs");
    const nvinfer1::DimsExprs& x = inputs[0];
    if (x.nbDims < 1 || x.nbDims > nvinfer1::Dims::MAX_DIMS)
      return fail(std::string(Op::kName) + ": X must have at least one dim (its last is K=" + std::to_string(K()) + ")");
    const nvinfer1::IDimensionExpr* last = x.d[x.nbDims - 1];
    if (!last) return fail(std::string(Op::kName) + ": X has a null dim expression");
    if (last->isConstant() && last->getConstantValue() != K())
      return fail(std::string(Op::kName) + ": X last dim must be K=" + std::to_string(K()) + ", got " +
                  std::to_string(last->getConstantValue()));
    const nvinfer1::IDimensionExpr* n = builder.constant(N());
    if (!n) return fail(std::string(Op::kName) + ": the expression builder returned no constant");
    outputs[0].nbDims = x.nbDims;
    for (int32_t i = 0; i + 1 < x.nbDims; ++i) outputs[0].d[i] = x.d[i];  // leading dims pass through (dynamic M)
    outputs[0].d[x.nbDims - 1] = n;
    return 0;
  }

  // X float32 or float16, Y the same type, both linear (row-major).
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override {
    if (nb_inputs != 1 || nb_outputs != 1 || !in_out || pos < 0 || pos > 1) return false;
    const nvinfer1::PluginTensorDesc& d = in_out[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
    if (pos == 0) return is_activation_type(d.type);
    return d.type == in_out[0].desc.type;
  }

  std::size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                               const nvinfer1::DynamicPluginTensorDesc* outputs,
                               int32_t nb_outputs) const noexcept override {
    if (nb_inputs != 1 || !inputs) return 0;
    const nvinfer1::Dims& d = inputs[0].max;
    if (d.nbDims < 1 || d.nbDims > nvinfer1::Dims::MAX_DIMS) return 0;
    int64_t rows = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i) {
      if (d.d[i] <= 0) return 0;
      if (rows > (int64_t{1} << 40) / d.d[i]) return 0;  // larger than any kernel accepts: enqueue fails anyway
      rows *= d.d[i];
    }
    const int64_t bytes = Op::workspace_bytes(config(), rows);
    return bytes > 0 ? static_cast<std::size_t>(bytes) : 0;
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs, const nvinfer1::PluginTensorDesc* out,
                        int32_t nb_outputs) noexcept override {
    if (nb_inputs != 1 || nb_outputs != 1 || !in || !out) return fail(io_count_message(nb_inputs, nb_outputs));
    int64_t rows = 0;
    Status st = check_io(Op::kName, K(), N(), in[0], &out[0], &rows);
    if (st.ok()) st = upload();  // before the first enqueue, so that enqueue never allocates or copies
    return st.ok() ? 0 : fail(st.message());
  }

  int32_t enqueue(const nvinfer1::PluginTensorDesc* in_desc, const nvinfer1::PluginTensorDesc* out_desc,
                  const void* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    try {
      if (!in_desc || !out_desc || !inputs || !outputs) return fail(std::string(Op::kName) + ": enqueue without tensors");
      int64_t rows = 0;
      Status st = check_io(Op::kName, K(), N(), in_desc[0], &out_desc[0], &rows);
      if (!st.ok()) return fail(st.message());
      if (rows == 0) return 0;
      if (!inputs[0] || !outputs[0]) return fail(std::string(Op::kName) + ": null X or Y");
      st = upload();  // normally done by onShapeChange already
      if (st.ok())
        st = Op::run(config(), device_ptrs_, to_dtype(in_desc[0].type), rows, inputs[0], outputs[0], workspace, stream);
      return st.ok() ? 0 : fail(st.message(), nvinfer1::ErrorCode::kFAILED_EXECUTION);
    } catch (...) {
      return fail(std::string(Op::kName) + ": unexpected error in enqueue", nvinfer1::ErrorCode::kINTERNAL_ERROR);
    }
  }

  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override {
    return copy(context ? context->getErrorRecorder() : nullptr);
  }

  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override {
    return parsed_->fields.collection();
  }

 private:
  Plugin(std::string layer, std::shared_ptr<const Parsed<Op>> parsed, std::shared_ptr<DeviceCopy> device)
      : layer_(std::move(layer)), parsed_(std::move(parsed)), device_(std::move(device)) {}

  Plugin* copy(nvinfer1::IErrorRecorder* recorder) noexcept {
    try {
      auto* p = new Plugin(layer_, parsed_, device_);  // shares the immutable fields and the device copy
      p->recorder_ = recorder;
      return p;
    } catch (...) {
      report_error(with_layer(std::string(Op::kName) + ": out of memory cloning the plugin", layer_.c_str()), recorder,
                   nvinfer1::ErrorCode::kFAILED_ALLOCATION);
      return nullptr;
    }
  }

  static std::string with_layer(const std::string& msg, const char* layer) {
    return (layer && *layer) ? msg + " (TensorRT layer '" + layer + "')" : msg;
  }
  int32_t fail(const std::string& msg, nvinfer1::ErrorCode code = nvinfer1::ErrorCode::kINVALID_ARGUMENT) const noexcept {
    report_error(with_layer(msg, layer_.c_str()), recorder_, code);
    return 1;
  }
  static std::string io_count_message(int32_t nb_inputs, int32_t nb_outputs) {
    return std::string(Op::kName) + ": expects 1 input (X; the weights are plugin fields) and 1 output, got " +
           std::to_string(nb_inputs) + " and " + std::to_string(nb_outputs);
  }
  int32_t check_build_dims(const nvinfer1::Dims& d) const noexcept {
    if (d.nbDims < 1 || d.nbDims > nvinfer1::Dims::MAX_DIMS) return fail(std::string(Op::kName) + ": X must have at least one dim");
    const int64_t last = d.d[d.nbDims - 1];
    if (last >= 0 && last != K())
      return fail(std::string(Op::kName) + ": X last dim must be K=" + std::to_string(K()) + ", got " + std::to_string(last));
    return 0;
  }
  Status upload() {
    if (!device_ptrs_.empty()) return Status::OK();
    return device_->ensure(Op::kName, Op::blobs(config()), &device_ptrs_);
  }
  int64_t K() const { return config().K; }
  int64_t N() const { return config().N; }

  std::string layer_;
  std::shared_ptr<const Parsed<Op>> parsed_;
  std::shared_ptr<DeviceCopy> device_;
  std::vector<void*> device_ptrs_;
  nvinfer1::IErrorRecorder* recorder_ = nullptr;  // the execution context's, once attached
};

template <class Op>
class Creator final : public nvinfer1::IPluginCreatorV3One {
 public:
  Creator() {
    for (const FieldSpec& s : Op::field_specs()) names_.emplace_back(s.name, nullptr, s.type, 0);
    fc_.nbFields = static_cast<int32_t>(names_.size());
    fc_.fields = names_.data();
  }
  nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase /*phase: build and runtime read the same fields*/) noexcept override {
    return Plugin<Op>::create(name, fc);
  }
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &fc_; }
  const char* getPluginName() const noexcept override { return Op::kName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

 private:
  std::vector<nvinfer1::PluginField> names_;
  nvinfer1::PluginFieldCollection fc_{};
};

// ---- registry ------------------------------------------------------------------------------------------
// Each op file registers its creator (allocated once, alive for the whole process, as TensorRT expects of
// the creators getCreators returns); getCreators (register.cpp) lists them all.
struct CreatorRegistrar {
  explicit CreatorRegistrar(nvinfer1::IPluginCreatorV3One* creator);
};
const std::vector<nvinfer1::IPluginCreatorInterface*>& registered_creators();

#define QCOMPILE_TRT_CONCAT2(a, b) a##b
#define QCOMPILE_TRT_CONCAT(a, b) QCOMPILE_TRT_CONCAT2(a, b)
#define QCOMPILE_REGISTER_TRT_CREATOR(Op)                                                      \
  static ::qcompile::trt::CreatorRegistrar QCOMPILE_TRT_CONCAT(qcompile_trt_registrar_, __LINE__)( \
      new ::qcompile::trt::Creator<Op>())

}  // namespace trt
}  // namespace qcompile
