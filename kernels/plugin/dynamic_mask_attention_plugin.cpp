// belle::DynamicMaskAttention, version "1" (see dynamic_mask_attention_plugin.h).
#include "dynamic_mask_attention_plugin.h"

#include "plugin_common.h"
#include "weight_only_gemm_plugin.h"

#include "belle_attention.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <string>

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::ILogger;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace belle
{
namespace
{

// ---------------------------------------------------------------------------------------------------------
// Logging through the logger TensorRT hands the library (setLoggerFinder, plugin_common.h); stderr until it does.

void log(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        std::string const text = std::string(kPLUGIN_NAMESPACE) + "::" + kPLUGIN_NAME + ": " + message;
        if (ILogger* logger = loggerFinder().logger())
        {
            logger->log(severity, text.c_str());
        }
        else if (severity <= ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    }
    catch (...)
    {
    }
}

void logError(std::string const& message) noexcept
{
    log(ILogger::Severity::kERROR, message);
}

// ---------------------------------------------------------------------------------------------------------
// Tensor layout: the input/output order of the ONNX node (belle_edge/compile/export_onnx.py).

enum Input : int32_t
{
    kQUERY = 0,
    kKEY = 1,
    kVALUE = 2,
    kPAST_KEY = 3,
    kPAST_VALUE = 4,
    kQ_POSITIONS = 5,
    kQ_TURNS = 6,
    kK_POSITIONS = 7,
    kK_TURNS = 8,
    kWINDOW = 9,
    kSINKS = 10,
    kALIBI_SLOPES = 11,
};

enum Output : int32_t
{
    kOUTPUT = 0,
    kPRESENT_KEY = 1,
    kPRESENT_VALUE = 2,
};

bool isIntInput(int32_t pos)
{
    return pos >= kQ_POSITIONS && pos <= kSINKS;
}

bool isKernelFloat(DataType type)
{
    return type == DataType::kHALF || type == DataType::kBF16;
}

BelleDType toBelle(DataType type)
{
    return type == DataType::kBF16 ? BELLE_BF16 : BELLE_FP16;
}

char const* typeName(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT: return "FLOAT";
    case DataType::kHALF: return "HALF";
    case DataType::kBF16: return "BF16";
    case DataType::kINT8: return "INT8";
    case DataType::kINT32: return "INT32";
    case DataType::kINT64: return "INT64";
    case DataType::kBOOL: return "BOOL";
    default: return "other";
    }
}

bool fitsInt(int64_t value)
{
    return value >= 0 && value <= std::numeric_limits<int>::max();
}

// Reads a one-element integer / float plugin field, whatever width the caller stored it in.
bool readInt(PluginField const& field, int32_t& value)
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    int64_t v = 0;
    switch (field.type)
    {
    case PluginFieldType::kINT8: v = *static_cast<int8_t const*>(field.data); break;
    case PluginFieldType::kINT16: v = *static_cast<int16_t const*>(field.data); break;
    case PluginFieldType::kINT32: v = *static_cast<int32_t const*>(field.data); break;
    case PluginFieldType::kINT64: v = *static_cast<int64_t const*>(field.data); break;
    default: return false;
    }
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
    {
        return false;
    }
    value = static_cast<int32_t>(v);
    return true;
}

bool readFloat(PluginField const& field, float& value)
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kFLOAT32: value = *static_cast<float const*>(field.data); return true;
    case PluginFieldType::kFLOAT64: value = static_cast<float>(*static_cast<double const*>(field.data)); return true;
    default: return false;
    }
}

std::string dimsString(nvinfer1::Dims const& dims)
{
    std::string s = "[";
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        s += (i != 0 ? ", " : "") + std::to_string(dims.d[i]);
    }
    return s + "]";
}

} // namespace

// ---------------------------------------------------------------------------------------------------------
// The plugin

DynamicMaskAttentionPlugin::DynamicMaskAttentionPlugin(DynamicMaskAttentionFields const& fields)
    : mFields(fields)
{
}

