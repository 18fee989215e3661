#!/usr/bin/env bash
# The simulation results of docs/simulation.md, one part per argument (default: all):
#   fidelity  the same bench against 2 real engines (SmolLM2-135M, 1 CPU thread each) and
#             against 2 simulated smollm2-135m@cpu engines (~16 minutes)
#   paper     the MicroServe paper's setting: 2 simulated llama-3.1-70b-fp8@h100x4 engines,
#             sonnet ~3000 in / ~100 out, 1.6-5.6 req/s, 100 requests per point (~35 minutes)
# Raw results go to results/simulation/; merged points to docs/figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${PORT:-18600}
TOKEN=${TOKEN:-bench-$RANDOM$RANDOM}
URL=http://127.0.0.1:$PORT
RAW=results/simulation
mkdir -p $RAW docs/figures
PARTS=${*:-fidelity paper}

start_serve() {  # start_serve LOG ARGS...: `microserve serve ARGS` in the background, waited on until up
  local log=$1; shift
  $BIN/microserve serve --admin-token "$TOKEN" --port "$PORT" "$@" > "$log" 2>&1 &
  SERVE=$!
  until grep -q "microserve is up" "$log"; do
    kill -0 $SERVE  # stop waiting if serve died
    sleep 1
  done
}
stop_serve() { kill -TERM $SERVE; wait $SERVE || true; }
trap '[ -n "${SERVE:-}" ] && kill -TERM $SERVE 2>/dev/null || true' EXIT

BENCH="$BIN/microserve bench --url $URL --admin-token $TOKEN --seed 1 --no-progress"

for part in $PARTS; do
  case $part in
  fidelity)
    # Light and moderate load on long prompts, and a shared-prefix run, each against real and simulated engines.
    # Light and moderate load for this CPU (one thread per engine; see docs/simulation.md).
    FID="--workload sonnet --input-len 256 --output-len 32 --num-requests 16 --rates 0.1 0.25"
    for kind in real simulated; do
      if [ $kind = real ]; then start_serve $RAW/fidelity_$kind.log --engines 2
      else start_serve $RAW/fidelity_$kind.log --engines 2 --simulate smollm2-135m@cpu --served-model-name SmolLM2-135M-Instruct; fi
      $BENCH $FID --strategies round_robin disagg@prefill,decode --output $RAW/fidelity_${kind}.json
      stop_serve
    done
    $BIN/python benchmarks/sim_report.py fidelity $RAW/fidelity_real.json $RAW/fidelity_simulated.json
    ;;
  paper)
    start_serve $RAW/paper.log --engines 2 --simulate llama-3.1-70b-fp8@h100x4 \
      --max-num-batched-tokens 8192 --max-num-seqs 256
    PAPER="--workload sonnet --input-len 3000 --output-len 100 --num-requests 100 --rates 1.6 2.4 3.2 4.0 4.8 5.6"
    $BENCH $PAPER --strategies round_robin disagg@prefill,decode balanced_disagg:fraction=0.1@prefill,decode \
      balanced_disagg:fraction=0.2@prefill,decode adaptive --output $RAW/paper.json
    # The strategy that beats them (microserve/router/strategies.py: elastic_disagg).
    $BENCH $PAPER --strategies elastic_disagg@prefill,decode --output $RAW/paper_elastic.json
    stop_serve
    $BIN/python -m microserve.bench.report $RAW/paper.json $RAW/paper_elastic.json --plot docs/figures/sim_paper \
      --save docs/figures/sim_paper_points.json \
      --title "simulated: 2 x Llama-3.1-70B FP8 on 4 H100 each, sonnet 3000 in / 100 out"
    ;;
  *) echo "unknown part $part (fidelity, paper)" >&2; exit 2 ;;
  esac
done
