"""Quantized weights: the storage formats (GGUF's Q8_0, Q4_0 and Q4_1 blocks, kept byte for byte) and the
kernels that multiply by them without ever holding a dequantized block.

formats.py   what a format is, its bytes, quantizing and dequantizing (numpy, via the `gguf` package)
kernels.py   products with quantized or narrow-float weights through a bounded float32 scratch (torch)
"""
