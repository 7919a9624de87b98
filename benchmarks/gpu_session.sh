#!/usr/bin/env bash
# A GPU session's checks and measurements. A session has 15 minutes of device time in all (the machine's
# start, about 30-90 s, and its idle time included), a call at most 10, and at most 8 files come back from
# a call: so one call runs several steps under one time budget (BUDGET seconds, 540 unless set), in the
# order given, skipping what no longer fits, and packs everything a step wrote into one archive per call.
#
# Here, once per session (no GPU needed):
#   bash benchmarks/gpu_session.sh prepare
# makes .gpu/ (ignored by git): wheels of what the GPU image lacks (fastapi, uvicorn, httptools, uvloop, pydantic, gguf,
# opentelemetry-api; for its Python 3.12) and the default model's tokenizer files (the serving benchmark needs one).
# Then, with the device tool, carrying .gpu, the decisive measurements first (every open target in one call):
#   run(command="bash benchmarks/gpu_session.sh ab serve64 ab18 tests", carry=[".gpu"], timeout_s=600)
# (ab18 and tests run only if ab and serve64 left time) and at once (a machine idle for 30 s is given back),
# with BUDGET = what `status` leaves less about 60 s, the steps that were skipped or cut short, then more:
#   run(command="BUDGET=200 bash benchmarks/gpu_session.sh ab18 tests pipe sweepq profile", carry=[".gpu"], timeout_s=260)
# Then give_back. After a run: unpack each results.tgz into one folder and
#   python benchmarks/gpu_results.py FOLDER
# prints every result, each target met or not, what each change is worth, and the settings with the least
# time per decode layer; winners become the defaults (QWENLM_GEMV, GEMV["split"] "fixup", launch settings),
# each change tested here first.
# What steps took on 2026-11-24 (H100): tests 95 s; engine 300 s; gptq 430 s (slow kernels then); kv 225 s;
# serve 150 s; sweep 260 s (the old grids: now about twice as large). `ab`, `ab18` and `serve64` are new:
# each capped so that the first call's steps fit its budget.
# The steps:
#   ab      issues 3, 5: the 7B shape, 2048 greedy tokens from one (the original's protocol), in ONE process
#           (benchmarks/decode_ab.py): the defaults; residual adds outside the norms (QWENLM_FUSE_NORM=0);
#           rotary and cache write unfused (QWENLM_FUSE_ROTARY=0); the float one-row kernel (QWENLM_GEMV=1);
#           the int8 KV cache with its fused write and without; GPTQ Int4 with an 8-bit head (the <= 5 GiB,
#           >= 2x bf16 target), with the reduce and the fixup split
#   ab18    issue 3: the same for the 1.8B shape, float variants
#   serve64 issue 4: 64 streams, 7B shape, bf16 KV cache then int8 (the 8,000 tok/s target)
#   pipe    issue 4: serve64's bf16 run with decode steps not run ahead (QWENLM_PIPELINE=0): what running ahead is worth
#   tests   CUDA + compiled Triton tests (the engines also check each kernel on the device before use)
#   sweepq  GPTQ one-row kernel's launch settings alone (the Int4 target's products)
#   engine  issue 3: 7B/1.8B, the original's whole protocol (8192 tokens, prefill, against transformers)
#   gptq    issue 5, per process: GPTQ Int4 (8-bit head) vs bf16, 7B shape; gptq2: Int8, Int4 with a bf16 head
#   kv      issue 5: int8 KV at 8192 tokens beside bf16, the KV-cache table
#   serve   issue 4: 1/8/32/64 streams, 7B shape; 64 streams with the int8 KV cache; the tiny model's ceiling
#   turns   issue 4: next turns, prefix cache on/off
#   ab2     issue 3: the earlier decode changes off, a process each (Triton attention, fused projections)
#   sweep   Triton launch settings, 7B shapes (GPTQ, the float one-row kernel against cuBLAS, attention)
#   profile issue 4: the GPU kernels of a 64-row serving decode step (graphs on, then off); issue 3: of a 1-row step
# What comes back: $OUT/steps.log (each command, its exit status and its results as they came: the
# `  -> ` lines), $OUT/device.txt and $OUT/results.tgz (every JSON and log).
# GPU_SESSION_DRY=1 runs the steps on a CPU with tiny shapes, to check this script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: gpu_session.sh prepare | STEP... (ab serve64 ab18 tests pipe sweepq engine gptq gptq2 kv serve turns ab2 sweep profile)" >&2; exit 2; }

