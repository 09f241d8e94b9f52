"""The machine's own float32 matrix-multiply rate: the yardstick every benchmark prints."""

import time

import numpy as np


def matmul_gflops(a, b, repeats: int = 5, sync=None) -> float:
    """Best-of-``repeats`` GFLOP/s of ``a @ b`` for square n×n operands of any array library
    with ``@`` (numpy, torch, cupy), after one warm-up product (thread pool, page faults).
    ``sync``: called before reading the clock (a GPU library's synchronize)."""
    sync = sync or (lambda: None)
    n = a.shape[0]
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an n×n float32 matmul through numpy's BLAS."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    return matmul_gflops(a, b, repeats)


def cupy_sgemm_gflops(n: int = 8192, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an n×n float32 matmul on the GPU through CuPy (cuBLAS;
    plain float32, TF32 only if CUPY_TF32=1 is set)."""
    import cupy

    rng = cupy.random.default_rng(0)
    a = rng.random((n, n), dtype=cupy.float32)
    b = rng.random((n, n), dtype=cupy.float32)
    return matmul_gflops(a, b, repeats, sync=cupy.cuda.Device().synchronize)
