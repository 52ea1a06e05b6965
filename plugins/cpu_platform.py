"""A `cpu` platform for verl 0.9.1, which ships only cuda/npu/rocm ones: the CPU demo and the tests.

verl imports every module named in `VERL_USE_EXTERNAL_MODULES` at the end of `import verl`
(verl/__init__.py), so with `VERL_USE_EXTERNAL_MODULES=plugins.cpu_platform`, `VERL_PLATFORM=cpu` and
the repo root on PYTHONPATH this runs in every torchrun rank before the trainer starts.
`stages/launch.py` sets all three when `launch.device=cpu` (tests and the CPU demo). What it patches:
  1. a `cpu` entry in verl's PlatformRegistry (picked by VERL_PLATFORM=cpu): device "cpu", backend
     gloo, and a stand-in for `torch.cuda` whose seeding/caching/memory calls are no-ops;
  2. verl opens its process group as "cpu:gloo,<device>:<backend>", which with device cpu reads
     "cpu:gloo,cpu:gloo" and torch rejects the duplicate: collapsed to plain "gloo";
  3. verl registers its FSDP engines for cuda/npu only: VERL_ENGINE_DEVICE=cuda (verl's own override
     of the lookup) selects them; they then place tensors on `get_device_name()`, i.e. cpu.
FSDP2 trains this way; FSDP1 does not (stages/sft.py refuses it on CPU). Attention must be sdpa or
eager (config.yaml's `model.attn_implementation`), as flash-attn needs CUDA. Nothing here runs on a GPU.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

ACTIVE = os.environ.get("VERL_PLATFORM", "") == "cpu"


class _CpuModule:
    """What verl calls on `torch.cuda`: one device, index 0; everything else (seeds, empty_cache,
    synchronize, memory statistics) does nothing and returns 0."""

    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 1)
    current_device = staticmethod(lambda: 0)
    mem_get_info = staticmethod(lambda *a, **k: (0, 0))
    get_device_name = staticmethod(lambda *a, **k: "CPU")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: 0


# 1. the platform
@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    device_name = property(lambda self: "cpu")
    vendor_name = property(lambda self: "cpu")
    device_module = property(lambda self: _CpuModule())

    def is_available(self):
        return True

    def is_platform_available(self, use_smi_check=False):
        return ACTIVE  # never auto-detected: only when VERL_PLATFORM=cpu asks for it

    def current_device(self):
        return "cpu"  # verl hands this to .to(device=…): an integer would mean an accelerator index

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

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
        pass

    def profiler_stop(self):
        pass

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


# 2. "cpu:gloo,cpu:gloo" → "gloo"
_init_process_group = torch.distributed.init_process_group


def _init_gloo(*args, backend=None, **kwargs):
    if backend and set(backend.split(",")) == {"cpu:gloo"}:
        backend = "gloo"
    return _init_process_group(*args, backend=backend, **kwargs)


if ACTIVE:
    torch.distributed.init_process_group = _init_gloo
    # 3. the FSDP engines registered for cuda
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
