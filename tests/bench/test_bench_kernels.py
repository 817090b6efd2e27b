"""The kernel timer: torch.utils.benchmark's adaptive autorange on a CPU (triton's do_bench on CUDA), so the
median is of whole calls after warm-up."""

from __future__ import annotations

import time

import torch

from mmeff.bench.kernels import timeit


def test_cpu_timer_measures_whole_calls_after_warm_up():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    seconds = timeit(fn, torch.device("cpu"), warmup=3, repeats=2)
    assert 0.002 <= seconds < 0.5  # at least the sleep of one call: the median is per call, not per batch
    assert len(calls) > 3  # the warm-up calls, then the timed ones
