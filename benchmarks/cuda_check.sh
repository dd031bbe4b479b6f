#!/usr/bin/env bash
# CUDA check: the GPU tests (NF4 engine, bf16 per-row LoRA, QLoRA with paged 8-bit AdamW, preference
# recipes on a GPU), the engine's decode step profile, then the serving benchmark on the GPU (`small`
# base, bf16 and NF4, no peers).
# Run from the repository root on a machine with a CUDA GPU: bash benchmarks/cuda_check.sh [OUT_DIR]
# Writes OUT_DIR/cuda_tests.log, OUT_DIR/{none,nf4}/decode_step_profile.json,
# OUT_DIR/serve_bench_cuda.{json,md,png} and OUT_DIR/serve_bench_logs.tgz.
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
python3 - <<'PY'
import torch, transformers, peft, bitsandbytes
print("torch", torch.__version__, "cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)
PY
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
timeout 240 python3 -m pytest -m gpu -p no:cacheprovider -q -s -rs \
    tests/server/test_engine_cuda.py tests/trainers/test_cuda.py 2>&1 | tee "$out/cuda_tests.log"
tests=$?
for q in none nf4; do
    timeout 90 python3 -m benchmarks.decode_step_profile --base small --quantize $q --batch 1 16 --out "$out/$q"
done
work=$(mktemp -d)
timeout 300 python3 -m benchmarks.serve_bench --base small --quantize none nf4 --scenarios base 1 8 64 \
    --requests 64 --requests-c1 4 --naive-requests 0 --cold-loads 10 --cycle 0 --time-limit 60 \
    --wall-budget 280 --startup-timeout 120 --name serve_bench_cuda --out "$work" 2>&1 | tail -40
bench=$?
cp "$work"/serve_bench_cuda.* "$out"/ 2>/dev/null
tar -czf "$out/serve_bench_logs.tgz" -C "$work" logs 2>/dev/null
echo "tests exit $tests, bench exit $bench"
