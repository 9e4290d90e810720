"""Workers' math-library threads: their share of the CPUs unless the user set a limit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from threadpoolctl import threadpool_info

from aqueduct import Flow, FlowStep
from aqueduct.cpus import available_cpus

from .handlers import Task, ThreadReporter

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def clean_thread_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


async def seen_by_worker(flow: Flow) -> object:
    await flow.start_async()
    try:
        task = Task()
        await flow.process(task)
        return task.result
    finally:
        await flow.stop()


async def test_each_worker_gets_its_share_of_the_cpus(clean_thread_env: pytest.MonkeyPatch) -> None:
    flow = Flow(FlowStep(ThreadReporter(), nprocs=2), FlowStep(ThreadReporter(), nprocs=2), worker_cpus=8)
    assert flow.worker_threads() == 2
    omp, blas, _ = await seen_by_worker(flow)
    assert omp == "2"
    assert blas and set(blas) == {2}


async def test_the_users_setting_wins(clean_thread_env: pytest.MonkeyPatch) -> None:
    clean_thread_env.setenv("OMP_NUM_THREADS", "3")
    omp, blas, _ = await seen_by_worker(Flow(FlowStep(ThreadReporter()), worker_cpus=1))
    assert omp == "3"  # the user's OpenMP setting stays
    assert set(blas) == {1}  # BLAS, which the user did not limit, gets the worker's share

    parent_blas = {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    clean_thread_env.setenv("OPENBLAS_NUM_THREADS", "7")
    omp, blas, _ = await seen_by_worker(Flow(FlowStep(ThreadReporter()), worker_cpus=1))
    assert set(blas) == parent_blas  # the user limits BLAS: the worker leaves its thread pool alone


async def test_a_pool_no_larger_than_the_share_starts_no_thread(clean_thread_env: pytest.MonkeyPatch) -> None:
    # Setting BLAS's pool in a new worker starts its threads, which spin for a while: a pool that is
    # already within the share is left alone, and the worker has no thread but its own.
    parent_blas = {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    share = max(parent_blas, default=1)
    _, blas, threads = await seen_by_worker(Flow(FlowStep(ThreadReporter()), worker_cpus=share))
    assert set(blas) == parent_blas
    assert threads == 1


def test_default_share_is_of_the_cpus_this_process_may_use() -> None:
    flow = Flow(FlowStep(ThreadReporter(), nprocs=3))
    assert flow.worker_threads() == max(1, int(available_cpus() // 3))
    with pytest.raises(ValueError, match="worker_cpus"):
        Flow(FlowStep(ThreadReporter()), worker_cpus=0)
