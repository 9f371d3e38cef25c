#!/bin/bash
# One device call for the kv_compression figures: the engine's compression tests on the GPU (Triton
# kernels and CUDA graphs), then bench/kv_capacity.py. Logs under $OUT.
set -x
cd "$(dirname "$0")/.."
timeout 200 python3 -m pytest tests/engine/test_kv_compression.py -q -x -s -p no:cacheprovider 2>&1 |
    tail -25 | tee "$OUT/tests.log"
cd bench && python3 kv_capacity.py --requests 128 "$@" 2>&1 | tee "$OUT/kv_capacity.log" | tail -20
