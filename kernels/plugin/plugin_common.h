// What the plugins of libbelle_trt_plugin.so share: the logger TensorRT hands the library.
//
// setLoggerFinder (one entry point for the whole library, dynamic_mask_attention_plugin.cpp) stores the
// finder here; every plugin logs through loggerFinder().logger(), or to stderr until TensorRT has called it.
// One holder for the library: an inline function's static is a single object across translation units.
#pragma once

#include <NvInferRuntime.h>

#include <mutex>

namespace belle
{

class LoggerFinderHolder
{
public:
    void set(nvinfer1::ILoggerFinder* finder)
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder == nullptr && finder != nullptr)
        {
            mFinder = finder;
        }
    }

    nvinfer1::ILogger* logger()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        return mFinder != nullptr ? mFinder->findLogger() : nullptr;
    }

private:
    nvinfer1::ILoggerFinder* mFinder{nullptr};
    std::mutex mMutex;
};

inline LoggerFinderHolder& loggerFinder()
{
    static LoggerFinderHolder holder;
    return holder;
}

} // namespace belle
