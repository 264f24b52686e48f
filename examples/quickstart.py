"""The core library in 40 lines: inject HRA, train a few steps, merge, unload.

Runs on the bundled default model (a tiny SD pipeline with random weights, built
offline on first use), so it shows the API working, not image quality.

    python examples/quickstart.py
"""

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from hra_diffusion import (
    HRAConfig,
    hra_parameters,
    inject_hra,
    merge_hra,
    orthogonality_loss,
    unload_hra,
)
from hra_diffusion.world.tiny_sd import default_model_path

pipe = StableDiffusionPipeline.from_pretrained(default_model_path())
unet = pipe.unet
cfg = HRAConfig(r=8, lambda_orth=1e-3)
names = inject_hra(unet, cfg)
params = hra_parameters(unet)
print(f"adapted {len(names)} layers, {sum(p.numel() for p in params):,} trainable parameters")

torch.manual_seed(0)
latents = torch.randn(2, 4, 8, 8)
text = torch.randn(2, 77, unet.config.cross_attention_dim)
target = torch.randn(2, 4, 8, 8)
optimizer = torch.optim.AdamW(params, lr=1e-2)
for step in range(10):
    loss = F.mse_loss(unet(latents, 500, text).sample, target)
    loss = loss + cfg.lambda_orth * orthogonality_loss(unet)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

with torch.no_grad():
    adapted = unet(latents, 500, text).sample
    merge_hra(unet)  # W ← W H: inference now costs what the base costs
    merged = unet(latents, 500, text).sample
print(f"merged vs unmerged max difference: {(merged - adapted).abs().max():.2e}")
unload_hra(unet, merge=True)  # a plain diffusers UNet that computes W H
