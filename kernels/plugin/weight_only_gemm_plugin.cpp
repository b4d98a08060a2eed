// belle::WeightOnlyGemm, version "1" (see weight_only_gemm_plugin.h).
#include "weight_only_gemm_plugin.h"

#include "plugin_common.h"

#include "belle_weight_only.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <new>
#include <string>

using nvinfer1::DataType;
using nvinfer1::Dims;
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
        std::string const text
            = std::string(kWEIGHT_ONLY_GEMM_NAMESPACE) + "::" + kWEIGHT_ONLY_GEMM_NAME + ": " + message;
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
// Tensor layout: the input order of the ONNX node (gemm_plugin_variant.py: X, codes, scales).

enum Input : int32_t
{
    kX = 0,
    kCODES = 1,
    kSCALES = 2,
};

enum Output : int32_t
{
    kY = 0,
};

// The two parts of the workspace (partial sums, then tile counters) each start on a 256-byte boundary.
constexpr size_t kWORKSPACE_ALIGNMENT = 256;

// getWorkspaceSize asks the kernels' size functions for every M up to this (and for the profile's largest M):
// split-K is used only for a handful of rows (M <= 8 in belle_weight_only.h), and the sizes need not grow
// with M, so the small M are all asked rather than trusting the largest.
constexpr int64_t kWORKSPACE_SCAN_ROWS = 64;

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
    case DataType::kINT4: return "INT4";
    case DataType::kINT32: return "INT32";
    case DataType::kINT64: return "INT64";
    case DataType::kFP8: return "FP8";
    case DataType::kBOOL: return "BOOL";
    default: return "other";
    }
}

bool fitsInt(int64_t value)
{
    return value >= 0 && value <= std::numeric_limits<int>::max();
}

size_t alignUp(size_t bytes)
{
    return (bytes + kWORKSPACE_ALIGNMENT - 1) / kWORKSPACE_ALIGNMENT * kWORKSPACE_ALIGNMENT;
}

// Reads a one-element integer plugin field, whatever width the caller stored it in (the ONNX parser passes
// INT attributes as INT32; Python creators may use other widths).
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

std::string dimsString(Dims const& dims)
{
    std::string s = "[";
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        s += (i != 0 ? ", " : "") + std::to_string(dims.d[i]);
    }
    return s + "]";
}

// What the kernels are asked to do, as far as the weights tell it.
struct GemmShape
{
    int bits{0};
    int64_t k{0};
    int64_t n{0};
};

// Checks codes and scales against the fields and the contract of belle_weight_only.h, and X's last dimension
// against K (X's dimensions may be -1 at build time: unknown ones are not checked). Fills `shape` and returns
// an empty string when everything fits, else what does not.
std::string checkInputs(WeightOnlyGemmFields const& fields, DataType codesType, Dims const& x, Dims const& codes,
    Dims const& scales, GemmShape& shape)
{
    // Built only on failure: this runs on every enqueue.
    auto where = [&]() {
        return " (X " + dimsString(x) + ", codes " + typeName(codesType) + " " + dimsString(codes) + ", scales "
            + dimsString(scales) + ", axis " + std::to_string(fields.axis) + ", block_size "
            + std::to_string(fields.blockSize) + ")";
    };
    if (x.nbDims < 2 || codes.nbDims != 2 || scales.nbDims < 1)
    {
        return "expects X of rank >= 2 and codes [K, N]" + where();
    }
    int64_t const k = codes.d[0];
    int64_t const xk = x.d[x.nbDims - 1];
    if (k < 1 || codes.d[1] < 1 || (xk >= 0 && xk != k))
    {
        return "X's last dimension must equal the codes' K" + where();
    }

    if (codesType == DataType::kINT4)
    {
        if (fields.axis != 0)
        {
            return "INT4 codes need axis 0 (block-wise scales along K)" + where();
        }
        shape.bits = 4;
        shape.n = codes.d[1];
    }
    else if (codesType == DataType::kINT8 && fields.axis == 1)
    {
        shape.bits = 8;
        shape.n = codes.d[1];
    }
    else if (codesType == DataType::kINT8 && fields.axis == 0)
    {
        // Packed INT4 typed as int8: [K, N/2] bytes, N given by the scales [K / block_size, N].
        if (scales.nbDims != 2 || scales.d[1] != 2 * codes.d[1])
        {
            return "INT8 codes need axis 1 (per output channel); with axis 0 they are read as packed INT4 "
                   "[K, N/2] and the scales must be [K / block_size, N]"
                + where();
        }
        shape.bits = 4;
        shape.n = scales.d[1];
    }
    else
    {
        return "codes must be INT4 (axis 0) or INT8 (axis 1)" + where();
    }
    shape.k = k;
    int64_t const n = shape.n;
    if (!fitsInt(k) || !fitsInt(n))
    {
        return "dimensions out of range" + where();
    }

    if (shape.bits == 4)
    {
        if (fields.blockSize <= 0 || fields.blockSize % 64 != 0 || k % fields.blockSize != 0)
        {
            return "4-bit codes need block_size a positive multiple of 64 dividing K" + where();
        }
        if (scales.nbDims != 2 || scales.d[0] != k / fields.blockSize || scales.d[1] != n)
        {
            return "4-bit codes need scales [K / block_size, N]" + where();
        }
        if (n % 32 != 0)
        {
            return "4-bit codes need N a multiple of 32" + where();
        }
    }
    else
    {
        if (fields.blockSize != 0)
        {
            return "INT8 codes are per output channel: block_size must be 0" + where();
        }
        if (scales.nbDims != 1 || scales.d[0] != n)
        {
            return "INT8 codes need scales [N]" + where();
        }
        if (n % 16 != 0 || k % 8 != 0)
        {
            return "INT8 codes need N a multiple of 16 and K a multiple of 8" + where();
        }
    }
    return std::string();
}

