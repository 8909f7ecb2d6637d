"""Runtimes that execute lowered models: :mod:`lowbit.runtime.binary`, the bit-packed XNOR-popcount runtime of
binarized networks (numba kernels, batch norm folded into integer thresholds); :mod:`lowbit.runtime.integer`, the
integer reference interpreter of int8-lowered models. Import the one you need (numba compiles on first use)."""
