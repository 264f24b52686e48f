#!/usr/bin/env bash
# Should the bundled model's text encoder train jointly with its UNet, or stay frozen at
# its random initialisation? One measured answer: the UNet stage of
# train/pretrain_world.py run twice with the same seed and steps, on the bundled VAE
# (its encoder is the one the UNet was trained on; the decoder stage only refined the
# decoder), each variant then scored by eval/evaluate_world.py.
#
#   STEPS=300 bash benchmarks/text_encoder_ab.sh   # STEPS=500 by default, ~20 min on 2 idle cores
#
# Writes benchmarks/results/text_encoder_ab/{joint,frozen}/results.{json,md} and samples.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
STEPS="${STEPS:-500}"
WORK="${WORK:-out/text_encoder_ab}"
MODEL=hra_diffusion/assets/tiny-sd-world
for variant in joint frozen; do
  dir="$WORK/$variant"
  rm -rf "$dir" "$dir.work"
  mkdir -p "$dir.work/pretraining"
  cp -r "$MODEL/vae" "$dir.work/vae"
  cp "$MODEL/pretraining/vae.json" "$dir.work/pretraining/"
  flags=()
  if [ "$variant" = frozen ]; then flags=(--freeze_text_encoder); fi
  "$PYTHON" train/pretrain_world.py --stage unet --output_dir "$dir" --unet_steps "$STEPS" \
    --snapshot_steps 0 "${flags[@]}"
  "$PYTHON" eval/evaluate_world.py --model "$dir" --num_seen 48 --num_held_out 24 \
    --output_dir "benchmarks/results/text_encoder_ab/$variant"
done