nvinfer1::IPluginCapability* DynamicMaskAttentionPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* DynamicMaskAttentionPlugin::clone() noexcept
{
    return new (std::nothrow) DynamicMaskAttentionPlugin(mFields);
}

char const* DynamicMaskAttentionPlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* DynamicMaskAttentionPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* DynamicMaskAttentionPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t DynamicMaskAttentionPlugin::configurePlugin(DynamicPluginTensorDesc const* /*in*/, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        logError("expects 12 inputs and 3 outputs, got " + std::to_string(nbInputs) + " and "
            + std::to_string(nbOutputs));
        return -1;
    }
    return 0;
}

int32_t DynamicMaskAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs < 1 || nbOutputs != kNB_OUTPUTS)
    {
        return -1;
    }
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        outputTypes[i] = inputTypes[kQUERY];
    }
    return 0;
}

int32_t DynamicMaskAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || inputs[kQUERY].nbDims != 4
        || inputs[kKEY].nbDims != 4 || inputs[kPAST_KEY].nbDims != 4)
    {
        logError("getOutputShapes: expects 12 inputs (query, key, past_key of rank 4) and 3 outputs");
        return -1;
    }
    DimsExprs const& q = inputs[kQUERY];
    DimsExprs const& k = inputs[kKEY];
    DimsExprs const& past = inputs[kPAST_KEY];

    // output [B, T, H * D]
    outputs[kOUTPUT].nbDims = 3;
    outputs[kOUTPUT].d[0] = q.d[0];
    outputs[kOUTPUT].d[1] = q.d[2];
    int64_t const width = static_cast<int64_t>(mFields.numHeads) * mFields.headDim;
    outputs[kOUTPUT].d[2] = width > 0 ? exprBuilder.constant(width)
                                      : exprBuilder.operation(nvinfer1::DimensionOperation::kPROD, *q.d[1], *q.d[3]);

    // present_key / present_value [B, Hkv, P + T, D]
    for (int32_t i : {static_cast<int32_t>(kPRESENT_KEY), static_cast<int32_t>(kPRESENT_VALUE)})
    {
        outputs[i].nbDims = 4;
        outputs[i].d[0] = past.d[0];
        outputs[i].d[1] = past.d[1];
        outputs[i].d[2] = exprBuilder.operation(nvinfer1::DimensionOperation::kSUM, *past.d[2], *k.d[2]);
        outputs[i].d[3] = past.d[3];
    }
    return 0;
}

bool DynamicMaskAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (isIntInput(pos))
    {
        return desc.type == DataType::kINT64;
    }
    // query, key, value, past_key, past_value, alibi_slopes and the three outputs: the query's fp16/bf16
    return isKernelFloat(desc.type) && desc.type == inOut[kQUERY].desc.type;
}

int32_t DynamicMaskAttentionPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

size_t DynamicMaskAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        return 0;
    }
    // The largest shapes of the profile: the split-KV decode (one new token) over the most keys is what needs
    // workspace. The kernels size it from the device's SM count and the batch, and more rows can mean fewer
    // splits each, so the size is not monotone in the batch: take the largest over every batch of the profile.
    // The largest prefill is asked too, in case the kernels ever want workspace there.
    int64_t const maxBatch = inputs[kQUERY].max.d[0];
    int64_t const maxNew = inputs[kQUERY].max.d[2];
    int64_t const maxPast = inputs[kPAST_KEY].max.d[2];
    int64_t const maxKeys = std::max<int64_t>(outputs[kPRESENT_KEY].max.d[2], maxPast + maxNew);
    if (!fitsInt(maxBatch) || !fitsInt(maxNew) || !fitsInt(maxKeys) || maxBatch < 1 || maxNew < 1 || maxKeys < 1)
    {
        return 0;
    }
    BelleAttentionParams p;
    std::memset(&p, 0, sizeof(p));
    p.dtype = toBelle(inputs[kQUERY].desc.type);
    p.num_heads = mFields.numHeads;
    p.num_kv_heads = mFields.numKvHeads;
    p.head_dim = mFields.headDim;
    p.cache_capacity = static_cast<int>(maxKeys);
    p.max_keys = static_cast<int>(maxKeys);
    p.scale = mFields.scale;

    size_t size = 0;
    int64_t const minBatch = std::max<int64_t>(1, inputs[kQUERY].min.d[0]);
    for (int64_t b = minBatch; b <= maxBatch; ++b)
    {
        p.batch = static_cast<int>(b);
        p.new_tokens = 1;
        p.start = static_cast<int>(maxKeys) - 1;
        size = std::max(size, belle_attention_workspace_size(&p));
        p.new_tokens = static_cast<int>(std::min(maxNew, maxKeys));
        p.start = static_cast<int>(maxKeys) - p.new_tokens;
        size = std::max(size, belle_attention_workspace_size(&p));
    }
    return size;
}

