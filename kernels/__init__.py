"""rebasin's compute kernels (installed as ``rebasin_kernels``): each Triton kernel beside its torch reference.

Nothing here imports triton at module import time; use
:func:`rebasin_kernels.backend.triton_usable` to ask whether it can run.
"""
