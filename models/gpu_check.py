"""Every GPU claim of the engine, checked in one run: what `scripts/gpu-check` runs.

    python models/gpu_check.py [--dry-run] [--wanserve PATH] [--work DIR] [--stages ...]

On a machine with an NVIDIA GPU (onnxruntime-gpu 1.31.1 installed or ORT_DYLIB_PATH set, torch
with CUDA, diffusers): builds Wan2.1-T2V-1.3B's real architecture with random weights
(models/real_size.json), exports it in bf16, checks every node has a CUDA kernel, then with
`wanserve --device cuda` at 832x480 / 81 frames:

  export      make_tiny.py + export.py --dtype bf16 + check_ops.py
  steps       a job of a few steps and a full 50-step job (`wanserve generate`): step time,
              end-to-end time, peak GPU memory, host<->device copies per step (from the debug
              log, the difference between the two jobs divided by the difference in steps:
              what happens inside the loop)
  concurrent  two 50-step jobs through one `wanserve serve --slots 2`, one after the other and
              then at once: total times and peak GPU memory of each
  memory      the short job again with `--cuda-memory exhaustive` (ONNX Runtime's defaults: every
              cuDNN algorithm tried, unbounded workspace, arenas grown in powers of two): memory
              and time against `steps`' short job (`lean`, the default)
  batch       the full job again with the other guidance mode (--batch-cfg: one batch-2 DiT call
              per step instead of two), to compare against `steps`
  torch       the same 50-step job in diffusers (bf16, same GPU), and one DiT forward in torch
              against ORT (models/gpu_step.py)
  cache       the 50-step job with `--cache fast`, and diffusers with its MagCacheConfig (same
              settings, the export's ratios): against `steps` and `torch`'s uncached jobs
  parity      a 10-step job (--parity-steps) with and without `--cache fast`: wanserve's bf16
              latents and diffusers bf16's against diffusers fp32's (relative error, and PSNR of
              the frames diffusers' fp32 VAE decodes from each): the bf16 noise floor as yardstick

`--dry-run` runs the same stages on the CPU with the bundled tiny configuration (fp32, 96x64,
9 frames, 3 and 6 steps; served jobs at the API's smallest, 832x480 / 24 frames / 20 steps), to
prove the script
on a machine without a GPU; its figures mean nothing for a GPU. Prints one summary at the end.
"""

import argparse
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "A beautiful sunset over the mountains, golden light on the snow"
API_KEY = "gpu-check-key-0123456789"


