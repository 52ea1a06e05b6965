#!/usr/bin/env bash
# ladder's one command: parse flags and environment variables, then hand over to `python -m stages`.
#   ./train.sh [--stage sft|eval|ei|grpo|all|data|sweep|demo] [--flags] [key=value ...]
#   ./train.sh --help
# Each environment variable below becomes its flag, placed before the user's own flags, so a flag
# on the command line wins over the variable.
set -euo pipefail
cd "$(dirname "$0")"
env_flags=()
add() { [[ -n ${!1:-} ]] && env_flags+=("--$2" "${!1}"); return 0; }
add MODEL_PATH model;        add TOKENIZER_PATH tokenizer;     add TRAIN_DATA train_data
add VAL_DATA val_data;       add MAX_LENGTH max_length;        add BATCH_SIZE batch_size
add MICRO_BATCH_SIZE micro_batch_size;  add LEARNING_RATE lr;  add NUM_EPOCHS epochs
add WARMUP_RATIO warmup_ratio;  add WEIGHT_DECAY weight_decay; add GRAD_CLIP grad_clip
add N_GPUS n_gpus;           add NNODES nnodes;                add NODE_RANK node_rank
add MASTER_ADDR master_addr; add MASTER_PORT master_port;      add STRATEGY strategy
add LORA_RANK lora_rank;     add LORA_ALPHA lora_alpha;        add LORA_TARGETS lora_targets
add OUTPUT_DIR output_dir;   add RUN_NAME run_name;            add TRAIN_SIZE train_size
case ${USE_LORA:-} in 1|true|True|yes) env_flags+=(--use_lora) ;; esac
case ${PARAM_OFFLOAD:-} in 1|true|True|yes) env_flags+=(--param_offload) ;; esac
case ${OPTIMIZER_OFFLOAD:-} in 1|true|True|yes) env_flags+=(--optimizer_offload) ;; esac
case ${GRADIENT_CHECKPOINTING:-} in 0|false|False|no) env_flags+=(--no_grad_ckpt) ;; esac
py=python3
[[ -x .venv/bin/python && -z ${VIRTUAL_ENV:-} ]] && py=.venv/bin/python
exec "$py" -m stages "${env_flags[@]}" "$@"
