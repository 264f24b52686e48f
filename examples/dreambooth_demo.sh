#!/usr/bin/env bash
# DreamBooth-HRA demo: the bundled default model (a tiny SD pretrained on the procedural
# world) learns the bundled toy robot (examples/subject/, colours and a shape its world
# never draws) on CPU in about three minutes, then draws it on a background it was never shown.
# The settings that suit the bundled model are in hra_diffusion/world/dreambooth.args; the
# script's own defaults are the paper's Stable Diffusion 1.5 recipe.
#
#   bash examples/dreambooth_demo.sh [extra train_dreambooth_hra.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" train/train_dreambooth_hra.py @hra_diffusion/world/dreambooth.args \
  --instance_data_dir examples/subject \
  --instance_prompt "a qwe toy" --caption_extension .txt \
  --validation_prompt "a qwe toy" "a qwe toy on a blue background" \
  --output_dir out/demo --overwrite_output_dir \
  "$@"
