"""verl checkpoints → plain Hugging Face folders, and `--init` → the folder a stage starts from.

`export(step_dir, stage_dir, base_model, lora)` writes `stage_dir/hf` (safetensors + tokenizer +
chat template + generation config) that transformers and vLLM load unchanged. It starts from the
checkpoint's `huggingface/` (saved because ladder asks verl for `hf_model`), or runs verl's
`model_merger` when that folder is absent. verl leaves LoRA unmerged (PEFT-wrapped keys), so for
LoRA it also writes `stage_dir/adapter` (a PEFT adapter) and merges it into the base with peft.

`resolve_init(path)` accepts a run folder (outputs/<run>: its latest stage with a manifest), a
stage folder or its manifest.json, a verl `global_step_N` folder (exported on the fly beside it,
under `global_step_N/export/`), any Hugging Face folder, or a hub id (not when HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from stages.common import hub_offline, read_manifest

STAGE_ORDER = ("grpo", "ei", "sft")  # a run folder resolves to its most advanced finished stage
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _hf_source(step_dir: Path) -> Path:
    hf = step_dir / "huggingface"
    if (hf / "config.json").exists() and any(hf.glob("*.safetensors")):
        return hf
    target = step_dir / "merged_by_verl"
    if not (target / "config.json").exists():
        subprocess.run([sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
                        "--local_dir", str(step_dir), "--target_dir", str(target)], check=True)
    return target


def _lora_modules(keys) -> list[str]:
    return sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in keys if ".lora_A." in k})


def _merge_lora(src: Path, base_model: str, out: Path, adapter_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    meta_file = src.parent / "lora_train_meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    rank = int(meta.get("r") or next(v.shape[0] for k, v in state.items() if ".lora_A." in k))
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=int(meta.get("lora_alpha", 2 * rank)),
                                            target_modules=_lora_modules(state), task_type="CAUSAL_LM"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    lora_missing = [k for k in missing if "lora_" in k]
    if lora_missing or unexpected:
        raise RuntimeError(f"{src}: LoRA checkpoint does not fit {base_model}: missing {lora_missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    model.save_pretrained(adapter_dir)
    merged = model.merge_and_unload()
    changed = sum(not torch.equal(v, reference[k]) for k, v in merged.state_dict().items() if k in reference)
    if changed == 0:
        raise RuntimeError(f"{src}: merging the LoRA adapter left every weight of {base_model} unchanged")
    merged.save_pretrained(out, safe_serialization=True)


def export(step_dir: Path, stage_dir: Path, base_model: str, lora: bool) -> dict[str, str]:
    step_dir, stage_dir = Path(step_dir), Path(stage_dir)
    src = _hf_source(step_dir)
    out = stage_dir / "hf"
    tmp = stage_dir / "hf.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    result = {"hf": str(out.resolve())}
    if lora:
        adapter = stage_dir / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        _merge_lora(src, base_model, tmp, adapter)
        result["adapter"] = str(adapter.resolve())
        for name in src.iterdir():  # tokenizer, chat template, generation config
            if name.suffix != ".safetensors" and name.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy2(name, tmp / name.name)
    else:
        shutil.copytree(src, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / "ladder_export.json").write_text(json.dumps({"from": str(step_dir.resolve()), "lora": lora}) + "\n")
    return result


def check_model_folder(folder: Path) -> None:
    """Fail fast, before any generation or training, on a folder that cannot be loaded."""
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json, so not a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{folder}: no weights (*.safetensors or *.bin)")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no tokenizer (tokenizer.json); copy the base model's "
                                "tokenizer files next to the weights")


def resolve_init(path: str | Path) -> str:
    """The Hugging Face folder (or hub id) that `--init path` means; see the module docstring."""
    p = Path(str(path)).expanduser()
    if p.name == "manifest.json" and p.is_file():
        return resolve_init(read_manifest(p)["hf_model"])
    if p.is_dir():
        if (p / "manifest.json").exists():
            manifest = read_manifest(p)
            if "hf_model" not in manifest:
                raise ValueError(f"{p / 'manifest.json'} names no exported model yet (status "
                                 f"{manifest.get('status')!r}): finish or resume that stage, or pass one "
                                 f"of its global_step_N folders")
            return resolve_init(manifest["hf_model"])
        for stage in STAGE_ORDER:
            if (p / stage / "manifest.json").exists():
                return resolve_init(p / stage)
        if p.name.startswith("global_step_"):
            lora = (p / "lora_train_meta.json").exists()
            base = _base_of(p) if lora else ""
            return export(p, p / "export", base_model=base, lora=lora)["hf"]
        check_model_folder(p)
        return str(p.resolve())
    if p.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"--init {path}: no such run, stage, checkpoint or model folder")
    if hub_offline():
        raise FileNotFoundError(f"--init {path}: not a local folder, and HF_HUB_OFFLINE=1 forbids the hub")
    return str(path)  # a hub id such as Qwen/Qwen2.5-0.5B


def _base_of(step_dir: Path) -> str:
    """The base model of a LoRA checkpoint: from the stage manifest beside it."""
    manifest = step_dir.parent / "manifest.json"
    if manifest.exists():
        return read_manifest(manifest)["base_model"]
    raise FileNotFoundError(f"{step_dir} is a LoRA checkpoint and {manifest} (which names its base model) "
                            "is missing; pass the base with --model and the adapter folder instead")
