"""Write a tiny random-weight diffusers model folder, for a command-line smoke run of
``--policy diffusers:PATH`` without real weights (:func:`finpercep.policies.diffusers_tiny.write_tiny_model`)::

    .venv/bin/python tools/make_tiny_diffusers.py runs/tiny-diffusers
    .venv/bin/finpercep data build --images runs/photos/train --out runs/tiny-pairs --num 4 --crop 32 \\
        --families bicubic --masks-per-sr 1 --workers 1
    .venv/bin/finpercep rl train --policy diffusers:runs/tiny-diffusers --algo refl --reward l1 \\
        --data runs/tiny-pairs --out runs/tiny-refl --steps 2 --batch 2 --crop 32 --lora-rank 2

The folder has the layout of a real one (``unet/``, ``vae/``, ``scheduler/``,
``prompt_embeds.safetensors``; ``--text-encoder`` writes a tiny CLIP ``text_encoder/`` +
``tokenizer/`` instead of the embedding file). ``--upscaler`` writes the Stable Diffusion x4
upscaler layout instead (UNet on latent + LR image, x4 VAE, ``low_res_scheduler/``), which
``--policy diffusers:PATH`` runs as the multi-step policy. Its outputs mean nothing: it checks the plumbing.
Needs the diffusers extra (``pip install 'finpercep[diffusers]'``). This script is in the repository only;
a pip-installed finpercep has the function it calls, ``finpercep.policies.diffusers_tiny.write_tiny_model``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finpercep.policies.diffusers_tiny import write_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="model folder to write (unet/, vae/, scheduler/, ...)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    ap.add_argument("--text-encoder", action="store_true", help="a tiny CLIP text encoder instead of prompt_embeds")
    ap.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "v_prediction", "sample"),
                    help="what the UNet predicts (default: %(default)s)")
    ap.add_argument("--upscaler", action="store_true",
                    help="the x4-upscaler layout (multi-step policy) instead of the one-step one")
    args = ap.parse_args()
    if Path(args.out).exists():
        ap.error(f"{args.out} exists; choose a new folder")
    folder = write_tiny_model(args.out, seed=args.seed, text_encoder=args.text_encoder,
                              prediction_type=args.prediction_type, upscaler=args.upscaler)
    print(f"tiny diffusers model: {folder} (use it with --policy diffusers:{folder})")


if __name__ == "__main__":
    main()
