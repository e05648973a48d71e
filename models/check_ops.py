"""Check that every node of a wanserve model's graphs has a CUDA kernel for its element type.

    python models/check_ops.py MODEL_DIR [--kernels models/cuda_kernels.json]

Prints each graph's (op, element type) pairs with counts and whether ONNX Runtime's CUDA
execution provider registers a kernel for them (from models/cuda_kernels.json, taken from ORT's
docs/OperatorKernels.md), and exits non-zero if any does not: such a node would run on the CPU
(or, with CPU fallback disabled as wanserve does, fail to load). Needs no GPU. For bf16 models it
also reports any MatMul/Attention/Conv left in fp32 (legal, but not what --dtype bf16 promises).
"""

import argparse
import collections
import json
import pathlib
import sys

import onnx
from onnx import TensorProto, shape_inference

HERE = pathlib.Path(__file__).resolve().parent
SHORT = {"BFLOAT16": "bf16", "FLOAT16": "f16", "FLOAT": "f32", "DOUBLE": "f64", "BOOL": "bool", "INT8": "i8",
         "INT16": "i16", "INT32": "i32", "INT64": "i64", "UINT8": "u8", "UINT16": "u16", "UINT32": "u32",
         "UINT64": "u64"}
# Which input carries the type constraint T, where it is not the first.
T_INPUT = {"Where": 1}
HEAVY = {"MatMul", "Gemm", "Attention", "MultiHeadAttention", "Conv"}


def load_typed(path: pathlib.Path) -> onnx.ModelProto:
    model = onnx.load(str(path), load_external_data=False)
    try:
        return shape_inference.infer_shapes(model)
    except Exception:  # very large graphs: infer from the file path instead
        out = path.with_suffix(".inferred.onnx")
        shape_inference.infer_shapes_path(str(path), str(out))
        typed = onnx.load(str(out), load_external_data=False)
        out.unlink()
        return typed


def node_types(model: onnx.ModelProto):
    types = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        index = T_INPUT.get(node.op_type, 0)
        name = node.input[index] if len(node.input) > index else ""
        elem = types.get(name)
        yield node, SHORT.get(TensorProto.DataType.Name(elem), "?") if elem else "?"


def supported(kernels, domain, op, opset, elem):
    for first, last, elems in kernels.get(domain, {}).get(op, []):
        if first <= opset and (last is None or opset <= last):
            return elem in elems
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("--kernels", type=pathlib.Path, default=HERE / "cuda_kernels.json")
    args = parser.parse_args()
    kernels = json.loads(args.kernels.read_text())
    manifest = json.loads((args.model_dir / "wanserve-model.json").read_text())
    graphs = [manifest[p][k] for p, k in [("text_encoder", "file"), ("transformer", "file"), ("vae", "init_file"),
                                           ("vae", "step_file")] if p in manifest]
    failures = 0
    for name in graphs:
        model = load_typed(args.model_dir / name)
        opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
        counts = collections.Counter()
        for node, elem in node_types(model):
            counts[(node.domain or "ai.onnx", node.op_type, elem)] += 1
        print(f"{name}  (opsets {opsets})")
        fp32_heavy = []
        for (domain, op, elem), n in sorted(counts.items()):
            ok = supported(kernels, domain, op, opsets.get(domain, 1), elem)
            failures += 0 if ok else n
            print(f"  {'ok ' if ok else 'NO '} {domain}.{op:<22} {elem:<5} x{n}")
            if op in HEAVY and elem == "f32":
                fp32_heavy.append(f"{op} x{n}")
        if manifest.get("dtype") == "bf16" and fp32_heavy and name == manifest.get("transformer", {}).get("file"):
            print(f"  note: fp32 heavy ops in a bf16 transformer: {', '.join(fp32_heavy)}")
    if failures:
        sys.exit(f"{failures} node(s) have no CUDA kernel for their type")
    print("every node has a CUDA kernel for its element type")


if __name__ == "__main__":
    main()
