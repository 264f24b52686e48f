#!/usr/bin/env bash
# DreamBooth-HRA demo: the bundled tiny model learns the bundled toy robot
# (examples/subject/) on CPU in well under a minute. Random base weights: the
# samples show that every part of the pipeline runs, not image quality.
#
#   bash examples/dreambooth_demo.sh [extra train_dreambooth_hra.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" train/train_dreambooth_hra.py \
  --instance_data_dir examples/subject \
  --instance_prompt "a photo of qwe toy" \
  --output_dir out/demo --overwrite_output_dir \
  --resolution 64 --max_train_steps 200 \
  --checkpointing_steps 100 --checkpoints_total_limit 1 \
  --validation_prompt "a photo of qwe toy" --validation_steps 100 --num_validation_images 4 \
  "$@"
