#!/usr/bin/env bash
# Issue 19 on ONE lent GPU (nvidia-h200 or an H100), no network: `lexfine train` / `lexfine eval` themselves, from
# process start, every training figure read from the runs' manifest.json. Stages, one device call each, back to back:
#
#   bash benchmarks/gpu19_session.sh prep    HERE, on the development machine: fills the ignored folder .gpu19/
#   s   carry .gpu19/w .gpu19/s   mask-free attention (train.mask_free_attention): the shipped 8B LoRA config on the
#                                 4,251 French train-year rows, 200 steps, with it (the default) and without it; an
#                                 SDPA micro-benchmark that says which kernel each form gets; cold data preparation
#                                 with 8 and 16 workers
#   e   carry .gpu19/w .gpu19/s   `lexfine eval` speed, compiled, from process start, on 2,500 French cases
#   n   carry .gpu19/w .gpu19/s   host-side levers still to measure, each a plain override of the shipped config, one
#                                 compile cache for all: the default; train.optim=adamw_torch_fused (AdamW's step
#                                 took ~13 ms of host time per step in stage q's profile); batch 8 with the same
#                                 global batch (half the per-token host work, more recomputation under 60 GiB)
#   q   carry .gpu19/w .gpu19/s   (third session) a 10-s check that the GPU answers; cProfile of a 3-step `lexfine
#                                 train` from cold inductor/Triton caches; the shipped config again with warm caches
#                                 and train.profile_steps (where a steady step's device time goes); the mask-free
#                                 GPU test with pytest's faulthandler (stacks of a hang). Each part writes to $OUT
#                                 as it goes: a call that reaches its limit returns no stdout
#   f   carry .gpu19/w .gpu19/s   the shipped config with flash attention (train.cudnn_attention=false) and with
#                                 PyTorch's choice (cuDNN), each with empty compile caches, steps 196-200 profiled
#   g   carry .gpu19/w .gpu19/s   stage e's `lexfine eval`, then Dynamo recompiles over 1,000 steps (8 of the 8B's layers)
#   h   carry .gpu19/w .gpu19/s   the bare tokenizer over 1-16 processes; the mask-free GPU test (about 2 minutes)
#   c   carry .gpu19/w .gpu19/s   (fourth session) start-up with lexfine's compile cache: the shipped config from empty
#                                 caches (200 steps), then 3 steps of it under cProfile with the cache warm
#   v   carry .gpu19/w .gpu19/s   stage e's `lexfine eval` from empty caches, then again warm with batches 60-64 profiled
#   x   carry .gpu19/w .gpu19/s   stage c's fix (no CPU-ISA probe) with byte code cached: 30 training steps from empty
#                                 and from warm caches; `lexfine eval` (1,500 cases) cold, then warm and profiled
#
#   .gpu19/w/   ../shared/wheels/py312-x86_64 without deepspeed (trl, datasets, pydantic, ...; ~5 MiB)
#   .gpu19/s/   the embedded SmolLM2's tokenizer (random:<arch> models use it), sjp/fr_{train,validation}.parquet
# Knobs as in gpu1_session.sh: GPU19_DRY=1 (no install), GPU19_EXTRA / GPU19_TAIL (overrides before / after the
# stage's own), STAGE_S (570: each stage ends its runs by then).
set -uo pipefail
stage=${1:?stage prep, s, e, q, f, g, h, n, c, v or x}
if [ "$stage" = prep ]; then
  cd "$(dirname "$0")/.." || exit 1
  rm -rf .gpu19 && mkdir -p .gpu19/w .gpu19/s/tok .gpu19/s/data/sjp
  grep -qx '/.gpu19/' .git/info/exclude 2>/dev/null || echo /.gpu19/ >> .git/info/exclude
  cp ../shared/wheels/py312-x86_64/*.whl .gpu19/w/ && rm -f .gpu19/w/deepspeed-*.whl .gpu19/w/hjson-*.whl
  cp ../shared/data/sjp/fr_train.parquet ../shared/data/sjp/fr_validation.parquet .gpu19/s/data/sjp/ || exit 1
  python3 - <<'PY' || exit 1
import shutil
from pathlib import Path
from lexfine import models
for f in models.embedded_model_dir().iterdir():  # converts the GGUF once (lexfine's cache)
    if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
        shutil.copy(f, Path(".gpu19/s/tok") / f.name)
PY
  du -sh .gpu19/*
  exit 0
fi

W=${GPU19_W:-$HOME/gpu19}             # outside the repository copy, which each device call lays anew
OUT=${OUT:-/tmp/out}
mkdir -p "$W" "$OUT"
DEADLINE=$(( $(date +%s) + ${STAGE_S:-570} ))
read -r -a EXTRA <<< "${GPU19_EXTRA:-}"
read -r -a TAIL <<< "${GPU19_TAIL:-}"
M8=${GPU19_M8:-random:apertus-8b}
export PYTHONPATH=$PWD/src:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false LEXFINE_CACHE=$W/cache
D=$W/data
COMMON=(model_args.tokenizer=$W/tok "eval=[]" output_dir=$W/runs "${EXTRA[@]}")
SJP=data.train=$D/sjp/fr_train.parquet
CFG=configs/exp/sjp_lora_apertus8b.yaml
source "$(dirname "$0")/gpu_lib.sh"

if [ -z "${GPU19_DRY:-}" ] && [ ! -d /tmp/site/trl ]; then
  # byte-compiled as pip does for a user (--no-compile left ~9 s of source compilation in every cold process)
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site \
    .gpu19/w/*.whl || exit 1
fi
[ -d "$W/tok" ] || cp -r .gpu19/s/tok "$W/tok" || exit 1
[ -d "$D/sjp" ] || cp -r .gpu19/s/data "$D" || exit 1

case $stage in
  s)
    date -u
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    lscpu | grep -E '^(Model name|CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\))'
    # which SDPA kernel each form of a training batch gets, and its fwd+bwd time (8B attention shapes)
    timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/sdpa.txt"
import time, torch, torch.nn.functional as F, transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
B, S, H, KV, D = 4, 2048, 32, 8, 128
q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(B, KV, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(B, KV, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
mask = torch.ones(S, S, device="cuda", dtype=torch.bool).tril()[None, None].expand(B, 1, S, S)
def masked():  # what transformers does for a padded batch: K/V repeated to 32 heads, a boolean [B,1,S,S] mask
    kk, vv = (t.repeat_interleave(H // KV, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
def free():    # mask-free: is_causal, K/V heads shared (enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
for name, fn in (("masked (bool mask, repeated K/V)", masked), ("mask-free (is_causal, enable_gqa)", free)):
    ok = []
    for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(b):
                fn().sum().backward()
            ok.append(b.name)
        except RuntimeError:
            pass
    for _ in range(3):
        fn().sum().backward()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20):
        fn().sum().backward()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / 20 * 1e3
    print(f"{name}: fwd+bwd {ms:.2f} ms (B={B}, S={S}, {H} heads, {KV} KV heads, d={D}); backends that run it: {ok}")
PY
    train speedfree 270 $CFG model=$M8 $SJP train.max_steps=200 train.grad_accum=1 train.save_steps=1000
    train speedmasked 270 $CFG model=$M8 $SJP train.max_steps=200 train.grad_accum=1 train.save_steps=1000 \
      train.mask_free_attention=false
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -gt 45 ]; then
      timeout $(( left - 10 )) python3 benchmarks/data_prep.py --data $D/sjp/fr_train.parquet --tokenizer $W/tok \
        --workers ${GPU19_PREP_WORKERS:-16,8} --limit 0 2>&1 | grep -v Warning | tee "$OUT/data_prep.txt"
    fi
    table
    ;;
  e)
    # evaluation through `lexfine eval`, compiled, from process start
    # with batches 60-64 profiled (after the compilation of the first batches; LEXFINE_EVAL_PROFILE)
    t0=$(date +%s%N)
    LEXFINE_EVAL_PROFILE=${GPU19_EVAL_PROFILE:-60-64} LEXFINE_EVAL_PROFILE_DIR=$W/evalprofile \
      timeout -k 20 $(( DEADLINE - $(date +%s) - 30 )) python3 -m lexfine.cli eval $M8 --tokenizer $W/tok --task sjp \
      --data $D/sjp/fr_train.parquet --limit ${GPU19_EVAL_N:-2500} --compile --no-cache -q --out $W/evalspeed \
      > "$W/evalspeed.log" 2>&1
    echo "lexfine eval: exit $? after $(( ($(date +%s%N) - t0) / 1000000 )) ms"; tail -n 4 "$W/evalspeed.log"
    for f in summary.json ops.txt; do cp "$W"/evalprofile/*/$f "$OUT/eval-$f" 2>/dev/null; done
    (cd "$W" && tar czf "$OUT/evalspeed.tgz" --exclude='*.safetensors' evalspeed evalspeed.log 2>/dev/null)
    ;;
  q)
    { date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
      timeout -k 5 60 python3 -c "import torch; torch.ones(1).cuda(); print('cuda ok', torch.__version__)"; } \
      > "$OUT/session.log" 2>&1
    export TORCHINDUCTOR_CACHE_DIR=$W/inductor TRITON_CACHE_DIR=$W/triton
    rm -rf "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR"
    cprofile_train coldprofile ${GPU19_PROFILE_S:-200} $CFG model=$M8 $SJP train.max_steps=3 train.grad_accum=1 \
      train.save_steps=1000 >> "$OUT/session.log"
    train warmprofile 220 $CFG model=$M8 $SJP train.max_steps=${GPU19_Q_STEPS:-45} train.grad_accum=1 \
      train.save_steps=1000 "train.profile_steps=[${GPU19_PROFILE_WINDOW:-36,40}]" >> "$OUT/session.log" 2>&1
    unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
    for f in summary.json ops.txt; do cp "$W"/runs/warmprofile-*/profile/$f "$OUT/" 2>/dev/null; done
    left=$(( DEADLINE - $(date +%s) - 25 )); [ "$left" -gt 150 ] && left=150
    [ "$left" -gt 30 ] && LEXFINE_TEST_TOKENIZER=$W/tok timeout -k 10 $left python3 -m pytest -q -p no:cacheprovider \
      -o faulthandler_timeout=110 tests/gpu/test_gpu.py -k mask_free > "$OUT/gpu_test.txt" 2>&1
    echo "gpu test: exit $?" >> "$OUT/session.log"
    table >> "$OUT/session.log" 2>&1
    cp "$W/coldprofile.log" "$OUT/" 2>/dev/null
    ;;
  f)
    # SDPA's cuDNN kernels cost ~2 ms of host time per call (stage q's profile): flash-only against the default,
    # each with a cache folder of its own (the compiled graph holds the kernel choice)
    date -u > "$OUT/session.log"
    for run in ${GPU19_F_RUNS:-flash cudnn}; do
      export TORCHINDUCTOR_CACHE_DIR=$W/inductor-$run TRITON_CACHE_DIR=$W/triton-$run
      knob=$([ "$run" = flash ] && echo false || echo null)
      train $run 240 $CFG model=$M8 $SJP train.max_steps=${GPU19_F_STEPS:-200} train.grad_accum=1 train.save_steps=1000 \
        train.cudnn_attention=$knob "train.profile_steps=[${GPU19_F_WINDOW:-196,200}]" >> "$OUT/session.log" 2>&1
      for f in summary.json ops.txt; do cp "$W"/runs/$run-*/profile/$f "$OUT/$run-$f" 2>/dev/null; done
    done
    unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
    table >> "$OUT/session.log" 2>&1
    ;;
  g)
    # the defaults after stage f (flash attention in training): `lexfine eval` speed, then Dynamo recompiles over
    # 1,000 steps (one epoch of the French rows) with the 8B's layers, 8 of them
    date -u > "$OUT/session.log"
    t0=$(date +%s%N)
    timeout -k 20 ${GPU19_EVAL_S:-260} python3 -m lexfine.cli eval $M8 --tokenizer $W/tok --task sjp \
      --data $D/sjp/fr_train.parquet --limit ${GPU19_EVAL_N:-2500} --compile --no-cache -q --out $W/evalspeed \
      > "$W/evalspeed.log" 2>&1
    echo "lexfine eval: exit $? after $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$OUT/session.log"
    (cd "$W" && tar czf "$OUT/evalspeed.tgz" --exclude='*.safetensors' evalspeed evalspeed.log 2>/dev/null)
    train recompile1000 300 $CFG model=$M8 $SJP train.max_steps=${GPU19_RECOMPILE_STEPS:-1000} train.grad_accum=1 \
      train.save_steps=5000 "model_args.arch_overrides={num_hidden_layers: 8}" >> "$OUT/session.log" 2>&1
    table >> "$OUT/session.log" 2>&1
    ;;
  h)
    # the last minutes of a session: the mask-free GPU test with flash attention (the new default), and whether
    # tokenizing scales past 8 processes on these vCPUs (the backend's own encode, no lexfine around it)
    { date -u; lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node\(s\))'; } > "$OUT/session.log"
    timeout -k 5 40 python3 - "$W/tok" "$D/sjp/fr_train.parquet" >> "$OUT/session.log" 2>&1 <<'PY'
