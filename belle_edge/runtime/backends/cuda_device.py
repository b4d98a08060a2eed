"""Device memory and streams for the TensorRT backend, without torch: one small interface over two libraries.

* ``cuda-python`` (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6): a wheel on x86_64 and aarch64;
  the CUDA runtime is linked into it, so it needs only the driver. With no usable driver it answers
  ``cudaErrorInsufficientDriver`` (or ``cudaErrorNoDevice``), which :func:`unavailable` turns into a reason.
* ``pycuda``: the usual choice on a Jetson, where it builds against JetPack's CUDA. It is used when
  cuda-python is missing. It works on the device's primary context, the one the CUDA runtime (and so
  TensorRT) uses, rather than creating its own as ``pycuda.autoinit`` does.

Pointers are plain ints and streams are opaque handles whose ``int()`` TensorRT takes. Every call either
succeeds or raises :class:`CudaError` naming the CUDA call and its error.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ...errors import BelleEdgeError, MissingDependencyError

INSTALL = "pip install 'belle_edge[trt-runtime]' (cuda-python), or pycuda on a Jetson"


class CudaError(BelleEdgeError):
    """CUDA is missing or refused a call (no driver, no device, out of memory)."""


def unavailable() -> str | None:
    """Why CUDA cannot be used here (one line), or None when it can."""
    try:
        device = open_device()
    except BelleEdgeError as e:
        return str(e)
    device.close()
    return None


def open_device(index: int = 0) -> "CudaPython | PyCuda":
    """The interface over whichever library is installed, bound to device ``index``."""
    try:
        return CudaPython(index)
    except ImportError:
        pass
    try:
        return PyCuda(index)
    except ImportError:
        raise MissingDependencyError(f"no CUDA Python bindings: {INSTALL}") from None


class _Device:
    name: str

    def pinned(self, shape, dtype) -> np.ndarray:
        """A page-locked host array (async copies from pageable memory are synchronous)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        ptr = self.malloc_host(max(count * dtype.itemsize, 1))
        raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def htod(self, dst: int, src: np.ndarray, stream, nbytes: int | None = None) -> None:
        self.copy(dst, src.ctypes.data, src.nbytes if nbytes is None else nbytes, "htod", stream)

    def dtoh(self, dst: np.ndarray, src: int, stream, nbytes: int | None = None) -> None:
        assert dst.flags.c_contiguous
        self.copy(dst.ctypes.data, src, dst.nbytes if nbytes is None else nbytes, "dtoh", stream)

    def dtod(self, dst: int, src: int, nbytes: int, stream) -> None:
        self.copy(dst, src, nbytes, "dtod", stream)


