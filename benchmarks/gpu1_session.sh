#!/usr/bin/env bash
# Issues 19, 20 and 21 on ONE lent GPU (nvidia-h200 or an H100) without network: `lexfine train` itself, from process
# start, on the French SJP train-year rows, every figure read from the runs' manifest.json / metrics.jsonl. Stages, one
# device call each, back to back on the same warm machine (each fits a 10-minute call):
#
#   bash benchmarks/gpu1_session.sh prep     HERE, on the development machine: fills the ignored folder .gpu1/
#   a   carry .whl .gpu1/a   install the wheels (+ bitsandbytes); issue 21: Apertus-8B architecture LoRA r=64 in
#                            bf16 and in NF4 on the same batches, then Apertus-70B architecture QLoRA r=64 on this
#                            one GPU (random weights built 4-bit layer by layer: quantize.build_random_quantized), on
#                            the bundled 800 real French train-year rows (the parquet does not fit this call too)
#   b   carry .gpu1/b      issue 19: the shipped 8B LoRA config on the 4,251 French train-year rows, 200 steps:
#                          timings (data prep, model load, start to step 1, steady tokens/s) and Dynamo recompiles
#                          after step 10, as the manifest records them
#   c   (nothing)          issue 20: the same with eval_during (500 SJP validation + 500 LEXam-4 cases every 20 steps):
#                          the cost of one evaluation, for the overhead at one evaluation per 10% of an epoch
#
#   .whl/              ../shared/wheels/py312-x86_64 (trl, datasets, pydantic, ...)
#   .gpu1/a/bnb/       the bitsandbytes wheel (py3-none manylinux: CPU and CUDA backends; 42 MiB)
#   .gpu1/a/tok/       the embedded SmolLM2's tokenizer (random: models take it; no GGUF needs to travel)
#   .gpu1/b/data/      sjp/fr_{train,validation}.parquet and lexam/mcq_4_choices_test.jsonl from ../shared/data
# A call carries at most 64 MiB, the repository (~7 MiB) included: a carries ~60 MiB, b ~19 MiB.
# Each stage writes to $OUT: <stage>.log, table.md (every run of the session so far) and runs-<stage>.tgz (the runs'
# small files). Edit the knobs below, never the configs: what ran is what the configs ship plus these overrides.
set -uo pipefail
stage=${1:?stage prep, a, b or c}
if [ "$stage" = prep ]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  cd "$here" || exit 1
  mkdir -p .whl .gpu1/a/bnb .gpu1/a/tok .gpu1/b/data/sjp .gpu1/b/data/lexam
  grep -qx '/.gpu1/' .git/info/exclude || echo /.gpu1/ >> .git/info/exclude
  cp ../shared/wheels/py312-x86_64/*.whl .whl/
  ls ../shared/wheels/py312-x86_64/bitsandbytes-*.whl > /dev/null 2>&1 && cp ../shared/wheels/py312-x86_64/bitsandbytes-*.whl .gpu1/a/bnb/
  [ -n "$(ls .gpu1/a/bnb/*.whl 2>/dev/null)" ] || python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 -d .gpu1/a/bnb bitsandbytes==0.50.2 \
    || exit 1
  cp ../shared/data/sjp/fr_train.parquet ../shared/data/sjp/fr_validation.parquet .gpu1/b/data/sjp/ || exit 1
  cp ../shared/data/lexam/mcq_4_choices_test.jsonl .gpu1/b/data/lexam/ || exit 1
  python3 - <<'EOF' || exit 1
import shutil
from pathlib import Path
from lexfine import models
src = models.embedded_model_dir()  # converts the GGUF once (lexfine's cache)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
        shutil.copy(f, Path(".gpu1/a/tok") / f.name)
EOF
  du -sh .whl .gpu1/a .gpu1/b
  exit 0
fi

W=$HOME/gpu1                          # outside the repository copy, which each device call lays anew
OUT=${OUT:-/tmp/out}
mkdir -p "$W" "$OUT"
export PYTHONPATH=$PWD/src:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false LEXFINE_CACHE=$W/cache
D=$W/data
COMMON=(model_args.tokenizer=$W/tok "eval=[]" output_dir=$W/runs)
SJP=data.train=$D/sjp/fr_train.parquet
BUNDLED=data.train=bundled:sjp_fr_train

train() {  # train NAME SECONDS CONFIG OVERRIDES...: one `lexfine train`, its wall time from process start
  local name=$1 secs=$2 cfg=$3
  shift 3
  local t0
  t0=$(date +%s%N)
  timeout -k 20 "$secs" python3 -m lexfine.cli train "$cfg" "${COMMON[@]}" "name=$name" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "{\"name\": \"$name\", \"rc\": $rc, \"process_s\": $(( ms / 1000 )).$(( ms % 1000 / 100 ))}" >> "$W/wall.jsonl"
  echo "$name: exit $rc after $(( ms / 1000 )) s"
  tail -n 3 "$W/$name.log"
}

table() {  # one row per run of the session: what the manifests say
  python3 - "$W" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
w, out = Path(sys.argv[1]), Path(sys.argv[2])
wall = {}
for line in (w / "wall.jsonl").read_text().splitlines() if (w / "wall.jsonl").exists() else []:
    r = json.loads(line)
    wall[r["name"]] = r
rows = ["| run | rc | status | steps | process s | data prep s | model load s | start to step 1 s | steady tokens/s "
        "| recompiles | peak GiB | save s | final loss | eval_during s |", "|" + "---|" * 14]
for m_path in sorted((w / "runs").glob("*/manifest.json")):
    m = json.loads(m_path.read_text())
    name = m_path.parent.name.rsplit("-", 1)[0]
    t = m.get("timings") or {}
    ed = m.get("eval_during") or {}
    rows.append(f"| {name} | {wall.get(name, {}).get('rc', '-')} | {m.get('status')} | {m.get('steps')} | "
                f"{wall.get(name, {}).get('process_s', '-')} | {t.get('data_prep_s', '-')} | {t.get('model_load_s', '-')} "
                f"| {t.get('first_step_s', '-')} | {t.get('steady_tokens_per_s', '-')} | {t.get('recompiles', '-')} | "
                f"{m.get('peak_gpu_memory_gib', '-')} | {m.get('save_s', '-')} | {m.get('final_loss', '-')} | "
                f"{ed.get('seconds', '-') if isinstance(ed, dict) else '-'} |")
