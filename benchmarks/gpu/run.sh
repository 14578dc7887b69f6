#!/usr/bin/env bash
# The GPU benchmarks of issue #6, for an offline machine (the device tool's H100).
#
# Here, once:   python benchmarks/gpu/prepare.py     (fills the git-ignored .bench-deps/)
# There:        bash benchmarks/gpu/run.sh meta_step  (< 5 min: meta_step.py, both settings, CUDA)
#               bash benchmarks/gpu/run.sh accuracy   (time to accuracy: 7.5 min of training, plus
#                                                      image decoding before and 600 test episodes after)
# with .bench-deps/wheels, .bench-deps/site and .bench-deps/omniglot in the tool's `carry`.
# The two parts are separate calls because one command may run 10 minutes at most (give the
# accuracy call timeout_s=600; MINUTES=7.5 leaves room for decoding and testing).
#
# Logs and the JSON lines go to $OUT (the device tool's result folder), else runs/gpu/.
# Overridable: PYTHON (python3), DEVICE (cuda), REPEATS (10), MINUTES (7.5), WORKERS (4), and
# META_STEP_ARGS / ACCURACY_ARGS (extra arguments), so the CPU-compatible parts can be dry-run
# here: DEVICE=cpu REPEATS=1 MINUTES=0.5 PYTHON=/work/venv/bin/python bash benchmarks/gpu/run.sh all
set -euo pipefail
cd "$(dirname "$0")/../.."
what=${1:-meta_step}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"

# Offline install of the pure-Python dependencies the image lacks; fewshot itself from src/.
site=/tmp/fewshot-bench-site
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .bench-deps/wheels/*.whl
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
fi
"$PYTHON" -c "import torch, lightning, jsonargparse, fewshot; print('torch', torch.__version__, \
'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

if [ "$what" = meta_step ] || [ "$what" = all ]; then
    # Both settings, every fewshot mode, learn2learn and higher; memory-bounded (1.25 GiB
    # budget), checkpointed and bf16 rows too. Then the memory curve of mini-ImageNet.
    timeout "${META_STEP_TIMEOUT:-200}" "$PYTHON" benchmarks/meta_step.py --device "$DEVICE" --repeats "${REPEATS:-10}" \
        --extra checkpoint budget bf16 ${META_STEP_ARGS:-} 2>&1 | tee "$OUT/meta_step.log"
    timeout 70 "$PYTHON" benchmarks/memory.py --device "$DEVICE" --setting mini_imagenet --tasks 4 \
        --steps 1 5 10 20 2>&1 | tee "$OUT/memory.log" || echo "memory curve skipped (time)"
fi
if [ "$what" = accuracy ] || [ "$what" = all ]; then
    "$PYTHON" benchmarks/time_to_accuracy.py --minutes "${MINUTES:-7.5}" \
        --data_root .bench-deps/omniglot --output_dir /tmp/fewshot-time-to-accuracy \
        --data.num_workers="${WORKERS:-4}" \
        ${ACCURACY_ARGS:-} 2>&1 | tee "$OUT/time_to_accuracy.log"
fi
