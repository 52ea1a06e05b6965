"""A transformers rollout backend for verl 0.9.1's GRPO (`actor_rollout_ref.rollout.name=hf`), for machines
without vLLM (CPU tests, the demo) and as a slow, plain fallback on GPU.

verl finds a rollout backend in two registries, both filled here at import time:
  - `RolloutReplicaRegistry["hf"]` -> HFReplica: used by the trainer's LLMServerManager (in the task
    runner) to start one HFServer Ray actor per rollout replica, on the node and GPU of the replica's
    first training worker, as vLLM's replica does;
  - `_ROLLOUT_REGISTRY[("hf", "async")]` -> HFServerAdapter: built inside every FSDP worker; it hands the
    actor's new weights to the server after each step (`update_weights`) and sleeps/wakes it.
verl imports this module in every process (driver, task runner, workers, servers) when it is named in
`VERL_USE_EXTERNAL_MODULES`, which stages/grpo.py sets for the whole Ray job.

The server decodes with its own loop over a transformers model (KV cache, left padding): requests that
arrive together (no gap of GATHER_QUIET_S) and share sampling settings are decoded as one batch. Each
request is one sample: verl's trainer repeats every prompt `rollout.n` times before the agent loop sends
them, so `n` needs nothing here. Sampling follows vLLM's semantics for the keys verl sends
(temperature 0 = greedy, top_k -1 = off, top_p), and the returned log-probs are vLLM's `processed_logprobs`: log-softmax of the
logits after temperature, top-k and top-p, at the sampled token.
Sampling is seeded per request, so a run repeats its rollouts and a request's sample does not depend on what
else is in its batch: a request's own generator starts from its `seed` when it sends one (vLLM's per-request
seed), else from a hash of `rollout.seed`, the replica, the global step, the prompt's token ids and how many
times this step has already seen that prompt (the n copies of a prompt in a GRPO group differ).
Departures: no tensor parallelism (grpo.py sets tp=1 for hf), no prefix cache, no multimodal input,
repetition_penalty is ignored, LoRA weights must arrive merged (`actor_rollout_ref.model.lora.merge`).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass, field

import ray
import torch

from verl.workers.rollout import base as rollout_base
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, RolloutReplicaRegistry, TokenOutput

# verl's agent-loop workers (separate Ray processes) send one step's requests in bursts that can be
# seconds apart; a batch decoded before the last burst arrives makes the rest wait for a second decode
# of the full response length. So a batch starts once no request has arrived for GATHER_QUIET_S, or
# GATHER_MAX_S after its first request, or as soon as it holds max_num_seqs requests.
GATHER_QUIET_S = 0.5
GATHER_MAX_S = 5.0


@dataclass
class _Request:
    prompt: list[int]
    max_tokens: int
    generator: torch.Generator
    done: asyncio.Future
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
         generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its processed log-prob for each row of `logits` [B, V] (vLLM's sampling rules); row i's
    draw is one uniform from generators[i] (CPU generators), so a row's token depends on nothing else in the batch."""
    scores = logits.float()
    if temperature <= 0:
        token = scores.argmax(-1)
    else:
        scores = scores / temperature
        if 0 < top_k < scores.shape[-1]:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p  # mass before a token already covers top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        # inverse CDF: the first token whose cumulative mass exceeds the row's uniform; float64 keeps the
        # cumulative sum over a 152k vocabulary exact enough, and a token of zero mass is never picked
        cdf = scores.double().softmax(-1).cumsum(-1)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(cdf.device)
        token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    logprob = scores.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
    return token, logprob


