"""Time diffusers and wanserve on the same tiny job, one after the other, and print the ratio.

    python models/compare_speed.py [--wanserve target/release/wanserve] [--steps 20] [--frames 24]
                                   [--config models/attention_11k.json --denoise-only]

The job is the README's: 832x480, 24 frames (25 generated), 20 steps, guidance 5, seed 1, on the
bundled tiny model (rebuilt in diffusers format by make_tiny.py, which is deterministic). Both use
every core. wanserve's time is the whole process (start, model load, mp4 encoding); diffusers' is
only the pipeline call (model already loaded, no video encoding), so the ratio favours diffusers.

`--config` builds another random model with make_tiny.py and exports it for wanserve (no step-cache
ratios, no export checks). `--denoise-only` times the denoising alone on both sides: diffusers'
pipeline call with the prompt already encoded and latents as output, wanserve's `denoise_s` from
its `generated` log line (from the first step to the last: noise, scheduler, guidance and every
transformer call).
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import torch
from diffusers import WanPipeline

HERE = pathlib.Path(__file__).resolve().parent
PROMPT = "A beautiful sunset over the mountains"


def wanserve_denoise_seconds(stderr: str) -> float:
    """`denoise_s` of wanserve's `generated` log line (RUST_LOG=wanserve=info)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", stderr)
    found = re.search(r"generated .*?denoise_s=([\d.]+)", plain)
    if not found:
        sys.exit(f"no `generated` log line with denoise_s in wanserve's output:\n{plain[-2000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wanserve", type=pathlib.Path, default=HERE.parent / "target" / "release" / "wanserve")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--runs", type=int, default=2, help="best of N for each side")
    parser.add_argument("--config", type=pathlib.Path, default=None,
                        help="a make_tiny.py config other than the bundled model's (exported for wanserve here)")
    parser.add_argument("--denoise-only", action="store_true",
                        help="time the denoising alone on both sides (no text encoding, decoding or process start)")
    args = parser.parse_args()
    if not args.wanserve.is_file():
        sys.exit(f"{args.wanserve} not found: cargo build --release -p wanserve")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "tiny"
        make = [sys.executable, str(HERE / "make_tiny.py"), str(src)]
        model_dir = []
        if args.config:
            make += ["--config", str(args.config)]
        subprocess.run(make, check=True, capture_output=True)
        if args.config:
            exported = pathlib.Path(tmp) / "exported"
            subprocess.run([sys.executable, str(HERE / "export.py"), str(src), str(exported), "--no-check",
                            "--cache-ratios", "none"], check=True, capture_output=True)
            model_dir = ["--model-dir", str(exported)]
        pipe = WanPipeline.from_pretrained(src, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        generated = (args.frames - 1 + 3) // 4 * 4 + 1
        call = {"prompt": PROMPT}
        if args.denoise_only:
            with torch.no_grad():
                positive, negative = pipe.encode_prompt(PROMPT, "", do_classifier_free_guidance=True,
                                                        max_sequence_length=512)
            call = {"prompt_embeds": positive, "negative_prompt_embeds": negative}
        diffusers_times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            with torch.no_grad():
                pipe(**call, height=480, width=832, num_frames=generated, num_inference_steps=args.steps,
                     guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
                     output_type="latent" if args.denoise_only else "np")
            diffusers_times.append(time.perf_counter() - start)
        wanserve_times = []
        env = dict(os.environ, RUST_LOG="wanserve=info")
        for _ in range(args.runs):
            start = time.perf_counter()
            done = subprocess.run([str(args.wanserve), "generate", "--prompt", PROMPT, "--image-size", "832x480",
                                   "--num-frames", str(args.frames), "--infer-steps", str(args.steps),
                                   "--guidance-scale", "5", "--seed", "1", *model_dir,
                                   "--output", str(pathlib.Path(tmp) / "out.mp4")],
                                  check=True, capture_output=True, text=True, env=env)
            elapsed = time.perf_counter() - start
            wanserve_times.append(wanserve_denoise_seconds(done.stderr + done.stdout) if args.denoise_only
                                  else elapsed)
    d, w = min(diffusers_times), min(wanserve_times)
    what = ("denoising only", "denoising only") if args.denoise_only else ("pipeline call only", "whole process")
    print(f"job: 832x480, {args.frames} frames, {args.steps} steps, guidance 5, {threads} threads"
          f"{f', model {args.config.name}' if args.config else ''}")
    print(f"diffusers ({what[0]}): {d:.2f} s   (runs: {', '.join(f'{t:.2f}' for t in diffusers_times)})")
    print(f"wanserve  ({what[1]}): {w:.2f} s   (runs: {', '.join(f'{t:.2f}' for t in wanserve_times)})")
    print(f"ratio wanserve / diffusers: {w / d:.2f}")


if __name__ == "__main__":
    main()
