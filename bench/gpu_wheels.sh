#!/usr/bin/env bash
# Make .whl/: the Python 3.12 x86-64 wheels that bench/gpu_check.sh installs on the lent GPU machine, whose
# image (python3 3.12, torch 2.11, torchvision, numpy, timm, h5py, scipy, huggingface_hub, ... : the device
# tool's KINDS.md lists it) lacks them and which cannot reach a package registry.
#
# What is here and why (installed there with --no-deps, so this list is the whole set):
#   open_clip_torch (+ ftfy, wcwidth; regex is in the image), segmentation-models-pytorch,
#   pydensecrf2 (built here: PyPI has only its sdist), dvclive, and of dvc what `from dvclive import Live`
#   and Live(dvcyaml=None, save_dvc_exp=False) outside a DVC/Git repository import: dvc, dvc-data, dvc-http,
#   dvc-objects, dvc-render, dvc-studio-client, scmrepo, dulwich, pygtrie, sqltrie, orjson, diskcache, dpath,
#   flufl.lock, atpublic, zc.lockfile, flatten-dict, funcy, voluptuous, ruamel.yaml (+ clib).
#   dvc's other requirements (celery, kombu, hydra-core, omegaconf, gto, pygit2, gitpython, asyncssh, ...)
#   are never imported on those paths and are left out; installing with --no-deps does not check them.
# Versions: requirements.txt's pins where it pins, otherwise those of the project's .venv.
#
# Needs: pip with access to PyPI, and a CPython 3.12 with a C++ compiler for pydensecrf2 ($PYTHON312,
# default python3.12). Usage, from anywhere: bash bench/gpu_wheels.sh   (about a minute; ~10 MiB)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python312="${PYTHON312:-python3.12}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
mkdir -p .whl

python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 segmentation_models_pytorch==0.6.0 \
  dvclive==3.49.1 dvc==3.67.1 dvc-data==3.18.3 dvc-http==2.32.0 dvc-objects==5.2.0 dvc-render==1.0.2 \
  dvc-studio-client==0.23.0 flatten-dict==0.5.0 funcy==2.1 voluptuous==0.16.0 scmrepo==3.6.2 dulwich==1.2.21 \
  pygtrie==2.6.2 sqltrie==0.11.3 orjson==3.13.0 diskcache==5.6.3 dpath==2.2.0 flufl.lock==9.2.0 \
  atpublic==9.0.0 zc.lockfile==4.0 ruamel.yaml==0.19.1 ruamel.yaml.clib==0.2.15

# pydensecrf2 1.1 is an sdist only: build a cp312 wheel (linux_x86_64; needs glibc >= 2.29 and libstdc++
# with GLIBCXX_3.4.21 where it runs) in a throwaway 3.12 venv, with pip's build isolation (Cython 0.29.36).
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
"$python312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "gpu_wheels: $python312 is not CPython 3.12; set PYTHON312" >&2; exit 1; }
"$python312" -m venv "$build/venv"
"$build/venv/bin/python" -m pip wheel -q --no-deps -w .whl pydensecrf2==1.1

ls -l .whl
du -sh .whl
