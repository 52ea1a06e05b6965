"""ladder's benchmarks, run from the repository root as modules (`python -m bench.sft_throughput ...`).

    sft_throughput   SFT tokens/s of verl variants and a hand loop: main() and the report table
      variants         the variant flags, the --sweep mini-language, labels
      workload         GSM8K rows → data_prep → SFT parquet; tokenizer and random real-shape models
      verl_run         one verl variant: ladder's SFT command, timed from verl's metrics file
      hand_loop        the hand-written training loop it is compared against
    trace_summary    where a profiled step's time goes (verl's torch profiler trace)
    loss_kernels     the LM-head log-prob loss alone: ladder's fused one against verl's
    real_shape_smoke a random-weight Qwen2.5-shaped model folder for trying stages on real shapes
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