int32_t DynamicMaskAttentionPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        logError("expects 12 inputs and 3 outputs");
        return -1;
    }
    nvinfer1::Dims const& q = in[kQUERY].dims;
    nvinfer1::Dims const& k = in[kKEY].dims;
    if (q.nbDims != 4 || k.nbDims != 4 || q.d[1] != mFields.numHeads || q.d[3] != mFields.headDim
        || k.d[1] != mFields.numKvHeads || k.d[3] != mFields.headDim)
    {
        logError("query " + dimsString(q) + " / key " + dimsString(k) + " do not match num_heads="
            + std::to_string(mFields.numHeads) + ", num_kv_heads=" + std::to_string(mFields.numKvHeads)
            + ", head_dim=" + std::to_string(mFields.headDim));
        return -1;
    }
    return 0;
}

int32_t DynamicMaskAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    DataType const type = inputDesc[kQUERY].type;
    if (!isKernelFloat(type) || outputDesc[kOUTPUT].type != type || outputDesc[kPRESENT_KEY].type != type
        || outputDesc[kPRESENT_VALUE].type != type)
    {
        logError(std::string("the kernels run fp16 or bf16 only (query, outputs all one type); got query ")
            + typeName(type) + " (an engine built with FLOAT attention cannot run this plugin)");
        return -1;
    }
    nvinfer1::Dims const& q = inputDesc[kQUERY].dims;
    nvinfer1::Dims const& k = inputDesc[kKEY].dims;
    nvinfer1::Dims const& past = inputDesc[kPAST_KEY].dims;
    nvinfer1::Dims const& kTable = inputDesc[kK_POSITIONS].dims;
    if (q.nbDims != 4 || k.nbDims != 4 || past.nbDims != 4 || kTable.nbDims != 2)
    {
        logError("unexpected ranks: query " + dimsString(q) + ", key " + dimsString(k) + ", past_key "
            + dimsString(past) + ", k_positions " + dimsString(kTable));
        return -1;
    }
    int64_t const B = q.d[0];
    int64_t const H = q.d[1];
    int64_t const T = q.d[2];
    int64_t const D = q.d[3];
    int64_t const Hkv = k.d[1];
    int64_t const P = past.d[2];
    int64_t const keys = P + T;
    if (H != mFields.numHeads || Hkv != mFields.numKvHeads || D != mFields.headDim || k.d[0] != B || k.d[2] != T
        || k.d[3] != D || past.d[0] != B || past.d[1] != Hkv || past.d[3] != D || kTable.d[1] < keys)
    {
        logError("shapes do not agree: query " + dimsString(q) + ", key " + dimsString(k) + ", past_key "
            + dimsString(past) + ", k_positions " + dimsString(kTable) + " (fields num_heads="
            + std::to_string(mFields.numHeads) + ", num_kv_heads=" + std::to_string(mFields.numKvHeads)
            + ", head_dim=" + std::to_string(mFields.headDim) + ")");
        return -1;
    }
    if (!fitsInt(B) || !fitsInt(T) || !fitsInt(keys))
    {
        logError("dimensions out of range");
        return -1;
    }
    size_t const elem = 2; // fp16 / bf16

    // (a) present = [past, new]: the past rows go first; the kernel writes the T new ones after them.
    if (P > 0 && B > 0 && Hkv > 0)
    {
        size_t const width = static_cast<size_t>(P * D) * elem;
        size_t const pitch = static_cast<size_t>(keys * D) * elem;
        size_t const rows = static_cast<size_t>(B * Hkv);
        for (int32_t i = 0; i < 2; ++i)
        {
            void* dst = outputs[i == 0 ? kPRESENT_KEY : kPRESENT_VALUE];
            void const* src = inputs[i == 0 ? kPAST_KEY : kPAST_VALUE];
            cudaError_t const err
                = cudaMemcpy2DAsync(dst, pitch, src, width, width, rows, cudaMemcpyDeviceToDevice, stream);
            if (err != cudaSuccess)
            {
                logError(std::string("copying the past ") + (i == 0 ? "keys" : "values")
                    + " into the present cache failed: " + cudaGetErrorString(err));
                return -1;
            }
        }
    }
    if (B == 0 || T == 0)
    {
        return 0;
    }
    if (T == 1 && workspace == nullptr)
    {
        logError("decode (one new token) needs a workspace, and this engine gives the layer none: the creator "
                 "registered when it was built reported 0 bytes (getWorkspaceSize / get_workspace_size must "
                 "return belle_attention_workspace_size for the profile's largest shapes); rebuild the engine");
        return -1;
    }

    // (b) the kernel call: new K/V go to slots [P, P + T) of the present outputs, then attention over them.
    BelleAttentionParams p;
    std::memset(&p, 0, sizeof(p));
    p.dtype = toBelle(type);
    p.batch = static_cast<int>(B);
    p.num_heads = static_cast<int>(H);
    p.num_kv_heads = static_cast<int>(Hkv);
    p.head_dim = static_cast<int>(D);
    p.new_tokens = static_cast<int>(T);
    p.cache_capacity = static_cast<int>(keys);
    p.start = static_cast<int>(P);
    p.start_device = nullptr;
    p.max_keys = static_cast<int>(keys);

    p.q = inputs[kQUERY];
    p.q_stride_b = H * T * D;
    p.q_stride_h = T * D;
    p.q_stride_t = D;
    p.k_new = inputs[kKEY];
    p.v_new = inputs[kVALUE];
    p.kv_new_stride_b = Hkv * T * D;
    p.kv_new_stride_h = T * D;
    p.kv_new_stride_t = D;
    p.k_cache = outputs[kPRESENT_KEY];
    p.v_cache = outputs[kPRESENT_VALUE];

    p.q_pos = static_cast<int64_t const*>(inputs[kQ_POSITIONS]);
    p.q_turn = static_cast<int64_t const*>(inputs[kQ_TURNS]);
    p.q_table_stride = inputDesc[kQ_POSITIONS].dims.nbDims == 2 ? inputDesc[kQ_POSITIONS].dims.d[1] : T;
    p.k_pos = static_cast<int64_t const*>(inputs[kK_POSITIONS]);
    p.k_turn = static_cast<int64_t const*>(inputs[kK_TURNS]);
    p.k_table_stride = kTable.d[1];
    p.window = static_cast<int64_t const*>(inputs[kWINDOW]);
    p.sinks = static_cast<int64_t const*>(inputs[kSINKS]);

    p.alibi_slopes = inputs[kALIBI_SLOPES]; // zeros for RoPE models: harmless
    p.rope_inv_freq = nullptr;              // the graph rotates q and k before this node
    p.scale = mFields.scale;

    p.out = outputs[kOUTPUT];
    p.workspace = workspace;

    // (c)
    int const rc = belle_attention_forward(&p, stream);
    if (rc != 0)
    {
        char const* what = belle_attention_error_string(rc);
        logError("belle_attention_forward failed (" + std::to_string(rc) + "): " + (what != nullptr ? what : "")
            + " [B=" + std::to_string(B) + " H=" + std::to_string(H) + " Hkv=" + std::to_string(Hkv)
            + " T=" + std::to_string(T) + " P=" + std::to_string(P) + " D=" + std::to_string(D) + "]");
        return rc;
    }
    return 0;
}

