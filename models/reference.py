"""Reference outputs of diffusers' WanPipeline on the tiny model, for wanserve's parity tests.

    python models/reference.py SRC_DIR OUT_DIR

SRC_DIR is the diffusers-format tiny model (make_tiny.py) that models/tiny was exported from.
For each case OUT_DIR/<case>/ gets:
  case.json          the request as wanserve receives it, the 4k+1 frame count diffusers ran,
                     the token ids of the cleaned prompt(s), and which frames were kept
  noise.npy          initial latents, torch.randn(shape, generator=Generator().manual_seed(seed))
  prompt_embeds.npy  text-encoder output after zeroing past the prompt (diffusers' _get_t5_prompt_embeds)
  latents.npy        final latents before de-normalisation
  frames.npy         uint8 [N, H, W, 3]: round(255 * frame) of output_type="np"
The step-cached cases' case.json also hold the cache mode, the ratios given to diffusers'
MagCacheConfig and, per guidance branch, which DiT passes diffusers' MagCache skipped.
and OUT_DIR/scheduler.json holds UniPC timesteps, sigmas and toy trajectories for several configs.
"""

import argparse
import json
import math
import pathlib

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline
from diffusers.hooks.mag_cache import MagCacheConfig
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

import magcache

LONG = ("A slow cinematic drone shot over a coastal town at golden hour, waves rolling in, "
        "seagulls circling, warm light on white houses, people walking along the harbour, ") * 20

# name, prompt, negative prompt (None: diffusers' default), (width, height), frames asked,
# steps, guidance, seed, kept frame indices (None: all)
CASES = [
    ("en_landscape", "A beautiful sunset over the mountains", None, (128, 64), 9, 4, 5.0, 0, None),
    ("cjk_portrait_rounded", "一只可爱的小猫在花园里玩耍，阳光明媚", None, (64, 128), 6, 6, 3.5, 42, None),
    ("emoji_no_guidance", "🌅 sunrise over the ocean 🌊 with seagulls 🐦", None, (96, 96), 13, 5, 1.0, 7, None),
    ("negative_prompt", "A cat playing the piano in a cozy living room", "Low quality, blurry, distorted, watermark",
     (160, 96), 10, 8, 7.5, 2147483647, None),
    ("long_prompt_truncated", LONG, None, (64, 64), 5, 3, 5.0, 123, None),
    ("html_whitespace_one_frame", "  Fish &amp;amp; chips\n\t on a   &lt;plate&gt;  ", None, (96, 64), 1, 4, 2.0, 5, None),
    ("twenty_steps", "Waves crashing on a rocky shore at dawn, slow motion", None, (64, 96), 17, 20, 5.0, 99, None),
    ("api_size_832x480", "A beautiful sunset over the mountains", None, (832, 480), 24, 20, 5.0, 1, [0, 1, 12, 23]),
]

# wanserve's step-cache modes as diffusers' MagCacheConfig (threshold, max_skip_steps, retention_ratio);
# host/src/pipeline/step_cache.rs holds the same numbers.
CACHE_MODES = {"fast": (0.12, 2, 0.2), "faster": (0.12, 4, 0.2)}

# Cases run with diffusers' MagCache on, ratios from the tiny model's manifest (its conditional
# branch's: a MagCacheConfig takes one array, which diffusers applies to both branches).
# name, prompt, negative, size, frames, steps, guidance, seed, kept frames, cache mode
CACHE_CASES = [
    ("magcache_fast", "A beautiful sunset over the mountains", None, (128, 64), 9, 30, 5.0, 3, None, "fast"),
    ("magcache_faster_unguided", "Two dogs running through a field of sunflowers", None, (96, 64), 5, 25, 1.0, 11,
     None, "faster"),
]

SCHEDULER_CONFIGS = [
    {"solver_order": 2, "solver_type": "bh2", "flow_shift": 3.0, "steps": 10},
    {"solver_order": 2, "solver_type": "bh2", "flow_shift": 3.0, "steps": 50},
    {"solver_order": 1, "solver_type": "bh2", "flow_shift": 5.0, "steps": 7},
    {"solver_order": 3, "solver_type": "bh1", "flow_shift": 3.0, "steps": 12, "final_sigmas_type": "sigma_min"},
    {"solver_order": 3, "solver_type": "bh2", "flow_shift": 2.0, "steps": 9},
    {"solver_order": 2, "solver_type": "bh1", "flow_shift": 1.0, "steps": 5, "final_sigmas_type": "sigma_min"},
    {"solver_order": 2, "solver_type": "bh2", "flow_shift": 3.0, "steps": 6, "disable_corrector": [0, 2]},
]


def next_4k1(n: int) -> int:
    return 1 if n <= 1 else math.ceil((n - 1) / 4) * 4 + 1


