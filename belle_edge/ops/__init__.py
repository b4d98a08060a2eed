"""Custom ops over kernels/: the fused turn-window attention (``attention``) and its nvcc build (``build``)."""
