"""Write scenes of the procedural world as a captioned dataset with edge and label maps.

    python train/make_world_dataset.py --output_dir data/world_train --num_scenes 2000
    python train/make_world_dataset.py --output_dir data/world_val --split held_out --seed 1

The folder is the ``folder`` layout of ``train/train_control_hra.py``::

    images/00000.png       the 64 px scene
    conditions/00000.png   its segmentation label map (mode L, ids of labels.json, 0 = ignore)
    edges/00000.png        its Canny edge map (thresholds 100, 200)
    metadata.jsonl         {"image", "condition", "edge", "text", "scene"} per line
    labels.json            the label list: id i + 1 is labels[i]

so ``train_control_hra.py --train_data_dir data/world_train --condition_type segmentation``
(or ``canny``) trains on it as it is. Captions are the full form ("a red circle on a blue
background"). The same arguments always write the same files. The folder is written
beside its final place and renamed into it, so a finished dataset is never half-replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hra_diffusion import cli, world
from hra_diffusion.errors import fail


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output_dir", type=cli.output_dir, required=True, help="Dataset folder to write."
    )
    parser.add_argument(
        "--num_scenes", type=cli.positive_int, default=1000, help="Scenes to write. Default: 1000."
    )
    parser.add_argument(
        "--split",
        choices=world.SPLITS,
        default="train",
        help="Colour-shape pairs to draw from: the training ones, the held-out ones, or all. "
        "Default: train.",
    )
    parser.add_argument(
        "--max_offset",
        type=cli.between(0, world.SIZE // 2, " pixels"),
        default=world.MAX_OFFSET,
        help="Largest shift of the object's centre from the image centre, per axis, in pixels "
        f"(0 to {world.SIZE // 2}). Default: {world.MAX_OFFSET:g}, the bundled model's training "
        "layouts; wider ones make control data whose condition says where the object is.",
    )
    parser.add_argument("--seed", type=cli.seed, default=0, help="Default: 0.")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="Replace an existing dataset."
    )
    return parser


def write_dataset(
    folder: Path, num_scenes: int, split: str, seed: int, max_offset: float = world.MAX_OFFSET
) -> None:
    """Write ``num_scenes`` scenes of ``split`` into ``folder`` (which must exist)."""
    for sub in ("images", "conditions", "edges"):
        (folder / sub).mkdir()
    rng = np.random.default_rng([seed, world.SPLITS.index(split)])
    lines = []
    for i in tqdm(range(num_scenes), desc="Scenes", unit="scene"):
        scene = world.sample_scene(rng, split, max_offset)
        name = f"{i:05d}.png"
        world.render_scene(scene).save(folder / "images" / name)
        world.label_map(scene).save(folder / "conditions" / name)
        world.edge_map(scene).save(folder / "edges" / name)
        row = {"image": name, "condition": name, "edge": name, "text": world.caption(scene)}
        lines.append(json.dumps({**row, "scene": scene.to_dict()}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "labels.json").write_text(json.dumps(list(world.LABELS)) + "\n")


@cli.cli_main("--num_scenes")
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite_output_dir:
        fail(f"--output_dir {out} is not empty; choose another or pass --overwrite_output_dir.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_dataset(tmp, args.num_scenes, args.split, args.seed, args.max_offset)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.num_scenes} scenes to {out}")
    return out


if __name__ == "__main__":
    main()
