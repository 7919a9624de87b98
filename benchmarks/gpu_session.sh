#!/usr/bin/env bash
# A GPU session's checks and measurements. A session has about 30 minutes of device time, a call at
# most 10, and at most 8 files come back from a call: so one call runs several steps under one time
# budget (BUDGET seconds, 560 unless set), in the order given, skipping what no longer fits, and
# packs everything a step wrote into one archive per call.
#
# Here, once per session (no GPU needed):
#   bash benchmarks/gpu_session.sh prepare
# makes .gpu/ (ignored by git): wheels of what the GPU image lacks (fastapi, uvicorn, httptools, uvloop, pydantic, gguf,
# opentelemetry-api; for its Python 3.12) and the default model's tokenizer files (the serving benchmark needs one).
# Then, with the device tool, three calls (timeout_s=600), carrying .gpu, most important first, each
# started at once when the last returns (a machine idle for 30 s is given back):
#   run(command="bash benchmarks/gpu_session.sh tests ab", carry=[".gpu"], timeout_s=600)
#   run(command="bash benchmarks/gpu_session.sh sweep", carry=[".gpu"], timeout_s=600)
#   run(command="bash benchmarks/gpu_session.sh gptq serve kv gptq2", carry=[".gpu"], timeout_s=600)
# (the budget skips a step's later commands that no longer fit: each step runs its most telling first)
# and `profile`/`ab2`/`engine`/`turns` when there is time left (a step that no longer fits the budget is
# skipped and says so). After a run: unpack each results.tgz into one folder and
#   python benchmarks/gpu_results.py FOLDER
# prints every result, the settings with the least time per decode layer, and each target met or not;
# the sweep's and ab's winners become the defaults (GEMV["split"] "fixup", QWENLM_GEMV, the gemv launch
# settings), each change tested here first.
# What each took on 2026-11-24 (H100, machine start about 30 s): tests 95 s; engine 300 s; gptq 430 s
# (each quantized bench about 100-170 s: quantizing the random 7B); kv 225 s; serve 150 s; sweep 260 s
# (the old grids: the grids are now about twice as large, and the gemv kernel is new; not yet timed).
# The steps:
#   tests   CUDA + compiled Triton tests (correctness of the GPU defaults: run first)
#   engine  issue 3: 7B/1.8B, the original's protocol, against transformers
#   gptq    issue 5: GPTQ Int4 (8-bit head) vs bf16, 7B shape; gptq2: Int8, Int4 with a bf16 head
#   kv      issue 5: int8 KV at 8192 tokens beside bf16, the KV-cache table
#   serve   issue 4: 1/8/32/64 streams, 7B shape; 64 streams with the int8 KV cache
#   turns   issue 4: next turns, prefix cache on/off
#   ab      issue 3: batch-1 decode with the newest changes on and off (the float one-row kernel, QWENLM_GEMV=1;
#           residual adds inside the norms, QWENLM_FUSE_NORM=0; rotary and cache write in one kernel,
#           QWENLM_FUSE_ROTARY=0)
#   ab2     issue 3: the earlier ones off (Triton attention, fused projections)
#   sweep   Triton launch settings, 7B shapes (GPTQ, the float one-row kernel against cuBLAS, attention)
#   profile issue 4: the GPU kernels of a 64-row serving decode step (graphs on, then off); issue 3: of a 1-row step
# What comes back: $OUT/steps.log (each command, its exit status and its results as they came: the
# `  -> ` lines of qwen bench), $OUT/device.txt and $OUT/results.tgz (every JSON and log).
# GPU_SESSION_DRY=1 runs the steps on a CPU with tiny shapes, to check this script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: gpu_session.sh prepare | STEP... (tests engine gptq gptq2 kv serve turns ab ab2 sweep profile)" >&2; exit 2; }

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
    case "$s" in tests|engine|gptq|gptq2|kv|serve|turns|ab|ab2|sweep|profile) ;; *) echo "unknown step $s" >&2; exit 2 ;; esac
done

OUT=${OUT:-/tmp/out}
W=/tmp/gpu-session  # what the steps write; packed into $OUT/results.tgz after each step
BUDGET=${BUDGET:-560}
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
    for v in QWENLM_FUSE QWENLM_FUSE_NORM QWENLM_FUSE_ROTARY QWENLM_TRITON QWENLM_GEMV; do [ -n "${!v:-}" ] && knobs+="$v=${!v} "; done
    log "== ${knobs}qwen bench ${args[*]}"
    fits 540 || return
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
    ab)  # what each change since the last measured run is worth, batch-1 decode, one after the other
        bench ab_1.8b --shape 1.8B --gen 2048 --prefill 0
        QWENLM_GEMV=1 bench ab_1.8b_gemv --shape 1.8B --gen 2048 --prefill 0
        QWENLM_FUSE_NORM=0 bench ab_1.8b_nonorm --shape 1.8B --gen 2048 --prefill 0
        QWENLM_FUSE_ROTARY=0 bench ab_1.8b_norotary --shape 1.8B --gen 2048 --prefill 0
        bench ab_7b --shape 7B --gen 2048 --prefill 0
        QWENLM_GEMV=1 bench ab_7b_gemv --shape 7B --gen 2048 --prefill 0
        QWENLM_FUSE_NORM=0 bench ab_7b_nonorm --shape 7B --gen 2048 --prefill 0
        QWENLM_FUSE_ROTARY=0 bench ab_7b_norotary --shape 7B --gen 2048 --prefill 0 ;;
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