// Types of X, scales and Y: one fp16/bf16 type for all three.
std::string checkFloatTypes(DataType x, DataType scales, DataType y)
{
    if (!isKernelFloat(x) || scales != x || y != x)
    {
        return std::string("X, scales and Y must share one type, fp16 or bf16; got X ") + typeName(x) + ", scales "
            + typeName(scales) + ", Y " + typeName(y);
    }
    return std::string();
}

// The product of X's leading dimensions; -1 when one of them is unknown or negative.
int64_t leadingProduct(Dims const& x)
{
    int64_t m = 1;
    for (int32_t i = 0; i + 1 < x.nbDims; ++i)
    {
        if (x.d[i] < 0)
        {
            return -1;
        }
        m *= x.d[i];
    }
    return m;
}

// Bytes the split-K path needs for these parameters: partial sums and counters, each 256-byte aligned.
size_t splitKBytes(BelleWeightOnlyParams const& p)
{
    size_t const partial = belle_weight_only_workspace_size(&p);
    size_t const counters = belle_weight_only_counters_size(&p);
    if (partial == 0 || counters == 0)
    {
        return 0; // no split-K for this M
    }
    return alignUp(partial) + alignUp(counters);
}

} // namespace

// ---------------------------------------------------------------------------------------------------------
// The plugin

WeightOnlyGemmPlugin::WeightOnlyGemmPlugin(WeightOnlyGemmFields const& fields)
    : mFields(fields)
{
}

nvinfer1::IPluginCapability* WeightOnlyGemmPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* WeightOnlyGemmPlugin::clone() noexcept
{
    return new (std::nothrow) WeightOnlyGemmPlugin(mFields);
}

char const* WeightOnlyGemmPlugin::getPluginName() const noexcept
{
    return kWEIGHT_ONLY_GEMM_NAME;
}

char const* WeightOnlyGemmPlugin::getPluginVersion() const noexcept
{
    return kWEIGHT_ONLY_GEMM_VERSION;
}

char const* WeightOnlyGemmPlugin::getPluginNamespace() const noexcept
{
    return kWEIGHT_ONLY_GEMM_NAMESPACE;
}

int32_t WeightOnlyGemmPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        logError("expects 3 inputs (X, codes, scales) and 1 output, got " + std::to_string(nbInputs) + " and "
            + std::to_string(nbOutputs));
        return -1;
    }
    std::string why = checkFloatTypes(in[kX].desc.type, in[kSCALES].desc.type, out[kY].desc.type);
    if (why.empty())
    {
        GemmShape shape;
        why = checkInputs(mFields, in[kCODES].desc.type, in[kX].desc.dims, in[kCODES].desc.dims,
            in[kSCALES].desc.dims, shape);
    }
    if (!why.empty())
    {
        logError(why);
        return -1;
    }
    return 0;
}

int32_t WeightOnlyGemmPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs < 1 || nbOutputs != kNB_OUTPUTS)
    {
        return -1;
    }
    outputTypes[kY] = inputTypes[kX];
    return 0;
}

