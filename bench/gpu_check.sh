#!/usr/bin/env bash
# GPU check of the training stages (a few minutes on one H100/H200):
#   1. the tiny chain's cam_train, weakclip_train and seg_train@gt with runtime.device cuda, once with
#      runtime.launcher none and once under torchrun with nproc 1 (NCCL process group, DDP, SyncBatchNorm);
#      wall time of each, outputs checked;
#   2. full-size WeakCLIP training steps (ViT-B/16 at 512, K = 21, random CLIP weights, batch 8, AMP off):
#      images/s and peak torch.cuda.max_memory_allocated.
# Everything printed also goes to $OUT/gpu_check.log when $OUT is set.
#
# Usage (from anywhere; uses the repository's .venv when there is one):
#   bash bench/gpu_check.sh                 # on the GPU machine
#   bash bench/gpu_check.sh --cpu-dry-run   # same code paths on CPU, tiny sizes (Gloo instead of NCCL)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
device=cuda
speed_size=full
case "${1:-}" in
  --cpu-dry-run) device=cpu; speed_size=quick ;;
  "") ;;
  *) echo "usage: $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac

python="$repo/.venv/bin/python"
[[ -x "$python" ]] || python="$(command -v python3)"
export PATH="$(dirname "$python"):$PATH" HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 PYTHONHASHSEED=0
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "== gpu_check: device=$device, python=$python, $(date -u +%FT%TZ)"
"$python" - <<'PY'
import torch
print(f"torch {torch.__version__}, cuda available {torch.cuda.is_available()}, "
      f"nccl {torch.distributed.is_nccl_available()}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
PY
if [[ "$device" == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

echo "== 1. training stages on the tiny chain (launcher none vs torchrun nproc 1)"
started=$SECONDS
timeout 300 "$python" -m bench.gpu_check stages --device "$device" --work "$work"
echo "stages: $((SECONDS - started)) s"

echo "== 2. full-size WeakCLIP training speed (size $speed_size)"
started=$SECONDS
timeout 180 "$python" -m bench.gpu_check weakclip-speed --device "$device" --size "$speed_size" --batch-size 8 --steps 5
echo "weakclip speed: $((SECONDS - started)) s"
echo "== gpu_check: done"