class GpuMemory:
    """Peak used GPU memory (nvidia-smi, every 100 ms) over a block, minus the level before it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.peak_mib = None

    @staticmethod
    def used_mib() -> int:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              "--id=0"], check=True, capture_output=True, text=True).stdout
        return int(out.strip().splitlines()[0])

    def __enter__(self):
        if self.enabled:
            self.before = self.used_mib()
            self.peak = self.before
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, self.used_mib())

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self.peak_mib = self.peak - self.before


def keep_log(args, name, text):
    """A job's log in the work dir, and its tail beside the summary (what a lent GPU hands back,
    even when the run is stopped later)."""
    (args.work / name).write_text(text)
    if args.summary:
        (args.summary.parent / name).write_text(text[-4_000_000:])


def run(cmd, **kwargs):
    print("+", " ".join(map(str, cmd)), flush=True)
    started = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], check=True, **kwargs)
    print(f"  ({time.perf_counter() - started:.1f} s)", flush=True)
    return done


def export(args, setup):
    src, model = args.work / "src", args.work / "model"
    run([sys.executable, HERE / "make_tiny.py", src, "--config", setup["config"]])
    # On a lent GPU every minute counts: the export's parity checks against diffusers (run on the
    # CPU, proven on the tiny model by the test suite and by --dry-run) are left out there.
    check = [] if setup["device"] == "cpu" else ["--no-check"]
    run([sys.executable, HERE / "export.py", src, model, "--dtype", setup["dtype"], *check])
    run([sys.executable, HERE / "check_ops.py", model])
    return {}


def generate(args, setup, steps, batch_cfg=None, cuda_memory="lean", cache="off", latents=None):
    """One `wanserve generate` job; its log parsed for timings and copies."""
    batch_cfg = args.batch_cfg if batch_cfg is None else batch_cfg
    env = dict(os.environ, RUST_LOG="wanserve=debug,ort=warn")
    name = (f"job-{steps}{'-batch-cfg' if batch_cfg else ''}{'' if cuda_memory == 'lean' else '-' + cuda_memory}"
            f"{'' if cache == 'off' else '-cache-' + cache}")
    out = args.work / f"{name}.mp4"
    cmd = [args.wanserve, "generate", "--model-dir", args.work / "model", "--device", setup["device"],
           "--prompt", PROMPT, "--image-size", setup["size"], "--num-frames", setup["frames"],
           "--infer-steps", steps, "--guidance-scale", 5, "--seed", 1, "--output", out,
           "--cuda-memory", cuda_memory, "--cache", cache]
    if batch_cfg:
        cmd.append("--batch-cfg")
    if latents is not None:
        cmd += ["--dump-latents", latents]
    with GpuMemory(setup["device"] == "cuda") as gpu:
        start = time.perf_counter()
        print("+", " ".join(map(str, cmd)), flush=True)
        proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    keep_log(args, f"{name}.log", log)
    if proc.returncode != 0:
        sys.exit(f"wanserve generate failed ({proc.returncode}):\n{log[-4000:]}")
    generated = re.search(r"generated text_s=([\d.]+) denoise_s=([\d.]+) decode_and_sink_s=([\d.]+) steps=(\d+)", log)
    if not generated:
        sys.exit(f"no timing line in the wanserve log:\n{log[-4000:]}")
    copies = [m.group(1) for m in re.finditer(r'host-device copy direction="?(\w+)"?', log)]
    # What each copy moved, so the summary alone shows that only scalars cross inside the loop.
    moved = {}
    for m in re.finditer(r'direction="?(\w+)"? what="?([^"=]+?)"? bytes=(\d+)', log):
        entry = moved.setdefault(f"{m.group(1)} {m.group(2).strip()}", {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += int(m.group(3))
    # ORT warns when it places nodes on the CPU EP (the CUDA EP leaves shape arithmetic there).
    placement = [line for line in log.splitlines() if "not assigned to the preferred execution providers" in line]
    skipped = re.search(r"skipped_passes=(\d+)", log)
    return {"steps": steps, "batch_cfg": batch_cfg, "cuda_memory": cuda_memory, "cache": cache,
            "skipped_passes": int(skipped.group(1)) if skipped else None,
            "end_to_end_s": seconds, "text_s": float(generated.group(1)),
            "denoise_s": float(generated.group(2)), "step_s": float(generated.group(2)) / steps,
            "decode_and_encode_s": float(generated.group(3)), "copies": len(copies),
            "copies_by_direction": {d: copies.count(d) for d in sorted(set(copies))},
            "copies_by_what": moved,
            "cpu_placement_warnings": placement[:8],
            "gpu_peak_mib": gpu.peak_mib}


def steps_stage(args, setup):
    few = generate(args, setup, setup["few_steps"])
    full = generate(args, setup, setup["full_steps"])
    extra = full["steps"] - few["steps"]
    per_step = (full["copies"] - few["copies"]) / extra
    # A step's cost without the first steps' one-time costs (kernel choice, arena growth): the
    # same measure as the torch stage's step time, which starts at the first step's end.
    marginal = (full["denoise_s"] - few["denoise_s"]) / extra
    return {"few": few, "full": full, "copies_per_step": per_step, "marginal_step_s": marginal}


def memory_stage(args, setup):
    """The short job with `--cuda-memory exhaustive` (ONNX Runtime's defaults), against the steps
    stage's short job (lean, the default): what bounding cuDNN's workspace and the arenas' growth
    saves in GPU memory and costs in time."""
    return {"few": generate(args, setup, setup["few_steps"], cuda_memory="exhaustive")}


def batch_stage(args, setup):
    """The full job again with the other guidance mode: CFG as one batch-2 call against two calls."""
    other = generate(args, setup, setup["full_steps"], batch_cfg=not args.batch_cfg)
    return {"job": other}


def request(url, body=None, key=API_KEY):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # the API's error body names the field and reason
        raise RuntimeError(f"{url}: HTTP {error.code}: {error.read()[:2000].decode(errors='replace')}") from None


def concurrent_stage(args, setup):
    data = args.work / "serve-data"
    env = dict(os.environ, WANSERVE_API_KEYS=API_KEY, RUST_LOG="wanserve=info,ort=warn")
    cmd = [args.wanserve, "serve", "--host", "127.0.0.1", "--port", 0, "--data-dir", data, "--model-dir",
           args.work / "model", "--device", setup["device"], "--slots", 2]
    if args.batch_cfg:
        cmd.append("--batch-cfg")
    print("+", " ".join(map(str, cmd)), flush=True)
    server_log = args.work / "serve.log"
    with open(server_log, "w") as log_file:
        server = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        url = None
        for line in server.stdout:
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        if url is None:
            sys.exit(f"wanserve serve did not start:\n{server_log.read_text()[-4000:]}")
        deadline = time.monotonic() + 900
        while True:  # /ready: model loaded and warmed up
            if server.poll() is not None:
                sys.exit(f"wanserve serve exited ({server.returncode}):\n{server_log.read_text()[-4000:]}")
            # A model that fails to load or warm up leaves the server up with /ready at 503.
            if "cannot load the model" in server_log.read_text() or time.monotonic() > deadline:
                sys.exit(f"wanserve serve did not become ready:\n{server_log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        job = {"model": "Wan2.1-T2V-1.3B", "prompt": PROMPT, "image_size": setup["served_size"],
               "num_frames": setup["served_frames"], "guidance_scale": 5.0, "infer_steps": setup["served_steps"]}

        def jobs(seeds):
            """Submits a job per seed at once and waits for all: seconds, statuses."""
            start = time.perf_counter()
            ids = [request(f"{url}/video/submit", dict(job, seed=seed))["requestId"] for seed in seeds]
            final = {}
            while len(final) < len(ids):
                for rid in ids:
                    status = request(f"{url}/video/status", {"requestId": rid})
                    if status["status"] in ("Succeed", "Failed", "Cancelled"):
                        final[rid] = status
                time.sleep(0.25)
            failed = [s for s in final.values() if s["status"] != "Succeed"]
            if failed:
                sys.exit(f"a job did not succeed: {failed}\n{server_log.read_text()[-4000:]}")
            return time.perf_counter() - start, list(final.values())

        with GpuMemory(setup["device"] == "cuda") as one_gpu:
            serial_s = sum(jobs([seed])[0] for seed in (1, 2))
        with GpuMemory(setup["device"] == "cuda") as two_gpu:
            together_s, statuses = jobs([1, 2])
        return {"jobs": 2, "size": setup["served_size"], "frames": setup["served_frames"],
                "steps": setup["served_steps"], "one_after_the_other_s": serial_s, "at_once_s": together_s,
                "at_once_vs_serial": together_s / serial_s,
                "inference_s": [s["results"]["timings"]["inference"] for s in statuses],
                "gpu_peak_mib_one_job": one_gpu.peak_mib, "gpu_peak_mib_two_jobs": two_gpu.peak_mib}
    finally:
        server.terminate()
        server.wait(timeout=60)
        keep_log(args, "serve.log", server_log.read_text())


# wanserve's cache modes as diffusers' MagCacheConfig (threshold, max_skip_steps, retention_ratio);
# host/src/pipeline/step_cache.rs and models/reference.py hold the same numbers.
CACHE_MODES = {"fast": (0.12, 2, 0.2), "faster": (0.12, 4, 0.2)}


def enable_mag_cache(args, pipe, cache, steps):
    """diffusers' own MagCache on `pipe` with `cache`'s settings and the export's ratios (the
    conditional branch's: a MagCacheConfig takes one array for both branches)."""
    import numpy as np
    from diffusers.hooks.mag_cache import MagCacheConfig

    threshold, k, retention = CACHE_MODES[cache]
    manifest = json.loads((args.work / "model" / "wanserve-model.json").read_text())
    ratios = np.array(manifest["step_cache"]["ratios"]["cond"])
    pipe.transformer.enable_cache(MagCacheConfig(threshold=threshold, max_skip_steps=k, retention_ratio=retention,
                                                 num_inference_steps=steps, mag_ratios=ratios))


def torch_stage(args, setup, cache="off"):
    import torch
    from diffusers import WanPipeline

    device = setup["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = WanPipeline.from_pretrained(args.work / "src", torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    width, height = map(int, setup["size"].split("x"))
    steps = setup["full_steps"]
    if cache != "off":
        enable_mag_cache(args, pipe, cache, steps)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    step_ends = []

    def step_ended(_pipe, _step, _timestep, outputs):
        if device == "cuda":
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        return outputs

    start = time.perf_counter()
    with torch.no_grad():
        pipe(PROMPT, height=height, width=width, num_frames=setup["frames"], num_inference_steps=steps,
             guidance_scale=5.0, generator=torch.Generator(device).manual_seed(1), output_type="np",
             callback_on_step_end=step_ended)
    if device == "cuda":
        torch.cuda.synchronize()
    # Step time as wanserve's: the denoising loop (first step's end to last's) over its steps.
    result = {"steps": steps, "cache": cache, "end_to_end_s": time.perf_counter() - start,
              "step_s": (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1),
              "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
        if args.gpu_step and cache == "off":
            run([sys.executable, HERE / "gpu_step.py", args.work / "src", args.work / "model"])
    return result


def cache_stage(args, setup):
    """Step caching: the full job with `--cache fast` in wanserve and diffusers' MagCache with the
    same settings and ratios, against the steps and torch stages' uncached jobs."""
    return {"wanserve": generate(args, setup, setup["full_steps"], cache="fast"),
            "diffusers": torch_stage(args, setup, cache="fast")}


def parity_stage(args, setup):
    """The bf16 noise floor as the yardstick: for the parity job, with and without step caching,
    wanserve's final latents (bf16 on the GPU) and diffusers bf16's against diffusers fp32's, all
    from the same CPU-seeded noise; relative error of the latents and PSNR of the frames
    diffusers' fp32 VAE decodes from each."""
    import numpy as np
    import torch
    from diffusers import WanPipeline

    device = setup["device"]
    steps = setup["parity_steps"]
    width, height = map(int, setup["size"].split("x"))
    frames = setup["frames"]
    result = {"steps": steps}
    pipes = {}
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16 if device == "cuda" else torch.float32)]:
        pipes[name] = WanPipeline.from_pretrained(args.work / "src", torch_dtype=dtype).to(device)
        pipes[name].set_progress_bar_config(disable=True)
    vae = pipes["fp32"].vae
    shape = (1, vae.config.z_dim, (frames - 1) // pipes["fp32"].vae_scale_factor_temporal + 1,
             height // pipes["fp32"].vae_scale_factor_spatial, width // pipes["fp32"].vae_scale_factor_spatial)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)

    def diffusers_latents(name, cache):
        pipe = pipes[name]
        if cache != "off":
            enable_mag_cache(args, pipe, cache, steps)
        try:
            with torch.no_grad():
                out = pipe(PROMPT, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                           guidance_scale=5.0, latents=noise.to(device, pipe.transformer.dtype), output_type="latent")
        finally:
            if cache != "off":
                pipe.transformer.disable_cache()
        return out.frames.float().cpu()

    def decode(latents):
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        with torch.no_grad():
            video = vae.decode((latents / std + mean).to(device), return_dict=False)[0]
        return ((video.float().clamp(-1, 1) + 1) * 127.5).round().cpu()

    def psnr(a, b):
        mse = float(((a - b) ** 2).mean())
        return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)

    for cache in ["off", "fast"]:
        dump = args.work / f"parity-{cache}.npy"
        job = generate(args, setup, steps, cache=cache, latents=dump)
        ours = torch.from_numpy(np.load(dump))
        fp32, bf16 = diffusers_latents("fp32", cache), diffusers_latents("bf16", cache)
        rel = lambda x: float((x - fp32).norm() / fp32.norm())
        reference = decode(fp32)
        entry = {"wanserve_rel_err": rel(ours), "diffusers_bf16_rel_err": rel(bf16),
                 "wanserve_psnr_db": psnr(decode(ours), reference), "diffusers_bf16_psnr_db": psnr(decode(bf16), reference),
                 "skipped_passes": job["skipped_passes"]}
        # The target: wanserve no further from fp32 than 1.5x diffusers bf16's own distance.
        entry["rel_err_vs_bf16_floor"] = entry["wanserve_rel_err"] / entry["diffusers_bf16_rel_err"] \
            if entry["diffusers_bf16_rel_err"] else None
        result[cache] = entry
    del pipes
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU rehearsal with the tiny configuration")
    parser.add_argument("--wanserve", type=pathlib.Path, default=ROOT / "target" / "release" / "wanserve")
    parser.add_argument("--work", type=pathlib.Path, help="keep the export here (default: a temp dir)")
    parser.add_argument("--stages", nargs="+",
                        default=["export", "steps", "torch", "cache", "parity", "concurrent", "memory", "batch"],
                        choices=["export", "steps", "batch", "concurrent", "torch", "memory", "cache", "parity"])
    parser.add_argument("--parity-steps", type=int, help="steps of the parity jobs (default 10)")
    parser.add_argument("--batch-cfg", action="store_true", help="run wanserve with --batch-cfg")
    parser.add_argument("--few-steps", type=int, help="the short job's steps (default 3)")
    parser.add_argument("--full-steps", type=int, help="the long job's steps, diffusers' too (default 50)")
    parser.add_argument("--served-frames", type=int, help="frames of the served jobs (default 81)")
    parser.add_argument("--served-steps", type=int, help="steps of the served jobs (default 50)")
    parser.add_argument("--gpu-step", action="store_true",
                        help="also models/gpu_step.py (needs the onnxruntime-gpu Python package)")
    parser.add_argument("--summary", type=pathlib.Path, help="also write the summary here, after each stage")
    args = parser.parse_args()
    if not args.wanserve.is_file():
        sys.exit(f"{args.wanserve} not found: cargo build --release -p wanserve, or --wanserve PATH")
    if args.dry_run:
        setup = {"config": HERE / "tiny.json", "dtype": "fp32", "device": "cpu", "size": "96x64", "frames": 9,
                 "few_steps": 3, "full_steps": 6, "served_size": "832x480", "served_frames": 24,
                 "served_steps": 20, "parity_steps": 10}
    else:
        setup = {"config": HERE / "real_size.json", "dtype": "bf16", "device": "cuda", "size": "832x480",
                 "frames": 81, "few_steps": 3, "full_steps": 50, "served_size": "832x480", "served_frames": 81,
                 "served_steps": 50, "parity_steps": 10}
    for key in ("few_steps", "full_steps", "served_frames", "served_steps", "parity_steps"):
        if getattr(args, key) is not None:
            setup[key] = getattr(args, key)
    temp = None
    if args.work is None:
        temp = tempfile.TemporaryDirectory()
        args.work = pathlib.Path(temp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = {"export": export, "steps": steps_stage, "batch": batch_stage, "concurrent": concurrent_stage,
              "torch": torch_stage, "memory": memory_stage, "cache": cache_stage, "parity": parity_stage}
    summary = {"setup": {k: str(v) for k, v in setup.items()}, "batch_cfg": args.batch_cfg}
    failed = False
    for name in args.stages:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        # A stage that breaks is reported and the next one still runs: on a lent GPU every
        # minute counts, and the other stages' figures stand on their own.
        try:
            summary[name] = stages[name](args, setup)
        except (Exception, SystemExit) as error:  # noqa: BLE001
            failed = True
            summary[name] = {"error": str(error)[-4000:]}
        summary[name]["stage_s"] = time.perf_counter() - started
        print(json.dumps({name: summary[name]}), flush=True)
        if args.summary:
            args.summary.write_text(json.dumps(summary, indent=2))
    if "step_s" in summary.get("steps", {}).get("full", {}) and "step_s" in summary.get("batch", {}).get("job", {}):
        summary["batch"]["batch_cfg_vs_two_calls_step"] = (
            summary["batch"]["job"]["step_s"] / summary["steps"]["full"]["step_s"] if not args.batch_cfg
            else summary["steps"]["full"]["step_s"] / summary["batch"]["job"]["step_s"])
    lean, exhaustive = summary.get("steps", {}).get("few", {}), summary.get("memory", {}).get("few", {})
    if "end_to_end_s" in lean and "end_to_end_s" in exhaustive:
        summary["memory"]["lean_vs_exhaustive"] = {
            key: lean[key] / exhaustive[key] if exhaustive[key] else None
            for key in ("end_to_end_s", "denoise_s", "decode_and_encode_s", "gpu_peak_mib")
            if lean.get(key) is not None and exhaustive.get(key) is not None}
    if "end_to_end_s" in summary.get("steps", {}).get("full", {}) and "end_to_end_s" in summary.get("torch", {}):
        summary["torch"]["wanserve_vs_torch"] = summary["steps"]["full"]["end_to_end_s"] / summary["torch"]["end_to_end_s"]
        summary["torch"]["wanserve_vs_torch_step"] = summary["steps"]["marginal_step_s"] / summary["torch"]["step_s"]
    cached = summary.get("cache", {})
    if "end_to_end_s" in cached.get("wanserve", {}) and "end_to_end_s" in summary.get("torch", {}):
        torch_s = summary["torch"]["end_to_end_s"]
        # The targets: exact <= 0.8x diffusers, cached <= 0.45x diffusers uncached.
        cached["targets"] = {
            "exact_vs_diffusers": summary.get("steps", {}).get("full", {}).get("end_to_end_s", 0) / torch_s,
            "cached_vs_diffusers_uncached": cached["wanserve"]["end_to_end_s"] / torch_s,
            "diffusers_cached_vs_uncached": cached.get("diffusers", {}).get("end_to_end_s", 0) / torch_s}
    summary["host_peak_rss_mib_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("== summary")
    print(json.dumps(summary, indent=2))
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2))
    if temp is not None:
        temp.cleanup()
    if failed:
        sys.exit("gpu-check: a stage failed (see its error above)")


if __name__ == "__main__":
    main()
