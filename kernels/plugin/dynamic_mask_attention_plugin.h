// belle::DynamicMaskAttention, version "1": the TensorRT IPluginV3 around belle_attention_forward.
//
// Same identity and fields as the build-time Python creator (belle_edge/compile/trt_plugin.py): an engine
// built with that creator registered stores name/version/namespace and the four fields below, and this
// plugin serves the layer at run time. Keep the two in step.
//
// Inputs: 0 query [B,H,T,D], 1 key, 2 value [B,Hkv,T,D], 3 past_key, 4 past_value [B,Hkv,P,D],
// 5 q_positions, 6 q_turns [B,T], 7 k_positions, 8 k_turns [B,S] (S >= P+T), 9 window, 10 sinks (int64
// scalars), 11 alibi_slopes [H]. Outputs: 0 output [B,T,H*D], 1 present_key, 2 present_value [B,Hkv,P+T,D].
// Float tensors are fp16 or bf16 (all the type of the query), the tables int64, every tensor LINEAR.
//
// The library exports the two entry points of TensorRT's plugin-library convention (IPluginRegistry::
// loadLibrary, trtexec --dynamicPlugins, plugins_to_serialize): getCreators and setLoggerFinder.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace belle
{

constexpr char const* kPLUGIN_NAME = "DynamicMaskAttention";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = "belle";

struct DynamicMaskAttentionFields
{
    int32_t numHeads{0};
    int32_t numKvHeads{0};
    int32_t headDim{0};
    float scale{0.F};
};

class DynamicMaskAttentionPlugin : public nvinfer1::IPluginV3,
                                   public nvinfer1::IPluginV3OneCore,
                                   public nvinfer1::IPluginV3OneBuild,
                                   public nvinfer1::IPluginV3OneRuntime
{
public:
    static constexpr int32_t kNB_INPUTS = 12;
    static constexpr int32_t kNB_OUTPUTS = 3;

    explicit DynamicMaskAttentionPlugin(DynamicMaskAttentionFields const& fields);
    ~DynamicMaskAttentionPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    DynamicMaskAttentionFields mFields;
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mSerializedCollection{0, nullptr};
};

class DynamicMaskAttentionCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    DynamicMaskAttentionCreator();
    ~DynamicMaskAttentionCreator() override = default;

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{0, nullptr};
};

} // namespace belle

#if defined(_WIN32)
#define BELLE_PLUGIN_EXPORT __declspec(dllexport)
#else
#define BELLE_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

// TensorRT's plugin-library entry points (the names and signatures IPluginRegistry::loadLibrary looks up).
extern "C" BELLE_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" BELLE_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
