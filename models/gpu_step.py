"""One Wan2.1-1.3B denoising step at 480x832, 81 frames, on a GPU: diffusers (torch, bf16) vs
ONNX Runtime's CUDA execution provider (bf16 graph, CPU fallback disabled), in one run.

    python models/gpu_step.py MODEL_SRC EXPORTED_DIR [--repeats 3]

MODEL_SRC: a diffusers-format Wan2.1 directory (make_tiny.py --config models/real_size.json
gives the real architecture with random weights). EXPORTED_DIR: its `export.py --dtype bf16`
output. Prints per-step time (median of --repeats, after one warm-up) and peak GPU memory for
each side. Memory: torch.cuda.max_memory_allocated for torch; for ORT, the device's used memory
(NVML through torch.cuda.mem_get_info) before and after, since ORT allocates outside torch.
Needs onnxruntime-gpu 1.31.1 (ORT_DYLIB_PATH is not used here: the Python wheel's own library).
"""

import argparse
import gc
import pathlib
import statistics
import time

import numpy as np
import torch

SHAPE = (1, 16, 21, 60, 104)  # latents of 81 frames at 480x832
TEXT_LEN = 512


def used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def torch_step(src: pathlib.Path, latents, timestep, context, repeats):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(src / "transformer", torch_dtype=torch.bfloat16).cuda().eval()
    x = torch.from_numpy(latents).cuda().to(torch.bfloat16)
    t = torch.from_numpy(timestep).cuda()
    ctx = torch.from_numpy(context).cuda().to(torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    result = out.float().cpu().numpy()
    del model, x, ctx, out
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median(times), peak, result


def ort_step(exported: pathlib.Path, latents, timestep, context, repeats):
    import onnxruntime as ort
    from onnx import numpy_helper  # noqa: F401  (bf16 conversion below uses ml_dtypes through onnx)
    import ml_dtypes

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    before = used_gib()
    session = ort.InferenceSession(str(exported / "transformer.onnx"), options,
                                   providers=[("CUDAExecutionProvider", {"device_id": 0})])
    feeds = {"hidden_states": latents.astype(ml_dtypes.bfloat16), "timestep": timestep,
             "encoder_hidden_states": context.astype(ml_dtypes.bfloat16)}
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    binding.bind_output("noise_pred", "cuda", 0)
    times = []
    peak = before
    for i in range(repeats + 1):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if i:
            times.append(time.perf_counter() - start)
        peak = max(peak, used_gib())
    out = binding.copy_outputs_to_cpu()[0].astype(np.float32)
    return statistics.median(times), peak - before, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=pathlib.Path)
    parser.add_argument("exported", type=pathlib.Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(SHAPE, dtype=np.float32)
    timestep = np.array([999], dtype=np.int64)
    context = rng.standard_normal((1, TEXT_LEN, 4096), dtype=np.float32)
    print(f"GPU: {torch.cuda.get_device_name(0)}; latents {SHAPE} ({21 * 30 * 52} tokens)")
    t_torch, m_torch, y_torch = torch_step(args.src, latents, timestep, context, args.repeats)
    print(f"diffusers/torch bf16 : {t_torch * 1000:8.1f} ms/step, peak {m_torch:.2f} GiB (allocated)")
    t_ort, m_ort, y_ort = ort_step(args.exported, latents, timestep, context, args.repeats)
    print(f"ORT CUDA EP bf16     : {t_ort * 1000:8.1f} ms/step, peak {m_ort:.2f} GiB (device, incl. arena)")
    rel = np.abs(y_ort - y_torch).max() / (np.abs(y_torch).max() + 1e-12)
    print(f"ratio ORT/torch: {t_ort / t_torch:.2f}; max |Δ| relative to max |y|: {rel:.2e}")


if __name__ == "__main__":
    main()
