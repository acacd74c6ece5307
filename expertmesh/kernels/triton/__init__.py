"""Triton kernels, one op per module. Each module imports triton, so import them lazily
(the registry does); importing this package alone never needs triton."""
