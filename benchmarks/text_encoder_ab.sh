#!/usr/bin/env bash
# Should the bundled model's text encoder train jointly with its UNet, or stay frozen at
# its random initialisation? One measured answer: the UNet stage of
# train/pretrain_world.py run twice with the same seed and steps, on the bundled VAE
# (its encoder is the one the UNet was trained on; the decoder stage only refined the
# decoder), the two variants side by side on one CPU thread each, then each scored by
# eval/evaluate_world.py.
#
#   bash benchmarks/text_encoder_ab.sh              # STEPS=1200 by default
#   STEPS=300 bash benchmarks/text_encoder_ab.sh    # a quick look
#
# Writes benchmarks/results/text_encoder_ab/{joint,frozen}/: results.{json,md} and samples.png
# from the evaluation, unet.json (wall time, final loss) and unet_loss.png from the training,
# and train.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
STEPS="${STEPS:-1200}"
WORK="${WORK:-out/text_encoder_ab}"
MODEL=hra_diffusion/assets/tiny-sd-world
RESULTS=benchmarks/results/text_encoder_ab

train_variant() {
  local variant=$1 dir="$WORK/$1" flags=()
  rm -rf "$dir" "$dir.work"
  mkdir -p "$dir.work/pretraining" "$RESULTS/$variant"
  cp -r "$MODEL/vae" "$dir.work/vae"
  cp "$MODEL/pretraining/vae.json" "$dir.work/pretraining/"
  if [ "$variant" = frozen ]; then flags=(--freeze_text_encoder); fi
  OMP_NUM_THREADS=1 "$PYTHON" train/pretrain_world.py --stage unet --output_dir "$dir" \
    --unet_steps "$STEPS" --snapshot_steps 0 --num_threads 1 "${flags[@]}" \
    > "$RESULTS/$variant/train.log" 2>&1
}

train_variant joint &
train_variant frozen &
wait
for variant in joint frozen; do
  "$PYTHON" eval/evaluate_world.py --model "$WORK/$variant" --num_seen 48 --num_held_out 24 \
    --output_dir "$RESULTS/$variant"
  cp "$WORK/$variant/pretraining/unet.json" "$WORK/$variant/pretraining/unet_loss.png" \
    "$RESULTS/$variant/"
done
