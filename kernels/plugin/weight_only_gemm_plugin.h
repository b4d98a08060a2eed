// belle::WeightOnlyGemm, version "1": the TensorRT IPluginV3 around belle_weight_only_gemm
// (include/belle_weight_only.h), Y = X @ W with W given as 4- or 8-bit codes and fp16/bf16 scales.
//
// One node per `DequantizeLinear -> MatMul` pair of a weight-only graph (belle_edge/compile/
// gemm_plugin_variant.py): domain / plugin_namespace "belle", plugin_version "1", the same three inputs and
// DequantizeLinear's two attributes as fields:
//
//   fields   axis (INT32; ONNX default 1), block_size (INT32; ONNX default 0). Other fields are ignored.
//   inputs   0 X [..., K] fp16 or bf16 (rank >= 2; M = the product of the leading dimensions)
//            1 codes [K, N]: INT4 (TensorRT kINT4, two per byte along N, the even column in the low nibble:
//              ONNX's and TensorRT's packing alike) with axis 0 and block_size a multiple of 64 dividing K;
//              or INT8 with axis 1 (one scale per output column)
//            2 scales, X's type: INT4 [K / block_size, N]; INT8 [N]
//   output   0 Y [..., N], X's type
//   all LINEAR.
//
// Also accepted, in case a TensorRT refuses kINT4 plugin inputs: axis 0 with INT8 codes of shape [K, N/2]
// (the same bytes as the packed INT4 [K, N], typed as int8) is read as 4-bit codes. INT8 codes with axis 0
// and any other shape are an error (the kernels do per-channel INT8 only).
//
// Workspace: the split-K partial sums and tile counters of belle_weight_only_gemm for small M, sized for the
// profile's largest shapes; the counters are zeroed on every enqueue (see the .cpp for why).
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <vector>

namespace belle
{

constexpr char const* kWEIGHT_ONLY_GEMM_NAME = "WeightOnlyGemm";
constexpr char const* kWEIGHT_ONLY_GEMM_VERSION = "1";
constexpr char const* kWEIGHT_ONLY_GEMM_NAMESPACE = "belle";

struct WeightOnlyGemmFields
{
    int32_t axis{1};      // DequantizeLinear's axis of the codes [K, N]: 0 block-wise (INT4), 1 per column (INT8)
    int32_t blockSize{0}; // inputs per scale along K (INT4); 0 for per-channel INT8
};

class WeightOnlyGemmPlugin : public nvinfer1::IPluginV3,
                             public nvinfer1::IPluginV3OneCore,
                             public nvinfer1::IPluginV3OneBuild,
                             public nvinfer1::IPluginV3OneRuntime
{
public:
    static constexpr int32_t kNB_INPUTS = 3;
    static constexpr int32_t kNB_OUTPUTS = 1;

    explicit WeightOnlyGemmPlugin(WeightOnlyGemmFields const& fields);
    ~WeightOnlyGemmPlugin() override = default;

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
    WeightOnlyGemmFields mFields;
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mSerializedCollection{0, nullptr};
};

class WeightOnlyGemmCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    WeightOnlyGemmCreator();
    ~WeightOnlyGemmCreator() override = default;

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
