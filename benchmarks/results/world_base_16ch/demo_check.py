"""Demo check on a base: the DreamBooth recipe on examples/subject, timed, then the object
colour distance of 8 samples of "a qwe toy" to the views (base vs tuned) and the VAE floor
(the views' own round trip), plus the blue-background rate of the recontext prompt."""
import json, sys, time
from pathlib import Path
sys.path.insert(0, "/work/main/tests")
from PIL import Image
from test_world_learning import sample
from hra_diffusion.eval.world_dreambooth import distances, vae_round_trip, recontext_rate
from hra_diffusion.inference import load_pipeline
from hra_diffusion.train.train_dreambooth_hra import main as train
from hra_diffusion.world.subjects import DREAMBOOTH_RECIPE

model, out = sys.argv[1], Path(sys.argv[2])
views = [Image.open(p).convert("RGB") for p in sorted(Path("/work/main/examples/subject").glob("*.png"))]
start = time.time()
train(["--pretrained_model_name_or_path", model, f"@{DREAMBOOTH_RECIPE}",
       "--instance_data_dir", "/work/main/examples/subject", "--instance_prompt", "a qwe toy",
       "--caption_extension", ".txt", "--output_dir", str(out / "run"), "--report_to", "none",
       *sys.argv[3:]])
seconds = time.time() - start
base, tuned = load_pipeline(model), load_pipeline(model, weights=str(out / "run"))
record = {"model": model, "train_seconds": round(seconds, 1), "extra": sys.argv[3:]}
for name, pipe in (("base", base), ("tuned", tuned)):
    images = sample(pipe, ["a qwe toy"] * 8)
    blue = sample(pipe, ["a qwe toy on a blue background"] * 8)
    record[name] = {"object_distance": distances(images, views)["object"],
                    "blue_background_rate": recontext_rate(blue)}
record["vae_floor_object_distance"] = distances(vae_round_trip(base, views), views)["object"]
(out / "check.json").write_text(json.dumps(record, indent=2))
print(json.dumps(record, indent=2))
