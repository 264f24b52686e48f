"""Train the world's evaluator models: a tiny CLIP, an attribute-supervised ViT and a SegFormer.

    OMP_NUM_THREADS=2 python train/train_world_evaluators.py --overwrite_output_dir

writes ``hra_diffusion/assets/world-evaluators/`` (see :mod:`hra_diffusion.world.evaluators`):

- ``clip.safetensors``: clip-anytorch ``CLIP``, contrastive (InfoNCE, both directions) on
  world images and varied captions (:func:`hra_diffusion.world.sample_caption`). A caption
  is a positive for every image in the batch it describes truly ("a red circle" fits any
  red circle), so the targets are spread over all consistent pairs;
- ``vit/``: ``ViTForImageClassification``, **attribute-supervised**: cross-entropy on
  shape, object colour and background colour from the CLS token (not self-supervised);
- with ``--identity_families``, CLIP and the ViT also learn to tell subjects apart: a
  supervised contrastive loss (:func:`identity_loss`) on CLIP's image embedding and on the
  ViT's CLS token (what the CLIP-I and DINO metrics read) over two views of each random
  subject of :mod:`hra_diffusion.world.random_subjects` (families of three that share inks or
  geometry; any background, placement, size and a small turn; half the views through the
  bundled VAE). The named subjects of :mod:`hra_diffusion.world.subjects` are never
  drawn: they are the validation set of ``eval/validate_identity.py``. ``--init_dir``
  starts both from earlier models; the bundled ones were fine-tuned so (see
  ``benchmarks/results/world_evaluators_identity/README.md``);
- ``segformer/``: ``SegformerForSemanticSegmentation`` on the world's label maps
  (0 = the anti-aliased rim, ignored), input upscaled to 128 px;
- ``recipe_<model>.json``: the command's arguments, seed, wall and CPU time (all threads)
  and loss curve; on a shared machine the CPU time is the cost, the wall time the wait.

The three train on one pool of scenes of every colour-shape pair (the held-out pairs are
held out from the *generator*, not from its judges). Half the pool is passed through the
bundled model's VAE (encode, perturb the latents, decode), and every batch gets blur,
noise and colour jitter, so that the evaluators read generated images as well as
rendered ones. Their held-out quality is measured by ``eval/evaluate_world_evaluators.py``.
``--models vit`` retrains one model and leaves the others as they are; the bundled three
were trained by three such processes side by side::

    for m in clip vit segformer; do
        OMP_NUM_THREADS=1 python train/train_world_evaluators.py --models $m --num_threads 1 \\
            --overwrite_output_dir &
    done
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from hra_diffusion import cli, world
from hra_diffusion.errors import fail
from hra_diffusion.formats.hra import atomic_save_file, atomic_write
from hra_diffusion.world import evaluators, random_subjects

MODELS = ("clip", "vit", "segformer")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEGFORMER_INPUT = 128
IGNORE_INDEX = 255


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output_dir",
        type=cli.output_dir,
        default=str(evaluators.ASSETS),
        help="Where the models go. Default: the bundled hra_diffusion/assets/world-evaluators.",
    )
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="Default: all three."
    )
    parser.add_argument("--seed", type=cli.seed, default=0, help="Default: 0.")
    parser.add_argument(
        "--num_scenes", type=cli.positive_int, default=3000, help="Scene pool size. Default: 3000."
    )
    parser.add_argument(
        "--vae_share",
        type=cli.probability,
        default=0.25,
        help="Share of the pool passed through the bundled VAE. Default: 0.25.",
    )
    parser.add_argument("--clip_steps", type=cli.positive_int, default=1200, help="Default: 1200.")
    parser.add_argument("--vit_steps", type=cli.positive_int, default=1000, help="Default: 1000.")
    parser.add_argument(
        "--segformer_steps", type=cli.positive_int, default=1200, help="Default: 1200."
    )
    parser.add_argument("--batch_size", type=cli.positive_int, default=64, help="Default: 64.")
    parser.add_argument(
        "--segformer_batch_size", type=cli.positive_int, default=16, help="Default: 16."
    )
    parser.add_argument(
        "--learning_rate", type=cli.positive_float, default=1e-3, help="Default: 1e-3."
    )
    parser.add_argument("--warmup_steps", type=cli.positive_int, default=50, help="Default: 50.")
    parser.add_argument(
        "--num_threads",
        type=cli.positive_int,
        default=None,
        help="torch threads. Default: torch's.",
    )
    parser.add_argument(
        "--init_dir",
        type=cli.existing_dir,
        default=None,
        help="Start CLIP and the ViT from the models in this folder (e.g. the bundled ones) "
        "instead of a random initialisation. Default: random.",
    )
    parser.add_argument(
        "--identity_families",
        type=cli.non_negative_int,
        default=0,
        help="Families of random subjects (3 each, hra_diffusion.world.random_subjects) for the "
        "identity loss of CLIP and the ViT; 0 turns it off. Default: 0.",
    )
    parser.add_argument(
        "--identity_views", type=cli.positive_int, default=4, help="Views per subject. Default: 4."
    )
    parser.add_argument(
        "--identity_batch",
        type=cli.positive_int,
        default=10,
        help="Families per step. Default: 10.",
    )
    parser.add_argument(
        "--identity_weight",
        type=cli.positive_float,
        default=1.0,
        help="Weight of the identity loss. Default: 1.",
    )
    parser.add_argument(
        "--temperature",
        type=cli.positive_float,
        default=0.1,
        help="Identity loss temperature. Default: 0.1.",
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="Replace models already there."
    )
    return parser


def check_args(args: argparse.Namespace) -> Path:
    """Fail before any work on bad values or on models that would be overwritten."""
    if args.identity_families and args.identity_views < 2:
        fail(
            f"--identity_views must be at least 2 (two views a subject), got {args.identity_views}."
        )
    out = Path(args.output_dir)
    existing = [m for m in args.models if (out / model_file(m)).exists()]
    if existing and not args.overwrite_output_dir:
        fail(
            f"{out} already holds {', '.join(existing)}; pass --overwrite_output_dir to "
            "replace them, or choose another --output_dir."
        )
    return out


def model_file(name: str) -> str:
    return "clip.safetensors" if name == "clip" else name


# --------------------------------------------------------------------------- data


class ScenePool:
    """Rendered scenes: images (N, 3, 64, 64) in [0, 1], label maps (N, 64, 64), captions."""

    def __init__(self, num_scenes: int, vae_share: float, seed: int) -> None:
        rng = np.random.default_rng([seed, 1])
        self.scenes = [world.sample_scene(rng, "all", world.WIDE_OFFSET) for _ in range(num_scenes)]
        images = np.stack([np.asarray(world.render_scene(s)) for s in self.scenes])  # (N,H,W,3)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        labels = np.stack([np.asarray(world.label_map(s)) for s in self.scenes])  # (N, H, W)
        self.labels = torch.from_numpy(np.where(labels == 0, IGNORE_INDEX, labels - 1)).long()
        self.through_vae = int(round(vae_share * num_scenes))
        if self.through_vae:
            self.images[: self.through_vae] = evaluators.vae_round_trip(
                self.images[: self.through_vae], seed
            )
        self.caption_rng = np.random.default_rng([seed, 2])

    def __len__(self) -> int:
        return len(self.scenes)

    def captions(self, index: torch.Tensor) -> list[str]:
        return [world.sample_caption(self.scenes[i], self.caption_rng) for i in index.tolist()]


class IdentityPool:
    """Views of random subjects (:mod:`hra_diffusion.world.random_subjects`), never the named ones:
    images (F, 3, V, 3, 64, 64) uint8 for F families of 3 subjects, V views each. Half of
    every subject's views go through the bundled VAE, half of those with perturbed latents."""

    def __init__(self, families: int, views: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 3])
        images = []
        for _ in range(families):
            for subject in random_subjects.random_family(rng):
                images += [
                    np.asarray(random_subjects.random_view(rng, subject)) for _ in range(views)
                ]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (F*3*V, 3, H, W)
        x = x.reshape(families, 3, views, *x.shape[1:])  # (F, 3, V, 3, H, W)
        decode = views // 2
        for noise, part in ((0.0, slice(0, decode // 2)), (0.15, slice(decode // 2, decode))):
            chunk = x[:, :, part]  # (F, 3, v, 3, H, W)
            flat = chunk.reshape(-1, *chunk.shape[-3:]).float() / 255.0
            decoded = evaluators.vae_round_trip(flat, seed, noise)  # (F*3*v, 3, H, W)
            x[:, :, part] = (decoded * 255).round().byte().reshape(chunk.shape)
        self.images = x

    def batch(self, families: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two distinct views of each subject of ``families`` random families: images
        (2 S, 3, H, W) in [0, 1] and subject labels (2 S,), S = 3 * families."""
        f, _, v = self.images.shape[:3]
        pick = torch.randint(f, (families, 1), generator=generator)  # (families, 1)
        first = torch.randint(v, (families, 3), generator=generator)  # (families, 3)
        second = (first + torch.randint(1, v, (families, 3), generator=generator)) % v
        subject = torch.arange(3)
        x = torch.stack([self.images[pick, subject, first], self.images[pick, subject, second]], 2)
        labels = torch.arange(families * 3).repeat_interleave(2)  # (2 S,)
        return x.reshape(-1, *x.shape[3:]).float() / 255.0, labels  # (2 S, 3, H, W)


def identity_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (SupCon) of embeddings z (B, D): each view is pulled to
    the other views of its subject and pushed from every other subject's, on cosines / T."""
    z = F.normalize(z, dim=-1)
    logits = z @ z.T / temperature  # (B, B)
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, -1e9)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask  # (B, B)
    log_prob = logits.log_softmax(dim=1)
    return -(log_prob * positive).sum(1).div(positive.sum(1)).mean()


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur (5 taps, reflect padding) of (B, C, H, W) images."""
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # (5,)
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur strength, colour gain/offset and pixel noise of (B, 3, H, W) images in [0, 1]."""
    b = x.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    strength = rand(b, 1, 1, 1)  # (B, 1, 1, 1)
    x = (1 - strength) * x + strength * gaussian_blur(x)
    gain = 1 + 0.08 * (2 * rand(b, 3, 1, 1) - 1)
    offset = 0.04 * (2 * rand(b, 1, 1, 1) - 1)
    noise = 0.03 * rand(b, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return (x * gain + offset + noise).clamp(0, 1)


def normalize(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- training


def train_loop(name, model, steps, args, loss_fn) -> dict:
    """AdamW with warmup + cosine; ``loss_fn(step)`` returns the batch loss. Returns a log."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup_steps, steps)
    )
    model.train()
    start, cpu_start, losses = time.perf_counter(), time.process_time(), []
    for step in range(steps):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(f"{name} step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f} {elapsed:.0f}s")
    model.eval()
    every = max(1, steps // 200)
    return {
        "steps": steps,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "final_loss_mean_last_50": round(float(np.mean(losses[-50:])), 5),
        "loss_every": every,
        "loss": [round(float(np.mean(losses[i : i + every])), 5) for i in range(0, steps, every)],
    }


def train_clip(
    pool: ScenePool, identity: IdentityPool | None, args: argparse.Namespace
) -> tuple[torch.nn.Module, dict]:
    """Contrastive training with every consistent (image, caption) pair a positive; with an
    identity pool, plus :func:`identity_loss` on the image embeddings (CLIP-I)."""
    import clip

    if args.init_dir:  # the architecture is read from the weights
        state = load_file(Path(args.init_dir) / "clip.safetensors")
        model = clip.model.build_model(state).float()
    else:
        model = evaluators.build_clip()
    generator = torch.Generator().manual_seed(args.seed)

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(len(pool), (args.batch_size,), generator=generator)
        texts = pool.captions(index)
        named = [evaluators.caption_attributes(t) for t in texts]
        positive = torch.tensor(
            [[evaluators.consistent(n, pool.scenes[i]) for n in named] for i in index.tolist()]
        ).float()  # (B images, B texts)
        pixels = normalize(augment(pool.images[index], generator), CLIP_MEAN, CLIP_STD)
        tokens = clip.tokenize(texts, context_length=model.context_length, truncate=True)
        image = F.normalize(model.encode_image(pixels), dim=-1)  # (B, E)
        text = F.normalize(model.encode_text(tokens), dim=-1)  # (B, E)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T  # (B, B)
        per_image = -(positive / positive.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1)
        per_text = -(positive / positive.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0)
        loss = 0.5 * (per_image.mean() + per_text.mean())
        if identity is None:
            return loss
        views, labels = identity.batch(args.identity_batch, generator)
        z = model.encode_image(normalize(augment(views, generator), CLIP_MEAN, CLIP_STD))  # (I, E)
        return loss + args.identity_weight * identity_loss(z, labels, args.temperature)

    return model, train_loop("clip", model, args.clip_steps, args, loss_fn)


def train_vit(
    pool: ScenePool, identity: IdentityPool | None, args: argparse.Namespace
) -> tuple[torch.nn.Module, dict]:
    """Cross-entropy on each attribute's slice of the head's logits; with an identity pool,
    plus :func:`identity_loss` on the CLS token after the final norm (the DINO slot)."""
    if args.init_dir:
        model = transformers.ViTForImageClassification.from_pretrained(Path(args.init_dir) / "vit")
    else:
        model = transformers.ViTForImageClassification(evaluators.vit_config())
    generator = torch.Generator().manual_seed(args.seed + 1)
    slices = evaluators.attribute_slices()
    targets = {
        name: torch.tensor([values.index(getattr(s, name)) for s in pool.scenes])
        for name, values in evaluators.ATTRIBUTES.items()
    }

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(len(pool), (args.batch_size,), generator=generator)
        pixels = normalize(augment(pool.images[index], generator), (0.5,) * 3, (0.5,) * 3)
        flip = torch.rand(len(index), generator=generator) < 0.5
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        if identity is not None:
            views, labels = identity.batch(args.identity_batch, generator)
            views = normalize(augment(views, generator), (0.5,) * 3, (0.5,) * 3)
            pixels = torch.cat([pixels, views])  # (B + I, 3, H, W)
        cls = model.vit(pixel_values=pixels).last_hidden_state[:, 0]  # (B + I, D)
        logits = model.classifier(cls[: len(index)])  # (B, 15)
        loss = sum(F.cross_entropy(logits[:, slices[n]], targets[n][index]) for n in slices)
        if identity is None:
            return loss
        return loss + args.identity_weight * identity_loss(
            cls[len(index) :], labels, args.temperature
        )

    return model, train_loop("vit", model, args.vit_steps, args, loss_fn)


def train_segformer(
    pool: ScenePool, identity: IdentityPool | None, args: argparse.Namespace
) -> tuple[torch.nn.Module, dict]:
    """Pixel cross-entropy at the label maps' size (logits upsampled), rim ignored."""
    model = transformers.SegformerForSemanticSegmentation(evaluators.segformer_config())
    generator = torch.Generator().manual_seed(args.seed + 2)

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(len(pool), (args.segformer_batch_size,), generator=generator)
        images, labels = augment(pool.images[index], generator), pool.labels[index]
        flip = torch.rand(len(index), generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)  # (B, H, W)
        pixels = F.interpolate(images, size=SEGFORMER_INPUT, mode="bilinear", align_corners=False)
        logits = model(pixel_values=normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)).logits
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear")  # (B, K, H, W)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

    return model, train_loop("segformer", model, args.segformer_steps, args, loss_fn)


# --------------------------------------------------------------------------- saving


def save_folder(out: Path, name: str, save) -> None:
    """Write a model folder beside its final place and rename it in (an old one is replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    try:
        save(tmp)
        old = out / f".{name}-old"
        if (out / name).exists():
            os.replace(out / name, old)
        os.replace(tmp, out / name)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(out: Path, name: str, model: torch.nn.Module) -> None:
    """CLIP as an fp16 state dict (clip-anytorch builds it in fp16 anyway); the transformers
    models with ``save_pretrained`` (fp32 safetensors) and their image processors."""
    if name == "clip":
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        atomic_save_file(state, out / "clip.safetensors", {"format": "clip-anytorch"})
    elif name == "vit":
        size = {"height": world.SIZE, "width": world.SIZE}
        processor = transformers.ViTImageProcessor(
            size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
        save_folder(out, "vit", lambda d: (model.save_pretrained(d), processor.save_pretrained(d)))
    else:
        processor = transformers.SegformerImageProcessor(
            size={"height": SEGFORMER_INPUT, "width": SEGFORMER_INPUT}, do_reduce_labels=False
        )
        save_folder(
            out, "segformer", lambda d: (model.save_pretrained(d), processor.save_pretrained(d))
        )


def write_recipe(out: Path, name: str, log: dict, args: argparse.Namespace) -> None:
    """Record this model's recipe in ``recipe_<name>.json`` (one file per model, so that
    the three can train in parallel processes)."""
    text = json.dumps({**log, "command_args": vars(args)}, indent=2) + "\n"
    atomic_write(out / f"recipe_{name}.json", lambda tmp: Path(tmp).write_text(text))


@cli.cli_main("--batch_size and --segformer_batch_size")
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = check_args(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", module="clip")  # pkg_resources deprecation
    start = time.perf_counter()
    pool = ScenePool(args.num_scenes, args.vae_share, args.seed)
    identity = None
    if args.identity_families and {"clip", "vit"} & set(args.models):
        identity = IdentityPool(args.identity_families, args.identity_views, args.seed)
    data_seconds = round(time.perf_counter() - start, 1)
    print(f"scene pool: {len(pool)} scenes ({pool.through_vae} through the VAE), {data_seconds}s")
    trainers = {"clip": train_clip, "vit": train_vit, "segformer": train_segformer}
    for name in args.models:
        model, log = trainers[name](pool, identity, args)
        log["parameters"] = sum(p.numel() for p in model.parameters())
        log["data_seconds"] = data_seconds
        save_model(out, name, model)
        write_recipe(out, name, log, args)
        print(f"saved {name} ({log['parameters']:,} parameters, {log['wall_seconds']}s)")


if __name__ == "__main__":
    main()
