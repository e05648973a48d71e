"""Time diffusers and wanserve on the same tiny job, one after the other, and print the ratio.

    python models/compare_speed.py [--wanserve target/release/wanserve] [--steps 20] [--frames 24]

The job is the README's: 832x480, 24 frames (25 generated), 20 steps, guidance 5, seed 1, on the
bundled tiny model (rebuilt in diffusers format by make_tiny.py, which is deterministic). Both use
every core. wanserve's time is the whole process (start, model load, mp4 encoding); diffusers' is
only the pipeline call (model already loaded, no video encoding), so the ratio favours diffusers.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import torch
from diffusers import WanPipeline

HERE = pathlib.Path(__file__).resolve().parent
PROMPT = "A beautiful sunset over the mountains"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wanserve", type=pathlib.Path, default=HERE.parent / "target" / "release" / "wanserve")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--runs", type=int, default=2, help="best of N for each side")
    args = parser.parse_args()
    if not args.wanserve.is_file():
        sys.exit(f"{args.wanserve} not found: cargo build --release -p wanserve")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "tiny"
        subprocess.run([sys.executable, str(HERE / "make_tiny.py"), str(src)], check=True, capture_output=True)
        pipe = WanPipeline.from_pretrained(src, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        generated = (args.frames - 1 + 3) // 4 * 4 + 1
        diffusers_times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            with torch.no_grad():
                pipe(PROMPT, height=480, width=832, num_frames=generated, num_inference_steps=args.steps,
                     guidance_scale=5.0, generator=torch.Generator().manual_seed(1), output_type="np")
            diffusers_times.append(time.perf_counter() - start)
        wanserve_times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([str(args.wanserve), "generate", "--prompt", PROMPT, "--image-size", "832x480",
                            "--num-frames", str(args.frames), "--infer-steps", str(args.steps), "--guidance-scale",
                            "5", "--seed", "1", "--output", str(pathlib.Path(tmp) / "out.mp4")],
                           check=True, capture_output=True)
            wanserve_times.append(time.perf_counter() - start)
    d, w = min(diffusers_times), min(wanserve_times)
    print(f"job: 832x480, {args.frames} frames, {args.steps} steps, guidance 5, {threads} threads")
    print(f"diffusers (pipeline call only): {d:.2f} s   (runs: {', '.join(f'{t:.2f}' for t in diffusers_times)})")
    print(f"wanserve  (whole process):      {w:.2f} s   (runs: {', '.join(f'{t:.2f}' for t in wanserve_times)})")
    print(f"ratio wanserve / diffusers: {w / d:.2f}")


if __name__ == "__main__":
    main()
