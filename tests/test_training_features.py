"""The training features of both scripts: aspect-ratio buckets, masked loss, min-SNR, noise
offset, v-prediction, optimizers and EMA; each against an independent reference, each
surviving checkpoint/resume bit for bit, each bad input refused before any model loads."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from hra_diffusion import (
    UNET_ATTENTION_TARGETS,
    HRAConfig,
    hra_state_dict,
    inject_hra,
    load_hra_weights,
)
from hra_diffusion.control import control_state_dict, load_control_weights
from hra_diffusion.train import arg_checks, train_control_hra
from hra_diffusion.train.args import add_bucket_args
from hra_diffusion.train.data import (
    BucketSampler,
    BucketSet,
    DreamBoothDataset,
    check_bucket_args,
    class_bucket_quota,
    collate_dreambooth,
    crop_geometry,
    make_buckets,
    select_class_images,
)
from hra_diffusion.train.ema import EMA
from hra_diffusion.train.loss import (
    debiased_weights,
    diffusion_loss,
    min_snr_weights,
    noisy_latents,
    set_prediction_type,
    snr,
    timestep_upper_bound,
)
from hra_diffusion.train.train_dreambooth_hra import main as dreambooth_main
from hra_diffusion.world.tiny_sd import tiny_unet

PROMPT = "a photo of qwe toy"
SIZES = [(48, 24), (24, 48), (32, 32), (64, 16), (40, 36), (36, 20)]
"""Instance pictures of six aspect ratios (width, height)."""


def write_subject(folder: Path, sizes=SIZES, alpha: bool = False) -> Path:
    """Noise pictures of the given sizes; with ``alpha`` an opaque left half."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if alpha:
            a = np.zeros((h, w, 1), np.uint8)
            a[:, : w // 2] = 255
            pixels = np.concatenate([pixels, a], axis=2)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def dreambooth(model_dir: Path, subject: Path, out: Path, *extra: str) -> dict:
    argv = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--instance_data_dir", str(subject),
        "--instance_prompt", PROMPT,
        "--output_dir", str(out),
        "--resolution", "32",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip
    return dreambooth_main(argv)


def assert_same_files(a: Path, b: Path) -> None:
    sa, sb = load_file(a), load_file(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def fails_with(run, *fragments: str) -> None:
    with pytest.raises(SystemExit) as info:
        run()
    message = str(info.value)
    assert info.value.code == 2 and ": error: " in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --------------------------------------------------------------------------- buckets


def brute_force_nearest(size: tuple[int, int], buckets: tuple[tuple[int, int], ...]):
    """Nearest aspect ratio, compared as |ln(w_b h) - ln(w h_b)|; ties to the larger area."""
    w, h = size
    scores = [(abs(math.log(bw * h) - math.log(w * bh)), -bw * bh, (bw, bh)) for bw, bh in buckets]
    return min(scores)[2]


def test_buckets_follow_kohyas_rule():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512 < max(w * (h + 64), (w + 64) * h)  # one side is maximal
        assert (h, w) in buckets


def test_bucket_defaults_and_bounds():
    def resolve(*argv: str) -> tuple[argparse.Namespace, BucketSet]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--resolution", type=int)
        add_bucket_args(parser)
        args = parser.parse_args(list(argv))
        return args, check_bucket_args(args)

    args, buckets = resolve("--resolution", "512", "--enable_bucket")  # kohya's flag name
    assert (args.bucket_reso_steps, args.min_bucket_reso, args.max_bucket_reso) == (64, 256, 1024)
    assert buckets.sizes == make_buckets(512, 256, 1024, 64)
    args, _ = resolve("--resolution", "64", "--aspect_ratio_buckets")
    assert (args.bucket_reso_steps, args.min_bucket_reso, args.max_bucket_reso) == (8, 32, 128)
    assert resolve("--resolution", "64")[1].sizes == ((64, 64),)


def test_every_image_lands_in_its_nearest_bucket_and_batches_hold_one_shape(tmp_path: Path):
    subject = write_subject(tmp_path / "subject")
    images = sorted(subject.iterdir())
    buckets = BucketSet(make_buckets(32, 16, 64, 8))
    ids = torch.zeros(len(images), 77, dtype=torch.long)
    dataset = DreamBoothDataset(images, ids, 32, False, True, buckets=buckets)
    assert sorted(instance for instance, _, _ in dataset.items) == list(range(len(SIZES)))
    for instance, _, bucket in dataset.items:
        assert bucket == brute_force_nearest(SIZES[int(images[instance].stem)], buckets.sizes)
    assert len(set(dataset.item_buckets)) >= 4

    sampler = BucketSampler(dataset.item_buckets, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, sampler=sampler, collate_fn=collate_dreambooth
    )
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            shapes = {tuple(p.shape) for p in batch["pixel_values"]}
            assert len(shapes) == 1 and batch["pixel_values"].shape[0] == 2
            (_, h, w), *_ = shapes
            assert batch["time_ids"][:, 4:].tolist() == [[h, w], [h, w]]
            seen.append((w, h))
        assert set(seen) == set(dataset.item_buckets)

    # Two processes: accelerate's shards never mix buckets and are equally long.
    batch_sampler = torch.utils.data.BatchSampler(sampler, 2, drop_last=False)
    shards = [list(BatchSamplerShard(batch_sampler, 2, rank)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1])
    for batch in shards[0] + shards[1]:
        assert len({dataset.item_buckets[i] for i, _ in batch}) == 1


def test_an_image_is_cropped_only_by_the_buckets_rounding():
    image = Image.new("RGB", (300, 200))
    for bucket in [(48, 32), (40, 32), (64, 32), (32, 48)]:
        size, (left, top, right, bottom), _ = crop_geometry(
            image, bucket, random.Random(0), center_crop=False, random_flip=False
        )
        assert (right - left, bottom - top) == bucket
        assert size[0] == bucket[0] or size[1] == bucket[1]  # one side is not cropped at all
        assert size[0] >= bucket[0] and size[1] >= bucket[1]


def test_class_images_follow_the_instance_buckets(tmp_path: Path):
    buckets = BucketSet(((16, 48), (32, 32), (48, 16)))
    quota = class_bucket_quota([(48, 16), (48, 16), (32, 32)], num_class_images=4)
    assert quota == {(32, 32): 1, (48, 16): 3}
    assert class_bucket_quota([(48, 16), (32, 32)], num_class_images=1) == {
        (32, 32): 1,
        (48, 16): 1,
    }
    folder = write_subject(tmp_path / "class", sizes=[(32, 32), (30, 30), (16, 48), (50, 15)])
    selected, missing = select_class_images(sorted(folder.iterdir()), buckets, quota)
    assert [p.name for p in selected] == ["0.png", "3.png"]  # (32, 32) quota 1; one of (48, 16)
    assert missing == {(48, 16): 2}


# --------------------------------------------------------------------------- losses


def sd15_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_min_snr_weights_equal_the_formula():
    scheduler = sd15_scheduler()
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    expected_snr = abar[timesteps] / (1 - abar[timesteps])
    values = snr(scheduler, timesteps)
    # The scheduler keeps abar in fp32: 1 - abar near t = 0 carries a relative error ~1e-4.
    np.testing.assert_allclose(values.numpy(), expected_snr, rtol=1e-4)
    gamma = 5.0
    eps = np.minimum(expected_snr, gamma) / expected_snr
    vel = np.minimum(expected_snr, gamma) / (expected_snr + 1)
    np.testing.assert_allclose(min_snr_weights(values, gamma, "epsilon"), eps, rtol=1e-4)
    np.testing.assert_allclose(min_snr_weights(values, gamma, "v_prediction"), vel, rtol=1e-4)
    assert min_snr_weights(torch.tensor([0.0]), gamma, "epsilon").item() == 1.0  # no 0/0

    prediction, target = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    per_example = ((prediction - target) ** 2).mean(dim=(1, 2, 3)).numpy()
    loss = diffusion_loss(prediction, target, timesteps, scheduler, snr_gamma=gamma)
    assert loss.item() == pytest.approx(float(np.mean(per_example * eps)), rel=1e-5)
    plain = diffusion_loss(prediction, target, timesteps, scheduler)
    assert plain.item() == pytest.approx(float(np.mean(per_example)), rel=1e-5)


def test_debiased_weights_equal_kohyas_formula():
    scheduler = sd15_scheduler()
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    values = snr(scheduler, timesteps)
    clipped = np.minimum(values.numpy().astype(np.float64), 1000.0)  # t = 0: SNR ~ 1e3
    np.testing.assert_allclose(debiased_weights(values, "epsilon"), 1 / np.sqrt(clipped), 1e-6)
    np.testing.assert_allclose(debiased_weights(values, "v_prediction"), 1 / (clipped + 1), 1e-6)
    with pytest.raises(ValueError, match="got 'sample'"):
        debiased_weights(values, "sample")

    prediction, target = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    per_example = ((prediction - target) ** 2).mean(dim=(1, 2, 3)).numpy()
    loss = diffusion_loss(prediction, target, timesteps, scheduler, debiased=True)
    assert loss.item() == pytest.approx(float(np.mean(per_example / np.sqrt(clipped))), rel=1e-5)
    both = diffusion_loss(prediction, target, timesteps, scheduler, snr_gamma=5.0, debiased=True)
    min_snr = np.minimum(clipped, 5.0) / values.numpy()
    expected = np.mean(per_example * min_snr / np.sqrt(clipped))
    assert both.item() == pytest.approx(float(expected), rel=1e-5)


def test_timesteps_are_drawn_from_the_chosen_range(tiny_pipeline: StableDiffusionPipeline):
    scheduler = sd15_scheduler()
    pixels = torch.rand(64, 3, 16, 16) * 2 - 1
    _, timesteps, _ = noisy_latents(
        pixels, tiny_pipeline.vae, scheduler, torch.Generator().manual_seed(5),
        timestep_range=(700, 1000),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(5)  # the same draws, in the documented order
    with torch.no_grad():
        latents = tiny_pipeline.vae.encode(pixels).latent_dist.sample(generator=generator)
    torch.randn(latents.shape, generator=generator)
    assert torch.equal(timesteps, torch.randint(700, 1000, (64,), generator=generator))
    assert timesteps.min() >= 700 and timesteps.max() < 1000

    assert timestep_upper_bound(scheduler, 700, None) == 1000
    assert timestep_upper_bound(scheduler, 0, 300) == 300
    with pytest.raises(SystemExit, match="leave the base's 1000-step schedule"):
        timestep_upper_bound(scheduler, 0, 2000)
    with pytest.raises(SystemExit, match="choose 0 <= min < max <= 1000"):
        timestep_upper_bound(scheduler, 1000, None)


def test_v_prediction_targets_and_noise_offset(tiny_pipeline: StableDiffusionPipeline):
    vae = tiny_pipeline.vae
    scheduler = sd15_scheduler()
    assert set_prediction_type(scheduler, None) == "epsilon"
    assert set_prediction_type(scheduler, "v_prediction") == "v_prediction"
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    noisy, timesteps, target = noisy_latents(
        pixels, vae, scheduler, torch.Generator().manual_seed(3), noise_offset=0.1
    )

    generator = torch.Generator().manual_seed(3)  # the same draws, in the documented order
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator=generator)
    latents = latents * vae.config.scaling_factor  # (2, 4, 2, 2)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, 1000, (2,), generator=generator)
    noise = noise + 0.1 * torch.randn(2, 4, 1, 1, generator=generator)
    assert torch.equal(timesteps, t)
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, t), rtol=0, atol=0)
    abar = scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    torch.testing.assert_close(target, abar.sqrt() * noise - (1 - abar).sqrt() * latents)
    torch.testing.assert_close(noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise)

    scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(SystemExit, match="predicts 'sample'; pass --prediction_type"):
        set_prediction_type(scheduler, None)


