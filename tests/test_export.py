"""Export: verl checkpoints → plain HF folders (full and LoRA, with and without `hf_model`), and
`resolve_init`. The LoRA checkpoint comes from one real SFT run (1 rank, CPU) shared by the slow tests."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.__main__ import main as stages_main
from stages.export import check_model_folder, export, resolve_init
from tests.test_sft import TRAIN, sft_parquet


@pytest.fixture(scope="module")
def lora_run(tiny_model, gsm8k_dir, tmp_path_factory) -> Path:
    """outputs/r of a 3-step LoRA run (rank 4), checkpoints at steps 2 and 3."""
    root = tmp_path_factory.mktemp("lora")
    data = sft_parquet(tiny_model, gsm8k_dir, root / "train.parquet", 24)
    assert stages_main(["--model", str(tiny_model), "--train_data", str(data), *TRAIN, "--epochs", "1",
                        "--use_lora", "--lora_rank", "4", "--lora_alpha", "8", "--save_freq", "2",
                        f"run.output_dir={root}", "run.name=r"]) == 0
    return root / "r"


def ladder_greedy(folder) -> list[str]:
    """ladder's own generation (the eval stage's and EI's, hf backend) from an exported folder."""
    from stages import generate as gen
    from stages.config import load_config

    tok = gen.load_tokenizer(str(folder))
    prompts = gen.prompt_ids(tok, [[{"role": "user", "content": q}] for q in ("What is 2+3?", "Natalia sold 48 clips")])
    cfg = load_config("eval", ["launch.device=cpu", "eval.backend=hf", "eval.max_new_tokens=8"])
    return [g.text for g in gen.generate(cfg, str(folder), tok, prompts, ())[0]]


