"""DiT forward time and peak memory at ~11k tokens: ONNX Runtime (the graph wanserve runs) against
diffusers, on the same random model and inputs, on the CPU.

    python models/compare_dit.py [--config models/attention_11k.json] [--runs 3] [--rounds 2]

Builds the model of `--config` with make_tiny.py, exports its transformer twice (attention as
`com.microsoft.MultiHeadAttention`, as wanserve ships it, and as ONNX `Attention`, as torch writes
it), then times one guided step's worth of forwards (batch 1, 832x480, 25 frames: 7 x 60 x 104
latents, 10,920 tokens with a 1x2x2 patch) in a fresh process per contender, so each one's peak
resident memory (ru_maxrss) is its own, in `--rounds` interleaved rounds. Every contender uses all
cores. Prints each one's best time, the ratio to torch and the peak RSS, and checks the outputs
agree.
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
SHAPE = (1, 16, 7, 60, 104)  # latents of an 832x480, 25-frame job
TEXT_LEN = 512


def inputs(text_dim):
    import numpy as np
    rng = np.random.default_rng(7)
    return (rng.standard_normal(SHAPE, dtype=np.float32), np.array([731], dtype=np.int64),
            rng.standard_normal((1, TEXT_LEN, text_dim), dtype=np.float32))


def contender(kind: str, path: pathlib.Path, runs: int, text_dim: int, out: pathlib.Path) -> None:
    """One contender, in its own process: best time and the output."""
    import numpy as np
    x, t, ctx = inputs(text_dim)
    if kind == "diffusers":
        import torch
        from diffusers import WanTransformer3DModel
        torch.set_num_threads(os.cpu_count() or 1)
        model = WanTransformer3DModel.from_pretrained(path, torch_dtype=torch.float32).eval()

        def forward():
            with torch.no_grad():
                return model(hidden_states=torch.from_numpy(x), timestep=torch.from_numpy(t),
                             encoder_hidden_states=torch.from_numpy(ctx), return_dict=False)[0].numpy()
    else:
        import onnxruntime as ort
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def forward():
            return session.run(None, {"hidden_states": x, "timestep": t, "encoder_hidden_states": ctx})[0]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = forward()
        times.append(time.perf_counter() - start)
    np.save(out, result)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"best_s": min(times), "times": times, "peak_rss_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=pathlib.Path, default=HERE / "attention_11k.json")
    parser.add_argument("--runs", type=int, default=3, help="forwards per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per contender, interleaved")
    parser.add_argument("--contender", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    text_dim = config["text_encoder"]["d_model"]
    if args.contender:
        contender(args.contender[0], pathlib.Path(args.contender[1]), args.runs, text_dim, args.out)
        return

    import numpy as np
    tr = config["transformer"]
    pt, ph, pw = tr["patch_size"]
    tokens = SHAPE[2] // pt * (SHAPE[3] // ph) * (SHAPE[4] // pw)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        run = lambda *cmd: subprocess.run([sys.executable, *map(str, cmd)], check=True, capture_output=True, text=True)
        run(HERE / "make_tiny.py", tmp / "src", "--config", args.config)
        graphs = {}
        for attention in ["contrib", "onnx"]:
            run(HERE / "export.py", tmp / "src", tmp / attention, "--skip", "text_encoder", "vae", "--attention",
                attention, "--no-check")
            graphs[attention] = tmp / attention / "transformer.onnx"
        contenders = [("diffusers", "diffusers", tmp / "src" / "transformer"),
                      ("ORT, MultiHeadAttention (wanserve)", "ort", graphs["contrib"]),
                      ("ORT, ONNX Attention", "ort", graphs["onnx"])]
        # Rounds of one process per contender, interleaved, so that a slow spell of the machine
        # does not land on one contender only; each contender's best over all rounds counts.
        results = {}
        for _ in range(args.rounds):
            for index, (label, kind, path) in enumerate(contenders):
                out = tmp / f"{index}.npy"
                proc = run(__file__, "--config", args.config, "--runs", args.runs, "--contender", kind, path,
                           "--out", out)
                measured = json.loads(proc.stdout.strip().splitlines()[-1]) | {"output": np.load(out)}
                best = results.get(label)
                if best is None or measured["best_s"] < best["best_s"]:
                    results[label] = measured | {"peak_rss_mib": max(measured["peak_rss_mib"],
                                                                     (best or measured)["peak_rss_mib"])}
    torch_s = results["diffusers"]["best_s"]
    print(f"DiT forward, {tokens} tokens ({tr['num_attention_heads']} heads x {tr['attention_head_dim']}, "
          f"{tr['num_layers']} layers, patch {pt}x{ph}x{pw}), {os.cpu_count()} threads, best of "
          f"{args.rounds} x {args.runs}")
    reference = results["diffusers"]["output"]
    matrix_mib = tokens * tokens * tr["num_attention_heads"] * 4 / 2**20
    for label, r in results.items():
        diff = float(np.abs(r["output"] - reference).max())
        print(f"  {label:36s} {r['best_s']:7.3f} s  {r['best_s'] / torch_s:5.2f}x torch  "
              f"peak RSS {r['peak_rss_mib']:7.0f} MiB  max |diff| {diff:.1e}")
    print(f"  (one layer's full attention matrix, all heads, float32: {matrix_mib:.0f} MiB)")


if __name__ == "__main__":
    main()
