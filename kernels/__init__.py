"""rebasin's compute kernels: each Triton kernel sits beside a plain torch reference.

Nothing here imports triton or cupy at module import time; use
:func:`kernels.backend.triton_usable` and :func:`kernels.backend.cupy_usable`.
"""