def peft_greedy(base, adapter) -> list[str]:
    """The same prompts through transformers' generate on the base model with the adapter applied (unmerged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    texts = []
    for q in ("What is 2+3?", "Natalia sold 48 clips"):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id)
        texts.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def logits(model, text="Natalia sold 48 clips"):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model.name_or_path)(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


# ---- LoRA, from a real run
@pytest.mark.slow
def test_lora_export_writes_adapter_and_merged_model(lora_run, tiny_model):
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    manifest = json.loads((lora_run / "sft" / "manifest.json").read_text())
    assert manifest["lora"] and manifest["global_step"] == 3
    merged, adapter = manifest["hf_model"], manifest["adapter"]
    config = PeftConfig.from_pretrained(adapter)
    assert (config.r, config.lora_alpha, config.base_model_name_or_path) == (4, 8, str(tiny_model))
    # merged weights moved away from the base: only the adapted projections
    base, after = load_file(str(tiny_model / "model.safetensors")), load_file(str(Path(merged, "model.safetensors")))
    changed = {k for k in base if not torch.equal(base[k], after[k].to(base[k].dtype))}
    assert changed and all(k.endswith("proj.weight") for k in changed)
    # the merged folder is the base with its adapter applied, and loads as a plain model
    plain = AutoModelForCausalLM.from_pretrained(merged)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    assert torch.allclose(logits(plain), logits(adapted), atol=1e-4)
    assert AutoTokenizer.from_pretrained(merged).chat_template and GenerationConfig.from_pretrained(merged).eos_token_id
    # ladder's generation from the merged folder says what the base with its adapter says
    texts = ladder_greedy(merged)
    assert all(texts) and texts == peft_greedy(tiny_model, adapter)


@pytest.mark.slow
def test_merged_lora_delta_is_b_times_a_times_scale(lora_run):
    """merged - base equals lora_B @ lora_A * alpha/r, computed from the checkpoint's raw tensors. The whole
    update is ~1e-3 here, so the tolerance is set 1000x below the largest delta: a doubled or halved B fails."""
    from safetensors.torch import load_file

    raw = load_file(str(lora_run / "sft" / "global_step_3" / "huggingface" / "model.safetensors"))
    merged = load_file(str(lora_run / "sft" / "hf" / "model.safetensors"))
    meta = json.loads((lora_run / "sft" / "global_step_3" / "lora_train_meta.json").read_text())
    scale = meta["lora_alpha"] / meta["r"]
    assert scale == 2.0  # --lora_alpha 8 --lora_rank 4
    adapted = sorted(k.split(".lora_A.")[0] for k in raw if ".lora_A." in k)
    assert adapted
    for prefix in adapted:
        name = prefix.removeprefix("base_model.model.") + ".weight"
        base = raw[f"{prefix}.base_layer.weight"].double()
        a, b = raw[f"{prefix}.lora_A.default.weight"].double(), raw[f"{prefix}.lora_B.default.weight"].double()
        expected, delta = b @ a * scale, merged[name].double() - base
        assert expected.abs().max() > 1e-4, f"{name}: no update to test against"
        assert torch.allclose(delta, expected, rtol=0, atol=1e-3 * expected.abs().max().item()), name


@pytest.mark.slow
def test_checkpoint_without_hf_model_goes_through_verls_merger(lora_run, tmp_path):
    from safetensors.torch import load_file

    step = shutil.copytree(lora_run / "sft" / "global_step_3", tmp_path / "global_step_3")
    (step / "huggingface" / "model.safetensors").unlink()  # as if saved without `hf_model`
    result = export(step, tmp_path / "out")
    assert json.loads(Path(result["hf"], "ladder_export.json").read_text())["via"] == "verl.model_merger"
    check_model_folder(Path(result["hf"]))
    ours = load_file(str(lora_run / "sft" / "hf" / "model.safetensors"))
    theirs = load_file(str(Path(result["hf"], "model.safetensors")))
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k].float(), atol=1e-2) for k in ours)  # the merger writes bf16
    assert not (tmp_path / "out" / "verl_merged.partial").exists()


@pytest.mark.slow
def test_resolve_init_from_run_stage_manifest_and_checkpoint(lora_run):
    hf = json.loads((lora_run / "sft" / "manifest.json").read_text())["hf_model"]
    stage = lora_run / "sft"
    assert resolve_init(lora_run) == resolve_init(stage) == resolve_init(stage / "manifest.json") == hf
    # a checkpoint folder is exported on first use into a cache inside it, then reused
    folder = resolve_init(lora_run / "sft" / "global_step_2")
    assert folder == str((lora_run / "sft" / "global_step_2" / "ladder_export" / "hf").resolve())
    stamp = Path(folder, "model.safetensors").stat().st_mtime_ns
    assert resolve_init(str(lora_run / "sft" / "global_step_2")) == folder
    assert Path(folder, "model.safetensors").stat().st_mtime_ns == stamp
    # the cached export generates as step 2's adapter on the base does
    texts = ladder_greedy(folder)
    assert all(texts) and texts == peft_greedy(json.loads((lora_run / "sft" / "manifest.json").read_text())["base_model"],
                                               Path(folder).parent / "adapter")


# ---- errors and the cheap cases
def test_hf_folder_is_accepted_as_it_is(tiny_model):
    assert resolve_init(tiny_model) == str(tiny_model.resolve())


@pytest.mark.parametrize("remove,message", [("model.safetensors", "no weights"), ("tokenizer.json", "no tokenizer"),
                                            ("config.json", "no config.json")])
def test_incomplete_folder_is_named(tiny_model, tmp_path, remove, message):
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    (folder / remove).unlink()
    with pytest.raises(FileNotFoundError, match=message):
        resolve_init(folder)


def test_hub_id_only_when_online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        resolve_init("Qwen/Qwen2.5-0.5B")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_init("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(FileNotFoundError, match="no such run"):
        resolve_init("./outputs/nothing/here")


def test_unfinished_stage_is_named(tmp_path):
    (tmp_path / "run" / "sft").mkdir(parents=True)
    (tmp_path / "run" / "sft" / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "running"}))
    with pytest.raises(ValueError, match="names no exported model yet"):
        resolve_init(tmp_path / "run" / "sft")
    with pytest.raises(ValueError, match="no stage has finished yet"):
        resolve_init(tmp_path / "run")


def test_run_folder_prefers_the_latest_finished_stage(tiny_model, tmp_path):
    for stage, hf in (("sft", tiny_model), ("ei", tiny_model)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "manifest.json").write_text(json.dumps({"stage": stage, "hf_model": str(hf)}))
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "manifest.json").write_text(json.dumps({"stage": "grpo", "status": "running"}))
    assert resolve_init(tmp_path) == str(tiny_model.resolve())


def test_a_grpo_checkpoint_or_its_actor_folder_resolves_to_one_export(tiny_model, tmp_path):
    """main_ppo saves global_step_N/actor/{huggingface,…} (the SFT trainer global_step_N/huggingface): --init of the
    step folder or of its actor/ folder exports the actor once, into global_step_N/ladder_export."""
    step = tmp_path / "grpo" / "global_step_10"
    shutil.copytree(tiny_model, step / "actor" / "huggingface")
    folder = resolve_init(step)
    assert folder == str((step / "ladder_export" / "hf").resolve())
    assert Path(folder, "ladder_export.json").exists()
    assert resolve_init(step / "actor") == folder


def test_checkpoint_without_weights_is_named(tmp_path):
    step = tmp_path / "global_step_5"
    (step / "huggingface").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no weights: neither huggingface"):
        export(step, tmp_path / "out")


def test_full_checkpoint_export_copies_the_hf_model(tiny_model, tmp_path):
    step = tmp_path / "global_step_1"
    shutil.copytree(tiny_model, step / "huggingface")
    result = export(step, tmp_path / "out")
    assert not result["lora"] and "adapter" not in result
    assert sorted(p.name for p in Path(result["hf"]).iterdir()) == sorted(
        [p.name for p in tiny_model.iterdir()] + ["ladder_export.json"])


def test_checkpoint_trained_with_ladder_varlen_exports_a_folder_that_loads_anywhere(tiny_model, tmp_path):
    """verl writes the training attention into config.json; ladder_varlen exists only where ladder is imported."""
    step = tmp_path / "global_step_1"
    shutil.copytree(tiny_model, step / "huggingface")
    config = json.loads((step / "huggingface" / "config.json").read_text())
    (step / "huggingface" / "config.json").write_text(json.dumps({**config, "attn_implementation": "ladder_varlen"}))
    result = export(step, tmp_path / "out")
    assert "attn_implementation" not in json.loads(Path(result["hf"], "config.json").read_text())
    load = "from transformers import AutoModelForCausalLM as M; import sys; M.from_pretrained(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", load, result["hf"]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