class HFServer:
    """One replica's generation server (a Ray actor): a transformers model and a batching request queue."""

    def __init__(self, config, model_config, rollout_mode: RolloutMode, replica_rank: int, devices: str):
        from verl.utils.config import omega_conf_to_dataclass
        from verl.utils.device import get_device_name, get_visible_devices_keyword
        from verl.workers.config import HFModelConfig, RolloutConfig

        if devices:  # a num_gpus=0 actor sharing its training worker's GPU, as vLLM's server does
            os.environ[get_visible_devices_keyword()] = devices
        self.config = omega_conf_to_dataclass(config, dataclass_type=RolloutConfig)
        self.model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.rollout_mode, self.replica_rank = rollout_mode, replica_rank
        self.device = torch.device(get_device_name() if torch.accelerator.is_available() else "cpu")
        self.global_steps = None
        self.seen: dict[tuple[int, ...], int] = {}  # requests per prompt at seen_step (the repeat count)
        self.seen_step = None
        self.pending: dict[tuple, list[_Request]] = {}
        self.last_arrival = 0.0
        self.batches = 0  # decode calls so far (a test counts them)
        self.drains: set[asyncio.Task] = set()
        self.lock = asyncio.Lock()
        self.awake = True
        self._load_model()

    def _load_model(self):
        from transformers import AutoModelForCausalLM

        attn = (self.model_config.override_config or {}).get("attn_implementation", "sdpa")
        if attn == "ladder_varlen":  # a training-only kernel (no KV cache): decode with sdpa
            attn = "sdpa"
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_config.local_path, dtype=getattr(torch, self.config.dtype), attn_implementation=attn,
            trust_remote_code=self.model_config.trust_remote_code).to(self.device).eval()
        gen, tok = self.model_config.generation_config, self.model_config.tokenizer
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tok is not None and tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        self.eos = set() if self.config.ignore_eos else eos
        self.pad = (tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0)

    def ready(self) -> str:
        return f"hf://{ray.util.get_node_ip_address()}/{self.replica_rank}/{os.getpid()}"

    # ---- generation
    async def generate(self, prompt_ids, sampling_params: dict, request_id: str, image_data=None,
                       video_data=None, **_ignored) -> TokenOutput:
        if image_data is not None or video_data is not None:
            raise NotImplementedError("the hf rollout serves text prompts only")
        params = dict(sampling_params)
        prompt = [int(t) for t in prompt_ids]
        max_tokens = params.get("max_tokens", params.get("max_new_tokens"))
        if max_tokens is None:  # vLLM server's default: the response budget, within prompt+response
            max_tokens = min(self.config.response_length,
                             self.config.prompt_length + self.config.response_length - len(prompt))
        if self.config.max_model_len:
            max_tokens = min(max_tokens, self.config.max_model_len - len(prompt))
        max_tokens = max(1, int(max_tokens))
        key = (float(params.get("temperature", 1.0)), int(params.get("top_k", -1)), float(params.get("top_p", 1.0)))
        request = _Request(prompt, int(max_tokens), self._generator(prompt, params.get("seed")),
                           asyncio.get_running_loop().create_future())
        first = not self.pending
        self.pending.setdefault(key, []).append(request)
        self.last_arrival = asyncio.get_running_loop().time()
        if first:  # keep a reference: asyncio holds tasks only weakly
            task = asyncio.get_running_loop().create_task(self._drain())
            self.drains.add(task)
            task.add_done_callback(self.drains.discard)
        await request.done
        return TokenOutput(token_ids=request.tokens,
                           log_probs=request.logprobs if params.get("logprobs") else None,
                           stop_reason="completed", extra_fields={"global_steps": self.global_steps})

    def _generator(self, prompt: list[int], seed) -> torch.Generator:
        """The request's own sampling generator (see the module docstring)."""
        if seed is None:
            if self.seen_step != self.global_steps:  # a new step counts its prompts afresh
                self.seen, self.seen_step = {}, self.global_steps
            repeat = self.seen.get(tuple(prompt), 0)
            self.seen[tuple(prompt)] = repeat + 1
            key = json.dumps([self.config.seed, self.replica_rank, self.global_steps, prompt, repeat])
            seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        return torch.Generator().manual_seed(int(seed))

    async def _gather(self):
        """Wait for the rest of the batch whose first request just arrived (see GATHER_QUIET_S)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GATHER_MAX_S
        while loop.time() < deadline:
            if sum(map(len, self.pending.values())) >= self.config.max_num_seqs:
                return
            quiet_until = self.last_arrival + GATHER_QUIET_S
            if loop.time() >= quiet_until:
                return
            await asyncio.sleep(min(quiet_until, deadline) - loop.time())

    async def _drain(self):
        async with self.lock:  # a second drain task finds the queue empty and returns
            while self.pending:
                await self._gather()
                key = next(iter(self.pending))
                queue = self.pending.pop(key)
                batch, rest = queue[: self.config.max_num_seqs], queue[self.config.max_num_seqs:]
                if rest:
                    self.pending[key] = rest
                try:
                    await asyncio.to_thread(self._decode, batch, *key)
                except Exception as err:  # fail every waiting request rather than leave them hanging
                    for r in batch:
                        r.done.set_exception(err)
                    continue
                for r in batch:
                    r.done.set_result(None)

    @torch.no_grad()
    def _decode(self, batch: list[_Request], temperature: float, top_k: int, top_p: float):
        self.batches += 1
        if not self.awake:  # asked to generate while asleep: wake up rather than fail
            self.model.to(self.device)
            self.awake = True
        width = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's next token is at the same column
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        alive, cache = [True] * len(batch), None
        for _ in range(max(r.max_tokens for r in batch)):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            token, logprob = pick(out.logits[:, -1], temperature, top_k, top_p, [r.generator for r in batch])
            for i, (t, lp) in enumerate(zip(token.tolist(), logprob.tolist())):
                if alive[i]:
                    batch[i].tokens.append(t)
                    batch[i].logprobs.append(lp)
                    alive[i] = t not in self.eos and len(batch[i].tokens) < batch[i].max_tokens
            if not any(alive):
                break
            ids = token[:, None]
            mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=-1)
            positions = positions[:, -1:] + 1

    # ---- weights and memory
    async def load_weights(self, named: list[tuple[str, torch.Tensor]], global_steps=None, last=False):
        async with self.lock:
            params = self.model.state_dict(keep_vars=True)  # tied weights appear under both names
            unknown = [name for name, _ in named if name not in params]
            if unknown:
                raise KeyError(f"hf rollout: the trainer sent weights the rollout model lacks: {unknown[:5]}")
            with torch.no_grad():
                for name, tensor in named:
                    params[name].copy_(tensor)
            if last:
                self.global_steps = global_steps

    async def wake_up(self, tags=None):
        if not self.awake and self.rollout_mode != RolloutMode.STANDALONE:
            async with self.lock:
                self.model.to(self.device)
                self.awake = True

    async def sleep(self):
        if self.config.free_cache_engine and self.device.type != "cpu" and self.awake:
            async with self.lock:
                self.model.to("cpu")
                getattr(torch, self.device.type).empty_cache()
                self.awake = False

    async def set_global_steps(self, global_steps):
        self.global_steps = global_steps

    async def _noop(self, *args, **kwargs):
        return {}

    # nothing is cached between requests and requests are not aborted mid-decode
    clear_kv_cache = release_kv_cache = resume_kv_cache = resume_generation = _noop
    start_profile = stop_profile = wait_for_requests_to_drain = abort_all_requests = _noop


class HFReplica(RolloutReplica):
    """One HFServer per replica, placed beside the replica's first training worker."""

    async def launch_servers(self):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from verl.plugin.platform import get_platform
        from verl.utils.device import get_device_name, get_resource_name, get_visible_devices_keyword

        resource = get_resource_name()

        def where(_worker):
            ids = ray.get_runtime_context().get_accelerator_ids().get(resource, [])
            return ray.get_runtime_context().get_node_id(), ",".join(str(i) for i in ids)

        if self.workers:
            node, devices = await self.workers[0].__ray_call__.remote(where)
            options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}
        else:
            devices, options = "", {}
        if get_device_name() == "cpu":
            devices = ""
        elif devices:  # set before the process starts (torch may query CUDA on import), and Ray told to keep it
            env = {var: "1" for var in get_platform().ray_noset_envvars()}
            options["runtime_env"] = {"env_vars": {**env, get_visible_devices_keyword(): devices}}
        kind = "reward" if self.is_reward_model else "teacher" if self.is_teacher_model else "rollout"
        server = ray.remote(HFServer).options(
            name=f"hf_server_{kind}_{self.replica_rank}{self.name_suffix}", max_concurrency=self.max_concurrency,
            num_cpus=0, **options,
        ).remote(self.config, self.model_config, self.rollout_mode, self.replica_rank, devices)
        self._server_address = await server.ready.remote()
        self.servers, self._server_handle = [server], server


