"""Broad procedural pictures and the VAE round-trip metrics (hra_diffusion.world.broad)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark
from diffusers import AutoencoderKL
from PIL import Image

from hra_diffusion import world
from hra_diffusion.train import pretrain_world
from hra_diffusion.world import broad
from hra_diffusion.world.tiny_sd import (
    latent_signal_to_noise,
    narrow_vae_latents,
    normalize_vae_latents,
    sampled_latent_statistics,
    widen_vae_latents,
    world_unet,
    world_vae,
)


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    a = [np.asarray(broad.render_broad(np.random.default_rng(5))) for _ in range(2)]
    b = np.asarray(broad.render_broad(np.random.default_rng(6)))
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
    assert np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b)
    held_out = broad.evaluation_set(3)
    assert all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(held_out, broad.evaluation_set(3), strict=True)
    )


def test_shapes_span_every_scale_and_small_ones_are_drawn() -> None:
    rng = np.random.default_rng(0)
    radii = [broad.sample_shape(rng).radius for _ in range(2000)]
    low, high = broad.RADIUS_RANGE
    assert low <= min(radii) < 2.5 and 28 < max(radii) <= high
    assert np.mean(np.array(radii) < 6) > 0.3  # log-uniform: many small shapes
    tiny = broad.Shape("ellipse", 32, 32, 2.0, 1.0, 0.0, 0.3)
    area = broad.shape_coverage(tiny).sum() / broad.K**2  # pixels of a 64 px picture
    assert area == pytest.approx(math.pi * 4, rel=0.15)  # PIL fills the outline too: +1/8 px


def test_colours_are_not_the_worlds() -> None:
    pixels = np.concatenate([np.asarray(im).reshape(-1, 3) for im in broad.evaluation_set(16)])
    palette = {tuple(c) for c in world.COLORS.values()}
    distinct = {tuple(p) for p in pixels}
    assert len(distinct) > 2000
    assert len(distinct & palette) <= 1


def test_probe_holds_three_colours_outside_the_world() -> None:
    pixels = np.asarray(broad.probe())
    for name, (x, y) in {"background": (2, 2), "disc": (32, 16), "square": (32, 32)}.items():
        assert tuple(pixels[y, x]) == broad.PROBE_COLORS[name]
    palette = np.array(list(world.COLORS.values()), dtype=float)
    for rgb in broad.PROBE_COLORS.values():
        assert np.linalg.norm(palette - np.array(rgb), axis=1).min() > 60


def test_histogram_known_good_and_known_bad() -> None:
    pictures = broad.evaluation_set(2)
    assert broad.histogram_l1(pictures[0], pictures[0]) == 0.0
    assert broad.histogram_l1(pictures[0], pictures[1]) > 1.0
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    blue = Image.new("RGB", (64, 64), (0, 0, 255))
    assert broad.histogram_l1(red, blue) == pytest.approx(2.0)
    assert broad.color_histogram(pictures[0]).sum() == pytest.approx(1.0)


def test_soft_histogram_is_robust_where_hard_bins_flip() -> None:
    a = Image.new("RGB", (64, 64), (127, 40, 200))
    b = Image.new("RGB", (64, 64), (128, 40, 200))  # one level on red, across a hard bin edge
    spacing = 255 / (broad.LEVELS - 1)
    assert broad.histogram_l1(a, b) == pytest.approx(2 / spacing)
    assert broad.histogram_l1(a, b, soft=False) == pytest.approx(2.0)


def test_psnr_matches_a_hand_computed_value() -> None:
    a = np.zeros((64, 64, 3), np.uint8)
    b = a.copy()
    b[:32] = 51  # half the pixels off by 51 levels = 0.4 in [-1, 1]: MSE = 0.08
    assert broad.psnr(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(
        10 * math.log10(4 / 0.08)
    )
    assert broad.psnr([Image.fromarray(a)] * 2, [Image.fromarray(a), Image.fromarray(b)]) == (
        pytest.approx(10 * math.log10(4 / 0.04))
    )
    assert broad.psnr(Image.fromarray(a), Image.fromarray(a)) == math.inf
    with pytest.raises(ValueError, match="equal"):
        broad.psnr([Image.fromarray(a)], [])


def test_vae_batch_keeps_the_old_draws_without_broad_pictures() -> None:
    rng = np.random.default_rng(1)
    old = [  # the recipe of the bundled VAE, before --vae_broad_share
        world.render_canvas(rng)
        if rng.random() < 0.5
        else world.render_scene(world.sample_scene(rng, "train"))
        for _ in range(6)
    ]
    new = pretrain_world.vae_batch(np.random.default_rng(1), 6, 0.5)
    assert new.shape == (6, 3, 64, 64)
    assert np.array_equal(np.stack([world.image_to_array(im) for im in old]), new.numpy())
    batch = pretrain_world.vae_batch(np.random.default_rng(1), 2, 0.0, broad_share=0.999)
    first = world.image_to_array(broad.render_broad(_after_one_draw(1)))
    assert np.array_equal(batch[0].numpy(), first)


def _after_one_draw(seed: int) -> np.random.Generator:
    rng = np.random.default_rng(seed)
    rng.random()
    return rng


def test_pretrain_refuses_shares_above_one_and_bad_channels(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        pretrain_world.main(
            ["--output_dir", str(tmp_path / "m"), "--stage", "vae", "--vae_broad_share", "0.6"]
        )
    with pytest.raises(SystemExit):
        pretrain_world.build_parser().parse_args(["--output_dir", "x", "--vae_channels", "16,30"])


def test_widened_vae_latents_draw_the_same_pictures() -> None:
    torch.manual_seed(0)
    vae = world_vae().eval()
    wide = widen_vae_latents(vae, 8).eval()
    assert wide.config.latent_channels == 8
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1  # (B, 3, 64, 64)
    with torch.no_grad():
        narrow, widened = vae.encode(pixels).latent_dist, wide.encode(pixels).latent_dist
        # equal up to rounding (measured up to 1e-5 on one thread): a conv with more channels
        # may block its sums differently; a decoder that read the new channels differs by ~0.1
        assert torch.allclose(widened.mean[:, :4], narrow.mean, atol=1e-4)
        assert torch.allclose(widened.logvar[:, :4], narrow.logvar, atol=1e-4)
        assert widened.mean[:, 4:].abs().max() > 0  # the new channels carry features
        latents = widened.mean.clone()  # (B, 8, 16, 16)
        picture = wide.decode(latents).sample
        assert torch.allclose(picture, vae.decode(narrow.mean).sample, atol=1e-4)
        latents[:, 4:] = torch.randn_like(latents[:, 4:])  # unused until trained
        assert torch.allclose(wide.decode(latents).sample, picture, atol=1e-4)
    with pytest.raises(ValueError, match="adds channels: 4 -> 4"):
        widen_vae_latents(vae, 4)


def test_normalized_vae_latents_are_unit_per_channel_and_draw_the_same_pictures() -> None:
    torch.manual_seed(0)
    vae = world_vae().eval()
    with torch.no_grad():  # channels of unequal spread, as a trained VAE has
        vae.quant_conv.weight[:4] *= torch.tensor([3.0, 0.5, 1.0, 0.1]).view(-1, 1, 1, 1)
        vae.quant_conv.bias[:4] += torch.tensor([1.0, -2.0, 0.0, 0.5])
        vae.quant_conv.bias[4:] -= 4.0  # log-variance: posterior std ~0.1, not the prior's 1
    pixels = torch.rand(8, 3, 64, 64) * 2 - 1  # (B, 3, 64, 64)
    shift, scale = sampled_latent_statistics(vae, pixels, torch.Generator().manual_seed(0))
    assert scale.max() / scale.min() > 3
    unit = normalize_vae_latents(vae, shift, scale).eval()
    assert unit.config.scaling_factor == 1.0
    with torch.no_grad():
        before, after = vae.encode(pixels).latent_dist, unit.encode(pixels).latent_dist
        assert torch.allclose(
            after.mean, (before.mean - shift.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1), atol=1e-4
        )
        assert torch.allclose(after.std * scale.view(1, -1, 1, 1), before.std, rtol=1e-4)
        sampled = after.sample(generator=torch.Generator().manual_seed(0))  # (B, 4, 16, 16)
        assert torch.allclose(sampled.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
        assert torch.allclose(sampled.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
        picture = vae.decode(before.mean).sample
        assert torch.allclose(unit.decode(after.mean).sample, picture, atol=1e-4)
        assert not torch.allclose(vae.decode(after.mean).sample, picture, atol=1e-2)
    with pytest.raises(ValueError, match="shape \\(4,\\), scale > 0"):
        normalize_vae_latents(vae, shift, -scale)


def test_pretraining_normalises_a_given_vae_without_training_it(tmp_path: Path) -> None:
    world_vae().save_pretrained(tmp_path / "vae4")
    out = tmp_path / "m"
    args = ["--output_dir", str(out), "--stage", "vae", "--vae_steps", "0"]
    with pytest.raises(SystemExit, match="pass --vae_init DIR too"):
        pretrain_world.main(args)
    pretrain_world.main([*args, "--vae_init", str(tmp_path / "vae4"), "--vae_eval_count", "8"])
    record = json.loads((tmp_path / "m.work" / "pretraining" / "vae.json").read_text())
    assert record["steps"] == 0 and record["scaling_factor"] == 1.0
    unit = AutoencoderKL.from_pretrained(tmp_path / "m.work" / "vae")
    given = AutoencoderKL.from_pretrained(tmp_path / "vae4")
    assert torch.equal(unit.encoder.conv_in.weight, given.encoder.conv_in.weight)
    shift, scale = (torch.tensor(record[k]) for k in ("latent_shift", "latent_scale"))
    normalized = normalize_vae_latents(given, shift, scale)
    assert torch.allclose(unit.quant_conv.bias, normalized.quant_conv.bias, atol=1e-4)


def test_pretraining_widens_an_initial_vae_and_narrows_it_back(tmp_path: Path) -> None:
    world_vae().save_pretrained(tmp_path / "vae4")
    out = tmp_path / "m"
    args = ["--output_dir", str(out), "--stage", "vae", "--vae_init", str(tmp_path / "vae4")]
    pretrain_world.main([*args, "--vae_latent_channels", "8", "--vae_steps", "1",
                         "--vae_batch_size", "1", "--vae_eval_count", "8"])  # fmt: skip
    saved = AutoencoderKL.from_pretrained(out.with_name("m.work") / "vae")
    assert saved.config.latent_channels == 8
    assert world_unet(saved.config.latent_channels).config.in_channels == 8
    narrow = tmp_path / "n"
    pretrain_world.main(["--output_dir", str(narrow), "--stage", "vae", "--vae_steps", "0",
                         "--vae_init", str(out.with_name("m.work") / "vae"),
                         "--vae_latent_channels", "4", "--vae_eval_count", "8"])  # fmt: skip
    assert AutoencoderKL.from_pretrained(tmp_path / "n.work" / "vae").config.latent_channels == 4


def test_narrowed_vae_keeps_the_informative_latents_and_draws_nearly_the_same_pictures() -> None:
    torch.manual_seed(0)
    vae = world_vae().eval()
    with torch.no_grad():  # channels 1 and 3 stay at the prior: log-variance 0, tiny means
        vae.quant_conv.bias[4:] = torch.tensor([-8.0, 0.0, -8.0, 0.0])
        vae.quant_conv.weight[[1, 3]] *= 0.01
    pixels = torch.rand(8, 3, 64, 64) * 2 - 1  # (B, 3, 64, 64)
    ratio = latent_signal_to_noise(vae, pixels)  # (4,)
    assert ratio[[0, 2]].min() > 5 > 0.1 > ratio[[1, 3]].max()
    with torch.no_grad():
        before = vae.encode(pixels).latent_dist
        fill = before.mean.mean(dim=(0, 2, 3))  # (4,)
        narrow = narrow_vae_latents(vae, [0, 2], fill).eval()
        after = narrow.encode(pixels).latent_dist
        assert narrow.config.latent_channels == 2
        assert torch.allclose(after.mean, before.mean[:, [0, 2]], atol=1e-4)
        assert torch.allclose(after.logvar, before.logvar[:, [0, 2]], atol=1e-4)
        filled = before.mean.clone()  # (B, 4, 16, 16)
        filled[:, [1, 3]] = fill[[1, 3]].view(1, 2, 1, 1)
        reference = vae.decode(filled).sample
        assert not torch.allclose(narrow.decode(after.mean).sample, reference, atol=1e-2)
        vae.post_quant_conv.bias.zero_()  # no constant through the dropped channels: exact
        fill[[1, 3]] = 0.0
        filled[:, [1, 3]] = 0.0
        narrow = narrow_vae_latents(vae, [0, 2], fill).eval()
        drawn = narrow.decode(after.mean).sample
        assert torch.allclose(drawn, vae.decode(filled).sample, atol=1e-4)
    with pytest.raises(ValueError, match="distinct channels of 0..3"):
        narrow_vae_latents(vae, [0, 0], fill)


def test_round_trip_benchmark_scores_a_vae_and_checks_its_instruments(tmp_path: Path) -> None:
    world_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "vae.json"
    load_benchmark("vae_round_trip").main(
        ["--vae", str(tmp_path / "vae"), "--out", str(out), "--broad_count", "4",
         "--world_count", "4", "--grid", str(tmp_path / "grid.png"),
         "--baseline_vae", str(tmp_path / "vae")]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["sets"]["broad"]["count"] == 4 and report["sets"]["subjects"]["count"] == 40
    check = report["instrument_check"]
    assert check["hist_l1_identical_mean"] == 0.0
    assert check["hist_l1_one_level_shift_mean"] <= 0.16 < 1.0 < check["hist_l1_other_picture_mean"]
    assert report["sets"]["world"]["psnr_db"] < 20  # an untrained VAE draws noise
    assert Image.open(tmp_path / "grid.png").size[0] > 0
