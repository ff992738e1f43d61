// Library entry point: RegisterCustomOps adds every self-registered op (see ort_op.h) to one custom-op
// domain "qcompile" (opset version 1). The library does not link libonnxruntime: the API table comes
// from the caller through api_base.
#include <mutex>
#include <vector>

#include "ort/ort_op.h"

namespace qcompile {
namespace ort {

namespace {
std::vector<AddOpsFn>& adders() {
  static std::vector<AddOpsFn> v;  // function-local: safe from static-initialisation order
  return v;
}
}  // namespace

OpRegistrar::OpRegistrar(AddOpsFn fn) { adders().push_back(fn); }

const std::vector<AddOpsFn>& registered_op_adders() { return adders(); }

}  // namespace ort
}  // namespace qcompile

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // The caller's onnxruntime is older than the headers we were built with; API version 1 always exists.
    const OrtApi* v1 = api_base->GetApi(1);
    std::string msg = std::string("qcompile_ops needs onnxruntime with C API version >= ") +
                      std::to_string(ORT_API_VERSION) + " (onnxruntime " + api_base->GetVersionString() +
                      " is too old)";
    return v1 ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  return qcompile::ort::guarded("RegisterCustomOps", [&]() -> OrtStatus* {
    // Domains must outlive every session that uses them; ORT keeps no ownership, so they are kept (and
    // deliberately never freed: freeing at process exit can race ORT's own teardown).
    static std::mutex mu;
    static std::vector<OrtCustomOpDomain*>* keep = new std::vector<OrtCustomOpDomain*>();
    std::vector<const OrtCustomOp*> ops;
    for (auto add : qcompile::ort::registered_op_adders()) add(ops);
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain(qcompile::ort::kDomain, &domain)) return st;
    {
      std::lock_guard<std::mutex> lock(mu);
      keep->push_back(domain);
    }
    for (const OrtCustomOp* op : ops) {
      if (OrtStatus* st = api->CustomOpDomain_Add(domain, const_cast<OrtCustomOp*>(op))) return st;
    }
    return api->AddCustomOpDomain(options, domain);
  });
}
