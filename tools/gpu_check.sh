#!/usr/bin/env bash
# The checks to run when a GPU is lent for a few minutes: the CUDA tests, then the GPU benchmarks, each under its
# own time limit so that a hang costs one step, not the loan. Every output goes under $OUT (the device tool brings
# that folder back: machine.txt, summary.txt and steps.txt, every step's log); the last lines printed are one
# summary line per step with its exit status.
#
#   bash tools/gpu_check.sh [WHEELS]       # from the repository root; about 10.5 minutes at most, 5-6 in practice
#
# WHEELS: a folder of wheels for what the GPU machine lacks and cannot download (it has no network). The H200 lent
# on 2026-12-04 (Python 3.12, torch 2.11.0+cu130, transformers 5.17) lacked starlette, uvicorn and gguf; made here
# with `pip download --no-deps --only-binary :all: --python-version 3.12 --implementation cp -d .gpu/whl
# starlette uvicorn gguf` and carried along (`carry: [".gpu"]`; their own needs are on that machine). Without them
# the modules that import them fail to collect and the rest still runs (test_codecs.py needs transformers 5.25,
# whose needs that machine lacks: it does not collect there either; it holds no CUDA test).
# STEPS limits the run to some steps, e.g. STEPS="cuda_tests decode_positions".
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS=${STEPS:-"cuda_tests decode_positions decode_positions_eager profile_step generate hybrid device_quant \
quant_slots stream_int4"}
summary=()

if [ $# -ge 1 ] && [ -d "$1" ]; then
    # --no-deps into a folder of their own: one missing need does not stop the others (as a resolving install did)
    pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site "$1"/*.whl > "$OUT/wheels.log" 2>&1
    summary+=("wheels rc=$? ($(ls "$1"/*.whl | wc -l) files)")
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"  # after the machine's own packages: adds, never replaces
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import sys, torch, numba; print(sys.version.split()[0], torch.__version__, numba.__version__,
torch.cuda.is_available())"
  lscpu | grep -E "Model name|^CPU\(s\)"; } > "$OUT/machine.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a limit unless STEPS leaves NAME out
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name rc=$rc $((SECONDS - t0))s: $(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-160)")
}

# -v: a run cut by its limit still names what passed and failed; collection errors do not stop the other modules.
step cuda_tests 200 python -m pytest -m cuda -v -p no:cacheprovider --continue-on-collection-errors tests
step decode_positions 45 python tools/bench_decode_positions.py --device cuda --rounds 3
step decode_positions_eager 45 python tools/bench_decode_positions.py --device cuda --rounds 3 --no-graphs
step profile_step 120 python tools/profile_cuda_step.py
step generate 90 python tools/bench_generate.py --shape mixtral-small --device cuda --dtype bfloat16 --rounds 3
step hybrid 40 python tools/bench_hybrid.py --device cuda
step device_quant 40 python tools/bench_device_quant.py --device cuda
step quant_slots 40 python tools/bench_quant_slots.py --device cuda
step stream_int4 40 python tools/bench_stream.py --device cuda --experts int4 --rows int4

printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
# The device tool brings back at most 8 files: every log in one (a run cut short keeps them apart).
for log in "$OUT"/*.log; do printf '\n===== %s\n' "$(basename "$log")"; cat "$log"; done > "$OUT/steps.txt" \
    && rm -f "$OUT"/*.log
