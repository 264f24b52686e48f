"""Demo check on a base: the DreamBooth recipe on examples/subject, timed, then the object
colour distance of 8 samples of "a qwe toy" to the views (base vs tuned) and the VAE floor
(the views' own round trip), plus the blue-background rate of the recontext prompt.

    python benchmarks/results/world_base_16ch/demo_check.py MODEL_DIR OUT_DIR
"""

import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from hra_diffusion.eval.world_dreambooth import distances, recontext_rate, vae_round_trip
from hra_diffusion.inference import load_pipeline
from hra_diffusion.train.train_dreambooth_hra import main as train
from hra_diffusion.world.subjects import DREAMBOOTH_RECIPE

SUBJECT = Path(__file__).resolve().parents[3] / "examples" / "subject"


def sample(pipe, prompts: list[str]) -> list[Image.Image]:
    """One image per prompt, image i from seed i (10 steps, guidance 10, as the tests)."""
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=10, guidance_scale=10.0, generator=generators).images


model, out = sys.argv[1], Path(sys.argv[2])
views = [Image.open(p).convert("RGB") for p in sorted(SUBJECT.glob("*.png"))]
start = time.time()
train(
    ["--pretrained_model_name_or_path", model, f"@{DREAMBOOTH_RECIPE}",
     "--instance_data_dir", str(SUBJECT), "--instance_prompt", "a qwe toy",
     "--caption_extension", ".txt", "--output_dir", str(out / "run"), "--report_to", "none",
     *sys.argv[3:]]
)  # fmt: skip
seconds = time.time() - start
base, tuned = load_pipeline(model), load_pipeline(model, weights=str(out / "run"))
record = {"model": model, "train_seconds": round(seconds, 1), "extra": sys.argv[3:]}
for name, pipe in (("base", base), ("tuned", tuned)):
    images = sample(pipe, ["a qwe toy"] * 8)
    blue = sample(pipe, ["a qwe toy on a blue background"] * 8)
    record[name] = {
        "object_distance": distances(images, views)["object"],
        "blue_background_rate": recontext_rate(blue),
    }
record["vae_floor_object_distance"] = distances(vae_round_trip(base, views), views)["object"]
(out / "check.json").write_text(json.dumps(record, indent=2))
print(json.dumps(record, indent=2))
