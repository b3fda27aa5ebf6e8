"""Hand-written device kernels of the model layers (Triton, and C++ for CPUs), imported lazily by the layers that use
them."""

# what a CPU needs for ringlet's own kernels (`cpu_vnni`), named here for placement, which imports no torch
CPU_KERNEL_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
