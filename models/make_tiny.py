"""Write a tiny random-weight Wan2.1 T2V model in diffusers format.

The layout is that of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (model_index.json, scheduler/, text_encoder/,
tokenizer/, transformer/, vae/), so `export.py` treats it exactly as it treats the real weights.
Every weight comes from a fixed seed: running this twice writes the same model.

UMT5's SentencePiece tokenizer cannot be downloaded here, so a small Unigram tokenizer is trained
with the `tokenizers` library in the T5 style the real one uses: Metaspace pre-tokenizer, `</s>`
appended, `<pad>` = 0, `</s>` = 1, `<unk>` = 2, saved as `tokenizer.json`.

    python models/make_tiny.py OUT_DIR [--config models/tiny.json]
"""

import argparse
import json
import os
import pathlib

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

HERE = pathlib.Path(__file__).resolve().parent

# Enough text for the trainer to learn English sub-words plus CJK characters and a few emoji, so
# the references exercise multi-byte input that is not simply <unk>.
CORPUS = [
    "A beautiful sunset over the mountains, golden light on the snow",
    "A cat playing the piano in a cozy living room, cinematic lighting",
    "Waves crashing on a rocky shore at dawn, slow motion, 4k",
    "A futuristic city at night with neon signs and flying cars",
    "An astronaut riding a horse on the moon, highly detailed",
    "Two dogs running through a field of sunflowers in summer",
    "A timelapse of clouds moving over a quiet lake and a forest",
    "Close-up of rain drops falling on green leaves, macro photography",
    "A paper boat floating down a stream after the rain",
    "Low quality, blurry, distorted, watermark, text, worst quality",
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings",
    "一只可爱的小猫在花园里玩耍，阳光明媚",
    "夕阳下的山脉，金色的光芒洒在雪地上",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面",
    "城市夜景，霓虹灯闪烁，车流穿梭",
    "海浪拍打着岩石海岸，慢动作",
    "🌅 sunrise over the ocean 🌊 with seagulls 🐦",
    "🐱 a kitten chasing a ball of yarn 🧶",
    "🚀 a rocket launch into the starry sky ✨",
    "A chef cooking pasta in a busy kitchen, steam rising from the pot",
    "Fireworks exploding over a river, reflections on the water",
    "A snowy village with warm lights in the windows, evening",
]


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        max_piece_length=8,
        shrinking_factor=0.9,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    # The trainer's scores vary in their last bits from run to run and tied pieces come out in
    # hash order; rounding the scores and sorting the pieces makes the tokenizer (and so every
    # token id in the references) reproducible.
    specials = ["<pad>", "</s>", "<unk>"]
    trained = json.loads(tokenizer.to_str())["model"]["vocab"]
    pieces = sorted(((p, round(s, 6)) for p, s in trained if p not in specials), key=lambda ps: (-ps[1], ps[0]))
    vocab = [(p, 0.0) for p in specials] + pieces
    normalizer, pre_tokenizer, decoder = tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoder
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    assert tokenizer.token_to_id("<pad>") == 0 and tokenizer.token_to_id("</s>") == 1
    return tokenizer


def build(config: dict) -> WanPipeline:
    torch.manual_seed(config["seed"])
    tok = train_tokenizer(config["tokenizer"]["vocab_size"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    te = config["text_encoder"]
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=te.get("vocab_size", tok.get_vocab_size()),
            d_model=te["d_model"],
            d_kv=te["d_kv"],
            d_ff=te["d_ff"],
            num_layers=te["num_layers"],
            num_heads=te["num_heads"],
            relative_attention_num_buckets=te["relative_attention_num_buckets"],
            relative_attention_max_distance=te["relative_attention_max_distance"],
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    tr = config["transformer"]
    transformer = WanTransformer3DModel(
        patch_size=tuple(tr["patch_size"]),
        num_attention_heads=tr["num_attention_heads"],
        attention_head_dim=tr["attention_head_dim"],
        in_channels=tr["in_channels"],
        out_channels=tr["out_channels"],
        text_dim=te["d_model"],
        freq_dim=tr["freq_dim"],
        ffn_dim=tr["ffn_dim"],
        num_layers=tr["num_layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=tr["rope_max_seq_len"],
    ).eval()
    va = config["vae"]
    generator = torch.Generator().manual_seed(config["seed"] + 1)
    vae = AutoencoderKLWan(
        base_dim=va["base_dim"],
        z_dim=va["z_dim"],
        dim_mult=va["dim_mult"],
        num_res_blocks=va["num_res_blocks"],
        attn_scales=[],
        temperal_downsample=va["temperal_downsample"],
        dropout=0.0,
        latents_mean=(torch.randn(va["z_dim"], generator=generator) * 0.5).tolist(),
        latents_std=(torch.rand(va["z_dim"], generator=generator) * 2.0 + 1.0).tolist(),
    ).eval()
    # The transformer's output projection starts at zero in diffusers; random weights there make
    # the denoising loop (and so the parity tests) actually depend on the transformer.
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if torch.count_nonzero(param) == 0 and param.dim() > 1:
                param.normal_(0.0, 0.05, generator=generator)
    sc = config["scheduler"]
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=sc["flow_shift"],
        solver_order=sc["solver_order"],
        solver_type=sc["solver_type"],
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--config", type=pathlib.Path, default=HERE / "tiny.json")
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    pipe = build(config)
    pipe.save_pretrained(args.out_dir, safe_serialization=True)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
