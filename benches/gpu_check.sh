#!/usr/bin/env bash
# The GPU checks of a session that is lent a CUDA machine, as one script: the CUDA tests
# (every test whose name says cuda or compile: tests/test_cuda_paths.py and the
# torch.compile tests among them), the training benchmark on the GPU (eager, then CUDA
# graphs through torch.compile's reduce-overhead mode) and the torch backend's layout
# microbenchmark. On an H200 (2026-12-04) the whole script took about 4 minutes.
#
#   OUT=/tmp/gpu bash benches/gpu_check.sh      # from the repository root
#
# Needs the built extension in python/bca (or bca installed) and torch with CUDA, peft,
# transformers, scipy, hypothesis and pytest. Each step has its own time limit so that the
# whole script ends within about 10 minutes; a step that fails or times out is reported
# and the next one still runs. Writes gpu_check.log and the benchmark tables
# (train_cuda_h200*.{json,md,png}; the tag is BENCH_TAG, default from the GPU's name) to
# $OUT; exits non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log="$out/gpu_check.log"
failed=()

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$log"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed+=("$name($rc)")
}

: >"$log"
step machine 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
    nproc; uptime; python3 -c "import sys, torch, peft, transformers, numpy, scipy;
print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"peft\", peft.__version__, \"transformers\", transformers.__version__,
      \"numpy\", numpy.__version__, \"scipy\", scipy.__version__)"'
tag=${BENCH_TAG:-cuda_$(python3 -c "import torch; n = torch.cuda.get_device_name().split();
print(next((w for w in n if w[:1] in 'HABL' and w[1:2].isdigit()), 'gpu').lower())")}
step cuda-tests 240 python3 -m pytest -q -p no:cacheprovider -rs -k "cuda or compile" tests/
step train-eager 150 python3 benches/bench_train.py --device cuda --rows 1,32,512,8192 \
    --tag "$tag" --out "$out"
step layouts 90 python3 benches/gpu_layouts.py --device cuda
step train-graphs 200 python3 benches/bench_train.py --device cuda --dims 4096 --rows 32,8192 \
    --scopes adapter --compile reduce-overhead --tag "${tag}_compile" --out "$out"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed: ${failed[*]}" | tee -a "$log"
    exit 1
fi
echo "gpu_check: all steps passed" | tee -a "$log"