int32_t WeightOnlyGemmPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || inputs[kX].nbDims < 2 || inputs[kSCALES].nbDims < 1)
    {
        logError("getOutputShapes: expects X of rank >= 2, codes, scales, and 1 output");
        return -1;
    }
    // Y [..., N]: X's leading dimensions, then N, the scales' last dimension in every accepted layout
    // (INT4 [K / block_size, N], INT8 [N], packed INT4 as int8 [K / block_size, N]).
    DimsExprs const& x = inputs[kX];
    outputs[kY].nbDims = x.nbDims;
    for (int32_t i = 0; i + 1 < x.nbDims; ++i)
    {
        outputs[kY].d[i] = x.d[i];
    }
    outputs[kY].d[x.nbDims - 1] = inputs[kSCALES].d[inputs[kSCALES].nbDims - 1];
    return 0;
}

bool WeightOnlyGemmPlugin::supportsFormatCombination(
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
    if (pos == kX)
    {
        return isKernelFloat(desc.type);
    }
    if (pos == kCODES)
    {
        // Either type whatever the fields say: a mismatch with axis / block_size is reported by configurePlugin
        // in words, rather than as "no supported format" (the codes are constants, TensorRT has no other type).
        return desc.type == DataType::kINT4 || desc.type == DataType::kINT8;
    }
    // scales and Y: X's type
    return desc.type == inOut[kX].desc.type;
}

int32_t WeightOnlyGemmPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

size_t WeightOnlyGemmPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t nbOutputs) const noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || !isKernelFloat(inputs[kX].desc.type))
    {
        return 0;
    }
    GemmShape shape;
    if (!checkInputs(mFields, inputs[kCODES].desc.type, inputs[kX].max, inputs[kCODES].desc.dims,
            inputs[kSCALES].desc.dims, shape)
             .empty())
    {
        return 0; // configurePlugin has said why
    }
    int64_t const maxM = leadingProduct(inputs[kX].max);
    int64_t const minM = std::max<int64_t>(1, leadingProduct(inputs[kX].min));
    if (maxM < 1 || !fitsInt(maxM))
    {
        return 0;
    }

    // The size functions only read the shape fields (no GPU, no pointers).
    BelleWeightOnlyParams p;
    std::memset(&p, 0, sizeof(p));
    p.dtype = toBelle(inputs[kX].desc.type);
    p.bits = shape.bits;
    p.n = static_cast<int>(shape.n);
    p.k = static_cast<int>(shape.k);
    p.group = shape.bits == 4 ? mFields.blockSize : 0;
    p.x_stride = shape.k;
    p.y_stride = shape.n;

    // The largest over the profile's M: every small M (where split-K happens), then the extremes.
    size_t size = 0;
    for (int64_t m = minM; m <= std::min(maxM, kWORKSPACE_SCAN_ROWS); ++m)
    {
        p.m = static_cast<int>(m);
        size = std::max(size, splitKBytes(p));
    }
    for (int64_t m : {minM, maxM})
    {
        p.m = static_cast<int>(m);
        size = std::max(size, splitKBytes(p));
    }
    return size;
}

int32_t WeightOnlyGemmPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        logError("expects 3 inputs (X, codes, scales) and 1 output");
        return -1;
    }
    std::string why = checkFloatTypes(in[kX].type, in[kSCALES].type, out[kY].type);
    if (why.empty())
    {
        GemmShape shape;
        why = checkInputs(mFields, in[kCODES].type, in[kX].dims, in[kCODES].dims, in[kSCALES].dims, shape);
    }
    if (!why.empty())
    {
        logError(why);
        return -1;
    }
    return 0;
}

