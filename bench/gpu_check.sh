#!/usr/bin/env bash
# GPU check of the training stages (about 3-6 minutes on one H100/H200):
#   1. the tiny chain's cam_train, weakclip_train and seg_train@gt with runtime.device cuda, once with
#      runtime.launcher none and once under torchrun with nproc 1 (NCCL process group, DDP, SyncBatchNorm);
#      wall time of each, outputs checked;
#   2. full-size WeakCLIP training steps (ViT-B/16 at 512, K = 21, random CLIP weights, batch 8, AMP off,
#      CRF boundary loss on): images/s and peak torch.cuda.max_memory_allocated;
#   3. one full-size training step split by part (bench/step_profile.py), CLIP frozen and unfrozen, fp32 and
#      bf16 autocast, with the frozen / full ratio's limit ($OUT/gpu_check_step_profile.json);
#   4. a summary block: stage wall times, launcher none vs torchrun nproc 1, and the WeakCLIP speed.
# Everything printed also goes to $OUT/gpu_check.log when $OUT is set, with the measurements as
# $OUT/gpu_check_stages.json and $OUT/gpu_check_speed.json.
#
# Python: the repository's .venv when there is one. Otherwise (the lent GPU machine, which is bare and
# offline) the image's python3 and its torch, plus the wheels in .whl/ (what the image lacks: open_clip_torch,
# segmentation-models-pytorch, pydensecrf2, dvclive and the part of dvc it imports; bench/gpu_wheels.sh
# makes that folder), installed into /tmp/site; the repository itself is importable through PYTHONPATH.
#
# Usage:
#   bash bench/gpu_check.sh                 # on the GPU machine (device tool: carry [".whl"])
#   bash bench/gpu_check.sh --cpu-dry-run   # same code paths on CPU, tiny sizes (Gloo instead of NCCL)
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
device=cuda
speed_size=full
case "${1:-}" in
  --cpu-dry-run) device=cpu; speed_size=quick ;;
  "") ;;
  *) echo "usage: $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac
# Seconds each part may take; the defaults (240 + 120 + 60 s) fit a 480 s device call with the wheel install and
# CUDA start-up.
stages_timeout="${GPU_CHECK_STAGES_TIMEOUT:-240}"
speed_timeout="${GPU_CHECK_SPEED_TIMEOUT:-120}"
profile_timeout="${GPU_CHECK_PROFILE_TIMEOUT:-60}"

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 PYTHONHASHSEED=0 PYTHONUNBUFFERED=1 \
  PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

echo "===== gpu_check: device=$device, $(date -u +%FT%TZ), repo $repo ($(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
echo "===== 0. python environment"
started=$SECONDS
if [[ -x "$repo/.venv/bin/python" ]]; then
  python="$repo/.venv/bin/python"
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  echo "using the repository's .venv"
else
  # The image's python3 holds torch; never install torch from .whl (there is none there on purpose).
  python="$(python3 -c 'import sys; print(sys.executable)')" || { echo "gpu_check: no python3" >&2; exit 1; }
  shopt -s nullglob
  wheels=(.whl/*.whl)
  shopt -u nullglob
  if (( ${#wheels[@]} == 0 )); then
    echo "gpu_check: no .venv and no wheels in $repo/.whl: make them with bench/gpu_wheels.sh, carry .whl" >&2
    exit 1
  fi
  echo "no .venv: installing ${#wheels[@]} wheels from .whl into /tmp/site for $python"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" || { echo "gpu_check: pip install of .whl failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$repo"
  if [[ -e /tmp/site/torch ]]; then
    echo "gpu_check: /tmp/site holds a torch: the image's torch must be the one used; remove it from .whl" >&2
    exit 1
  fi
fi
# The stages and torchrun find each other next to this python (weakclip_core.runtime.distributed looks there first).
export PATH="$(dirname "$python"):$PATH"
echo "python $python, PYTHONPATH=$PYTHONPATH, torchrun $(command -v torchrun || echo 'NOT FOUND'), $((SECONDS - started)) s"
"$python" - <<'PY' || { echo "gpu_check: the environment is incomplete (see the failed imports above)" >&2; exit 1; }
import importlib, importlib.metadata as metadata, sys


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "MISSING"


names = ("torch", "torchvision", "numpy", "timm", "huggingface_hub", "open_clip_torch", "segmentation_models_pytorch",
         "pydensecrf2", "dvclive", "dvc", "h5py", "scipy", "pillow", "matplotlib")
print("python", sys.version.split()[0], "|", ", ".join(f"{name} {version(name)}" for name in names))
failed = []
for module in ("torch", "open_clip", "segmentation_models_pytorch", "pydensecrf.densecrf", "dvclive", "h5py",
               "matplotlib.pyplot", "weakclip_core.method.crf", "pipeline.prepare", "pipeline.clip", "pipeline.cam_train",
               "pipeline.cam_infer", "pipeline.weakclip_train", "pipeline.seg_train", "bench.measure"):
    try:
        importlib.import_module(module)
    except Exception as error:  # report every missing piece at once, then fail
        failed.append(module)
        print(f"import {module} FAILED: {type(error).__name__}: {error}")
if failed:
    sys.exit(1)
import torch
print(f"torch {torch.__version__} from {torch.__file__}, cuda available {torch.cuda.is_available()}, "
      f"nccl {torch.distributed.is_nccl_available()}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
PY
if [[ "$device" == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
results="${OUT:-$work}"
stages_json="$results/gpu_check_stages.json"
speed_json="$results/gpu_check_speed.json"
profile_json="$results/gpu_check_step_profile.json"
failed=()

echo "===== 1. training stages on the tiny chain (launcher none vs torchrun nproc 1), limit $stages_timeout s"
started=$SECONDS
timeout "$stages_timeout" "$python" -m bench.gpu_check stages --device "$device" --work "$work" \
  --results "$stages_json" || failed+=("stages (exit $?)")
stages_s=$((SECONDS - started))
echo "stages: $stages_s s"

echo "===== 2. full-size WeakCLIP training speed (size $speed_size), limit $speed_timeout s"
started=$SECONDS
timeout "$speed_timeout" "$python" -m bench.gpu_check weakclip-speed --device "$device" --size "$speed_size" \
  --batch-size 8 --steps 5 --results "$speed_json" || failed+=("weakclip-speed (exit $?)")
speed_s=$((SECONDS - started))
echo "weakclip speed: $speed_s s"

echo "===== 3. one training step split by part, frozen / unfrozen, fp32 / bf16 (size $speed_size), limit $profile_timeout s"
started=$SECONDS
timeout "$profile_timeout" "$python" -m bench.gpu_check step-profile --device "$device" --size "$speed_size" \
  --results "$profile_json" || failed+=("step-profile (exit $?)")
profile_s=$((SECONDS - started))
echo "step profile: $profile_s s"

echo "===== summary (device=$device)"
"$python" -m bench.gpu_check summary --stages "$stages_json" --speed "$speed_json" || failed+=("summary")
echo "part wall times: stages $stages_s s, weakclip speed $speed_s s, step profile $profile_s s, whole check $SECONDS s"
if (( ${#failed[@]} )); then
  echo "===== gpu_check: FAILED: ${failed[*]} (exit 124 = ran out of its limit)"
  exit 1
fi
echo "===== gpu_check: all ok"