nvinfer1::IPluginV3* DynamicMaskAttentionPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* DynamicMaskAttentionPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mSerialized.clear();
        mSerialized.emplace_back("num_heads", &mFields.numHeads, PluginFieldType::kINT32, 1);
        mSerialized.emplace_back("num_kv_heads", &mFields.numKvHeads, PluginFieldType::kINT32, 1);
        mSerialized.emplace_back("head_dim", &mFields.headDim, PluginFieldType::kINT32, 1);
        mSerialized.emplace_back("scale", &mFields.scale, PluginFieldType::kFLOAT32, 1);
    }
    catch (...)
    {
        mSerialized.clear();
    }
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerialized.size());
    mSerializedCollection.fields = mSerialized.data();
    return &mSerializedCollection;
}

// ---------------------------------------------------------------------------------------------------------
// The creator

DynamicMaskAttentionCreator::DynamicMaskAttentionCreator()
{
    mFieldNames.emplace_back("num_heads", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("num_kv_heads", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("head_dim", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("scale", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

nvinfer1::IPluginV3* DynamicMaskAttentionCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        DynamicMaskAttentionFields fields;
        bool seen[4] = {false, false, false, false};
        bool ok = true;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr)
            {
                continue;
            }
            std::string const name(f.name);
            if (name == "num_heads")
            {
                ok = ok && readInt(f, fields.numHeads);
                seen[0] = true;
            }
            else if (name == "num_kv_heads")
            {
                ok = ok && readInt(f, fields.numKvHeads);
                seen[1] = true;
            }
            else if (name == "head_dim")
            {
                ok = ok && readInt(f, fields.headDim);
                seen[2] = true;
            }
            else if (name == "scale")
            {
                ok = ok && readFloat(f, fields.scale);
                seen[3] = true;
            }
            // other attributes of the ONNX node (plugin_namespace, plugin_version) are not fields
        }
        if (!(seen[0] && seen[1] && seen[2] && seen[3]))
        {
            logError("fields missing: need num_heads, num_kv_heads, head_dim (INT32) and scale (FLOAT32)");
            return nullptr;
        }
        if (!ok || fields.numHeads <= 0 || fields.numKvHeads <= 0 || fields.headDim <= 0
            || fields.numHeads % fields.numKvHeads != 0)
        {
            logError("bad fields: num_heads=" + std::to_string(fields.numHeads) + ", num_kv_heads="
                + std::to_string(fields.numKvHeads) + ", head_dim=" + std::to_string(fields.headDim)
                + " (positive, num_heads a multiple of num_kv_heads, ints as INT32 and scale as FLOAT32)");
            return nullptr;
        }
        return new DynamicMaskAttentionPlugin(fields);
    }
    catch (std::exception const& e)
    {
        logError(std::string("createPlugin: ") + e.what());
    }
    catch (...)
    {
        logError("createPlugin: unknown exception");
    }
    return nullptr;
}

PluginFieldCollection const* DynamicMaskAttentionCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

char const* DynamicMaskAttentionCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* DynamicMaskAttentionCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* DynamicMaskAttentionCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

} // namespace belle

// ---------------------------------------------------------------------------------------------------------
// Plugin-library entry points

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static belle::DynamicMaskAttentionCreator attention;
    static belle::WeightOnlyGemmCreator weightOnlyGemm;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&attention, &weightOnlyGemm};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    belle::loggerFinder().set(finder);
}
