"""Math-library threads of a worker process: its share of the CPUs, unless the user said otherwise.

OpenMP, MKL, OpenBLAS and torch each start one thread per core of the *machine* by default; with
several workers in a pod limited to a few CPUs, those threads fight over the same cores (and spin
while they wait). A worker therefore limits them, before ``on_start``, to its share of the CPUs:
libraries loaded later read the environment variables below; those already loaded (numpy's
OpenBLAS, inherited from the parent) are limited through threadpoolctl, and torch, if imported
already, through ``torch.set_num_threads``. A variable the user set is left alone, and so is the
library it governs; so is a thread pool no larger than the share (setting it would start its threads
in the new process, which spin a while before they sleep).
"""

from __future__ import annotations

import os
import sys

from threadpoolctl import threadpool_info, threadpool_limits

#: Environment variables read by math libraries when they load, and the threadpoolctl API each governs.
THREAD_VARIABLES = {
    "OMP_NUM_THREADS": "openmp",
    "MKL_NUM_THREADS": "blas",
    "OPENBLAS_NUM_THREADS": "blas",
    "BLIS_NUM_THREADS": "blas",
    "VECLIB_MAXIMUM_THREADS": "blas",
    "NUMEXPR_NUM_THREADS": None,
}


def limit_math_threads(threads: int) -> None:
    """Limit this process's math-library threads to ``threads`` where the user set no limit."""
    user_set = {name for name in THREAD_VARIABLES if name in os.environ}
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))
    apis = {api for name, api in THREAD_VARIABLES.items() if api is not None and name not in user_set}
    blas_set_by_user = any(THREAD_VARIABLES[name] == "blas" for name in user_set)
    if blas_set_by_user:
        apis.discard("blas")
    # Only pools larger than the share are set: setting a pool, even to the size it had, starts its
    # threads in a forked process, and OpenBLAS's spin for about 0.1 s before they sleep.
    apis &= {lib["user_api"] for lib in threadpool_info() if lib["num_threads"] > threads}
    for api in sorted(apis):
        threadpool_limits(limits=threads, user_api=api)
    torch = sys.modules.get("torch")
    user_set_torch = "OMP_NUM_THREADS" in user_set or "MKL_NUM_THREADS" in user_set
    if torch is not None and not user_set_torch and torch.get_num_threads() > threads:
        torch.set_num_threads(threads)


def worker_share(cpus: float, workers: int) -> int:
    """Threads for each of ``workers`` processes sharing ``cpus`` CPUs: at least 1."""
    return max(1, int(cpus // max(1, workers)))
