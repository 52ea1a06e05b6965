"""Test-only: a `cpu` platform for verl 0.9.1, which ships only cuda/npu/rocm ones.

Loaded in every process (torchrun ranks, Ray workers) through `VERL_USE_EXTERNAL_MODULES=tests.cpu_platform`
together with `VERL_PLATFORM=cpu`; `stages/sft.py` sets both when `launch.device=cpu`. It
  1. registers a PlatformBase subclass named `cpu`: device `cpu`, gloo, no-op seeding/caches;
  2. collapses verl's process-group backend "cpu:gloo,cpu:gloo" (cpu + this device) to "gloo";
  3. nothing more: verl's FSDP engines are looked up under `cuda` (`VERL_ENGINE_DEVICE=cuda`, also
     set by the stage) and place tensors on `get_device_name()`, which is now `cpu`. FSDP2 works
     on CPU this way; FSDP1 does not.
The CPU demo (`make demo`) uses it too. Nothing here is used on a GPU.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


class _CpuModule:
    """What verl calls on `torch.cuda`-like modules, answered for the CPU."""

    @staticmethod
    def is_available():
        return True

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def current_device():
        return 0

    @staticmethod
    def mem_get_info(*_a, **_k):
        return (0, 0)

    @staticmethod
    def get_device_name(*_a, **_k):
        return "CPU"

    def __getattr__(self, name):  # memory stats read 0; empty_cache, synchronize, seeds do nothing
        if name.startswith("__"):
            raise AttributeError(name)
        return _zero


def _zero(*_a, **_k):
    return 0


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    _module = _CpuModule()

    @property
    def device_name(self):
        return "cpu"

    @property
    def vendor_name(self):
        return "cpu"

    @property
    def device_module(self):
        return self._module

    def is_available(self):
        return True

    def is_platform_available(self, use_smi_check=False):
        return os.environ.get("VERL_PLATFORM", "") == "cpu"

    def current_device(self):
        # verl passes this straight to .to(device=…) / torch.device(…): an index would mean an accelerator
        return "cpu"

    def device_count(self):
        return 1

    def set_device(self, device_index):
        return None

    def synchronize(self, device_index=None):
        return None

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        return None

    def empty_cache(self):
        return None

    def get_device_capability(self, device_index=0):
        return None, None

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        return None

    def profiler_stop(self):
        return None

    def ray_resource_name(self):
        return "CPU"

    def ray_resource_options(self, num_gpus):
        return {}

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None



_init_process_group = torch.distributed.init_process_group


def _init_gloo(*args, backend=None, **kwargs):
    if backend and set(backend.split(",")) == {"cpu:gloo"}:
        backend = "gloo"
    return _init_process_group(*args, backend=backend, **kwargs)


if os.environ.get("VERL_PLATFORM", "") == "cpu":
    torch.distributed.init_process_group = _init_gloo
