"""MagCache (step caching) helpers over diffusers' own implementation (hooks/mag_cache.py).

Used by export.py (a checkpoint's magnitude ratios for the manifest) and reference.py (the
steps diffusers skips, per guidance branch, for wanserve's parity test).

The ratios of Wan2.1-T2V-1.3B are MagCache's published ones (MagCache4Wan2.1/magcache_generate.py
in the MagCache repository, calibrated there with SDPA at 832x480, 50 UniPC steps); they are
interleaved per step as (conditional, unconditional) and split here. Other checkpoints are
calibrated with diffusers' `MagCacheConfig(calibrate=True)`: per branch, the mean over tokens of
‖residual‖ / ‖previous step's residual‖, 1.0 for the first step.
"""

import contextlib

import torch
from diffusers.hooks import mag_cache
from diffusers.hooks.mag_cache import MagCacheConfig

_PUBLISHED_1_3B = [1.0] * 2 + [
    1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634, 0.99685, 0.99567, 0.99586,
    0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511, 0.99506, 0.99535, 0.99531, 0.99552, 0.99549,
    0.99541, 0.99539, 0.9954, 0.99536, 0.99489, 0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481, 0.99479,
    0.99415, 0.99413, 0.99419, 0.99416, 0.99396, 0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309, 0.99304,
    0.9927, 0.9927, 0.99228, 0.99226, 0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005, 0.99003,
    0.98944, 0.98942, 0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836, 0.98359,
    0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741, 0.97411, 0.97003, 0.97002, 0.96538, 0.96541,
    0.9593, 0.95933, 0.95086, 0.95089, 0.94013, 0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821, 0.86868,
    0.81838, 0.81939,
]
PUBLISHED_1_3B = {"cond": _PUBLISHED_1_3B[0::2], "uncond": _PUBLISHED_1_3B[1::2]}

# The architecture the published ratios belong to (Wan2.1-T2V-1.3B's transformer config).
ARCH_1_3B = {"num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128}


def is_1_3b(config) -> bool:
    return all(getattr(config, k) == v for k, v in ARCH_1_3B.items())


@contextlib.contextmanager
def recording_calibration():
    """Inside: every calibration ratio diffusers computes, by cache context ("cond"/"uncond")."""
    ratios = {}
    original = mag_cache.MagCacheBlockHook._perform_calibration_step

    def record(self, state, residual):
        original(self, state, residual)
        ratios.setdefault(self.state_manager.context.name, []).append(state.calibration_ratios[-1])

    mag_cache.MagCacheBlockHook._perform_calibration_step = record
    try:
        yield ratios
    finally:
        mag_cache.MagCacheBlockHook._perform_calibration_step = original


@contextlib.contextmanager
def recording_plan():
    """Inside: for each cache context, whether each DiT pass skipped the blocks, in order."""
    skipped = {}
    original = mag_cache.MagCacheHeadHook.new_forward

    def record(self, module, *args, **kwargs):
        out = original(self, module, *args, **kwargs)
        state = self.state_manager.get_state()
        skipped.setdefault(self.state_manager.context.name, []).append(not state.should_compute)
        return out

    mag_cache.MagCacheHeadHook.new_forward = record
    try:
        yield skipped
    finally:
        mag_cache.MagCacheHeadHook.new_forward = original


def calibrate(pipe, *, steps=50, width=128, height=64, frames=9, guidance=5.0, seed=0,
              prompt="A beautiful sunset over the mountains, golden light on the snow"):
    """The pipeline's transformer's magnitude ratios per branch, by diffusers' calibration run."""
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with recording_calibration() as ratios, torch.no_grad():
            pipe(prompt=prompt, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                 guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="latent")
    finally:
        pipe.transformer.disable_cache()
    return {"cond": ratios["cond"], "uncond": ratios["uncond"]}
