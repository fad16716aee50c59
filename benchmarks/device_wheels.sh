#!/usr/bin/env bash
# Downloads into .whl/ the pure-Python wheels that benchmarks/device_check.sh installs on a GPU
# machine that has torch, transformers, tokenizers, safetensors, numpy, pillow, click, tqdm,
# fsspec and pytest but reaches no package index. Run it where the index is reachable and copy
# .whl/ along with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 importlib_metadata==8.7.0
ls -l .whl
du -sh .whl
