#!/usr/bin/env bash
# The GPU checks in one time-budgeted script: the GPU tests, the full-size build / FLOP / GPU
# benchmark sections, and the encoder-output cast on the GPU. Steps run in order of value, each
# only while the budget lasts; what they print and write lands in $OUT as each step ends, so a
# run cut short keeps every step it finished.
#
#   bash benchmarks/device_check.sh
#
# Wheels in .whl/ (benchmarks/device_wheels.sh) are installed first, for a GPU machine that has
# torch and transformers but no package index.
#
# Environment: BUDGET_S (seconds for the whole script, default 420), PYTHON (default python3),
# OUT (default /tmp/device-check), N (samples per build, default 200), DEVICE (default cuda; cpu
# runs the same steps with the tiny encoders, to check the script on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check}
PYTHON=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3} here"; exit 3; }
PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"  # absolute (not resolved: a venv's link stays)
BUDGET_S=${BUDGET_S:-420}
N=${N:-200}
WORK=${WORK:-/tmp/shardkit-bench-gpu}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then SIZE=(--full-size --resolution 1024 --batch-size 16 --workers 8); LATENT_HW="[128, 128]"
else SIZE=(--resolution 512 --batch-size 2 --workers 2); LATENT_HW="[64, 64]"; fi
mkdir -p "$OUT"
started=$SECONDS
left() { echo $(( BUDGET_S - (SECONDS - started) )); }
step() { echo "== $1 ($(left) s left)" | tee -a "$OUT/steps.log"; }

step "install carried wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" | tee -a "$OUT/steps.log"; exit 3; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import shardkit.build, diffusers, webdataset, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    2>&1 | tee -a "$OUT/steps.log"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"

# 1. Correctness of the GPU code paths (tiny encoders, about a minute).
step "GPU tests"
timeout $(( $(left) < 150 ? $(left) : 150 )) "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_gpu.py tests/test_encoder_output.py 2>&1 | tee "$OUT/tests.log"

# 2. Build vs encoders alone vs the per-file baseline, FLOP floor, GPU busy time,
#    with the full-size SDXL VAE and T5-XXL at random initialisation (written once into $WORK).
if [ "$(left)" -gt 120 ]; then
    step "full-size build benchmark"
    timeout "$(left)" "$PYTHON" benchmarks/run_all.py --device "$DEVICE" "${SIZE[@]}" --n "$N" --repeats 1 \
        --only build flops gpu --workdir "$WORK" --json "$OUT/$DEVICE-n$N.json" 2>&1 | tee "$OUT/bench.log"
fi

# 3. Encoder outputs to stored arrays on the GPU (host CPU per sample), a few seconds.
if [ "$(left)" -gt 30 ]; then
    step "output cast"
    (cd benchmarks && timeout "$(left)" "$PYTHON" tasks.py output_cast \
        "{\"device\": \"$DEVICE\", \"batch\": 16, \"hidden\": 4096, \"latent_hw\": $LATENT_HW, \"compute_dtypes\": [\"float16\", \"float32\"], \"repeats\": 5}") \
        2>&1 | tail -1 | tee "$OUT/output_cast.txt"
fi
step "done"
