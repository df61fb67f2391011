#!/usr/bin/env bash
# Issue 5's GPU checks as one prepared script, for a task that is lent a GPU machine (the `device`
# tool's `run`). Nothing here has run on a GPU yet: no task so far was lent one.
#
# The device image (as last seen) has python3 3.12 with torch, scikit-learn, scipy, matplotlib,
# xarray, tqdm and pytest, but not zarr: carry its wheels. Here, once per session:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
#
# then run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=590).
# Stages, most important first, each under its own time limit, each writing into $OUT as it
# finishes (copy the JSON into benchmarks/results/ and summarise it in BENCHMARKS.md):
#   1. tests/test_cuda.py (CUDA operator vs CPU, determinism, fused/compiled on CUDA)
#   2. top-16 of the P = 1.1e6 MLP (64-1024-1024-10, the paper's schedule)  -> scale-top16-cuda.json
#   3. the operator benchmark on CUDA (eager and fused)                      -> operator-cuda.json
#   4. `tjac run` of the paper recipe on CUDA (all 4,810 sigma)              -> run-paper.log
#   5. column-parallel products (tjac.distributed): block-32 J V and top-16 on 1 process against
#      --world ranks, the same benchmark as on the CPU                        -> distributed-cuda.json
# Limits: TEST_LIMIT, SCALE_LIMIT, OP_LIMIT, RUN_LIMIT, DIST_LIMIT (seconds; defaults
# 90/140/140/80/100 = 550 s fit one 590-s call; the 1e6 target itself allows 600 s: where 140 s
# is short, give stage 2 a call of its own with SCALE_LIMIT=560).
# Dry run on this CPU: DEVICE=cpu SCALE_SIZES=1e3 OP_ARGS=--quick RUN_ARGS="--epochs 2" \
#   DIST_ARGS=--quick OUT=/tmp/dc bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/tjac-device-check}
DEV=${DEVICE:-cuda}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/tjac-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/tjac-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/stages.log"
  tail -n 5 "$OUT/$name.log"
}

python3 - <<'PY' 2>&1 | tee "$OUT/env.log"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import tjac, zarr
print("tjac", tjac.__version__, "zarr", zarr.__version__)
PY
stage test-cuda ${TEST_LIMIT:-90} python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
stage scale ${SCALE_LIMIT:-140} python3 benchmarks/bench_scale.py --device "$DEV" --sizes "${SCALE_SIZES:-1e6}" \
  --out "$OUT/scale-top16-$DEV.json"
stage operator ${OP_LIMIT:-140} python3 benchmarks/bench_operator.py --device "$DEV" \
  ${OP_ARGS:---backends eager,fused} --out "$OUT/operator-$DEV.json"
stage run-paper ${RUN_LIMIT:-80} python3 -m tjac run --device "$DEV" ${RUN_ARGS:-} --store "$OUT/paper-$DEV.zarr" \
  --png none
rm -rf "$OUT/paper-$DEV.zarr"  # a folder tree: only the log comes back
# Stage 5 is untested on a GPU (only its CPU form, `--device cpu --quick`, has run). The machine
# has one GPU: NCCL refuses two ranks on one device, so `--dist-backend auto` gives the ranks gloo
# and both replay on cuda:0, each slice crossing through host memory — it measures whether two
# processes overlap on one GPU (the paper's MLP is launch-bound there), not NVLink. On a node with
# a GPU per rank `auto` picks NCCL. The script starts its own ranks (no torchrun needed).
if [ "${DIST_LIMIT:-100}" -gt 0 ]; then
  stage distributed ${DIST_LIMIT:-100} python3 benchmarks/bench_distributed.py --device "$DEV" \
    ${DIST_ARGS:---world 2 --repeats 5 --svd-repeats 1} --out "$OUT/distributed-$DEV.json"
fi
cat "$OUT/stages.log"
