#!/usr/bin/env bash
# The GPU benchmarks in one go, for a machine with one CUDA device (about 10 minutes on a current
# data-centre GPU): TRCE stage 1 and stage 2 at SD-1.4 size next to the reference layout (stage 2 also
# under bf16 autocast), and generation at SD-1.4 size next to plain diffusers. Every result file
# names the device it ran on:
#   benchmarks/results/trce_scale_cuda.{json,md}
#   benchmarks/results/eval_throughput_sd14_cuda.{json,md}
# Usage: bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device visible to torch')"
python -c "import torch; print('device:', torch.cuda.get_device_name(), flush=True)"
python benchmarks/trce_scale.py --device cuda --steps 5
python benchmarks/eval_throughput.py --sd14 --device cuda
