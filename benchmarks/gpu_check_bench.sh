#!/usr/bin/env bash
# Issue 16's GPU check, for one H200 (141 GB), under 8 minutes: TTFT and TPOT at 4k, 16k and 64k context, batch 1,
# for 34B at its exact shape in bf16 and 70B at its exact shape in our int8 (random weights, built block by block so
# the 70B never exists in bf16). Rows go to docs/bench-measured-h200.jsonl with the H200 prediction beside each;
# then `codellama bench report --measured docs/bench-measured-cpu.jsonl docs/bench-measured-h200.jsonl` puts them in
# the report.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench-measured-h200.jsonl}
: > "$out"
codellama bench latency --model CodeLlama-34b --dtype bf16 --device cuda --hardware H200 \
    --context 4k,16k,64k --output-tokens 32 --json | tee -a "$out"
codellama bench latency --model CodeLlama-70b --dtype int8 --device cuda --hardware H200 \
    --context 4k,16k,64k --output-tokens 32 --json | tee -a "$out"
