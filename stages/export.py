"""verl checkpoints → plain Hugging Face folders, and `--init` → the folder a stage starts from.

`export(step_dir, dest)` turns a verl `global_step_N` folder into `dest/hf` (safetensors + tokenizer
+ chat template + generation config, whose eos_token_id gains the chat template's end of turn: see
`stop_at_end_of_turn`) that transformers and vLLM load unchanged:
  - the weights come from the checkpoint's `huggingface/` (there because ladder asks verl for
    `hf_model`), or, when that holds none, from `python -m verl.model_merger merge --backend fsdp`;
  - verl leaves LoRA unmerged (PEFT-wrapped keys in `huggingface/`, or base + `lora_adapter/` from
    the merger), so for LoRA it also writes `dest/adapter` (a PEFT adapter folder) and merges the
    adapter into the checkpoint's own base weights with peft's `merge_and_unload`, checking that
    the merge changed them. The base model is never re-downloaded.
Weights keep the dtype verl saved them in (fp32 from `hf_model`, bf16 from the merger). A config.json
naming ladder's training-only attention (`ladder_varlen`) is given transformers' default instead, so the
folder loads anywhere.

`resolve_init(path)` accepts a run folder (outputs/<run>: its most advanced stage with an export),
a stage folder or its manifest.json, a verl `global_step_N` folder (SFT's, or GRPO's with its `actor/`; that
`actor/` folder too) (exported on first use into
`global_step_N/ladder_export/`, so the cache goes when verl or keep-last-N deletes the checkpoint,
and no stray `global_step_*` sibling confuses checkpoint listings), any Hugging Face folder, or a
hub id (not when HF_HUB_OFFLINE=1). `run_folder(init)` finds the outputs/<run> an --init lies in.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from stages import registry
from stages.config import hub_offline, read_manifest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
CACHE = "ladder_export"
INDEX = "model.safetensors.index.json"


# ---- where the weights are
def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _has_lora_keys(folder: Path) -> bool:
    from safetensors import safe_open

    for shard in _weights(folder):
        with safe_open(shard, "pt") as f:
            if any("lora_" in k for k in f.keys()):
                return True
    return False


def _merge_with_verl(step_dir: Path, target: Path) -> Path:
    """verl's own merger, for checkpoints saved without `hf_model`."""
    if not any(step_dir.glob("model_world_size_*_rank_*.pt")):
        raise FileNotFoundError(f"{step_dir}: no weights: neither huggingface/*.safetensors nor verl's "
                                "model_world_size_*_rank_*.pt shards (checkpoint.save_contents needs 'model')")
    shutil.rmtree(target, ignore_errors=True)
    merge = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
             "--local_dir", str(step_dir), "--target_dir", str(target)]
    done = subprocess.run(merge, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(merge)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return target


# ---- LoRA: a PEFT model built from the checkpoint alone, then merged
def _peft_from_hf_model(src: Path, meta: dict):
    """verl's `hf_model` for LoRA: one state dict with PEFT-wrapped keys (base_layer, lora_A.default, …)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    state = {}
    for shard in _weights(src):
        state.update(load_file(shard))
    lora = {k: v for k, v in state.items() if "lora_" in k}
    base = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
            for k, v in state.items() if "lora_" not in k}
    modules = sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in lora if ".lora_A." in k})
    rank = int(meta.get("r") or next(v.shape[0] for k, v in lora.items() if ".lora_A." in k))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=next(iter(base.values())).dtype)
    missing, unexpected = model.load_state_dict(base, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"{src}: base weights do not fit config.json: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=int(meta.get("lora_alpha") or rank),
                                             target_modules=modules, task_type=meta.get("task_type", "CAUSAL_LM")))
    missing, unexpected = model.load_state_dict(lora, strict=False)
    if unexpected or [k for k in missing if "lora_" in k]:
        raise RuntimeError(f"{src}: LoRA weights do not fit: unexpected {unexpected[:3]}, "
                           f"missing {[k for k in missing if 'lora_' in k][:3]}")
    return model


def _peft_from_merger(src: Path):
    """verl's merger output for LoRA: base weights in `src`, the adapter in `src/lora_adapter`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), src / "lora_adapter")


def _merge_lora(peft_model, out: Path, adapter_dir: Path, base_model: str | None) -> None:
    import torch

    base = peft_model.get_base_model()
    before = {k.replace(".base_layer.", "."): v.detach().clone()
              for k, v in base.state_dict().items() if "lora_" not in k}
    if base_model:  # so that PeftModel.from_pretrained(adapter) finds its base
        peft_model.peft_config["default"].base_model_name_or_path = base_model
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if k in before and not torch.equal(v, before[k])]
    if not changed:
        raise RuntimeError(f"merging the LoRA adapter into {base_model or 'the base'} changed no weight: the "
                           "adapter is zero (no optimizer step reached it?); not exporting an untrained model")
    merged.save_pretrained(out, safe_serialization=True)