def run_case(pipe, out_dir, name, prompt, negative, size, frames, steps, guidance, seed, keep, cache=None,
             ratios=None):
    width, height = size
    ran_frames = next_4k1(frames)
    shape = (1, pipe.transformer.config.in_channels, (ran_frames - 1) // pipe.vae_scale_factor_temporal + 1,
             height // pipe.vae_scale_factor_spatial, width // pipe.vae_scale_factor_spatial)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    final = {}

    def capture(_pipe, i, _t, kwargs):
        if i == steps - 1:
            final["latents"] = kwargs["latents"].clone()
        return {}

    skipped = None
    # Recording from before the hooks exist: diffusers binds each hook's forward when it registers it.
    with magcache.recording_plan() as skipped_by_branch:
        if cache is not None:
            threshold, k, retention = CACHE_MODES[cache]
            pipe.transformer.enable_cache(MagCacheConfig(threshold=threshold, max_skip_steps=k,
                                                         retention_ratio=retention, num_inference_steps=steps,
                                                         mag_ratios=np.array(ratios)))
        try:
            out = pipe(prompt=prompt, negative_prompt=negative, height=height, width=width, num_frames=ran_frames,
                       num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(), output_type="np",
                       callback_on_step_end=capture, callback_on_step_end_tensor_inputs=["latents"])
        finally:
            if cache is not None:
                pipe.transformer.disable_cache()
    if cache is not None:
        skipped = {"cond": skipped_by_branch["cond"], "uncond": skipped_by_branch.get("uncond", [])}
    video = out.frames[0][:frames]
    frames_u8 = np.round(np.clip(video, 0.0, 1.0) * 255.0).astype(np.uint8)
    kept = list(range(frames)) if keep is None else keep
    embeds = pipe._get_t5_prompt_embeds(prompt=prompt, max_sequence_length=512)

    def ids(text):
        enc = pipe.tokenizer(prompt_clean(text), padding="max_length", max_length=512, truncation=True,
                             add_special_tokens=True, return_attention_mask=True)
        return [i for i, m in zip(enc["input_ids"], enc["attention_mask"]) if m]

    case_dir = out_dir / name
    case_dir.mkdir(parents=True, exist_ok=True)
    np.save(case_dir / "noise.npy", noise.numpy())
    np.save(case_dir / "prompt_embeds.npy", embeds.float().numpy())
    np.save(case_dir / "latents.npy", final["latents"].float().numpy())
    np.save(case_dir / "frames.npy", frames_u8[kept])
    case = {"prompt": prompt, "negative_prompt": negative or "", "width": width, "height": height,
            "num_frames": frames, "reference_frames": ran_frames, "infer_steps": steps, "guidance_scale": guidance,
            "seed": seed, "kept_frames": kept, "prompt_ids": ids(prompt),
            "negative_prompt_ids": ids(negative or "") if guidance > 1.0 else None}
    if cache is not None:
        case.update({"cache": cache, "mag_ratios": list(map(float, ratios)), "skipped": skipped})
    (case_dir / "case.json").write_text(json.dumps(case, indent=1, ensure_ascii=False) + "\n")
    print(f"{name}: {len(case['prompt_ids'])} tokens, latents {tuple(shape)}, frames {frames_u8.shape}")


def scheduler_references():
    out = []
    for config in SCHEDULER_CONFIGS:
        steps = config["steps"]
        extra = {k: v for k, v in config.items() if k != "steps"}
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, predict_x0=True, lower_order_final=True,
                                            **{"final_sigmas_type": "zero", **extra})
        scheduler.set_timesteps(steps)
        sample = torch.sin(torch.arange(16, dtype=torch.float32)).reshape(1, 16)
        trajectory = []
        for i, t in enumerate(scheduler.timesteps):
            # A deterministic stand-in for the model, reproduced in the Rust test.
            model_output = 0.5 * torch.cos(sample + 0.3 * i) + 0.05 * i
            sample = scheduler.step(model_output, t, sample, return_dict=False)[0]
            trajectory.append(sample.flatten().tolist())
        out.append({"config": {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                               "use_flow_sigmas": True, "num_train_timesteps": 1000, "predict_x0": True,
                               "lower_order_final": True, "final_sigmas_type": "zero", **extra},
                    "steps": steps, "timesteps": scheduler.timesteps.tolist(), "sigmas": scheduler.sigmas.tolist(),
                    "trajectory": trajectory})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=pathlib.Path)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--only", nargs="*", default=None, help="case names to (re)generate")
    parser.add_argument("--model", type=pathlib.Path, default=pathlib.Path(__file__).parent / "tiny",
                        help="the wanserve export of SRC_DIR, whose manifest's step-cache ratios the cached cases use")
    parser.add_argument("--prefix", default="",
                        help="prepended to each case's directory name (another model's cases beside the tiny one's)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = WanPipeline.from_pretrained(args.src, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, *case in CASES:
        if args.only is None or name in args.only:
            with torch.no_grad():
                run_case(pipe, args.out, args.prefix + name, *case)
    manifest = json.loads((args.model / "wanserve-model.json").read_text())
    ratios = manifest["step_cache"]["ratios"]["cond"]
    for name, *case in CACHE_CASES:
        if args.only is None or name in args.only:
            with torch.no_grad():
                run_case(pipe, args.out, args.prefix + name, *case, ratios=ratios)
    if not args.prefix:
        (args.out / "scheduler.json").write_text(json.dumps(scheduler_references()) + "\n")


if __name__ == "__main__":
    main()
