"""Every file format hra-diffusion reads or writes, one module each.

- :mod:`~hra_diffusion.formats.hra`: our own ``hra_weights.safetensors`` (and PEFT HRA
  folders on load), the control file, atomic writes;
- :mod:`~hra_diffusion.formats.lora`: the exact LoRA export (diffusers and kohya keys);
- :mod:`~hra_diffusion.formats.kohya_flux`: kohya's FLUX.1 names (BFL layout, fused q, k, v);
- :mod:`~hra_diffusion.formats.glora`: the GLoRA export that keeps HRA multiplicative on any
  base (A1111, Forge, ComfyUI);
- :mod:`~hra_diffusion.formats.peft`: a PEFT HRA adapter folder.
"""
