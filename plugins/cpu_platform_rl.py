"""Beside plugins/cpu_platform.py (CPU runs: tests, the demo): what verl 0.9.1's Ray trainer (`main_ppo`) also needs on CPU.

Loaded in every Ray process through `VERL_USE_EXTERNAL_MODULES=plugins.cpu_platform,plugins.cpu_platform_rl,…`
(stages/grpo.py sets it from stages/launch.py when `launch.device=cpu`). With the `cpu` platform, verl already asks Ray for
CPU bundles, but
  1. the resource check before placement counts Ray's `GPU` (or `NPU`) resource, finds none and
     stops: here it counts CPUs;
  2. the reference model (forward only) is sharded with FSDP2's CPUOffloadPolicy(pin_memory=True), and
     pinning needs an accelerator: here the policy does not pin.
Nothing here is used on a GPU.
"""
from __future__ import annotations

import os

if os.environ.get("VERL_PLATFORM", "") == "cpu":
    import ray
    from verl.single_controller.ray.base import ResourcePoolManager

    def _check_cpus(self):
        have = sum(node.get("CPU", 0) for node in ray._private.state.available_resources_per_node().values())
        need = sum(n for per_node in self.resource_pool_spec.values() for n in per_node)
        if have < need:
            raise ValueError(f"the CPU platform needs {need} Ray CPUs for its worker processes; Ray has {have}")

    ResourcePoolManager._check_resource_available = _check_cpus

    from torch.distributed.fsdp import CPUOffloadPolicy
    from verl.workers.engine.fsdp import transformer_impl

    transformer_impl.CPUOffloadPolicy = lambda pin_memory=True, **kw: CPUOffloadPolicy(pin_memory=False, **kw)
