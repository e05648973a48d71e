"""Make a wanserve model directory a few-step distilled one: its manifest gets a `sampler`.

    python models/few_step.py MODEL_DIR [--out OUT_DIR] [--preset fastwan|lightx2v]
                              [--timesteps 1000,757,522] [--shift 8]

A distilled checkpoint keeps the base architecture and changes how it samples (the DMD loop of
host/src/pipeline/few_step.rs: fixed timesteps, each step's x0 noised again to the next, no
guidance). `export.py --sampler ...` writes the same section when it exports the checkpoint;
this script adds it to an export made without it, in place or into a copy (--out). A few-step
model has no step cache: the section is removed, as are the step-cached graph's settings.

Presets (the published settings of each family):
  fastwan   FastVideo's FastWan2.1-T2V-1.3B: timesteps 1000, 757, 522; training-noise shift 8
  lightx2v  LightX2V's step-distilled Wan2.1 (4 steps): timesteps 1000, 750, 500, 250; shift 5
Only the standard library: no torch needed.
"""

import argparse
import json
import pathlib
import shutil

PRESETS = {
    "fastwan": {"timesteps": [1000, 757, 522], "shift": 8.0,
                "source": "FastVideo FastWan2.1-T2V-1.3B (dmd_denoising_steps, training-noise shift 8)"},
    "lightx2v": {"timesteps": [1000, 750, 500, 250], "shift": 5.0,
                 "source": "LightX2V step-distilled Wan2.1 (4 steps, shift 5)"},
}


def sampler_section(preset=None, timesteps=None, shift=None):
    """The manifest's `sampler`: a preset's, with explicit timesteps or shift overriding it."""
    base = dict(PRESETS[preset]) if preset else {"source": "custom"}
    if timesteps is not None:
        base["timesteps"] = [int(t) for t in timesteps]
    if shift is not None:
        base["shift"] = float(shift)
    if "timesteps" not in base or "shift" not in base:
        raise SystemExit("give --preset, or both --timesteps and --shift")
    steps = base["timesteps"]
    if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[-1] < 1 or steps[0] > 1000:
        raise SystemExit(f"timesteps must decrease strictly within 1..1000: {steps}")
    return {"kind": "dmd", **base}


def apply(manifest, section):
    manifest["sampler"] = section
    manifest.pop("step_cache", None)
    return manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="a copy to write (default: in place)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--timesteps", default=None, help="comma-separated, decreasing")
    parser.add_argument("--shift", type=float, default=None)
    args = parser.parse_args()
    section = sampler_section(args.preset, args.timesteps.split(",") if args.timesteps else None, args.shift)
    target = args.model_dir
    if args.out is not None:
        shutil.copytree(args.model_dir, args.out, dirs_exist_ok=True)
        target = args.out
    path = target / "wanserve-model.json"
    manifest = apply(json.loads(path.read_text()), section)
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"{target}: sampler {section['kind']} at {section['timesteps']}, shift {section['shift']}")


if __name__ == "__main__":
    main()