class HFServerAdapter(BaseRollout):
    """The training worker's side: weight sync and sleep/wake for its replica's server."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        c = self.config
        size = c.tensor_model_parallel_size * c.data_parallel_size * c.pipeline_model_parallel_size
        rank = int(os.environ["RANK"])
        self.replica_rank = rank // size if replica_rank == -1 else replica_rank
        self.leader = rank % size == 0
        self.bucket_bytes = min(c.checkpoint_engine.update_weights_bucket_megabytes, 512) << 20
        self.dtype = getattr(torch, c.dtype)  # sent as the rollout will hold them: bf16 halves the transfer
        self._server = None

    @property
    def server(self):
        if self._server is None:  # the server starts after the workers: look it up on first use
            self._server = ray.get_actor(f"hf_server_rollout_{self.replica_rank}")
        return self._server

    async def resume(self, tags: list[str]):
        if self.leader and self.config.free_cache_engine:
            await self.server.wake_up.remote(tags)

    async def release(self):
        if self.leader and self.config.free_cache_engine:
            await self.server.sleep.remote()

    async def update_weights(self, weights, wire_format: str = "named_tensors", peft_config=None,
                             global_steps=None, **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout: weight format {wire_format!r}; use checkpoint_engine.backend=naive")
        if peft_config is not None:
            raise NotImplementedError("hf rollout takes merged LoRA weights: set "
                                      "actor_rollout_ref.model.lora.merge=true (stages/grpo.py does)")
        bucket, size = [], 0
        # every rank walks the generator: gathering a sharded parameter is a collective
        items = weights if hasattr(weights, "__aiter__") else _aiter(weights)
        async for name, tensor in items:
            if not self.leader:
                continue
            tensor = tensor.detach().to("cpu", dtype=self.dtype if tensor.is_floating_point() else None)
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                await self.server.load_weights.remote(bucket)
                bucket, size = [], 0
        if self.leader:
            await self.server.load_weights.remote(bucket, global_steps=global_steps, last=True)


async def _aiter(iterable):
    for item in iterable:
        yield item


rollout_base._ROLLOUT_REGISTRY[("hf", "async")] = f"{__name__}.HFServerAdapter"
RolloutReplicaRegistry.register("hf", lambda: HFReplica)
