"""Expert iteration: sample K completions per training question, keep what the grader accepts,
fine-tune on them through the SFT stage, evaluate, repeat.

    ./train.sh --stage ei --init outputs/<run>/sft --rounds 3 --samples 8            # one GPU
    N_GPUS=8 ./train.sh --stage ei --init outputs/<run>/sft data.train_size=2048     # SFT on 8 GPUs

Each round r (outputs/<run>/ei/round_r/):
  1. sample `ei.samples` completions per question from the current policy (stages/generate.py: vLLM
     when importable, else transformers; `ei.temperature`, `ei.top_p`, `ei.max_new_tokens`), on
     `ei.questions` of the training questions (a seeded subset; null = all of data.train_size's);
  2. grade each with rewards.compute_score; keep the strict-correct ones (`ei.keep: lenient` to
     keep lenient ones) that stopped on their own, drop identical completions, keep at most
     `ei.max_per_question` per question → kept.parquet (SFT rows);
  3. fine-tune with the SFT stage (full or LoRA; a LoRA round's adapter is merged, so the next
     round samples from the merged model) starting from the previous round's model
     (`ei.init_each_round: previous`), from the initial policy every round (`base`, as in CS336's expert
     iteration), or from `model.path` every round (`model`: in `--stage all` the model the chain started
     from, so a round is SFT of the pretrained model on the references and the samples, as in RFT (Yuan et
     al. 2023) and ReST-EM); `ei.references: true` adds the training set's reference solutions (data_prep's
     sft_train, all of data.train_size) to the kept samples → train.parquet;
  4. greedy eval on the test set (`eval.*`, e.g. eval.limit) and a round.json record.
A finished round (its round.json exists) is never redone, so a killed run restarts at the first
unfinished round. A round that keeps nothing stops with a message instead of training on nothing.
Memory: nothing here materializes full-vocabulary tensors beyond what generate() itself needs;
no entropy is computed.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from stages import chain, generate, vllm_engine
from stages.config import stage_dir, write_manifest


def sample(cfg, policy: str, tok, prompts: list[list[int]], stops) -> list:
    """K samples per prompt, in prompt order (prompt i's samples at i*K … i*K+K-1)."""
    gen_cfg = copy.deepcopy(cfg)
    gen_cfg.eval.max_new_tokens = cfg.ei.max_new_tokens
    sampling = {"temperature": float(cfg.ei.temperature), "top_p": float(cfg.ei.top_p)}
    return generate.generate(gen_cfg, policy, tok, prompts, stops, sampling, n=int(cfg.ei.samples))[0]


def filter_samples(problems: pd.DataFrame, gens: list, k: int, keep: str, cap: int) -> tuple[list[dict], dict]:
    """Graded, deduplicated, capped SFT rows and the round's counts (stats["per_question"]: each question's
    extra_info.index and how many of its k samples were right, for solve.parquet)."""
    from rewards import compute_score

    rows, per_question = [], []
    for i, problem in enumerate(problems.itertuples()):
        seen, right = set(), 0
        for g in gens[i * k:(i + 1) * k]:
            score = compute_score(problem.data_source, g.text, problem.reward_model["ground_truth"])
            good = score["acc"] if keep == "strict" else score["lenient_acc"]
            right += int(good > 0)
            if good and g.finish_reason == "stop" and g.text not in seen and len(seen) < cap:
                seen.add(g.text)
                user = list(problem.prompt)[-1]["content"]
                rows.append({"messages": [{"role": "user", "content": user},
                                          {"role": "assistant", "content": g.text}],
                             "data_source": problem.data_source, "extra_info": dict(problem.extra_info),
                             "tokens": g.tokens})
        per_question.append({"index": int(dict(problem.extra_info)["index"]), "correct": right, "samples": k})
    n = len(problems)
    correct, solved = sum(q["correct"] for q in per_question), sum(q["correct"] > 0 for q in per_question)
    stats = {"questions": n, "samples": n * k, "correct_samples": correct, "solve_rate": solved / max(n, 1),
             "kept": len(rows), "mean_kept_tokens": sum(r["tokens"] for r in rows) / max(len(rows), 1),
             "per_question": per_question}
    return rows, stats


def questions(problems: pd.DataFrame, count, seed: int) -> pd.DataFrame:
    """`ei.questions` of the training problems, a seeded subset (the same ones every round); null = all."""
    if count is None or int(count) >= len(problems):
        return problems
    if int(count) <= 0:
        raise SystemExit(f"[ei] ei.questions={count}: use a positive number, or null for every training question")
    return problems.sample(n=int(count), random_state=seed).sort_index().reset_index(drop=True)


STARTS = ("previous", "base", "model")  # ei.init_each_round
SOLVE_FILE = "solve.parquet"  # round_N/: index (the training row's extra_info.index), correct, samples


def round_dirs(ei_dir: Path) -> list[Path]:
    """An EI stage's round_N folders, in round order."""
    return sorted(Path(ei_dir).glob("round_*"), key=lambda p: int(p.name.split("_")[1]))


def check_pretrained(cfg) -> None:
    """ei.init_each_round=model fine-tunes model.path every round. When --init is a ladder stage (or run) folder whose
    manifest names the model it was trained from, model.path must be that model: `--stage ei --init <run>/sft`
    without --model would otherwise restart from config.yaml's default model."""
    from stages.config import read_manifest

    init = Path(str(cfg.model.init or "")).expanduser()
    found = [m for m in (init, init / "manifest.json", init / "sft" / "manifest.json")
             if cfg.model.init and m.name == "manifest.json" and m.is_file()]
    base = str(read_manifest(found[0]).get("base_model") or "") if found else ""
    path = str(cfg.model.path)
    if base and base != path and not (Path(base).exists() and Path(base).resolve() == Path(path).expanduser().resolve()):
        raise SystemExit(f"[ei] ei.init_each_round=model restarts every round from model.path ({cfg.model.path}), but "
                         f"{found[0]} was trained from {base}: pass --model {base}")


def run(cfg) -> int:
    from data_prep import prepare
    from stages import report
    from stages.export import resolve_init

    out = stage_dir(cfg, "ei")
    if str(cfg.ei.init_each_round) not in STARTS:
        raise SystemExit(f"[ei] ei.init_each_round={cfg.ei.init_each_round}: use one of {', '.join(STARTS)}")
    if cfg.ei.init_each_round == "model":
        check_pretrained(cfg)
    initial = resolve_init(str(cfg.model.init or cfg.model.path))
    files = prepare(cfg.data, stage_dir(cfg, "data"))
    problems = questions(pd.read_parquet(files["rl_train"]), cfg.ei.questions, int(cfg.data.seed))
    stops = generate.stops_of(generate.template_of(problems))
    tok = generate.load_tokenizer(initial)
    prompts = generate.prompt_ids(tok, problems["prompt"])
    if cfg.run.dry_run:
        print(OmegaConf.to_yaml(cfg.ei), f"initial policy: {initial}\n{len(problems)} questions")
        return 0
    policy, records = initial, []
    for r in range(1, int(cfg.ei.rounds) + 1):
        rdir = out / f"round_{r}"
        if (rdir / "round.json").exists():  # finished earlier: never regenerate
            record = json.loads((rdir / "round.json").read_text())
            policy, records = record["policy"], records + [record]
            print(f"[ei] round {r}: done earlier (policy {policy})")
            continue
        t0 = time.time()
        rdir.mkdir(parents=True, exist_ok=True)
        # ---- 1-2. sample and filter
        gens = sample(cfg, policy, tok, prompts, stops)
        rows, stats = filter_samples(problems, gens, int(cfg.ei.samples), str(cfg.ei.keep), int(cfg.ei.max_per_question))
        # each sampled question's right answers out of ei.samples: grpo.prompts=mixed trains on those in between
        pd.DataFrame(stats.pop("per_question")).to_parquet(rdir / SOLVE_FILE, index=False)
        print(f"[ei] round {r}: solve rate {stats['solve_rate']:.3f}, kept {stats['kept']} of {stats['samples']} samples")
        if not rows:
            print(f"[ei] round {r} kept no sample: nothing to train on. Raise --samples (now {cfg.ei.samples}) "
                  f"or ei.temperature (now {cfg.ei.temperature}), or start from a stronger --init.")
            return 1
        kept = pd.DataFrame([{k: v for k, v in row.items() if k != "tokens"} for row in rows])
        kept.to_parquet(rdir / "kept.parquet", index=False)
        train = rdir / "train.parquet"  # the kept samples, after every reference solution with ei.references
        refs = [pd.read_parquet(files["sft_train"])[list(kept.columns)]] if cfg.ei.references else []
        pd.concat([*refs, kept], ignore_index=True).to_parquet(train, index=False)
        # ---- 3-4. fine-tune through the SFT stage, then evaluate the new policy
        round_cfg = copy.deepcopy(cfg)
        round_cfg.run.output_dir, round_cfg.run.name = str(out), f"round_{r}"
        start = {"previous": policy, "base": initial}.get(str(cfg.ei.init_each_round))
        round_cfg.model.path = start or resolve_init(str(cfg.model.path))  # init_each_round=model
        round_cfg.model.init = None
        round_cfg.data.train_file, round_cfg.data.val_file = str(train.resolve()), None
        print(f"[ei] round {r}: fine-tuning {round_cfg.model.path} on {len(kept)} samples"
              + (f" and the references ({train})" if cfg.ei.references else f" ({train})"), flush=True)
        round_cfg.eval.dataset = files["rl_test"]
        vllm_engine.prestart_before_training(round_cfg)  # the round's eval finds vLLM imported
        metrics = chain.train_then_evaluate(round_cfg)
        if isinstance(metrics, int):
            vllm_engine.release()  # the child the round's eval did not take (its training failed)
            return metrics
        policy = json.loads((rdir / "sft" / "manifest.json").read_text())["hf_model"]
        record = {"round": r, **stats, "policy": policy, "seconds": round(time.time() - t0, 1),
                  **{f"eval_{k}": metrics[k] for k in ("accuracy", "format_accuracy", "trunc_rate", "avg_gen_len")}}
        (rdir / "round.json").write_text(json.dumps(record, indent=2) + "\n")
        records.append(record)
    write_manifest(out, stage="ei", status="done", base_model=initial, hf_model=policy, rounds=records,
                   lora=bool(cfg.model.use_lora), config=OmegaConf.to_container(cfg, resolve=True))
    figures = report.plot_vs_step([{**rec, "step": rec["round"]} for rec in records],
                                  {"eval_accuracy": "accuracy", "solve_rate": "train solve rate"},
                                  out.parent / "report" / "figures", "ei")
    cols = ["round", "questions", "solve_rate", "kept", "mean_kept_tokens", "eval_accuracy",
            "eval_format_accuracy", "seconds"]
    table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                      ["| " + " | ".join(f"{rec[c]:.4g}" if isinstance(rec[c], float) else str(rec[c]) for c in cols) + " |"
                       for rec in records])
    report.add_section(out.parent, "ei", "Expert iteration", table, figures)
    print(table)
    return 0
