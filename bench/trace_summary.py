"""Where an SFT step's time goes, from the chrome trace verl's torch profiler writes.

    python -m bench.trace_summary TRACE.json.gz          # a table; --json for the dict

bench/sft_throughput.py `--profile` has verl (`profiler.enable`, `trainer.profile_interval`) trace two
steps after the timed ones and puts this summary in its results. verl marks each step `train_batch`
and each micro-batch `micro_batchN` (user annotations on the training thread); the trace holds CPU
ops, CUDA runtime calls and, on a GPU, the kernels, linked to their launches by `correlation`.
  - steps: wall time of each train_batch, and the time between them (data loading, logging);
  - GPU busy: the union of kernel/memcpy/memset intervals inside each step; idle is the rest;
  - per micro-batch: kernel time launched from inside it (the rest of a step's kernels are the
    optimizer, gradient clipping and reduction);
  - the largest GPU idle gaps, each named by what the CPU was inside of when the GPU ran out of work
    (a host sync there means the GPU drained its queue and then waited for the host's next launch);
  - host syncs (`aten::_local_scalar_dense`: `.item()`, `int(tensor)`; cudaStreamSynchronize, ...);
  - the kernels and the CPU ops (self time) that take longest.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import re
import sys

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNCS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SMALL_GAP_US = 20
MICRO = re.compile(r"micro_batch\d+$")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def overlap(busy: list[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in busy)


def covering(events: list[dict], times: list[float]) -> list[list[dict]]:
    """For each of the sorted times, the events (sorted by start) that contain it, outermost first."""
    out, active, i = [], [], 0
    for t in times:
        while i < len(events) and events[i]["ts"] <= t:
            active.append(events[i])
            i += 1
        active = [e for e in active if e["ts"] + e["dur"] > t]
        out.append(list(active))
    return out


def self_times(events: list[dict]) -> collections.Counter:
    """Each op's duration less its children's, per thread (events nest by time within a thread)."""
    total: collections.Counter = collections.Counter()
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e["tid"]].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, child time]
        for e in evs:
            while stack and stack[-1][0] <= e["ts"]:
                end, name, child = stack.pop()
                total[name] -= child
            if stack:
                stack[-1][2] += e["dur"]
            total[e["name"]] += e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], 0.0])
        for end, name, child in stack:
            total[name] -= child
    return total


def summarize(events: list[dict], top: int = 10) -> dict:
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = []  # verl marks a step twice (the worker's and the engine's train_batch): keep the outer one
    for e in sorted((e for e in xs if e["name"] == "train_batch"), key=lambda e: (e["ts"], -e["dur"])):
        if not steps or e["ts"] >= steps[-1]["ts"] + steps[-1]["dur"]:
            steps.append(e)
    if not steps:
        raise ValueError("no train_batch annotation in this trace: was it written by verl's profiler?")
    main = steps[0]["tid"]
    lo, hi = steps[0]["ts"], steps[-1]["ts"] + steps[-1]["dur"]
    gpu = [e for e in xs if e.get("cat") in GPU_CATS]
    cpu = [e for e in xs if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "python_function")
           and e["ts"] + e["dur"] >= lo and e["ts"] <= hi]
    cpu.sort(key=lambda e: e["ts"])
    micro = sorted((e for e in cpu if e["tid"] == main and MICRO.match(e["name"])), key=lambda e: e["ts"])
    out: dict = {"steps": [], "gpu": bool(gpu)}
    out["between_steps_ms"] = [round((b["ts"] - (a["ts"] + a["dur"])) / 1e3, 1) for a, b in zip(steps, steps[1:])]

    # kernels → the micro-batch that launched them (launch and kernel share args.correlation)
    launch_at = {e["args"]["correlation"]: e["ts"] for e in cpu
                 if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    starts = [m["ts"] for m in micro]
    per_micro = collections.Counter()
    for k in gpu:
        t = launch_at.get(k.get("args", {}).get("correlation"))
        i = bisect.bisect_right(starts, t) - 1 if t is not None else -1
        if i >= 0 and t < micro[i]["ts"] + micro[i]["dur"]:
            per_micro[i] += k["dur"]
    busy = merged([(k["ts"], k["ts"] + k["dur"]) for k in gpu])
    for s in steps:
        a, b = s["ts"], s["ts"] + s["dur"]
        mine = [(i, m) for i, m in enumerate(micro) if a <= m["ts"] < b]
        row = {"wall_ms": round(s["dur"] / 1e3, 1), "micro_batches": len(mine),
               "micro_ms": [round(m["dur"] / 1e3, 1) for _, m in mine]}
        if gpu:
            row["gpu_busy_ms"] = round(overlap(busy, a, b) / 1e3, 1)
            row["gpu_micro_ms"] = [round(per_micro[i] / 1e3, 1) for i, _ in mine]
        out["steps"].append(row)

    if gpu:  # idle stretches inside the steps, named by what the CPU was inside of as each began
        gaps = []
        for s in steps:
            a, b = s["ts"], s["ts"] + s["dur"]
            inside = [(max(x, a), min(y, b)) for x, y in busy if y > a and x < b]
            edges = [a] + [v for iv in inside for v in iv] + [b]
            gaps += [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2) if edges[i + 1] > edges[i]]
        named = collections.Counter()
        small = [g for g in gaps if g[1] - g[0] < SMALL_GAP_US]
        if small:
            named[f"(gaps under {SMALL_GAP_US} us: launch spacing)"] = sum(g1 - g0 for g0, g1 in small)
        large = [g for g in gaps if g[1] - g[0] >= SMALL_GAP_US]
        labels = {}
        for g, stack in zip(large, covering(cpu, [g0 for g0, _ in large])):
            marks = [e["name"] for e in stack if e.get("cat") == "user_annotation"]
            where = " > ".join(n for i, n in enumerate(marks) if i == 0 or n != marks[i - 1])
            op = next((e["name"] for e in reversed(stack) if e.get("cat") != "user_annotation"), "")
            labels[g] = f"{where} | {op}" if op else where or "(no CPU activity)"
            named[labels[g]] += g[1] - g[0]
        largest = [{"ms": round((g1 - g0) / 1e3, 2), "cpu": labels[(g0, g1)]}
                   for g0, g1 in sorted(large, key=lambda g: g[0] - g[1])[:top]]
        out["gpu_idle_ms"] = round(sum(g1 - g0 for g0, g1 in gaps) / 1e3, 1)
        out["largest_gaps"] = largest
        out["idle_by_cpu_activity_ms"] = {k: round(v / 1e3, 1) for k, v in named.most_common(top)}
        kernels = collections.Counter()
        counts = collections.Counter()
        for k in gpu:
            if lo <= k["ts"] <= hi + 1e6:
                kernels[k["name"][:90]] += k["dur"]
                counts[k["name"][:90]] += 1
        out["top_kernels_ms"] = {f"{name} (x{counts[name]})": round(v / 1e3, 1) for name, v in kernels.most_common(top)}

    syncs, sync_ms = collections.Counter(), collections.Counter()
    for e in cpu:
        if e["name"] in SYNCS:
            syncs[e["name"]] += 1
            sync_ms[e["name"]] += e["dur"]
    out["host_syncs"] = {name: {"count": n, "ms": round(sync_ms[name] / 1e3, 1)} for name, n in syncs.items()}
    ops = self_times([e for e in cpu if e.get("cat") in ("cpu_op", "cuda_runtime")])
    out["top_cpu_self_ms"] = {name: round(v / 1e3, 1) for name, v in ops.most_common(top)}
    return out


def render(s: dict) -> str:
    lines = ["| step | wall ms | micro-batches | micro ms (CPU) | GPU busy ms | GPU ms per micro-batch |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(s["steps"]):
        lines.append(f"| {i} | {r['wall_ms']} | {r['micro_batches']} | {r['micro_ms']} | "
                     f"{r.get('gpu_busy_ms', '')} | {r.get('gpu_micro_ms', '')} |")
    lines.append(f"\nbetween steps (data loading, logging): {s['between_steps_ms']} ms")
    if s["gpu"]:
        lines.append(f"GPU idle inside the steps: {s['gpu_idle_ms']} ms; by CPU activity:")
        lines += [f"  {ms:>8} ms  {name}" for name, ms in s["idle_by_cpu_activity_ms"].items()]
        lines.append("largest gaps: " + ", ".join(f"{g['ms']} ms ({g['cpu']})" for g in s["largest_gaps"][:5]))
        lines.append("top kernels:")
        lines += [f"  {ms:>8} ms  {name}" for name, ms in s["top_kernels_ms"].items()]
    lines.append("host syncs: " + (", ".join(f"{k} x{v['count']} ({v['ms']} ms)" for k, v in s["host_syncs"].items())
                                   or "none"))
    lines.append("top CPU ops (self):")
    lines += [f"  {ms:>8} ms  {name}" for name, ms in s["top_cpu_self_ms"].items()]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("--json", action="store_true")
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args()
    s = summarize(load(args.trace), args.top)
    print(json.dumps(s, indent=1) if args.json else render(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