def test_a_fully_masked_image_gives_zero_gradient():
    torch.manual_seed(0)
    unet = tiny_unet(16)
    unet.requires_grad_(False)
    inject_hra(unet, HRAConfig(r=2, target_modules=UNET_ATTENTION_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # leave the identity so that every adapter gets a gradient
        p.data.add_(0.1 * torch.randn_like(p))
    scheduler = sd15_scheduler()
    noisy, target = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    timesteps, text = torch.tensor([500]), torch.randn(1, 77, 16)

    def gradients(mask: torch.Tensor, target: torch.Tensor = target) -> list[torch.Tensor]:
        prediction = unet(noisy, timesteps, text).sample
        loss = diffusion_loss(prediction, target, timesteps, scheduler, 5.0, mask)
        return torch.autograd.grad(loss, params)

    masked = gradients(torch.zeros(1, 1, 64, 64))  # pixel-sized mask, area-resized to 8 x 8
    assert all(torch.equal(g, torch.zeros_like(g)) for g in masked)
    unmasked = gradients(torch.ones(1, 1, 64, 64))
    assert all(g.abs().sum() > 0 for g in unmasked)

    left = torch.zeros(1, 1, 64, 64)
    left[..., :32] = 1.0
    other = target.clone()
    other[..., 4:] = 7.0  # change the target only where the mask is zero
    for a, b in zip(gradients(left), gradients(left, other), strict=True):
        torch.testing.assert_close(a, b)


def test_alpha_and_folder_masks_follow_the_crop(tmp_path: Path):
    subject = write_subject(tmp_path / "subject", sizes=[(40, 20)], alpha=True)
    [image] = sorted(subject.iterdir())
    ids = torch.zeros(1, 77, dtype=torch.long)
    dataset = DreamBoothDataset(
        [image], ids, 16, True, False, buckets=BucketSet(((24, 8), (16, 16))), masks=[image],
        alpha_mask=True,
    )  # fmt: skip
    example = dataset[(0, 0)]
    mask = example["instance_mask"]  # (1, 8, 24): centre crop of the 24 x 12 resize
    assert mask.shape == (1, 8, 24) and example["instance_pixels"].shape == (3, 8, 24)
    assert example["instance_time_ids"].tolist() == [20, 40, 2, 0, 8, 24]
    assert mask[..., :11].min() == 1.0 and mask[..., 13:].max() == 0.0

    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (40, 20), 255).save(masks / "0.png")
    dataset = DreamBoothDataset([image], ids, 16, True, False, masks=[masks / "0.png"])
    assert dataset[(0, 0)]["instance_mask"].min() == 1.0


# --------------------------------------------------------------------------- EMA


def test_ema_after_k_steps_equals_the_closed_form(tmp_path: Path):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    decay, values = 0.9, [torch.tensor([1.0, -2.0])]
    ema = EMA({"p": p}, decay)
    for k in range(1, 6):
        with torch.no_grad():
            p.copy_(torch.tensor([float(k * k), 3.0 - k]))
        values.append(p.detach().clone())
        ema.update()
    k = len(values) - 1
    closed = decay**k * values[0].double() + sum(
        (1 - decay) * decay ** (k - i) * values[i].double() for i in range(1, k + 1)
    )
    torch.testing.assert_close(ema.shadow["p"].double(), closed, rtol=1e-6, atol=1e-6)

    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow["p"])
    assert torch.equal(p.detach(), values[-1])
    ema.save(tmp_path / "ema.safetensors")
    again = EMA({"p": p}, decay)
    again.load(tmp_path / "ema.safetensors")
    assert torch.equal(again.shadow["p"], ema.shadow["p"])


