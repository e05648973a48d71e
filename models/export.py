"""Turn a diffusers-format Wan2.1 T2V directory into a wanserve model directory.

    python models/export.py SRC_DIR OUT_DIR [--dtype fp32|bf16] [--text-encoder-layers N]

SRC_DIR is the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers: the tiny model from make_tiny.py, or
the real weights. OUT_DIR receives:

  text_encoder.onnx    UMT5 encoder: input_ids, attention_mask [B, L] int64 -> last_hidden_state
  transformer.onnx     DiT: hidden_states [B, C, F, H, W], timestep [B] int64,
                       encoder_hidden_states [B, L, D] -> noise prediction [B, C, F, H, W] and the
                       blocks' residual [B, F', H', W', dim] (patch grid) for step caching
  transformer_skip.onnx a step-cached pass: hidden_states, timestep, residual -> noise prediction
                       (patch and time embedding, + residual, output head; no blocks)
  vae_decode_init.onnx first latent frame [B, Z, 1, h, w] -> video [B, 3, 1, 8h, 8w] + cache_*
  vae_decode_step.onnx next latent frame + cache_* -> video [B, 3, 4, 8h, 8w] + cache_out_*
  tokenizer.json       the model's own tokenizer, unchanged
  wanserve-model.json  the manifest wanserve reads (dimensions, scheduler, VAE statistics, cache
                       slots, dtypes, and the SHA-256 of every file)

Why the VAE is two graphs: diffusers decodes one latent frame at a time with a causal cache of
per-convolution tensors (some "Rep" markers or None after the first frame). A traced export of the
whole loop freezes the frame count. Here every cache slot becomes an explicit tensor input/output of
a steady shape (2 frames, channels x a fixed multiple of the latent size), the first frame gets its
own graph, and wanserve runs the loop. `--check` (on by default) decodes random latents both ways.

Graphs over 2 GB are saved with external data (`<name>.onnx.data` beside them). The full UMT5-XXL
text encoder (5.7 B parameters) needs ~23 GB in fp32: export it on a machine with >= 64 GB of RAM,
or with --dtype bf16 (which loads it in bf16). `--text-encoder-layers N` keeps only the first N
blocks (used to prove the real widths export on a small machine; never for serving).
"""

import argparse
import hashlib
import json
import pathlib
import shutil
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from transformers import UMT5EncoderModel

import few_step
import previews

OPSET = 23
TWO_GB = 2 * 1024**3
MAX_TEXT_LEN = 512  # diffusers pads every prompt to 512 tokens for Wan


def save(path: pathlib.Path) -> None:
    """torch writes weights as external data (`<name>.data`); fold them back into one file unless
    they are over protobuf's 2 GB limit."""
    data = path.with_name(path.name + ".data")
    if not data.exists() or data.stat().st_size > TWO_GB:
        return
    proto = onnx.load(str(path), load_external_data=True)
    data.unlink()
    onnx.save(proto, str(path))


def export(module, args, path, input_names, output_names, dynamic_shapes):
    program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=input_names,
                                output_names=output_names, dynamic_shapes=dynamic_shapes, external_data=True,
                                optimize=True, verbose=False)
    program.save(str(path), external_data=True)
    save(path)


# ---------------------------------------------------------------- text encoder
class TextEncoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_text_encoder(src, out, dtype, layers):
    encoder = UMT5EncoderModel.from_pretrained(src / "text_encoder", attn_implementation="eager",
                                               torch_dtype=dtype).eval()
    if layers is not None:
        encoder.encoder.block = encoder.encoder.block[:layers]
        encoder.config.num_layers = layers
    batch = torch.export.Dim("batch", min=1, max=8)
    text_len = torch.export.Dim("text_len", min=2, max=MAX_TEXT_LEN)
    ids = torch.randint(0, encoder.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 40, dtype=torch.int64)
    mask[1, 7:] = 0
    export(TextEncoder(encoder).eval(), (ids, mask), out / "text_encoder.onnx", ["input_ids", "attention_mask"],
           ["last_hidden_state"], {"input_ids": {0: batch, 1: text_len}, "attention_mask": {0: batch, 1: text_len}})
    return encoder


