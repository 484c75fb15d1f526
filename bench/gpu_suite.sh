#!/usr/bin/env bash
# The performance issue's GPU figures, in three stages that each fit one 10-minute device call:
#
#   bash bench/gpu_suite.sh tests    # the CUDA-only tests (compiled/CUDA-graph decoding, memory prediction)
#   bash bench/gpu_suite.sh train    # training throughput + MFU: GPT-2 124M at T=1024, ~1B LLaMA; lmlab vs HF, compiled
#   bash bench/gpu_suite.sh decode   # decoding: ~1B LLaMA, bf16, batch 1 (roofline) and batches 8, 64
#   bash bench/gpu_suite.sh scale    # scale-out: one process vs FSDP2 (tokens/s, peak memory), llama-1b with CPU
#                                    # offload, --dry-run beside them; NPROC=8 (8 GPUs) adds DDP vs FSDP2
#
# Runs from the repository root with the machine's own python3 (torch, transformers, safetensors,
# tokenizers, numpy and tqdm are what the benchmarks import). JSON results go to $OUT (the device
# tool's output folder) or ./bench-results. Copy the tables into docs/benchmarks.md with the date.
set -euo pipefail
stage=${1:?usage: bash bench/gpu_suite.sh tests|train|decode|scale}
out=${OUT:-bench-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
case "$stage" in
  tests)
    $py -m pytest -q -p no:cacheprovider tests/test_generate.py tests/test_pretrain.py tests/test_engine.py -k "cuda or bf16 or gpu" 2>&1 | tee "$out/tests_generate.log"
    if [ -f tests/test_memory.py ]; then $py -m pytest -q -p no:cacheprovider tests/test_memory.py -k cuda 2>&1 | tee "$out/tests_memory.log"; fi
    ;;
  train)
    $py bench/train_throughput.py --model gpt2-124m --vocab-size 50304 --batch-size 16 --seq-len 1024 --steps 20 --warmup 5 \
        --round-steps 5 --device cuda --dtype bf16 --compile --json "$out/train_gpt2_124m.json"
    $py bench/train_throughput.py --model llama-1b --batch-size 4 --seq-len 2048 --steps 10 --warmup 4 \
        --round-steps 5 --device cuda --dtype bf16 --compile --json "$out/train_llama_1b.json"
    ;;
  decode)
    $py bench/decode_latency.py --model llama-1b --device cuda --dtype bf16 --json "$out/decode_latency_llama_1b.json"
    $py bench/decode_throughput.py --model llama-1b --device cuda --dtype bf16 --json "$out/decode_throughput_llama_1b.json"
    ;;
  scale)
    nproc=${NPROC:-1}
    strategies=$([ "$nproc" -gt 1 ] && echo "ddp fsdp" || echo "fsdp")
    mkdir -p "$out/scale"
    data=${DATA:-$($py -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from scale_out import builtin_data; print(builtin_data(Path('$out/scale')))")}
    # shellcheck disable=SC2086 # strategies is a list
    $py bench/scale_out.py --model gpt2-124m --nproc "$nproc" --global-batch 16 --seq-len 1024 --steps 20 --device cuda \
        --strategies $strategies --data "$data" --json "$out/scale_gpt2_124m.json"
    $py bench/scale_out.py --model llama-1b --nproc "$nproc" --global-batch 4 --seq-len 2048 --steps 8 --device cuda \
        --strategies fsdp --extra "--cpu-offload --activation-checkpointing" --data "$data" --json "$out/scale_llama_1b_offload.json"
    for extra in "" "--strategy fsdp" "--strategy fsdp --cpu-offload --activation-checkpointing"; do
      # shellcheck disable=SC2086 # extra is a list of flags
      $py -m lmlab.cli pretrain --model llama-1b --data "$data" --out "$out/dry" --device cuda --dry-run \
          --world-size "$nproc" --micro-batch-size 4 --seq-len 2048 $extra 2>&1 | tee -a "$out/scale_dry_run.txt" || true
    done
    ;;
  *) echo "unknown stage '$stage': expected tests, train, decode or scale" >&2; exit 2 ;;
esac
