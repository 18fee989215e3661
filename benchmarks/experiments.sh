#!/usr/bin/env bash
# The experiments of docs/experiments.md: router strategies x request rates on two engines
# (the built-in SmolLM2-135M-Instruct, one CPU thread each) behind one router on this machine.
# Results (JSON) and figures (PNG) go to docs/figures/. Takes about 40 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${PORT:-18500}
TOKEN=${TOKEN:-bench-$RANDOM$RANDOM}
URL=http://127.0.0.1:$PORT

$BIN/microserve serve --engines 2 --admin-token "$TOKEN" --port "$PORT" > /tmp/microserve-experiments-serve.log 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE; wait $SERVE' EXIT
until grep -q "microserve is up" /tmp/microserve-experiments-serve.log; do
  kill -0 $SERVE  # stop waiting if serve died
  sleep 1
done

# Capacity: one request at a time, then a burst of 16 (the saturated throughput).
$BIN/microserve bench --url $URL --input-len 512 --output-len 32 --concurrency 1 --num-requests 4 \
  --output docs/figures/calibrate_single.json
$BIN/microserve bench --url $URL --input-len 512 --output-len 32 --num-requests 16 \
  --output docs/figures/calibrate_burst.json

# (a) Prefill/decode disaggregation on long prompts: data parallel vs 1P1D vs balanced vs adaptive.
$BIN/microserve bench --url $URL --admin-token "$TOKEN" --workload sonnet --input-len 512 --output-len 32 \
  --num-requests 28 --rates 0.3 0.45 0.6 0.75 --slo-ttft-ms 3000 --slo-tpot-ms 100 --seed 1 \
  --strategies round_robin disagg@prefill,decode balanced_disagg:fraction=0.1@prefill,decode \
               balanced_disagg:fraction=0.2@prefill,decode balanced_disagg:fraction=0.3@prefill,decode adaptive \
  --output docs/figures/sonnet.json

# (b) Shared document prefixes: prefix-aware routing and context migration vs round robin.
$BIN/microserve bench --url $URL --admin-token "$TOKEN" --workload shared-prefix --input-len 1024 \
  --question-len 32 --questions-per-doc 4 --output-len 32 --num-requests 32 --rates 0.5 1 1.5 \
  --slo-ttft-ms 3000 --slo-tpot-ms 100 --seed 1 \
  --strategies round_robin prefix_aware context_migration \
  --output docs/figures/shared_prefix.json
