"""Give a wanserve model directory live previews: its manifest gets a `preview` section.

    python models/previews.py MODEL_DIR

A preview is a linear map of the latent channels to RGB (what latent previewers show while a
job runs; host/src/pipeline/preview.rs). For the Wan2.1 VAE (16 latent channels) the factors
are the ones ComfyUI publishes for it (comfy/latent_formats.py, class Wan21:
latent_rgb_factors, latent_rgb_factors_bias), fitted to that VAE's decoder and applied to the
normalised latents the DiT denoises. `export.py` writes the section for every export with a
16-channel VAE; this script adds it to an export made before it, in place. Only the standard
library: no torch needed.
"""

import argparse
import json
import pathlib

# Rows: latent channels 0..15; columns: R, G, B.
WAN21_RGB_FACTORS = [
    [-0.1299, -0.1692, 0.2932],
    [0.0671, 0.0406, 0.0442],
    [0.3568, 0.2548, 0.1747],
    [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328],
    [0.0296, -0.0956, -0.0665],
    [-0.3477, -0.4059, -0.2925],
    [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364],
    [-0.1293, 0.0740, 0.1636],
    [0.0680, 0.3019, 0.1128],
    [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699],
    [0.0060, -0.0633, 0.0005],
    [0.3477, 0.2275, 0.2950],
    [0.1984, 0.0913, 0.1861],
]
WAN21_RGB_BIAS = [-0.1835, -0.0868, -0.3360]


def preview_section(z_dim):
    """The manifest's `preview` for a VAE with `z_dim` latent channels; None when none is known."""
    if z_dim != len(WAN21_RGB_FACTORS):
        return None
    return {"rgb_factors": WAN21_RGB_FACTORS, "rgb_bias": WAN21_RGB_BIAS,
            "source": "ComfyUI comfy/latent_formats.py Wan21 (latent_rgb_factors, latent_rgb_factors_bias)"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=pathlib.Path)
    args = parser.parse_args()
    path = args.model_dir / "wanserve-model.json"
    manifest = json.loads(path.read_text())
    section = preview_section(manifest["vae"]["z_dim"])
    if section is None:
        raise SystemExit(f"no preview factors known for a VAE with {manifest['vae']['z_dim']} latent channels")
    manifest["preview"] = section
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"{args.model_dir}: preview factors from {section['source']}")


if __name__ == "__main__":
    main()