# ---- export
def export(step_dir: Path, dest: Path, base_model: str | None = None) -> dict:
    """verl `global_step_N` → dest/hf (and dest/adapter for LoRA); returns their paths and `lora`."""
    from plugins import attention  # a checkpoint trained with ladder_varlen names it in its config.json

    step_dir, dest = Path(step_dir), Path(dest)
    if not step_dir.is_dir():
        raise FileNotFoundError(f"{step_dir}: no such checkpoint folder")
    hf = step_dir / "huggingface"
    dest.mkdir(parents=True, exist_ok=True)
    tmp, out, merged_dir = dest / "hf.partial", dest / "hf", dest / "verl_merged.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    src = hf if _weights(hf) else _merge_with_verl(step_dir, merged_dir)
    meta_file = step_dir / "lora_train_meta.json"
    lora = meta_file.exists() or (src / "lora_adapter").is_dir() or _has_lora_keys(src)
    result = {"hf": str(out.resolve()), "lora": lora}
    if lora:
        adapter = dest / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        model = _peft_from_merger(src) if (src / "lora_adapter").is_dir() else _peft_from_hf_model(src, meta)
        _merge_lora(model, tmp, adapter, base_model)
        result["adapter"] = str(adapter.resolve())
    else:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("lora_adapter"))
    # tokenizer, chat template, generation config: as verl saved them beside the checkpoint
    for item in hf.iterdir() if hf.is_dir() else []:
        if item.is_file() and item.suffix != ".safetensors" and item.name not in ("config.json", INDEX):
            shutil.copy2(item, tmp / item.name)
    config = json.loads((tmp / "config.json").read_text())
    if config.get("attn_implementation") == attention.NAME:  # training-only and ladder's: load with the default
        del config["attn_implementation"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    check_model_folder(tmp)
    stop_at_end_of_turn(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(merged_dir, ignore_errors=True)
    via = "hf_model" if src == hf else "verl.model_merger"
    record = {"from": str(step_dir.resolve()), "lora": lora, "via": via}
    (out / "ladder_export.json").write_text(json.dumps(record) + "\n")
    return result


def stop_at_end_of_turn(folder: Path) -> None:
    """Add the chat template's end-of-turn token (`<|im_end|>`) to generation_config.json's eos_token_id when it is
    not there. A base model (Qwen2.5-0.5B) declares only `<|endoftext|>`, but SFT on chat rows teaches it to end
    each answer with the end of turn; vLLM (ladder's eval, verl's rollout) and transformers' generate (ladder's hf
    rollout) stop at generation_config.json's ids, so without it every answer of an SFT'd base model would run on
    to the length limit. Instruct models list the token already and are left as they are."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from stages.generate import end_of_turn

    tok = AutoTokenizer.from_pretrained(folder)
    turn = end_of_turn(tok) if tok.chat_template else None
    if turn is None:
        return
    try:
        gen = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: start from config.json's ids
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder))
    ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [i for i in [gen.eos_token_id] if i is not None]
    if turn not in ids:
        gen.eos_token_id = [*ids, turn]
        gen.save_pretrained(folder)


def check_model_folder(folder: Path) -> None:
    """Fail fast, before any generation or training, on a folder that cannot be loaded."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json, so not a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{folder}: no weights (*.safetensors or *.bin)")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no tokenizer (tokenizer.json); copy the base model's "
                                "tokenizer files next to the weights")


# ---- --init
def run_folder(init: str) -> Path | None:
    """outputs/<run> when --init lies inside a run folder (a folder holding sft/, ei/ or grpo/)."""
    p = Path(init).expanduser().resolve()
    return next((q for q in [p, *p.parents][:4] for s in registry.trainers()
                 if (q / s / "manifest.json").exists() or any((q / s).glob("global_step_*"))), None)


def resolve_init(path: str | Path) -> str:
    """The Hugging Face folder (or hub id) that `--init path` means; see the module docstring."""
    p = Path(str(path)).expanduser()
    if p.name == "manifest.json" and p.is_file():
        return _from_manifest(p)
    if p.is_dir():
        if (p / "manifest.json").exists():
            return _from_manifest(p / "manifest.json")
        # a run folder: its most advanced stage with an export
        stages = [p / s for s in reversed(registry.trainers()) if (p / s / "manifest.json").exists()]
        for stage in stages:
            if "hf_model" in read_manifest(stage):
                return _from_manifest(stage / "manifest.json")
        if stages:
            raise ValueError(f"{p}: no stage has finished yet ({', '.join(s.name for s in stages)} still "
                             "running or failed); resume it, or pass one of its global_step_N folders")
        if p.name == "actor" and p.parent.name.startswith("global_step_"):
            p = p.parent
        if p.name.startswith("global_step_"):
            cached = p / CACHE / "hf"
            if not (cached / "ladder_export.json").exists():  # GRPO's (main_ppo's) checkpoints keep it in actor/
                export(p / "actor" if (p / "actor").is_dir() else p, p / CACHE, base_model=_base_of(p))
            return str(cached.resolve())
        check_model_folder(p)
        return str(p.resolve())
    if p.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"--init {path}: no such run, stage, checkpoint or model folder")
    if hub_offline():
        raise FileNotFoundError(f"--init {path}: not a local folder, and HF_HUB_OFFLINE=1 forbids the hub")
    return str(path)  # a hub id such as Qwen/Qwen2.5-0.5B


def _from_manifest(manifest: Path) -> str:
    fields = read_manifest(manifest)
    if "hf_model" not in fields:
        raise ValueError(f"{manifest} names no exported model yet (status {fields.get('status')!r}): finish "
                         "or resume that stage, or pass one of its global_step_N folders")
    return resolve_init(fields["hf_model"])


def _base_of(step_dir: Path) -> str | None:
    """A LoRA adapter's base, for its adapter_config.json: from the stage manifest beside the checkpoint."""
    manifest = step_dir.parent / "manifest.json"
    return read_manifest(manifest).get("base_model") if manifest.exists() else None