if [ "$1" = prepare ]; then
    set -e
    rm -rf .gpu && mkdir -p .gpu/wheels .gpu/tokenizer
    exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
    python -m pip download -q --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d .gpu/wheels fastapi starlette pydantic pydantic_core annotated_types typing_inspection annotated_doc \
        uvicorn httptools uvloop gguf opentelemetry_api  # (fastapi >= 0.165 imports opentelemetry)
    tok=$(python -c "from qwenlm.hub import default_model_dir; print(default_model_dir(progress=False))")
    cp "$tok"/{vocab.json,merges.txt,tokenizer_config.json,config.json,generation_config.json} .gpu/tokenizer/
    du -sh .gpu
    exit 0
fi

steps="$*"
for s in $steps; do
    case "$s" in ab|serve64|ab18|tests|pipe|sweepq|engine|gptq|gptq2|kv|serve|turns|ab2|sweep|profile) ;; *) echo "unknown step $s" >&2; exit 2 ;; esac
done

OUT=${OUT:-/tmp/out}
W=/tmp/gpu-session  # what the steps write; packed into $OUT/results.tgz after each step
BUDGET=${BUDGET:-540}
DRY=${GPU_SESSION_DRY:-0}
t_end=$(( $(date +%s) + BUDGET ))
rm -rf "$W" && mkdir -p "$OUT" "$W" && : >"$OUT/steps.log"
log() { echo "$*" | tee -a "$OUT/steps.log"; }
left() { echo $(( t_end - $(date +%s) )); }
pack() { tar -C "$W" -czf "$OUT/results.tgz.part" . && mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"; }
fits() {  # fits CAP: LIMIT=min(CAP, what is left of the budget); false (and a note) under 30 s
    LIMIT=$(( $(left) - 10 )); [ "$LIMIT" -gt "$1" ] && LIMIT=$1
    [ "$LIMIT" -ge 30 ] || { log "   skipped: $(left) s of the budget left"; return 1; }
}

python3 -m pip install -q --no-index --no-deps --find-links .gpu/wheels .gpu/wheels/*.whl >"$W/pip.log" 2>&1 \
    || echo "note: carried wheels not installed (see pip.log)"
python3 -c "import fastapi, uvicorn, gguf" 2>>"$W/pip.log" || log "note: the serving packages do not import (pip.log)"
export PYTHONPATH=$PWD QWENLM_HOME=/tmp/qwenlm-home PYTHONUNBUFFERED=1
{ if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else echo "no nvidia-smi (dry run: $DRY)"; fi
  python3 -c "import torch; print('torch', torch.__version__)"
  python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
} | tee "$OUT/device.txt"

bench() {  # bench NAME ARGS...: JSON to NAME.json, progress and results to NAME.log
    local name=$1 rc; shift
    local args=("$@")
    if [ "$DRY" = 1 ]; then args=("${args[@]/#7B/tiny}"); args=("${args[@]/#1.8B/tiny}"); fi
    local knobs="" v
    for v in QWENLM_FUSE QWENLM_FUSE_NORM QWENLM_FUSE_ROTARY QWENLM_TRITON QWENLM_GEMV QWENLM_PIPELINE; do [ -n "${!v:-}" ] && knobs+="$v=${!v} "; done
    log "== ${knobs}qwen bench ${args[*]}"
    fits "${CAP:-540}" || return
    timeout -k 5 "$LIMIT" python3 -m qwenlm bench "${args[@]}" --json >"$W/$name.json" 2>"$W/$name.log"
    rc=$?
    grep -E -B1 '^  -> ' "$W/$name.log" | grep -v '^--$' | tee -a "$OUT/steps.log"
    [ $rc = 0 ] || tail -n 5 "$W/$name.log" | sed 's/^/   | /' | tee -a "$OUT/steps.log"
    log "   exit $rc ($(date -u +%T), $(left) s left)"
}
sweep() {  # sweep KERNEL CAP: every launch setting checked, then timed; the defaults are marked '*'
    log "== kernel_sweep.py --only $1"
    fits "$2" || return
    timeout -k 5 "$LIMIT" python3 benchmarks/kernel_sweep.py --only "$1" --json "$W/sweep_$1.json" \
        >"$W/sweep_$1.log" 2>&1
    log "   exit $? ($(left) s left)"
    grep -v -i warn "$W/sweep_$1.log" | tail -n 25 | tee -a "$OUT/steps.log"
}

decode_ab() {  # decode_ab NAME CAP ARGS...: benchmarks/decode_ab.py, its summary into steps.log
    local name=$1 cap=$2 rc; shift 2
    local args=("$@")
    if [ "$DRY" = 1 ]; then args=(--shape tiny --device cpu --tokens 4 --variants base,norotary,kv8); fi
    log "== decode_ab.py ${args[*]}"
    fits "$cap" || return
    timeout -k 5 "$LIMIT" python3 benchmarks/decode_ab.py "${args[@]}" --json "$W/$name.json" >"$W/$name.out" \
        2>"$W/$name.log"
    rc=$?
    grep '^  -> ' "$W/$name.log" | tee -a "$OUT/steps.log"
    tee -a "$OUT/steps.log" <"$W/$name.out"
    [ $rc = 0 ] || tail -n 5 "$W/$name.log" | sed 's/^/   | /' | tee -a "$OUT/steps.log"
    log "   exit $rc ($(date -u +%T), $(left) s left)"
}

for step in $steps; do
    log "#### $step ($(date -u +%T), $(left) s of the budget left)"
    case "$step" in
    tests)
        if fits 300; then
            timeout -k 5 "$LIMIT" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
                tests/test_triton_kernels.py >"$W/tests.log" 2>&1
            log "   exit $?"
            tail -n 25 "$W/tests.log" | tee -a "$OUT/steps.log"
        fi ;;
    engine)
        bench bench_7b --shape 7B --gen 2048,8192 --prefill 2048 --compare hf --hf-tokens 128
        bench bench_1.8b --shape 1.8B --gen 2048,8192 --prefill 2048 --compare hf --hf-tokens 128 ;;
    gptq)  # the target's row (Int4 with the head in 8 bits: weights <= 5 GiB), then its bf16 baseline
        bench gptq_int4_head8 --shape 7B --gen 2048 --prefill 2048 --quantize gptq4 --quantize-head
        bench gptq_bf16 --shape 7B --gen 2048 --prefill 2048 ;;
    gptq2)  # the table's other rows
        bench gptq_int8 --shape 7B --gen 2048 --prefill 2048 --quantize gptq8
        bench gptq_int4 --shape 7B --gen 2048 --prefill 2048 --quantize gptq4 ;;
    kv)  # the int8 cache's decoding (its write now one kernel) beside bf16's, same session
        bench kv_int8_8192 --shape 7B --gen 8192 --prefill 0 --kv-cache int8
        bench kv_bf16_8192 --shape 7B --gen 8192 --prefill 0
        bench kv_table_7b --shape 7B --kv-table --kv-batches 1,4,16,32,64,100 --kv-lengths 512,1024,2048,4096,8192 ;;
    serve)  # the 7B shape; then a model that costs nothing: the ceiling that serving itself puts on tok/s
        bench serve_7b --shape 7B --serve 1,8,32,64 --serve-tokens 256 --prompt-len 128 --tokenizer .gpu/tokenizer
        # 64 streams read ~14.4 GB of weights and ~8.6 GB of keys/values per step in bf16: at 3.35 TB/s
        # that alone allows ~9,300 tok/s; an 8-bit cache halves the second part
        bench serve_7b_kv8 --shape 7B --serve 64 --serve-tokens 256 --prompt-len 128 --kv-cache int8 \
            --tokenizer .gpu/tokenizer
        bench serve_tiny --shape tiny --serve 64 --serve-tokens 256 --prompt-len 128 --tokenizer .gpu/tokenizer ;;
    turns)  # conversations growing turn by turn, 7B shape: each turn's wait, with the prefix cache and without
        bench turns_7b --shape 7B --serve 1,16 --serve-turns 4 --serve-tokens 128 --prompt-len 512 \
            --tokenizer .gpu/tokenizer ;;
    ab)  # each change on and off, and GPTQ Int4 against bf16, side by side in one process (250-370 s, estimated:
        # a float variant ~30 s, a GPTQ one 20-80 s), the most telling first
        decode_ab decode_ab_7b 330 --shape 7B --tokens 2048 --rounds 1 \
            --variants base,gptq4h8,gemv,norotary,nonorm,kv8,kv8-norotary,gptq4h8-fixup ;;
    ab18)
        decode_ab decode_ab_1.8b 120 --shape 1.8B --tokens 2048 --rounds 2 --variants base,nonorm,norotary,gemv ;;
    serve64)  # 64 streams read ~14.4 GB of weights and ~8.6 GB of bf16 keys/values per step: at 3.35 TB/s that
        # alone allows ~9,300 tok/s; the 8-bit cache takes the second part to ~4.4 GB
        CAP=100 bench serve_7b --shape 7B --serve 64 --serve-tokens 256 --prompt-len 128 --tokenizer .gpu/tokenizer
        CAP=100 bench serve_7b_kv8 --shape 7B --serve 64 --serve-tokens 256 --prompt-len 128 --kv-cache int8 \
            --tokenizer .gpu/tokenizer ;;
    pipe)  # the host's work on a step's tokens done after the next step is queued, or before (the old way)
        QWENLM_PIPELINE=0 CAP=100 bench serve_7b_sync --shape 7B --serve 64 --serve-tokens 256 --prompt-len 128 \
            --tokenizer .gpu/tokenizer ;;
    sweepq)
        sweep gptq "$(left)" ;;
    ab2)  # the earlier decode changes, off
        QWENLM_TRITON=0 bench ab_7b_sdpa --shape 7B --gen 2048 --prefill 0
        QWENLM_FUSE=0 bench ab_7b_unfused --shape 7B --gen 2048 --prefill 0
        QWENLM_TRITON=0 bench ab_1.8b_sdpa --shape 1.8B --gen 2048 --prefill 0
        QWENLM_FUSE=0 bench ab_1.8b_unfused --shape 1.8B --gen 2048 --prefill 0 ;;
    sweep)
        sweep gptq 240
        sweep gemv 150
        sweep attention 150 ;;
    profile)  # 64 streams at ~256 tokens, 7B: where the 16 ms of a step went on 2026-11-24
        shape=7B rows=64 ctx=256; [ "$DRY" = 1 ] && shape=tiny rows=8 ctx=32
        for graphs in 1 0; do
            log "== QWENLM_GRAPHS=$graphs profile_step.py --shape $shape --rows $rows --context $ctx"
            fits 150 || break
            QWENLM_GRAPHS=$graphs timeout -k 5 "$LIMIT" python3 benchmarks/profile_step.py --shape $shape \
                --rows $rows --context $ctx --json "$W/profile_64_graphs$graphs.json" >"$W/profile_graphs$graphs.log" 2>&1
            log "   exit $? ($(left) s left)"
            grep -v -i -E "warn|USDT" "$W/profile_graphs$graphs.log" | tail -n 26 | tee -a "$OUT/steps.log"
        done
        # one row (issue 3's batch-1 decoding): what the launches between the matmuls cost
        rows=1 ctx=1024; [ "$DRY" = 1 ] && rows=1 ctx=32
        log "== QWENLM_GRAPHS=0 profile_step.py --shape $shape --rows $rows --context $ctx"
        if fits 150; then
            QWENLM_GRAPHS=0 timeout -k 5 "$LIMIT" python3 benchmarks/profile_step.py --shape $shape --rows $rows \
                --context $ctx --json "$W/profile_1.json" >"$W/profile_1.log" 2>&1
            log "   exit $? ($(left) s left)"
            grep -v -i -E "warn|USDT" "$W/profile_1.log" | tail -n 26 | tee -a "$OUT/steps.log"
        fi ;;
    esac
    pack
done
log "#### done ($(date -u +%T), $(left) s of the budget left)"
