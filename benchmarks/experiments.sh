#!/usr/bin/env bash
# The experiments of docs/experiments.md: router strategies x request rates on two engines
# (the built-in SmolLM2-135M-Instruct, one CPU thread each) behind one router on this machine.
# Raw results (JSON with every request, and per-command plots) go to results/experiments/;
# the merged tables' data and the figures go to docs/figures/. About 50 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${PORT:-18500}
TOKEN=${TOKEN:-bench-$RANDOM$RANDOM}
URL=http://127.0.0.1:$PORT
RAW=results/experiments
mkdir -p $RAW docs/figures

$BIN/microserve serve --engines 2 --admin-token "$TOKEN" --port "$PORT" > $RAW/serve.log 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE; wait $SERVE' EXIT
until grep -q "microserve is up" $RAW/serve.log; do
  kill -0 $SERVE  # stop waiting if serve died
  sleep 1
done

BENCH="$BIN/microserve bench --url $URL --admin-token $TOKEN --slo-ttft-ms 3000 --slo-tpot-ms 100 --seed 1"
SONNET="--workload sonnet --input-len 512 --output-len 32 --num-requests 28"
DISAGG="round_robin disagg@prefill,decode balanced_disagg:fraction=0.1@prefill,decode
        balanced_disagg:fraction=0.2@prefill,decode balanced_disagg:fraction=0.3@prefill,decode adaptive"

# Capacity: one request at a time, then a burst of 16.
$BENCH $SONNET --concurrency 1 --num-requests 4 --output $RAW/calibrate_single.json
$BENCH $SONNET --num-requests 16 --output $RAW/calibrate_burst.json

# (a) Prefill/decode disaggregation on long prompts: data parallel vs 1P1D vs balanced vs adaptive.
$BENCH $SONNET --rates 0.3 0.45 0.6 0.75 --strategies $DISAGG --output $RAW/sonnet.json
$BENCH $SONNET --rates 1.0 1.25 1.5 --strategies $DISAGG --output $RAW/sonnet_high.json
# Points that a neighbour's load disturbed in the run above, run again (they replace the first ones).
$BENCH $SONNET --rates 0.3 0.45 0.6 0.75 --strategies round_robin --output $RAW/sonnet_repeat1.json
$BENCH $SONNET --rates 0.3 --strategies disagg@prefill,decode --output $RAW/sonnet_repeat2.json

# (b) Shared document prefixes: prefix-aware routing and context migration vs round robin.
$BENCH --workload shared-prefix --input-len 1024 --question-len 32 --questions-per-doc 4 --output-len 32 \
  --num-requests 32 --rates 0.5 1 1.5 --strategies round_robin prefix_aware context_migration \
  --output $RAW/shared_prefix.json

# Tables (printed) and figures: later files' points replace earlier ones with the same strategy and rate.
$BIN/python -m microserve.bench.report $RAW/sonnet.json $RAW/sonnet_high.json $RAW/sonnet_repeat1.json \
  $RAW/sonnet_repeat2.json --plot docs/figures/sonnet --save docs/figures/sonnet_points.json \
  --title "sonnet: 512 in / 32 out tokens, SmolLM2-135M, 2 engines x 1 CPU thread"
$BIN/python -m microserve.bench.report $RAW/shared_prefix.json --plot docs/figures/shared_prefix \
  --save docs/figures/shared_prefix_points.json \
  --title "shared-prefix: 1024-token docs, 4 x 32-token questions, 32 out, SmolLM2-135M"