# --------------------------------------------------------------------------- optimizers


def initial_adapters(model_dir: Path) -> dict[str, torch.Tensor]:
    """The HRA weights the script starts from (seed 0), keyed as in its weights file."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    set_seed(0)
    inject_hra(pipe.unet, HRAConfig(r=8, target_modules=UNET_ATTENTION_TARGETS))
    return {f"unet.{k}": v for k, v in hra_state_dict(pipe.unet).items()}


@pytest.mark.parametrize(
    ("optimizer", "package", "extra"),
    [
        ("adamw", None, []),
        ("adamw_8bit", "bitsandbytes", []),
        ("prodigy", "prodigyopt", ["--learning_rate", "1.0"]),
        ("adafactor", None, ["--learning_rate", "1e-3"]),
    ],
)
def test_each_optimizer_trains_and_resumes_exactly(
    model_dir: Path, tmp_path: Path, optimizer: str, package: str | None, extra: list[str]
):
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install {package})")
    subject = write_subject(tmp_path / "subject", sizes=SIZES[:2])
    run = ("--optimizer", optimizer, *extra, "--checkpointing_steps", "2")
    straight = tmp_path / "straight"
    dreambooth(model_dir, subject, straight, *run, "--max_train_steps", "4")
    resumed = tmp_path / "resumed"
    resume = ("--resume_from_checkpoint", str(straight / "checkpoint-2"))
    summary = dreambooth(model_dir, subject, resumed, *run, *resume, "--max_train_steps", "4")
    assert summary["global_step"] == 4
    assert_same_files(straight / "hra_weights.safetensors", resumed / "hra_weights.safetensors")

    initial = initial_adapters(model_dir)
    after_two = load_file(straight / "checkpoint-2" / "hra_weights.safetensors")
    assert any(not torch.equal(initial[k], after_two[k]) for k in initial)  # 2 steps trained
    assert f"- optimizer: `{optimizer}`" in (straight / "README.md").read_text()


def test_adamw_8bit_keeps_8_bit_state_and_follows_adamw():
    """bitsandbytes keeps 32-bit state for tensors under 4096 entries (the tiny UNet's HRA
    weights, 16 x 8, in the test above); a 64 x 128 weight gets 8-bit state. Three steps
    land within 0.73 % (of the update's norm) of torch's AdamW, not on it."""
    pytest.importorskip("bitsandbytes")
    from hra_diffusion.train.setup import make_optimizer

    g = torch.Generator().manual_seed(0)
    start = torch.randn(64, 128, generator=g)
    grads = [torch.randn(64, 128, generator=g) for _ in range(3)]
    adam = {"learning_rate": 1e-2, "adam_beta1": 0.9, "adam_beta2": 0.999}
    adam.update(adam_weight_decay=1e-2, adam_epsilon=1e-8)
    results = {}
    for optimizer in ("adamw_8bit", "adamw"):
        param = torch.nn.Parameter(start.clone())
        opt = make_optimizer([param], argparse.Namespace(optimizer=optimizer, **adam))
        for grad in grads:
            param.grad = grad.clone()
            opt.step()
        results[optimizer] = param.detach()
        states = {k: v.dtype for k, v in opt.state[param].items() if torch.is_tensor(v)}
        if optimizer == "adamw_8bit":
            assert states["state1"] == states["state2"] == torch.uint8, states
    gap = results["adamw_8bit"] - results["adamw"]
    assert 0 < gap.norm() < 0.02 * (results["adamw"] - start).norm()


# --------------------------------------------------------------------------- all together


def test_every_feature_together_resumes_bit_for_bit(model_dir: Path, tmp_path: Path):
    subject = write_subject(tmp_path / "subject", alpha=True)
    class_dir = tmp_path / "class"
    run = (
        "--aspect_ratio_buckets", "--train_batch_size", "2",
        "--masked_loss", "--alpha_mask",
        "--with_prior_preservation", "--class_prompt", "a photo of toy",
        "--class_data_dir", str(class_dir), "--num_class_images", "6",
        "--prediction_type", "v_prediction", "--snr_gamma", "5", "--noise_offset", "0.1",
        "--debiased_estimation_loss", "--min_timestep", "100", "--max_timestep", "900",
        "--use_ema", "--ema_decay", "0.5", "--learning_rate", "1e-2",
        "--random_flip", "--checkpointing_steps", "2",
        "--validation_prompt", PROMPT, "--validation_steps", "100",
        "--num_validation_images", "1", "--num_validation_inference_steps", "2",
    )  # fmt: skip
    straight = tmp_path / "straight"
    dreambooth(model_dir, subject, straight, *run, "--max_train_steps", "4")
    resumed = tmp_path / "resumed"
    resume = ("--resume_from_checkpoint", str(straight / "checkpoint-2"))
    dreambooth(model_dir, subject, resumed, *run, *resume, "--max_train_steps", "4")

    for name in ("hra_weights.safetensors", "hra_weights_ema.safetensors"):
        assert_same_files(straight / name, resumed / name)
    state = Path("checkpoint-4") / "ema_state.safetensors"
    assert_same_files(straight / state, resumed / state)
    weights = load_file(straight / "hra_weights.safetensors")
    ema_weights = load_file(straight / "hra_weights_ema.safetensors")
    assert any(not torch.equal(weights[k], ema_weights[k]) for k in weights)

    # Class images were generated at the instance images' bucket sizes.
    sizes = {Image.open(p).size for p in class_dir.glob("*.png")}
    buckets = make_buckets(32, 16, 64, 8)
    assert sizes == {brute_force_nearest(s, buckets) for s in SIZES}

    # The validation image is drawn with the EMA weights (and the v-prediction scheduler):
    # it matches their image to a grey level and is far from the final weights' image and
    # from the base model's.
    def draw(weights: Path | None) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, prediction_type="v_prediction"
        )
        pipe.set_progress_bar_config(disable=True)
        if weights is not None:
            load_hra_weights(pipe, weights)
        image = pipe(
            PROMPT, height=32, width=32, num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
        ).images[0]  # fmt: skip
        return np.asarray(image, np.int16)

    grid = np.asarray(Image.open(straight / "validation_grid.png"), np.int16)
    saved = grid[:32]  # the image, above the caption band with its prompt
    ema_image = draw(straight / "hra_weights_ema.safetensors")
    final_image, base_image = draw(straight / "hra_weights.safetensors"), draw(None)
    print("validation image vs EMA, final, base:", [
        int(np.abs(saved - other).max()) for other in (ema_image, final_image, base_image)
    ])  # fmt: skip
    assert np.abs(saved - ema_image).max() <= 1
    assert np.abs(saved - final_image).max() >= 20
    assert np.abs(saved - base_image).max() >= 20

    card = (straight / "README.md").read_text()
    for line in [
        "- prediction type: `v_prediction`",
        "- loss weighting: min-SNR, gamma 5 and debiased estimation; noise offset 0.1",
        "- timesteps: 100 <= t < 900",
        "- EMA of the trained weights, decay 0.5",
        "- aspect-ratio buckets: sides 16-64 px in steps of 8",
        "- masked loss: alpha channel",
        'pipe.scheduler.register_to_config(prediction_type="v_prediction")',
        "- `hra_weights_ema.safetensors`: EMA of the HRA weights",
    ]:
        assert line in card, line


def test_control_runs_are_seeded_and_resume_bit_for_bit_with_every_feature(
    tiny_model_dir: Path, tmp_path: Path
):
    """One 4-step control run with every training feature (and random flips and dropped
    prompts), resumed from its step-2 checkpoint by path into another folder, and as "latest"
    in the folder of a fresh 2-step run (whose first steps show the run is seeded before
    anything is built): all three give the same weights and EMA bit for bit, and these moved
    after the checkpoint."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (w, h) in enumerate(SIZES):
        photo = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(photo).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": f"picture {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    run = [
        "--pretrained_model_name_or_path", str(tiny_model_dir),
        "--train_data_dir", str(root), "--condition_type", "canny",
        "--resolution", "32", "--condition_encoder_channels", "4", "8", "8", "16",
        "--aspect_ratio_buckets", "--train_batch_size", "2",
        "--random_flip", "--proportion_empty_prompts", "0.5",
        "--optimizer", "adafactor", "--learning_rate", "1e-3",
        "--prediction_type", "v_prediction", "--snr_gamma", "5", "--noise_offset", "0.05",
        "--debiased_estimation_loss", "--min_timestep", "700",
        "--use_ema", "--ema_decay", "0.5",
        "--checkpointing_steps", "2", "--report_to", "none",
    ]  # fmt: skip
    ema_file = "hra_control_weights_ema.safetensors"

    def train(name: str, steps: int, *argv: str) -> tuple[Path, Path]:
        out = str(tmp_path / name)
        weights = train_control_hra.main(
            [*run, "--output_dir", out, "--max_train_steps", str(steps), *argv]
        )
        return weights, weights.with_name(ema_file)

    straight = train("straight", 4)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    resumed = train("resumed", 4, "--resume_from_checkpoint", str(checkpoint))
    train("latest", 2)
    two_plus_two = train("latest", 4, "--resume_from_checkpoint", "latest")
    for other in (resumed, two_plus_two):
        for a, b in zip(straight, other, strict=True):
            assert_same_files(a, b)
    for final, at_two in zip(straight, (checkpoint / p.name for p in straight), strict=True):
        final, at_two = load_file(final), load_file(at_two)
        assert any(not torch.equal(final[k], at_two[k]) for k in final), final.keys()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    load_control_weights(pipe.unet, straight[1])
    loaded, saved = control_state_dict(pipe.unet), load_file(straight[1])
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    features = (tmp_path / "straight" / "training_args.md").read_text()
    assert "- optimizer: `adafactor`" in features and "aspect-ratio buckets" in features
    assert "- loss weighting: min-SNR, gamma 5 and debiased estimation" in features
    assert "- timesteps: 700 <= t < 1000" in features


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--aspect_ratio_buckets", "--min_bucket_reso", "64"], ["no bucket", "--min_bucket_reso"]),
        (["--aspect_ratio_buckets", "--min_bucket_reso", "20"], ["not a multiple", "16 or 24"]),
        (["--aspect_ratio_buckets", "--bucket_reso_steps", "12"], ["multiple of 8", "8 or 16"]),
        (["--optimizer", "sgd"], ["--optimizer sgd is unknown", "adamw, adamw_8bit"]),
        (["--optimizer", "adafactor", "--use_8bit_adam"], ["--use_8bit_adam means"]),
        (["--snr_gamma", "0"], ["--min_snr_gamma: must be a number > 0"]),
        (["--noise_offset", "-1"], ["--noise_offset: must be a number >= 0"]),
        (["--min_timestep", "-1"], ["--min_timestep: must be an integer >= 0"]),
        (["--min_timestep", "500", "--max_timestep", "500"], ["must be greater than"]),
        (["--use_ema", "--ema_decay", "1"], ["--ema_decay: must lie strictly between 0 and 1"]),
        (["--masked_loss"], ["--masked_loss needs one mask source"]),
        (["--alpha_mask"], ["--alpha_mask chooses the masks of --masked_loss"]),
        (["--masked_loss", "--mask_data_dir", "MASKS"], ["has no mask for 1 image(s): 1.png"]),
        (["--masked_loss", "--mask_data_dir", "WRONG"], ["is 8x8 but its image 0.png is 48x24"]),
        (["--masked_loss", "--alpha_mask"], ["1.png is fully transparent"]),
    ],
)
def test_bad_input_is_refused_before_any_model_loads(
    tmp_path: Path, extra: list[str], fragments: list[str]
):
    subject = write_subject(tmp_path / "subject", sizes=SIZES[:2], alpha=True)
    Image.new("RGBA", (24, 48), (0, 0, 0, 0)).save(subject / "1.png")  # fully transparent
    masks, wrong = tmp_path / "masks", tmp_path / "wrong"
    masks.mkdir()
    wrong.mkdir()
    Image.new("L", (48, 24), 255).save(masks / "0.png")
    Image.new("L", (8, 8), 255).save(wrong / "0.png")
    Image.new("L", (24, 48), 255).save(wrong / "1.png")
    extra = [{"MASKS": str(masks), "WRONG": str(wrong)}.get(a, a) for a in extra]
    out = tmp_path / "out"
    hollow_model = tmp_path / "no-model"  # would fail to load: the check must come first
    hollow_model.mkdir()
    (hollow_model / "model_index.json").write_text("{}")
    fails_with(lambda: dreambooth(hollow_model, subject, out, *extra), *fragments)
    assert not out.exists()