(out / "table.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
  (cd "$W" && tar czf "$OUT/runs-$stage.tgz" --exclude='*.safetensors' --exclude='*/checkpoints' --exclude='*.bin' \
     --exclude='*.pt' runs wall.jsonl ./*.log 2>/dev/null)
}

if [ "$stage" != a ] && [ ! -d /tmp/site/trl ]; then
  echo "this machine is not the one stage a prepared (no /tmp/site): it went back; run stage a again" >&2
  exit 1
fi

case $stage in
  a)
    date -u
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl .gpu1/a/bnb/*.whl || exit 1
    rm -rf "$W/tok" && cp -r .gpu1/a/tok "$W/tok" || exit 1
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, trl, peft, bitsandbytes as bnb
print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft',
      peft.__version__, 'bitsandbytes', bnb.__version__, 'gpus', torch.cuda.device_count())" || exit 1
    LEXFINE_TEST_TOKENIZER=$W/tok timeout 180 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu.py \
      -k quantized 2>&1 | tail -n 5   # the 4-bit random build on this GPU, in seconds, before the big runs
    # issue 21: the same 8B batches (seed, data, global batch) in bf16 and in NF4; then 70B NF4 on this GPU
    train lora8b-bf16 170 configs/exp/sjp_lora_apertus8b.yaml model=random:apertus-8b $BUNDLED train.max_steps=20 \
      train.grad_accum=1 train.save_steps=1000
    train qlora8b-nf4 200 configs/exp/sjp_lora_apertus8b.yaml model=random:apertus-8b $BUNDLED train.max_steps=20 \
      train.grad_accum=1 train.save_steps=1000 lora.quantize=nf4 train.compile_layers=false
    train qlora70b-nf4 300 configs/exp/sjp_qlora_apertus70b.yaml model=random:apertus-70b $BUNDLED train.max_steps=8 \
      train.grad_accum=1 train.save_steps=1000
    table
    ;;
  b)
    rm -rf "$D" && cp -r .gpu1/b/data "$D" || exit 1
    # issue 19: the shipped 8B LoRA config as a user runs it, long enough for the recompile count after step 10
    train speed8b 540 configs/exp/sjp_lora_apertus8b.yaml model=random:apertus-8b $SJP train.max_steps=200 \
      train.grad_accum=1 train.save_steps=1000
    table
    ;;
  c)
    # issue 20: evaluation during training, 500 SJP validation-year cases + 500 LEXam-4 questions every 20 steps
    train evaldur8b 560 configs/exp/sjp_lora_apertus8b.yaml model=random:apertus-8b $SJP train.max_steps=60 \
      train.grad_accum=1 train.save_steps=1000 eval_during.every_steps=20 "eval_during.tasks=[sjp,lexam_mcq4]" \
      eval_during.limit=500 eval_during.sjp_data=$D/sjp/fr_validation.parquet eval_during.lexam_data=$D/lexam
    python3 - "$W" <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads(x) for p in Path(sys.argv[1]).glob("runs/evaldur8b-*/metrics.jsonl")
        for x in p.read_text().splitlines() if x.strip()]
evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
print(f"{len(evals)} evaluations (step 0 = the base model); seconds each:", [r.get("eval_s") for r in evals])
EOF
    table
    ;;
  *)
    echo "unknown stage $stage (prep, a, b or c)" >&2
    exit 2
    ;;
esac
