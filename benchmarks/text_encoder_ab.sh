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
#   # full length: the bundled model is the joint variant (same seed, steps and arguments),
#   # so train only the frozen one, on both threads, and score the bundled model beside it
#   STEPS=3500 VARIANTS=frozen THREADS=2 RESULTS=benchmarks/results/text_encoder_ab_3500 \
#     bash benchmarks/text_encoder_ab.sh
#
# Writes $RESULTS/{joint,frozen}/ (default benchmarks/results/text_encoder_ab): results.{json,md} and samples.png
# from the evaluation, unet.json (wall time, final loss) and unet_loss.png from the training,
# and train.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
STEPS="${STEPS:-1200}"
VARIANTS="${VARIANTS:-joint frozen}"
THREADS="${THREADS:-1}"
WORK="${WORK:-out/text_encoder_ab}"
MODEL=hra_diffusion/assets/tiny-sd-world
RESULTS="${RESULTS:-benchmarks/results/text_encoder_ab}"

train_variant() {
  local variant=$1 dir="$WORK/$1" flags=()
  rm -rf "$dir" "$dir.work"
  mkdir -p "$dir.work/pretraining" "$RESULTS/$variant"
  cp -r "$MODEL/vae" "$dir.work/vae"
  cp "$MODEL/pretraining/vae.json" "$dir.work/pretraining/"
  if [ "$variant" = frozen ]; then flags=(--freeze_text_encoder); fi
  OMP_NUM_THREADS="$THREADS" "$PYTHON" train/pretrain_world.py --stage unet --output_dir "$dir" \
    --unet_steps "$STEPS" --snapshot_steps 0 --num_threads "$THREADS" "${flags[@]}" \
    > "$RESULTS/$variant/train.log" 2>&1
}

for variant in $VARIANTS; do train_variant "$variant" & done
wait
for variant in $VARIANTS; do
  "$PYTHON" eval/evaluate_world.py --model "$WORK/$variant" --num_seen 48 --num_held_out 24 \
    --output_dir "$RESULTS/$variant"
  cp "$WORK/$variant/pretraining/unet.json" "$WORK/$variant/pretraining/unet_loss.png" \
    "$RESULTS/$variant/"
done
