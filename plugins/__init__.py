"""What verl imports by name inside its own processes (torchrun ranks, Ray workers), never ladder's stages.

verl loads these modules from a string: `model.external_lib` (every process that builds the model) or the
`VERL_USE_EXTERNAL_MODULES` environment variable (every process that imports verl). Importing one registers
or patches something in verl, transformers or torch; none of them imports anything from `stages/`.

    attention        `ladder_varlen`: packed-row attention on PyTorch's own variable-length flash kernel
    fused_ce         `model.fused_ce: ladder`: LM-head log-probs in chunks, cuBLAS matmuls + two triton passes
    compile          `model.compile`: torch.compile of every decoder layer
    hf_rollout       `grpo.rollout: hf`: a transformers rollout backend for verl's GRPO
    grpo_variants    GRPO's reward manager: each response's token count to the reward function, `truncated` out
    overlong_filter  `grpo.overlong: filter`: truncated responses masked out of the actor update
    cpu_platform     a `cpu` platform for verl (gloo, FSDP2, sdpa): the CPU demo and the tests
    cpu_platform_rl  what verl's Ray trainer (GRPO) also needs on that platform
    lifeline         every verl process stops when ladder's launcher is gone (even SIGKILLed)

stages/launch.py decides which of them a run loads (lifeline: stages/supervise.py).
"""
