# Helpers shared by the one-GPU session scripts (gpu1_session.sh, gpu19_session.sh); sourced, never run.
# The caller sets W (work folder outside the repository copy), OUT, DEADLINE (epoch seconds by which runs must end),
# stage, and the arrays COMMON (overrides every run gets first) and TAIL (overrides every run gets last).

train() {  # train NAME SECONDS CONFIG OVERRIDES...: one `lexfine train`, its wall time from process start
  local name=$1 secs=$2 cfg=$3
  shift 3
  local t0 left
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 60 ]; then echo "$name: skipped, $left s left in this stage"; return; fi
  [ "$secs" -gt "$left" ] && secs=$left
  t0=$(date +%s%N)
  timeout -k 20 "$secs" python3 -m lexfine.cli train "$cfg" "${COMMON[@]}" "name=$name" "$@" "${TAIL[@]}" > "$W/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "{\"name\": \"$name\", \"rc\": $rc, \"process_s\": $(( ms / 1000 )).$(( ms % 1000 / 100 ))}" >> "$W/wall.jsonl"
  echo "$name: exit $rc after $(( ms / 1000 )) s"
  tail -n 3 "$W/$name.log"
}

cprofile_train() {  # cprofile_train NAME SECONDS CONFIG OVERRIDES...: `lexfine train` under cProfile; the functions
  # with the most cumulative and own time to $OUT/NAME_cprofile.txt
  local name=$1 secs=$2 cfg=$3
  shift 3
  local t0
  t0=$(date +%s)
  timeout -k 15 "$secs" python3 -m cProfile -o "$W/$name.prof" -m lexfine.cli train "$cfg" "${COMMON[@]}" "name=$name" \
    "$@" "${TAIL[@]}" > "$W/$name.log" 2>&1
  echo "$name (cProfile): exit $? after $(( $(date +%s) - t0 )) s"
  timeout -k 5 30 python3 -c 'import pstats, sys
s = pstats.Stats(sys.argv[1])
s.sort_stats("cumulative").print_stats(90)
s.sort_stats("tottime").print_stats(40)' "$W/$name.prof" > "$OUT/${name}_cprofile.txt" 2>&1
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
        "| recompiles | peak GiB | save s | final loss | eval_during s | mask-free |", "|" + "---|" * 15]
for m_path in sorted((w / "runs").glob("*/manifest.json")):
    m = json.loads(m_path.read_text())
    name = m_path.parent.name.rsplit("-", 1)[0]
    t = m.get("timings") or {}
    ed = m.get("eval_during") or {}
    rows.append(f"| {name} | {wall.get(name, {}).get('rc', '-')} | {m.get('status')} | {m.get('steps')} | "
                f"{wall.get(name, {}).get('process_s', '-')} | {t.get('data_prep_s', '-')} | {t.get('model_load_s', '-')} "
                f"| {t.get('first_step_s', '-')} | {t.get('steady_tokens_per_s', '-')} | {t.get('recompiles', '-')} | "
                f"{m.get('peak_gpu_memory_gib', '-')} | {m.get('save_s', '-')} | {m.get('final_loss', '-')} | "
                f"{ed.get('seconds', '-') if isinstance(ed, dict) else '-'} | "
                f"{(m.get('speed') or {}).get('mask_free_attention', '-')} |")
(out / "table.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
  (cd "$W" && tar czf "$OUT/runs-$stage.tgz" --exclude='*.safetensors' --exclude='*/checkpoints' --exclude='*.bin' \
     --exclude='*.pt' --exclude='trace.json.gz' runs wall.jsonl ./*.log 2>/dev/null)
}
