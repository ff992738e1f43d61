// Attribute helpers over the ORT C API (no exceptions: a missing attribute is a Status, not a throw) and the
// log of model errors found at session creation.
#include "ort/ort_op.h"

namespace qcompile {
namespace ort {
namespace {

// Releases an OrtStatus and tells whether there was one.
bool consume(OrtStatus* st) {
  if (!st) return false;
  Ort::GetApi().ReleaseStatus(st);
  return true;
}

bool has_int(const OrtKernelInfo* info, const char* name, int64_t* out) {
  return !consume(Ort::GetApi().KernelInfoGetAttribute_int64(info, name, out));
}

bool has_string(const OrtKernelInfo* info, const char* name, std::string* out) {
  size_t size = 0;
  if (consume(Ort::GetApi().KernelInfoGetAttribute_string(info, name, nullptr, &size))) return false;
  std::string buf(size, '\0');
  if (consume(Ort::GetApi().KernelInfoGetAttribute_string(info, name, &buf[0], &size))) return false;
  buf.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  *out = buf;
  return true;
}

}  // namespace

Status attr_int(const OrtKernelInfo* info, const char* op, const char* name, int64_t* out) {
  if (!has_int(info, name, out))
    return Status::Error(std::string(op) + ": missing or non-integer attribute '" + name + "'");
  return Status::OK();
}

// True when the attribute exists with some other type than the one asked for (so a default must not
// silently replace a value the model did give).
bool present_with_other_type(const OrtKernelInfo* info, const char* name) {
  float f;
  int64_t i;
  std::string s;
  size_t n = 0;  // list-valued attributes (INTS, FLOATS) count too: [16] is no group_size of 16
  return !consume(Ort::GetApi().KernelInfoGetAttribute_float(info, name, &f)) || has_int(info, name, &i) ||
         has_string(info, name, &s) ||
         !consume(Ort::GetApi().KernelInfoGetAttributeArray_int64(info, name, nullptr, &n)) ||
         !consume(Ort::GetApi().KernelInfoGetAttributeArray_float(info, name, nullptr, &n));
}

Status attr_int_or(const OrtKernelInfo* info, const char* op, const char* name, int64_t dflt, int64_t* out) {
  if (has_int(info, name, out)) return Status::OK();
  if (present_with_other_type(info, name))
    return Status::Error(std::string(op) + ": attribute '" + name + "' must be an integer");
  *out = dflt;
  return Status::OK();
}

Status attr_string(const OrtKernelInfo* info, const char* op, const char* name, std::string* out) {
  if (!has_string(info, name, out))
    return Status::Error(std::string(op) + ": missing or non-string attribute '" + name + "'");
  return Status::OK();
}

Status attr_string_or(const OrtKernelInfo* info, const char* op, const char* name, const std::string& dflt,
                      std::string* out) {
  if (has_string(info, name, out)) return Status::OK();
  if (present_with_other_type(info, name))
    return Status::Error(std::string(op) + ": attribute '" + name + "' must be a string");
  *out = dflt;
  return Status::OK();
}

}  // namespace ort
}  // namespace qcompile
