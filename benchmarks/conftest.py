"""Shared benchmark set-up: real compiled kernels on GPU, machine facts in every JSON."""

from __future__ import annotations

import pytest
import torch

from benchmarks._common import cpu_device_name


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return cpu_device_name()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["imrnns_device"] = device_name()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        pass


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
