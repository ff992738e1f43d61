// Library entry points TensorRT looks up when it loads a plugin library (IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins): setLoggerFinder hands us TensorRT's logger, getCreators lists the IPluginV3
// creators of every op (name = the ONNX op type, version "1", namespace "qcompile"). There is no
// getPluginCreators: that entry point lists IPluginV2 creators, and these plugins are IPluginV3 only.
#include <algorithm>
#include <cstring>
#include <vector>

#include "trt/trt_plugin.h"

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  qcompile::trt::set_logger_finder(finder);
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nb_creators) {
  // Sorted by name so the order does not depend on static-initialisation order across files.
  static const std::vector<nvinfer1::IPluginCreatorInterface*> sorted = [] {
    std::vector<nvinfer1::IPluginCreatorInterface*> v = qcompile::trt::registered_creators();
    std::sort(v.begin(), v.end(), [](nvinfer1::IPluginCreatorInterface* a, nvinfer1::IPluginCreatorInterface* b) {
      return std::strcmp(static_cast<nvinfer1::IPluginCreatorV3One*>(a)->getPluginName(),
                         static_cast<nvinfer1::IPluginCreatorV3One*>(b)->getPluginName()) < 0;
    });
    return v;
  }();
  nb_creators = static_cast<int32_t>(sorted.size());
  return sorted.data();
}
