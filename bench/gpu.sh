#!/usr/bin/env bash
# The GPU session in one command: the memory's Triton path checked against the torch path on the GPU,
# training speed (tokens/s, MFU, peak memory) of MONETA (Triton, torch eager, torch compiled) and a
# same-size Llama at sizes s and m, T = 4096, bf16, and a 200-step `miras train` whose loss must fall.
# Everything goes to one JSON; the run keeps to 7.5 minutes on one H100/H200 (later sections are
# recorded as skipped when time runs out). bench/README.md says what each number means.
#
#   bash bench/gpu.sh [OUT_JSON [bench_gpu.py flags...]]     default OUT_JSON: bench/out/gpu.json
#   bash bench/gpu.sh "$OUT/gpu.json"                         on a lent machine whose $OUT comes back
#
# Needs torch with CUDA, transformers, accelerate, safetensors, tokenizers and triton (CUDA torch wheels
# bring it); not `datasets` or `wandb`, no network, no install of miras (it runs from this checkout).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

out_json=${1:-bench/out/gpu.json}
shift || true
mkdir -p "$(dirname "$out_json")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
python=${PYTHON:-python3}

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device visible to torch (or no torch); for a CPU check of the script: $python bench/bench_gpu.py --device cpu --quick" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 450 s for the sections, 20 s of slack for start-up and the last write: under 8 minutes in all.
timeout --kill-after=10 470 "$python" bench/bench_gpu.py --out "$out_json" --deadline 450 "$@"
status=$?
echo "gpu.sh: exit $status; results in $out_json"
exit $status