def test_a_missing_optimizer_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    installed = arg_checks.is_installed
    without_prodigy = lambda name: name != "prodigyopt" and installed(name)  # noqa: E731
    monkeypatch.setattr(arg_checks, "is_installed", without_prodigy)
    subject = write_subject(tmp_path / "subject", sizes=SIZES[:1])
    hollow_model = tmp_path / "none"  # would fail to load: the check must come first
    hollow_model.mkdir()
    (hollow_model / "model_index.json").write_text("{}")
    run = lambda: dreambooth(hollow_model, subject, tmp_path / "out", "--optimizer", "prodigy")  # noqa: E731
    fails_with(run, "--optimizer prodigy needs prodigyopt: pip install prodigyopt")


def test_prodigy_warns_about_a_small_learning_rate(model_dir: Path, tmp_path: Path):
    if importlib.util.find_spec("prodigyopt") is None:
        pytest.skip("prodigyopt is not installed")
    subject = write_subject(tmp_path / "subject", sizes=SIZES[:1])
    with pytest.warns(UserWarning, match="Prodigy estimates the step size itself"):
        dreambooth(
            model_dir, subject, tmp_path / "out", "--optimizer", "prodigy", "--max_train_steps", "1"
        )


def test_kohya_flag_names_are_accepted(tmp_path: Path):
    from hra_diffusion.train.train_dreambooth_hra import build_parser

    argv = ["--instance_data_dir", str(tmp_path), "--instance_prompt", "p"]  # an existing folder
    argv += ["--optimizer_type", "Adafactor"]
    argv += ["--min_snr_gamma", "5", "--v_parameterization", "--enable_bucket"]
    args = build_parser().parse_args(argv)
    arg_checks.check_common_args(args)
    assert args.optimizer == "adafactor" and args.snr_gamma == 5.0
    assert args.prediction_type == "v_prediction" and args.aspect_ratio_buckets