import multiprocessing as mp, sys, time
import pandas as pd
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
texts = [str(t) for t in pd.read_parquet(sys.argv[2])["text"]][:3000]
def work(chunk):
    return sum(len(tok.encode(t, add_special_tokens=False).ids) for t in chunk)
for n in (1, 4, 8, 12, 16):
    chunks = [texts[i::n * 4] for i in range(n * 4)]
    t = time.perf_counter()
    with mp.get_context("fork").Pool(n) as pool:
        total = sum(pool.map(work, chunks))
    dt = time.perf_counter() - t
    print(f"raw tokenizer encode, {n:2d} processes: {len(texts) / dt:6.0f} texts/s ({total / dt / 1e6:.2f}M tokens/s)",
          flush=True)
PY
    LEXFINE_TEST_TOKENIZER=$W/tok timeout -k 5 ${GPU19_TEST_S:-140} python3 -m pytest -q -p no:cacheprovider \
      -o faulthandler_timeout=130 tests/gpu/test_gpu.py -k mask_free > "$OUT/gpu_test.txt" 2>&1
    echo "gpu test: exit $?" >> "$OUT/session.log"
    ;;
  n)
    date -u > "$OUT/session.log"
    export TORCHINDUCTOR_CACHE_DIR=$W/inductor TRITON_CACHE_DIR=$W/triton
    base=($CFG model=$M8 $SJP train.max_steps=${GPU19_N_STEPS:-200} train.grad_accum=1 train.save_steps=1000)
    train default 200 "${base[@]}" >> "$OUT/session.log" 2>&1
    train fusedadamw 180 "${base[@]}" train.optim=adamw_torch_fused >> "$OUT/session.log" 2>&1
    train batch8 180 "${base[@]}" train.batch_size=8 train.checkpoint_fraction=${GPU19_B8_FRACTION:-0.8125} \
      train.max_steps=$(( ${GPU19_N_STEPS:-200} / 2 )) >> "$OUT/session.log" 2>&1
    unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
    table >> "$OUT/session.log" 2>&1
    ;;
  c)
    # start-up with lexfine's compile cache (lexfine.compile_cache: $LEXFINE_CACHE/compile/inductor, no
    # TORCHINDUCTOR_CACHE_DIR set): the shipped config from empty caches for 200 steps, then a 3-step run of the same
    # config under cProfile, which finds the cache the first wrote (where a warm step 1 still goes)
    date -u > "$OUT/session.log"
    unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
    train cold 330 $CFG model=$M8 $SJP train.max_steps=${GPU19_C_STEPS:-200} train.grad_accum=1 train.save_steps=1000 \
      >> "$OUT/session.log" 2>&1
    du -sh "$W/cache/compile" ~/.triton 2>/dev/null >> "$OUT/session.log"
    cprofile_train warm $(( DEADLINE - $(date +%s) - 40 )) $CFG model=$M8 $SJP train.max_steps=3 train.grad_accum=1 \
      train.save_steps=1000 >> "$OUT/session.log"
    table >> "$OUT/session.log" 2>&1
    ;;
  v)
    # `lexfine eval` twice with lexfine's compile cache: from empty caches, then warm with batches 60-64 profiled
    date -u > "$OUT/session.log"
    unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
    for run in cold warm; do
      t0=$(date +%s%N)
      prof=(); [ $run = warm ] && prof=(env LEXFINE_EVAL_PROFILE=${GPU19_EVAL_PROFILE:-60-64} LEXFINE_EVAL_PROFILE_DIR=$W/evalprofile)
      "${prof[@]}" timeout -k 20 ${GPU19_EVAL_S:-250} python3 -m lexfine.cli eval $M8 --tokenizer $W/tok --task sjp \
        --data $D/sjp/fr_train.parquet --limit ${GPU19_EVAL_N:-2500} --compile --no-cache -q --out $W/eval-$run \
        > "$W/eval-$run.log" 2>&1
      echo "lexfine eval ($run caches): exit $? after $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$OUT/session.log"
      tail -n 3 "$W/eval-$run.log" >> "$OUT/session.log"
    done
    for f in summary.json ops.txt; do cp "$W"/evalprofile/*/$f "$OUT/eval-$f" 2>/dev/null; done
    (cd "$W" && tar czf "$OUT/evalspeed.tgz" --exclude='*.safetensors' eval-cold eval-warm eval-*.log 2>/dev/null)
    ;;
  x)
    # stage c's finding applied (lexfine's entry points set TORCHINDUCTOR_VEC_ISA_OK=0: no CPU-ISA probe processes),
    # and byte code cached for the machine's read-only torch environment, as a user's installation has it:
    # the shipped config 30 steps from empty caches, 30 steps warm; then `lexfine eval` from empty and warm caches
    export PYTHONPYCACHEPREFIX=$W/pycache
    date -u > "$OUT/session.log"
    unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
    for run in cold warm; do
      train $run 200 $CFG model=$M8 $SJP train.max_steps=${GPU19_X_STEPS:-30} train.grad_accum=1 train.save_steps=1000 \
        >> "$OUT/session.log" 2>&1
    done
    table >> "$OUT/session.log" 2>&1
    for run in cold warm; do
      t0=$(date +%s%N)
      prof=(); [ $run = warm ] && prof=(env LEXFINE_EVAL_PROFILE=${GPU19_EVAL_PROFILE:-30-34} LEXFINE_EVAL_PROFILE_DIR=$W/evalprofile)
      left=$(( DEADLINE - $(date +%s) - 10 )); [ "$left" -lt 30 ] && break
      "${prof[@]}" timeout -k 10 $left python3 -m lexfine.cli eval $M8 --tokenizer $W/tok --task sjp \
        --data $D/sjp/fr_train.parquet --limit ${GPU19_EVAL_N:-1500} --compile --no-cache -q --out $W/eval-$run \
        > "$W/eval-$run.log" 2>&1
      echo "lexfine eval ($run caches): exit $? after $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$OUT/session.log"
      tail -n 3 "$W/eval-$run.log" >> "$OUT/session.log"
      for f in summary.json ops.txt; do cp "$W"/evalprofile/*/$f "$OUT/eval-$f" 2>/dev/null; done
      (cd "$W" && tar czf "$OUT/evalspeed.tgz" --exclude='*.safetensors' eval-cold eval-warm eval-*.log 2>/dev/null)
    done
    ;;
  *)
    echo "unknown stage $stage (prep, s, e, q, f, g, h, n, c, v or x)" >&2
    exit 2
    ;;
esac