int32_t WeightOnlyGemmPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    DataType const type = inputDesc[kX].type;
    std::string why = checkFloatTypes(type, inputDesc[kSCALES].type, outputDesc[kY].type);
    GemmShape shape;
    if (why.empty())
    {
        why = checkInputs(mFields, inputDesc[kCODES].type, inputDesc[kX].dims, inputDesc[kCODES].dims,
            inputDesc[kSCALES].dims, shape);
    }
    if (!why.empty())
    {
        logError(why);
        return -1;
    }
    int64_t const m = leadingProduct(inputDesc[kX].dims);
    if (m == 0)
    {
        return 0;
    }
    if (!fitsInt(m))
    {
        logError("X " + dimsString(inputDesc[kX].dims) + ": M out of range");
        return -1;
    }
    // The kernels read X, codes and scales with 16-byte loads.
    for (int32_t i : {static_cast<int32_t>(kX), static_cast<int32_t>(kCODES), static_cast<int32_t>(kSCALES)})
    {
        if (reinterpret_cast<uintptr_t>(inputs[i]) % 16 != 0)
        {
            logError("input " + std::to_string(i) + " is not 16-byte aligned");
            return -1;
        }
    }

    BelleWeightOnlyParams p;
    std::memset(&p, 0, sizeof(p));
    p.dtype = toBelle(type);
    p.bits = shape.bits;
    p.m = static_cast<int>(m);
    p.n = static_cast<int>(shape.n);
    p.k = static_cast<int>(shape.k);
    p.group = shape.bits == 4 ? mFields.blockSize : 0;
    p.x = inputs[kX];
    p.x_stride = shape.k; // X is [..., K], dense
    p.codes = inputs[kCODES];
    p.scales = inputs[kSCALES];
    p.bias = nullptr;
    p.y = outputs[kY];
    p.y_stride = shape.n;
    p.workspace = nullptr;
    p.tile_counters = nullptr;

    // Split-K (small M): partial sums at the start of the workspace, the tile counters after them, each part
    // 256-byte aligned (getWorkspaceSize reserved the largest such layout of the profile). The kernels leave
    // the counters at zero after each call, but they need them zero before it, and TensorRT's workspace is
    // scratch memory shared with other layers: its content at enqueue is arbitrary. So the counters are zeroed
    // here on every call (one small memset on the same stream; CUDA-graph capturable). A workspace of 0 bytes
    // (an engine built with a creator that reported none) runs without split-K, which the kernels allow.
    if (workspace != nullptr)
    {
        size_t const partial = belle_weight_only_workspace_size(&p);
        size_t const counters = belle_weight_only_counters_size(&p);
        if (partial > 0 && counters > 0)
        {
            char* const base = static_cast<char*>(workspace);
            p.workspace = base;
            p.tile_counters = reinterpret_cast<int32_t*>(base + alignUp(partial));
            cudaError_t const err = cudaMemsetAsync(p.tile_counters, 0, counters, stream);
            if (err != cudaSuccess)
            {
                logError(std::string("zeroing the split-K tile counters failed: ") + cudaGetErrorString(err));
                return -1;
            }
        }
    }

    int const rc = belle_weight_only_gemm(&p, stream);
    if (rc != 0)
    {
        char const* what = belle_weight_only_error_string(rc);
        logError("belle_weight_only_gemm failed (" + std::to_string(rc) + "): " + (what != nullptr ? what : "")
            + " [bits=" + std::to_string(p.bits) + " M=" + std::to_string(p.m) + " N=" + std::to_string(p.n)
            + " K=" + std::to_string(p.k) + " group=" + std::to_string(p.group) + "]");
        return rc;
    }
    return 0;
}

nvinfer1::IPluginV3* WeightOnlyGemmPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* WeightOnlyGemmPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mSerialized.clear();
        mSerialized.emplace_back("axis", &mFields.axis, PluginFieldType::kINT32, 1);
        mSerialized.emplace_back("block_size", &mFields.blockSize, PluginFieldType::kINT32, 1);
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

WeightOnlyGemmCreator::WeightOnlyGemmCreator()
{
    // The ONNX parser passes only the node attributes named here (INT attributes as INT32).
    mFieldNames.emplace_back("axis", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("block_size", nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

nvinfer1::IPluginV3* WeightOnlyGemmCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        // Missing fields take DequantizeLinear's defaults (axis 1, block_size 0), as the ONNX node would.
        WeightOnlyGemmFields fields;
        bool ok = true;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr)
            {
                continue;
            }
            std::string const name(f.name);
            if (name == "axis")
            {
                ok = ok && readInt(f, fields.axis);
            }
            else if (name == "block_size")
            {
                ok = ok && readInt(f, fields.blockSize);
            }
            // anything else (plugin_namespace, plugin_version, future attributes) is not a field: ignored
        }
        // codes are [K, N]: axis -2 / -1 are 0 / 1
        if (ok && (fields.axis == -2 || fields.axis == -1))
        {
            fields.axis += 2;
        }
        if (!ok || (fields.axis != 0 && fields.axis != 1) || fields.blockSize < 0)
        {
            logError("bad fields: axis=" + std::to_string(fields.axis) + ", block_size="
                + std::to_string(fields.blockSize) + " (axis 0 or 1 of the codes [K, N], block_size >= 0, as integers)");
            return nullptr;
        }
        return new WeightOnlyGemmPlugin(fields);
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

PluginFieldCollection const* WeightOnlyGemmCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

char const* WeightOnlyGemmCreator::getPluginName() const noexcept
{
    return kWEIGHT_ONLY_GEMM_NAME;
}

char const* WeightOnlyGemmCreator::getPluginVersion() const noexcept
{
    return kWEIGHT_ONLY_GEMM_VERSION;
}

char const* WeightOnlyGemmCreator::getPluginNamespace() const noexcept
{
    return kWEIGHT_ONLY_GEMM_NAMESPACE;
}

} // namespace belle