# ---------------------------------------------------------------- transformer
def output_head(t, hidden_states, temb, shape):
    """`WanTransformer3DModel.forward`'s step 5 (diffusers 0.42.1, text-to-video): the output
    norm modulated by the time embedding, the projection, and unpatchify back to `shape`."""
    batch, _, frames, height, width = shape
    p_t, p_h, p_w = t.config.patch_size
    shift, scale = (t.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    hidden_states = (t.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
    hidden_states = t.proj_out(hidden_states)
    hidden_states = hidden_states.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def patch_tokens(t, hidden_states):
    """The patch embedding as `[B, tokens, dim]`, the blocks' input."""
    return t.patch_embedding(hidden_states).flatten(2).transpose(1, 2)


class Transformer(torch.nn.Module):
    """The whole DiT, `WanTransformer3DModel.forward` for text-to-video written out, returning
    besides the prediction the blocks' residual (last block's output minus the first block's
    input, `[B, F', H', W', dim]` on the patch grid) that a step-cached step reuses: what
    diffusers' MagCache hooks keep as `previous_residual`."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        t = self.transformer
        p_t, p_h, p_w = t.config.patch_size
        _, _, frames, height, width = hidden_states.shape
        rotary_emb = t.rope(hidden_states)
        tokens = patch_tokens(t, hidden_states)
        temb, timestep_proj, context, _ = t.condition_embedder(timestep, encoder_hidden_states, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        out = tokens
        for block in t.blocks:
            out = block(out, context, timestep_proj, rotary_emb)
        residual = (out - tokens).unflatten(1, (frames // p_t, height // p_h, width // p_w))
        return output_head(t, out, temb, hidden_states.shape), residual


class TransformerSkip(torch.nn.Module):
    """A step-cached DiT pass: patch embedding and time embedding, the residual of the branch's
    last computed step added in place of the 30 blocks, and the output head (diffusers'
    `MagCacheHeadHook` when it skips). No text input: only the blocks read the prompt."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, residual):
        t = self.transformer
        embedder = t.condition_embedder
        tokens = patch_tokens(t, hidden_states)
        freq = embedder.timesteps_proj(timestep)
        time_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        temb = embedder.time_embedder(freq.to(time_dtype)).type_as(tokens)
        out = tokens + residual.flatten(1, 3)
        return output_head(t, out, temb, hidden_states.shape)


def rotate(x, freqs_cos, freqs_sin):
    """Wan's rotary embedding on [B, S, heads, head_dim]: the pairs (x[2i], x[2i+1]) rotated, the
    same products and sums as diffusers' `apply_rotary_emb`, interleaved back with stack + flatten
    where diffusers writes them into strided slices of an empty tensor (exported as ScatterND
    between 4-D transposes: ~7 % of a DiT forward in ORT at 11k tokens)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class ExportAttnProcessor:
    """diffusers' `WanAttnProcessor` for text-to-video, for export only: same projections, norms,
    SDPA and output layers, with the rotary embedding written as `rotate` above."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.add_k_proj is not None:
            sys.exit("image-conditioned (I2V) attention is not exported by wanserve")
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        heads_first = lambda t: t.transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(
            heads_first(query), heads_first(key), heads_first(value), attn_mask=attention_mask)
        out = heads_first(out).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def export_transformer(src, out, dtype, attention="contrib"):
    transformer = WanTransformer3DModel.from_pretrained(src / "transformer", torch_dtype=dtype).eval()
    # Exported with ExportAttnProcessor; checked afterwards against diffusers' own processors.
    stock_processors = transformer.attn_processors
    transformer.set_attn_processor(ExportAttnProcessor())
    # The output norm's table as a buffer, same fp32 values: torch 2.11's exporter (the GPU
    # machine's) fails on `scale_shift_table.to(temb.device) + temb` when the table is a parameter
    # held in fp32 beside bf16 weights (its type-promotion pass traces prim.device instead of add).
    table = transformer.scale_shift_table.data
    del transformer.scale_shift_table
    transformer.register_buffer("scale_shift_table", table)
    cfg = transformer.config
    pt, ph, pw = cfg.patch_size
    batch = torch.export.Dim("batch", min=1, max=8)
    frames = torch.export.Dim("frames", min=1, max=64)
    h = torch.export.Dim("h_patches", min=1, max=256)
    w = torch.export.Dim("w_patches", min=1, max=256)
    text_len = torch.export.Dim("text_len", min=1, max=MAX_TEXT_LEN)
    x = torch.randn(2, cfg.in_channels, 3 * pt, 4 * ph, 6 * pw, dtype=dtype)
    t = torch.tensor([999, 500], dtype=torch.int64)
    ctx = torch.randn(2, 16, cfg.text_dim, dtype=dtype)
    frames_dim = frames if pt == 1 else frames * pt
    export(Transformer(transformer).eval(), (x, t, ctx), out / "transformer.onnx",
           ["hidden_states", "timestep", "encoder_hidden_states"], ["noise_pred", "residual"],
           {"hidden_states": {0: batch, 2: frames_dim, 3: h * ph, 4: w * pw}, "timestep": {0: batch},
            "encoder_hidden_states": {0: batch, 1: text_len}})
    with torch.no_grad():
        residual = Transformer(transformer)(x, t, ctx)[1]
    export(TransformerSkip(transformer).eval(), (x, t, residual), out / "transformer_skip.onnx",
           ["hidden_states", "timestep", "residual"], ["noise_pred"],
           {"hidden_states": {0: batch, 2: frames_dim, 3: h * ph, 4: w * pw}, "timestep": {0: batch},
            "residual": {0: batch, 1: frames, 2: h, 3: w}})
    transformer.set_attn_processor(stock_processors)
    if attention == "contrib":
        count = use_contrib_attention(out / "transformer.onnx", cfg.num_attention_heads)
        print(f"transformer: {count} attention nodes as com.microsoft.MultiHeadAttention")
    return transformer


def use_contrib_attention(path: pathlib.Path, num_heads: int) -> int:
    """Rewrite every ONNX `Attention` node of the graph at `path` as ONNX Runtime's
    `com.microsoft.MultiHeadAttention`; returns how many were rewritten.

    torch's exporter writes SDPA as ONNX `Attention` on [B, heads, S, head_dim] tensors. ORT's CPU
    kernel for it materialises the whole S x S score matrix per head and is ~2x slower than the
    contrib op at 11k tokens (DESIGN.md); the contrib op has the fused/flash kernels on the CPU and
    on the CUDA EP (bf16 included). It takes [B, S, heads * head_dim]: the exporter's transposes
    around the node are bypassed, and reshapes put in."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def swaps_heads_and_sequence(node):
        if node is None or node.op_type != "Transpose":
            return False
        return [list(a.ints) for a in node.attribute if a.name == "perm"] == [[0, 2, 1, 3]]

    elem_type = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    elem_type["*"] = elem_type[graph.input[0].name]
    to_3d, to_4d = "mha_shape_bsd", "mha_shape_bsnh"
    graph.initializer.extend([numpy_helper.from_array(np.array([0, 0, -1], np.int64), to_3d),
                              numpy_helper.from_array(np.array([0, 0, num_heads, -1], np.int64), to_4d)])
    nodes, dropped, rewritten = [], set(), 0
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        extra_inputs = [name for name in node.input[3:] if name]
        extra_outputs = [name for name in node.output[1:] if name]
        if attrs.get("is_causal", 0) or extra_inputs or extra_outputs or "q_num_heads" in attrs \
                or attrs.get("softcap", 0.0):
            sys.exit(f"{node.name}: an Attention form this rewrite does not handle ({attrs}, "
                     f"inputs {list(node.input)})")
        base = node.name or f"attention_{rewritten}"
        flat = []
        for i, name in enumerate(node.input[:3]):
            before = producer.get(name)
            if swaps_heads_and_sequence(before):
                bsnh = before.input[0]
            else:
                bsnh = f"{base}_in{i}_bsnh"
                nodes.append(onnx.helper.make_node("Transpose", [name], [bsnh], perm=[0, 2, 1, 3]))
            flat.append(f"{base}_in{i}_bsd")
            nodes.append(onnx.helper.make_node("Reshape", [bsnh, to_3d], [flat[-1]]))
        mha_attrs = {"num_heads": num_heads}
        if "scale" in attrs:
            mha_attrs["scale"] = attrs["scale"]
        nodes.append(onnx.helper.make_node("MultiHeadAttention", flat, [f"{base}_bsd"], name=base,
                                           domain="com.microsoft", **mha_attrs))
        # ONNX shape inference knows no contrib op: declare the output's type for what follows.
        graph.value_info.append(onnx.helper.make_tensor_value_info(f"{base}_bsd", elem_type.get(node.output[0], elem_type["*"]), None))
        out = node.output[0]
        after = consumers.get(out, [])
        if len(after) == 1 and swaps_heads_and_sequence(after[0]) and out not in {o.name for o in graph.output}:
            # The exporter transposes the result straight back to [B, S, heads, head_dim].
            nodes.append(onnx.helper.make_node("Reshape", [f"{base}_bsd", to_4d], [after[0].output[0]]))
            dropped.add(id(after[0]))
        else:
            nodes.append(onnx.helper.make_node("Reshape", [f"{base}_bsd", to_4d], [f"{base}_out_bsnh"]))
            nodes.append(onnx.helper.make_node("Transpose", [f"{base}_out_bsnh"], [out], perm=[0, 2, 1, 3]))
        rewritten += 1
    nodes = [node for node in nodes if id(node) not in dropped]
    # The bypassed transposes are dead now, unless something else reads them.
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in nodes for name in node.input} | outputs
        live = [node for node in nodes if any(out in used for out in node.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del graph.node[:]
    graph.node.extend(nodes)
    if rewritten and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    # Keep the external data where it is (graphs over 2 GB): only the graph file is rewritten.
    onnx.save(model, str(path))
    return rewritten


# ---------------------------------------------------------------- VAE decoder as chunk graphs
def cache_layout(vae: AutoencoderKLWan, z_dim: int):
    """Which decoder cache slots are used in the steady state, and their shapes relative to the latent."""
    n = vae._cached_conv_counts["decoder"]
    lat_h, lat_w = 4, 6
    z = torch.randn(1, z_dim, 2, lat_h, lat_w)
    with torch.no_grad():
        x = vae.post_quant_conv(z)
        cache = [None] * n
        vae.decoder(x[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True)
        vae.decoder(x[:, :, 1:2], feat_cache=cache, feat_idx=[0])
    slots = []
    for idx, c in enumerate(cache):
        if isinstance(c, torch.Tensor):
            assert c.shape[2] == 2 and c.shape[3] % lat_h == 0 and c.shape[4] % lat_w == 0, (idx, c.shape)
            assert c.shape[3] // lat_h == c.shape[4] // lat_w
            slots.append({"index": idx, "channels": int(c.shape[1]), "scale": int(c.shape[3] // lat_h)})
    return n, slots


class VaeDecodeInit(torch.nn.Module):
    def __init__(self, vae, n, slots):
        super().__init__()
        self.vae, self.n, self.slots = vae, n, slots

    def forward(self, z):
        x = self.vae.post_quant_conv(z)
        cache = [None] * self.n
        video = self.vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=True)
        outs = []
        for slot in self.slots:
            c = cache[slot["index"]]
            if isinstance(c, torch.Tensor):
                if c.shape[2] < 2:  # a real 1-frame cache: left-pad with the zero frame the conv would add
                    c = torch.cat([torch.zeros_like(c), c], dim=2)
            else:  # "Rep" or None: the causal conv would pad zeros, so zeros of the steady shape
                c = z.new_zeros(z.shape[0], slot["channels"], 2, z.shape[3] * slot["scale"],
                                z.shape[4] * slot["scale"])
            outs.append(c)
        return (video, *outs)


class VaeDecodeStep(torch.nn.Module):
    def __init__(self, vae, n, slots):
        super().__init__()
        self.vae, self.n, self.slots = vae, n, slots

    def forward(self, z, *caches):
        x = self.vae.post_quant_conv(z)
        cache = [None] * self.n
        for slot, c in zip(self.slots, caches):
            cache[slot["index"]] = c
        video = self.vae.decoder(x, feat_cache=cache, feat_idx=[0])
        return (video, *[cache[slot["index"]] for slot in self.slots])


def export_vae(src, out):
    vae = AutoencoderKLWan.from_pretrained(src / "vae", torch_dtype=torch.float32).eval()
    cfg = vae.config
    n, slots = cache_layout(vae, cfg.z_dim)
    batch = torch.export.Dim("batch", min=1, max=8)
    h = torch.export.Dim("latent_h", min=2, max=512)
    w = torch.export.Dim("latent_w", min=2, max=512)
    z = torch.randn(1, cfg.z_dim, 1, 4, 6)
    cache_names = [f"cache_{i}" for i in range(len(slots))]
    export(VaeDecodeInit(vae, n, slots).eval(), (z,), out / "vae_decode_init.onnx", ["latent"], ["video", *cache_names],
           {"z": {0: batch, 3: h, 4: w}})
    caches = tuple(torch.randn(1, s["channels"], 2, 4 * s["scale"], 6 * s["scale"]) for s in slots)
    cache_dims = [{0: batch, 3: h * s["scale"] if s["scale"] > 1 else h, 4: w * s["scale"] if s["scale"] > 1 else w}
                  for s in slots]
    export(VaeDecodeStep(vae, n, slots).eval(), (z, *caches), out / "vae_decode_step.onnx", ["latent", *cache_names],
           ["video", *[f"cache_out_{i}" for i in range(len(slots))]],
           {"z": {0: batch, 3: h, 4: w}, "caches": tuple(cache_dims)})
    return vae, cfg, slots


def check_vae(vae, out, z_dim):
    """Decode random latents with diffusers and with the two graphs in ORT; they must agree."""
    import onnxruntime as ort

    init = ort.InferenceSession(str(out / "vae_decode_init.onnx"), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(out / "vae_decode_step.onnx"), providers=["CPUExecutionProvider"])
    worst = 0.0
    for frames, lat_h, lat_w in [(3, 4, 6), (4, 6, 4)]:
        z = torch.randn(1, z_dim, frames, lat_h, lat_w, generator=torch.Generator().manual_seed(frames))
        with torch.no_grad():
            expected = vae.decode(z, return_dict=False)[0].numpy()
        outs = init.run(None, {"latent": z[:, :, :1].numpy()})
        videos, caches = [outs[0]], outs[1:]
        for i in range(1, frames):
            outs = step.run(None, {"latent": z[:, :, i:i + 1].numpy(),
                                   **{f"cache_{k}": c for k, c in enumerate(caches)}})
            videos.append(outs[0])
            caches = outs[1:]
        got = np.clip(np.concatenate(videos, axis=2), -1.0, 1.0)
        assert got.shape == expected.shape, (got.shape, expected.shape)
        worst = max(worst, float(np.abs(got - expected).max()))
    print(f"vae chunk graphs vs diffusers: max |diff| {worst:.2e}")
    if worst > 1e-4:
        sys.exit("VAE chunk export does not match diffusers")


def check_text_encoder(encoder, out):
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, encoder.config.vocab_size, (2, MAX_TEXT_LEN), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, MAX_TEXT_LEN, dtype=torch.int64)
    mask[0, :30] = 1
    mask[1, :3] = 1
    with torch.no_grad():
        expected = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float().numpy()
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    worst = float(np.abs(got.astype(np.float32) - expected).max())
    print(f"text encoder vs transformers: max |diff| {worst:.2e}")
    if worst > 1e-3:
        sys.exit("text encoder export does not match transformers")


def check_transformer(transformer, out):
    import onnxruntime as ort

    cfg = transformer.config
    session = ort.InferenceSession(str(out / "transformer.onnx"), providers=["CPUExecutionProvider"])
    skip = ort.InferenceSession(str(out / "transformer_skip.onnx"), providers=["CPUExecutionProvider"])
    pt, ph, pw = cfg.patch_size
    worst = worst_skip = 0.0
    for shape, text_len in [((1, cfg.in_channels, 2 * pt, 3 * ph, 5 * pw), 512), ((2, cfg.in_channels, 1, 2 * ph, 2 * pw), 9)]:
        g = torch.Generator().manual_seed(text_len)
        x = torch.randn(*shape, generator=g)
        t = torch.full((shape[0],), 731, dtype=torch.int64)
        ctx = torch.randn(shape[0], text_len, cfg.text_dim, generator=g)
        with torch.no_grad():
            expected = transformer(hidden_states=x.to(transformer.dtype), timestep=t,
                                   encoder_hidden_states=ctx.to(transformer.dtype), return_dict=False)[0]
        feeds = {"hidden_states": x.to(transformer.dtype), "timestep": t, "encoder_hidden_states": ctx.to(transformer.dtype)}
        if transformer.dtype == torch.bfloat16:
            continue  # ORT's CPU provider has no bf16 kernels for this graph; checked on CUDA instead
        got, residual = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        worst = max(worst, float(np.abs(got - expected.float().numpy()).max()))
        # A skipped pass with this pass's own residual is this pass (blocks in, blocks out).
        skipped = skip.run(None, {"hidden_states": feeds["hidden_states"].numpy(), "timestep": t.numpy(),
                                  "residual": residual})[0]
        worst_skip = max(worst_skip, float(np.abs(skipped - expected.float().numpy()).max()))
    print(f"transformer vs diffusers: max |diff| {worst:.2e}; skip graph with its own residual: {worst_skip:.2e}")
    if worst > 1e-3 or worst_skip > 1e-3:
        sys.exit("transformer export does not match diffusers")


def step_cache(args, config):
    """The manifest's `step_cache`: MagCache's magnitude ratios per guidance branch."""
    import magcache

    choice = args.cache_ratios
    if choice == "auto":
        choice = "published" if magcache.is_1_3b(config) else "calibrate"
    if choice == "none":
        return None
    if choice == "published":
        if not magcache.is_1_3b(config):
            sys.exit("--cache-ratios published: the published ratios are Wan2.1-T2V-1.3B's; calibrate this model")
        return {"method": "magcache", "calibrated_steps": 50, "ratios": magcache.PUBLISHED_1_3B,
                "source": "MagCache4Wan2.1 (published for Wan2.1-T2V-1.3B, 832x480, 50 UniPC steps)"}
    from diffusers import WanPipeline

    torch.set_num_threads(2)
    pipe = WanPipeline.from_pretrained(args.src, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ratios = magcache.calibrate(pipe, steps=50)
    return {"method": "magcache", "calibrated_steps": 50, "ratios": ratios,
            "source": "diffusers MagCacheConfig(calibrate=True), 128x64, 9 frames, 50 steps, guidance 5"}


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=pathlib.Path)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--text-encoder-layers", type=int, default=None)
    parser.add_argument("--text-encoder-dtype", choices=["fp32", "bf16"], default=None,
                        help="the text encoder's precision (default: --dtype); fp32 for --text-encoder-device cpu "
                             "(ONNX Runtime's CPU provider has no bf16 kernels)")
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--attention", choices=["contrib", "onnx"], default="contrib",
                        help="the transformer's attention as com.microsoft.MultiHeadAttention (default: fused "
                             "kernels on the CPU and CUDA) or as torch exports it, ONNX Attention (for comparison)")
    parser.add_argument("--cache-ratios", choices=["auto", "published", "calibrate", "none"], default="auto",
                        help="the step cache's magnitude ratios for the manifest: MagCache's published ones for "
                             "Wan2.1-T2V-1.3B, or calibrated here with diffusers (a 50-step run of the source "
                             "model; small models only); auto: published for the 1.3B architecture, else calibrate")
    parser.add_argument("--skip", nargs="*", default=[], choices=["text_encoder", "transformer", "vae"],
                        help="leave out parts (for proving the export of one part at real size)")
    parser.add_argument("--sampler", choices=sorted(few_step.PRESETS), default=None,
                        help="a few-step distilled checkpoint (FastWan2.1, LightX2V): its DMD sampler in the "
                             "manifest (see models/few_step.py; no step cache then)")
    parser.add_argument("--sampler-timesteps", default=None, help="override the preset's (comma-separated)")
    parser.add_argument("--sampler-shift", type=float, default=None, help="override the preset's")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)

    manifest = {"format": "wanserve-model", "version": 1, "model": json.loads((args.src / "model_index.json").read_text())
                .get("_name_or_path", "Wan2.1-T2V"), "dtype": args.dtype}
    # Parts left out keep what an earlier export wrote for them.
    previous = args.out / "wanserve-model.json"
    if args.skip and previous.exists():
        kept = json.loads(previous.read_text())
        for part, keys in {"text_encoder": ["text_encoder", "tokenizer"], "transformer": ["transformer", "step_cache"],
                           "vae": ["vae", "preview"]}.items():
            if part in args.skip:
                manifest.update({k: kept[k] for k in keys if k in kept})
    files = {}
    if "text_encoder" not in args.skip:
        text_dtype = args.text_encoder_dtype or args.dtype
        encoder = export_text_encoder(args.src, args.out, torch.bfloat16 if text_dtype == "bf16" else torch.float32,
                                      args.text_encoder_layers)
        te = encoder.config
        if args.check and text_dtype == "fp32":
            check_text_encoder(encoder, args.out)
        manifest["text_encoder"] = {"file": "text_encoder.onnx", "dtype": text_dtype, "dim": te.d_model,
                                    "max_length": MAX_TEXT_LEN, "layers": te.num_layers}
        shutil.copy(args.src / "tokenizer" / "tokenizer.json", args.out / "tokenizer.json")
        manifest["tokenizer"] = {"file": "tokenizer.json", "pad_id": 0}
    if "transformer" not in args.skip:
        transformer = export_transformer(args.src, args.out, dtype, args.attention)
        tr = transformer.config
        if args.check and args.dtype == "fp32":
            check_transformer(transformer, args.out)
        manifest["transformer"] = {"file": "transformer.onnx", "skip_file": "transformer_skip.onnx",
                                   "dtype": args.dtype, "in_channels": tr.in_channels,
                                   "out_channels": tr.out_channels, "patch_size": list(tr.patch_size),
                                   "text_dim": tr.text_dim, "num_layers": tr.num_layers,
                                   "num_attention_heads": tr.num_attention_heads,
                                   "attention_head_dim": tr.attention_head_dim}
        manifest["step_cache"] = step_cache(args, tr)
    if "vae" not in args.skip:
        vae, va, slots = export_vae(args.src, args.out)
        manifest["vae"] = {"init_file": "vae_decode_init.onnx", "step_file": "vae_decode_step.onnx", "dtype": "fp32",
                           "z_dim": va.z_dim, "latents_mean": list(va.latents_mean),
                           "latents_std": list(va.latents_std), "scale_factor_spatial": 2 ** len(va.temperal_downsample),
                           "scale_factor_temporal": 2 ** sum(va.temperal_downsample),
                           "cache_slots": [{"channels": s["channels"], "scale": s["scale"]} for s in slots]}
        if args.check:
            check_vae(vae, args.out, va.z_dim)
        preview = previews.preview_section(va.z_dim)
        if preview is not None:
            manifest["preview"] = preview
    manifest["scheduler"] = json.loads((args.src / "scheduler" / "scheduler_config.json").read_text())
    manifest["fps"] = 16
    if args.sampler or args.sampler_timesteps:
        few_step.apply(manifest, few_step.sampler_section(
            args.sampler, args.sampler_timesteps.split(",") if args.sampler_timesteps else None, args.sampler_shift))
    for path in sorted(args.out.iterdir()):
        if path.name != "wanserve-model.json" and path.is_file():
            files[path.name] = sha256(path)
    manifest["files"] = files
    (args.out / "wanserve-model.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k} ({(args.out / k).stat().st_size // 1024} KiB)" for k in files))


if __name__ == "__main__":
    main()
