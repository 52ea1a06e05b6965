"""ladder's stages: one module each (sft, evaluate, ei, grpo), run as `python -m stages <flags>`."""
