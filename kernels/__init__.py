"""Triton kernels, one op per file, each beside a plain-PyTorch reference of the same op."""
