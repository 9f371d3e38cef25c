import os

# Triton kernels run through the interpreter on CPU (CI has no GPU); must be set before triton imports.
os.environ.setdefault("TRITON_INTERPRET", "1")