class CudaPython(_Device):
    name = "cuda-python"

    def __init__(self, index: int):
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            from cuda import cudart as rt  # cuda-python < 12.6
        self.rt = rt
        self._kinds = {"htod": rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                       "dtoh": rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                       "dtod": rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice}
        try:
            (count,) = self._call("cudaGetDeviceCount")
        except CudaError as e:  # no driver, one too old for these bindings, or no GPU: the usual skip reason
            raise CudaError(f"no usable CUDA GPU here: {str(e).split(': ', 1)[1]} (cuda-bindings {_version()})") \
                from None
        if count <= index:
            raise CudaError(f"CUDA device {index} not found ({count} devices)")
        self._call("cudaSetDevice", index)
        self.index = index
        self._host: list[int] = []

    def _call(self, fn: str, *args):
        result = getattr(self.rt, fn)(*args)
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1].decode()
            text = self.rt.cudaGetErrorString(err)[1].decode()
            raise CudaError(f"CUDA via cuda-python: {fn} failed: {name} ({text})")
        return rest

    def compute_capability(self) -> int:
        attr = self.rt.cudaDeviceAttr
        (major,) = self._call("cudaDeviceGetAttribute", attr.cudaDevAttrComputeCapabilityMajor, self.index)
        (minor,) = self._call("cudaDeviceGetAttribute", attr.cudaDevAttrComputeCapabilityMinor, self.index)
        return 10 * major + minor

    def device_name(self) -> str:
        (props,) = self._call("cudaGetDeviceProperties", self.index)
        name = props.name
        return (name.decode() if isinstance(name, bytes) else str(name)).split("\x00")[0]

    def malloc(self, nbytes: int) -> int:
        (ptr,) = self._call("cudaMalloc", max(int(nbytes), 1))
        return int(ptr)

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def malloc_host(self, nbytes: int) -> int:
        (ptr,) = self._call("cudaMallocHost", int(nbytes))
        self._host.append(int(ptr))
        return int(ptr)

    def stream(self):
        (stream,) = self._call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)
        return stream

    def sync(self, stream) -> None:
        self._call("cudaStreamSynchronize", stream)

    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream) -> None:
        if nbytes:
            self._call("cudaMemcpyAsync", dst, src, nbytes, self._kinds[kind], stream)

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
        """Device to device: ``height`` rows of ``width`` bytes, rows ``spitch`` / ``dpitch`` bytes apart."""
        if width and height:
            self._call("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, self._kinds["dtod"], stream)

    def memset(self, ptr: int, value: int, nbytes: int, stream) -> None:
        if nbytes:
            self._call("cudaMemsetAsync", ptr, value, nbytes, stream)

    def close(self) -> None:
        while self._host:
            self._call("cudaFreeHost", self._host.pop())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "?"


class PyCuda(_Device):
    name = "pycuda"

    def __init__(self, index: int):
        import pycuda.driver as drv

        self.drv = drv
        try:
            drv.init()
            if drv.Device.count() <= index:
                raise CudaError(f"CUDA device {index} not found ({drv.Device.count()} devices)")
            self.dev = drv.Device(index)
            self.ctx = self.dev.retain_primary_context()  # the CUDA runtime's (TensorRT's) context
            self.ctx.push()
        except drv.Error as e:
            raise CudaError(f"CUDA via pycuda: {e}") from None
        self._mem: dict[int, object] = {}  # pycuda frees an allocation when its object dies: keep them
        self._host: list[np.ndarray] = []

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except self.drv.Error as e:
            raise CudaError(f"CUDA via pycuda: {getattr(fn, '__name__', fn)} failed: {e}") from None

    def compute_capability(self) -> int:
        major, minor = self.dev.compute_capability()
        return 10 * major + minor

    def device_name(self) -> str:
        return self.dev.name()

    def malloc(self, nbytes: int) -> int:
        mem = self._guard(self.drv.mem_alloc, max(int(nbytes), 1))
        self._mem[int(mem)] = mem
        return int(mem)

    def free(self, ptr: int) -> None:
        self._mem.pop(ptr).free()

    def pinned(self, shape, dtype) -> np.ndarray:
        array = self._guard(self.drv.pagelocked_empty, shape, dtype)
        self._host.append(array)
        return array

    def stream(self):
        return _Handle(self._guard(self.drv.Stream))

    def sync(self, stream) -> None:
        self._guard(stream.obj.synchronize)

    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream) -> None:
        if not nbytes:
            return
        if kind == "dtod":
            self._guard(self.drv.memcpy_dtod_async, dst, src, nbytes, stream.obj)
            return
        # pycuda's host<->device calls take buffers, not addresses: wrap the host side
        host = np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(src if kind == "htod" else dst))
        if kind == "htod":
            self._guard(self.drv.memcpy_htod_async, dst, host, stream.obj)
        else:
            self._guard(self.drv.memcpy_dtoh_async, host, src, stream.obj)

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
        if not (width and height):
            return
        op = self.drv.Memcpy2D()
        op.set_src_device(src)
        op.set_dst_device(dst)
        op.src_pitch, op.dst_pitch, op.width_in_bytes, op.height = spitch, dpitch, width, height
        self._guard(op, stream.obj)

    def memset(self, ptr: int, value: int, nbytes: int, stream) -> None:
        if nbytes:
            self._guard(self.drv.memset_d8_async, ptr, value, nbytes, stream.obj)

    def close(self) -> None:
        self._host.clear()
        if self.ctx is not None:
            self.ctx.pop()
            self.ctx = None


class _Handle:
    """A pycuda stream that TensorRT can take as ``int(stream)``."""

    def __init__(self, obj):
        self.obj = obj

    def __int__(self) -> int:
        return int(self.obj.handle)
