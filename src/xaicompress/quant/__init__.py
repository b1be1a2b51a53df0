"""Quantization: bit allocation, integer and codebook quantizers, bit packing."""