def test_control_sources_read_jpeg_sizes_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """JPEG only: for a PNG, Pillow's ``getexif`` (read for the EXIF rotation) decodes the
    whole image to reach chunks after the pixel data."""
    import datasets
    from PIL import ImageFile

    from hra_diffusion.train.control_data import load_control_source

    files = []
    for i, size in enumerate(SIZES[:3]):
        files.append(str(tmp_path / f"{i}.jpg"))
        Image.new("RGB", size).save(files[-1])
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = {"image": files, "text": ["a", "b", "c"]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "saved"))
    source = load_control_source(str(tmp_path / "saved"), "auto", "canny", "image", "", "text")

    def no_decoding(image: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded {image!r}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # PIL decodes in load()
    assert source.sizes() == SIZES[:3]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "prodigy", "adafactor"])
def test_hra_magnitudes_get_no_weight_decay(optimizer: str):
    """Decay would pull a magnitude (ones at init) and the layer's output towards 0: the
    magnitudes sit in a group without decay, so with no gradient an AdamW step leaves them
    at 1 while the reflections' vectors shrink."""
    from hra_diffusion.injection import hra_magnitudes
    from hra_diffusion.train.setup import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    inject_hra(model, HRAConfig(r=2, target_modules=("0",), magnitude=True))
    (m,) = hra_magnitudes(model)
    u = model[0].hra_u
    options = {"learning_rate": 0.5, "adam_beta1": 0.9, "adam_beta2": 0.999}
    options.update(adam_weight_decay=0.5, adam_epsilon=1e-8, prodigy_beta3=None)
    options.update(prodigy_decouple=True, prodigy_use_bias_correction=False)
    options.update(prodigy_safeguard_warmup=False)
    opt = make_optimizer([u, m], argparse.Namespace(optimizer=optimizer, **options), [m])
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert (decay[id(u)], decay[id(m)]) == (0.5, 0.0)
    if optimizer == "adamw":
        before = u.detach().clone()
        u.grad, m.grad = torch.zeros_like(u), torch.zeros_like(m)
        opt.step()
        assert torch.equal(m.detach(), torch.ones(6))
        assert u.detach().norm() < before.norm()
