#!/usr/bin/env bash
# The one-command GPU suite (issues 13, 14, 36): the SD-1.5 UNet architecture at 512 px, the
# SDXL-base UNet architecture at 1024 px (128x128 latents) and the SD3-medium and FLUX.1 [dev]
# transformer architectures at 1024 px, bf16 base with fp32 adapters, batch 1 and 4, eager
# and compiled; ours vs PEFT LoRA, OFT and HRA. The SD3 and FLUX.1 rows run when a GPU is
# lent (none has been yet: no numbers).
# Writes benchmarks/results/train_step_cuda.json and prints a table.
#
#   benchmarks/gpu_suite.sh                        # on a CUDA machine
#   benchmarks/gpu_suite.sh --model sdxl           # the SDXL rows only
#   benchmarks/gpu_suite.sh --model sd3 flux       # the transformer rows only
#   benchmarks/gpu_suite.sh --device cpu --model tiny tiny_sdxl tiny_sd3 tiny_flux --latent 8 \
#       --batches 1 --steps 1 --compile_backend aot_eager --out /tmp/suite.json   # small, on CPU
#
# Extra arguments go to benchmarks/bench_gpu_suite.py (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" benchmarks/bench_gpu_suite.py "$@"
