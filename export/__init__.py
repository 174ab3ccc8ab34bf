"""ONNX export of a static plan: the exporter (torch), the manifest format, and the replay driver (no torch).

`dit_accel.export.exporter` writes an export folder; `dit_accel.export.driver` replays one with numpy and
onnxruntime only; `dit_accel.export.manifest` defines the folder's format for both. This file imports none of
them, so `import dit_accel.export.driver` works in an environment without torch.

Example:
    >>> from dit_accel.export.driver import OnnxPlanRunner, denoise
    >>> latents = denoise(OnnxPlanRunner("export/"), noise, cond_embeds, uncond_embeds, guidance_scale=5.0)
"""
