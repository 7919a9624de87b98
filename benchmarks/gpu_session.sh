#!/usr/bin/env bash
# A GPU session's checks and measurements, in steps that each fit one device call (10 minutes).
#
# Here, once per session (no GPU needed):
#   bash benchmarks/gpu_session.sh prepare
# makes .gpu/ (ignored by git): wheels of what the GPU image lacks (fastapi, uvicorn, httptools, uvloop, pydantic, gguf;
# for its Python 3.12) and the default model's tokenizer files (the serving benchmark needs one).
# Then, with the device tool, one step per call, carrying .gpu:
#   run(command="bash benchmarks/gpu_session.sh tests",  carry=[".gpu"])   # CUDA + compiled Triton tests
#   run(command="bash benchmarks/gpu_session.sh engine", carry=[".gpu"])   # issue 3: 7B/1.8B, the original's protocol
#   run(command="bash benchmarks/gpu_session.sh gptq",   carry=[".gpu"])   # issue 5: bf16 vs GPTQ Int4/Int8, 7B shape
#   run(command="bash benchmarks/gpu_session.sh kv",     carry=[".gpu"])   # issue 5: KV-cache table, int8 at 8192
#   run(command="bash benchmarks/gpu_session.sh serve",  carry=[".gpu"])   # issue 4: 1/8/32/64 streams, 7B shape
#   run(command="bash benchmarks/gpu_session.sh turns",  carry=[".gpu"])   # issue 4: next turns, prefix cache on/off
#   run(command="bash benchmarks/gpu_session.sh ab",     carry=[".gpu"])   # issue 3: each decode change on and off
#   run(command="bash benchmarks/gpu_session.sh sweep",  carry=[".gpu"])   # Triton launch settings, 7B shapes
# Each step writes its JSON and logs under $OUT (they come back to this machine).
set -uo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: gpu_session.sh prepare|tests|engine|gptq|kv|serve|turns|ab|sweep}

if [ "$step" = prepare ]; then
    set -e
    rm -rf .gpu && mkdir -p .gpu/wheels .gpu/tokenizer
    exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
    python -m pip download -q --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d .gpu/wheels fastapi starlette pydantic pydantic_core annotated_types typing_inspection annotated_doc \
        uvicorn httptools uvloop gguf
    tok=$(python -c "from qwenlm.hub import default_model_dir; print(default_model_dir(progress=False))")
    cp "$tok"/{vocab.json,merges.txt,tokenizer_config.json,config.json,generation_config.json} .gpu/tokenizer/
    du -sh .gpu
    exit 0
fi

OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --find-links .gpu/wheels .gpu/wheels/*.whl >"$OUT/pip.log" 2>&1 \
    || echo "note: carried wheels not installed (see pip.log)"
export PYTHONPATH=$PWD QWENLM_HOME=/tmp/qwenlm-home
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
qwen() { python3 -m qwenlm "$@"; }
bench() {  # bench NAME ARGS...: JSON to $OUT/NAME.json, progress to $OUT/NAME.log
    local name=$1; shift
    echo "== qwen bench $*" | tee -a "$OUT/steps.log"
    timeout 540 python3 -m qwenlm bench "$@" --json >"$OUT/$name.json" 2>"$OUT/$name.log"
    echo "   exit $? ($(date -u +%T))" | tee -a "$OUT/steps.log"
}

case "$step" in
tests)
    timeout 560 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py \
        2>&1 | tee "$OUT/tests.log" | tail -30 ;;
engine)
    bench bench_7b --shape 7B --gen 2048,8192 --prefill 2048 --compare hf --hf-tokens 128
    bench bench_1.8b --shape 1.8B --gen 2048,8192 --prefill 2048 --compare hf --hf-tokens 128 ;;
gptq)
    bench gptq_bf16 --shape 7B --gen 2048 --prefill 2048
    bench gptq_int4 --shape 7B --gen 2048 --prefill 2048 --quantize gptq4
    bench gptq_int4_head8 --shape 7B --gen 2048 --prefill 2048 --quantize gptq4 --quantize-head
    bench gptq_int8 --shape 7B --gen 2048 --prefill 2048 --quantize gptq8 ;;
kv)
    bench kv_table_7b --shape 7B --kv-table --kv-batches 1,4,16,32,64,100 --kv-lengths 512,1024,2048,4096,8192
    bench kv_int8_8192 --shape 7B --gen 8192 --prefill 0 --kv-cache int8 ;;
ab)  # what each change since the last measured run is worth, batch-1 decode, one after the other
    bench ab_1.8b --shape 1.8B --gen 2048 --prefill 0
    QWENLM_FUSE=0 bench ab_1.8b_unfused --shape 1.8B --gen 2048 --prefill 0
    QWENLM_TRITON=0 bench ab_1.8b_sdpa --shape 1.8B --gen 2048 --prefill 0
    bench ab_7b --shape 7B --gen 2048 --prefill 0
    QWENLM_FUSE=0 bench ab_7b_unfused --shape 7B --gen 2048 --prefill 0
    QWENLM_TRITON=0 bench ab_7b_sdpa --shape 7B --gen 2048 --prefill 0 ;;
sweep)  # every launch setting checked, then timed; the defaults are marked '*' (choose, then edit them)
    timeout 330 python3 benchmarks/kernel_sweep.py --only gptq --json "$OUT/sweep_gptq.json" 2>&1 \
        | tee "$OUT/sweep_gptq.log" | grep -v -i warn
    timeout 230 python3 benchmarks/kernel_sweep.py --only attention --json "$OUT/sweep_attention.json" 2>&1 \
        | tee "$OUT/sweep_attention.log" | grep -v -i warn ;;
serve)  # the 7B shape; then a model that costs nothing: the ceiling that serving itself puts on tok/s
    bench serve_7b --shape 7B --serve 1,8,32,64 --serve-tokens 256 --prompt-len 128 --tokenizer .gpu/tokenizer
    bench serve_tiny --shape tiny --serve 64 --serve-tokens 256 --prompt-len 128 --tokenizer .gpu/tokenizer ;;
turns)  # conversations growing turn by turn, 7B shape: each turn's wait, with the prefix cache and without
    bench turns_7b --shape 7B --serve 1,16 --serve-turns 4 --serve-tokens 128 --prompt-len 512 --tokenizer .gpu/tokenizer ;;
*)
    echo "unknown step $step" >&2; exit 2 ;;
esac
