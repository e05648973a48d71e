"""Reference latents of a few-step distilled (DMD) job, for wanserve's few-step parity test.

    python models/reference_dmd.py MODEL_DIR EMBEDS_CASE OUT_DIR [--seed S] [--size WxH] [--frames N]

MODEL_DIR is a wanserve model directory whose manifest has a `sampler` (models/few_step.py
writes one). The loop is FastVideo's `DmdDenoisingStage.forward`
(https://github.com/hao-ai-lab/FastVideo, fastvideo/pipelines/stages/denoising.py; SGLang
carries a copy as sglang/multimodal_gen/runtime/pipelines_core/stages/denoising_dmd.py), step
for step, with its helpers as FastVideo writes them:

- `pred_noise_to_pred_video` (fastvideo/models/utils.py): in float64, sigma_t is
  `scheduler.sigmas[argmin |scheduler.timesteps - t|]`, and `x0 = x_t - sigma_t * pred`;
- the scheduler's `add_noise`: `(1 - sigma) * x0 + sigma * noise`, sigma looked up the same way;
- the scheduler is `FlowMatchEulerDiscreteScheduler(shift=...)` as constructed: "DMD needs the
  complete training-noise table, separate from the inference scheduler mutated by
  TimestepPreparationStage" (fastvideo/pipelines/basic/wan/wan_dmd_pipeline.py, which builds
  the stage with its own `FlowMatchEulerDiscreteScheduler(shift=DMD_TRAINING_NOISE_SHIFT)`, as
  SGLang's copy does); diffusers' class builds the same table as FastVideo's fork;
- the DMD pipeline prepares latents with `LatentPreparationStage(use_btchw_layout=True)`: the
  initial latents are `randn_tensor` of the (batch, frames, channels, height, width) shape with
  a CPU generator seeded with the job's seed, and each fresh noise is `torch.randn` of that
  shape from the same generator;
- the DiT runs once per timestep on the conditional prompt (no guidance).

The DiT is MODEL_DIR's own transformer.onnx run by onnxruntime: the weights wanserve runs, whose
parity with diffusers' WanTransformer3DModel tests/parity.rs checks; the text embeddings are
the ones diffusers computed for EMBEDS_CASE (models/references/<case>/prompt_embeds.npy). So
what this checks is the sampler. OUT_DIR gets case.json (the request), noise.npy (the initial
latents), sigmas.json (the sigma of each timestep) and latents.npy (the final latents).
"""

import argparse
import json
import pathlib

import numpy as np
import onnxruntime as ort
import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def sigma_for_prediction(scheduler, t):
    # pred_noise_to_pred_video: the lookup in float64.
    timesteps = scheduler.timesteps.double()
    index = torch.argmin((timesteps - float(t)).abs())
    return scheduler.sigmas.double()[index]


def sigma_for_noise(scheduler, t):
    # The scheduler's add_noise: float32 table against the long timestep.
    index = torch.argmin((scheduler.timesteps - torch.tensor(t, dtype=torch.long)).abs())
    return scheduler.sigmas[index]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("embeds_case", type=pathlib.Path)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--size", default="128x64")
    parser.add_argument("--frames", type=int, default=9)
    args = parser.parse_args()

    manifest = json.loads((args.model_dir / "wanserve-model.json").read_text())
    sampler = manifest["sampler"]
    timesteps = [int(t) for t in sampler["timesteps"]]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=float(sampler["shift"]))

    width, height = (int(v) for v in args.size.split("x"))
    vae = manifest["vae"]
    ts, ss = vae["scale_factor_temporal"], vae["scale_factor_spatial"]
    frames = (args.frames - 1 + ts - 1) // ts * ts + 1
    shape = (1, vae["z_dim"], (frames - 1) // ts + 1, height // ss, width // ss)

    embeds_case = json.loads((args.embeds_case / "case.json").read_text())
    prompt_embeds = np.load(args.embeds_case / "prompt_embeds.npy").astype(np.float32)

    session = ort.InferenceSession(
        str(args.model_dir / manifest["transformer"]["file"]), providers=["CPUExecutionProvider"])
    outputs = [session.get_outputs()[0].name]

    def dit(latents_bcthw, t):
        (prediction,) = session.run(outputs, {
            "hidden_states": latents_bcthw.numpy().astype(np.float32),
            "timestep": np.array([t], dtype=np.int64),
            "encoder_hidden_states": prompt_embeds,
        })
        return torch.from_numpy(prediction)

    generator = torch.Generator().manual_seed(args.seed)
    # FastVideo's DMD pipeline: latents as (B, T, C, H, W) throughout.
    b, c, f, h, w = shape
    raw_shape = (b, f, c, h, w)
    latents = torch.randn(raw_shape, generator=generator, dtype=torch.float32)
    noise = latents.permute(0, 2, 1, 3, 4).contiguous()
    sigmas = []
    for i, t in enumerate(timesteps):
        noise_latents = latents.clone()
        pred_noise = dit(latents.permute(0, 2, 1, 3, 4), t).permute(0, 2, 1, 3, 4)
        sigma_t = sigma_for_prediction(scheduler, t)
        sigmas.append(float(sigma_t))
        pred_video = (noise_latents.double() - sigma_t * pred_noise.double()).float()
        if i < len(timesteps) - 1:
            fresh = torch.randn(raw_shape, generator=generator, dtype=torch.float32)
            sigma_next = sigma_for_noise(scheduler, timesteps[i + 1])
            latents = ((1 - sigma_next) * pred_video + sigma_next * fresh).type_as(pred_video)
        else:
            latents = pred_video
    final = latents.permute(0, 2, 1, 3, 4).contiguous()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    case = {
        "prompt": embeds_case["prompt"], "width": width, "height": height,
        "num_frames": args.frames, "infer_steps": len(timesteps), "seed": args.seed,
        "timesteps": timesteps, "shift": sampler["shift"], "embeds_case": args.embeds_case.name,
    }
    (args.out_dir / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    (args.out_dir / "sigmas.json").write_text(json.dumps(sigmas) + "\n")
    np.save(args.out_dir / "noise.npy", noise.numpy())
    np.save(args.out_dir / "latents.npy", final.numpy())
    print(f"{args.out_dir}: latents {tuple(final.shape)}, sigmas {sigmas}")


if __name__ == "__main__":
    main()
