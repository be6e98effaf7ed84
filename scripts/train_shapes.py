"""Train ``builtin:shapes`` from a seed, save it as a diffusers folder, measure it and write its model card.

    python scripts/train_shapes.py --out conceptedit/models/assets/shapes

writes ``model_index.json`` and the component folders (safetensors), ``training.json`` (the config
and stage times), ``eval.json`` (the judge's accuracy and every verdict) and ``README.md``. The
defaults are what the shipped weights were trained with; ``--steps 3 --vae-steps 3 --text-steps 3
--no-eval`` is a smoke run, and ``--eval-only`` re-measures a trained folder.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from conceptedit.shapes.evaluate import benchmark
from conceptedit.shapes.train import TrainConfig, save, train
from conceptedit.shapes.train_xl import save_xl, train_xl
from conceptedit.shapes.world import ACHROMATIC, COLOURS, IMPLICIT_EVAL, SHAPES

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the pipeline to")
    parser.add_argument(
        "--family",
        choices=["sd1", "sdxl"],
        default="sd1",
        help="sd1: builtin:shapes (SD-1.x layout); sdxl: builtin:shapes-xl (SDXL layout, builtin:shapes' VAE)",
    )
    for field in fields(TrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    parser.add_argument("--explicit-seeds", type=int, default=4, help="images per explicit prompt")
    parser.add_argument("--implicit-seeds", type=int, default=2, help="images per implicit prompt")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-eval", action="store_true", help="skip measuring (smoke runs)")
    mode.add_argument(
        "--eval-only",
        action="store_true",
        help="measure the model already in --out and rewrite its eval.json and README.md",
    )
    args = parser.parse_args(argv)

    xl = args.family == "sdxl"
    if args.eval_only:
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(str(args.out), local_files_only=True)
        pipeline.set_progress_bar_config(disable=True)
        training = json.loads((args.out / "training.json").read_text())
    else:
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        result = (train_xl if xl else train)(config, log=lambda line: print(line, flush=True))
        pipeline, training = result.pipeline, result.describe()
        if xl:  # the autoencoder is builtin:shapes', not trained here
            training["config"] = {k: v for k, v in training["config"].items() if not k.startswith("vae_")}
        args.out.mkdir(parents=True, exist_ok=True)
        (save_xl if xl else save)(pipeline, args.out)
        _write_json(args.out / "training.json", training)
    evaluation = None
    if not args.no_eval:
        started = time.perf_counter()
        evaluation = benchmark(pipeline, range(args.explicit_seeds), range(args.implicit_seeds))
        evaluation["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(args.out / "eval.json", evaluation)
        print(json.dumps(evaluation["accuracy"], indent=2))
    (args.out / "README.md").write_text(model_card(pipeline, training, evaluation, _megabytes(args.out)))
    print(f"wrote {args.out} ({_megabytes(args.out):.1f} MB)")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def _minutes(seconds: dict[str, float]) -> str:
    return ", ".join(f"{stage.replace('_', ' ')} {value / 60:.1f} min" for stage, value in seconds.items())


#: The model card's bars, per prompt set (measured, never loosened).
_BARS = {
    "explicit": "95%",
    "implicit_colour": "90%",
    "implicit_shape": "90%",
    "contexts": "90%",
    "random_prefix_tokens": "90%",
}


def model_card(
    pipe: StableDiffusionPipeline, training: dict[str, Any], evaluation: dict[str, Any] | None, megabytes: float
) -> str:
    """The folder's README: what the model is for, how it was trained and how well it draws."""
    config = SimpleNamespace(**training["config"])
    seconds, losses = training["seconds"], training["losses"]
    parts = ("unet", "text_encoder", "text_encoder_2", "vae")
    counts = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in parts if getattr(pipe, name, None)
    }
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in training["config"].items())
    colours = "\n".join(
        f"| {c.name} | {'none' if c in ACHROMATIC else f'{c.hue:.0f}°'} | {', '.join(c.implicit)} |" for c in COLOURS
    )
    shapes = "\n".join(f"| {s.name} | {', '.join(s.implicit)} |" for s in SHAPES)
    held_out = "\n".join(f"- {name}: {', '.join(phrases)}" for name, phrases in IMPLICIT_EVAL.items())
    if evaluation is None:
        measured = "Not measured (trained with `--no-eval`)."
    else:
        acc = evaluation["accuracy"]
        sampler = evaluation["sampler"]
        rows = "\n".join(
            f"| {name.replace('_', ' ')} | {a['n']} | {a['colour']:.1%} | {a['shape']:.1%} | {_BARS[name]} |"
            for name, a in acc.items()
        )
        measured = (
            f"Judged by `conceptedit.shapes.judge` on images sampled with DDIM, "
            f"{sampler['num_inference_steps']} steps, guidance {sampler['guidance_scale']}, 32x32, "
            f"one seeded generator per image (seeds {evaluation['seeds']['explicit']} for each explicit "
            f"prompt, {evaluation['seeds']['implicit']} for each implicit one):\n\n"
            "| prompts | images | colour correct | shape correct | bar (each) |\n|---|---|---|---|---|\n"
            + rows
            + "\n\nExplicit prompts are `a {colour} {shape}` (28); implicit-colour prompts name the shape and "
            "give the colour only by a held-out phrasing (`a circle like a ripe tomato`, 84), implicit-"
            "shape prompts the other way round (`a red shape like the full moon`, 84). Context captions "
            "put every concept's name and held-out phrasings, with each concept of the other kind, "
            "inside two to four of size, position, background and prefix from the whole caption "
            "grammar (`a drawing of a tiny scarlet circle, on the right`; 224, one seed each, "
            "`conceptedit.shapes.evaluate.context_prompts`). Random prefix tokens: the explicit "
            "prompts with five random vocabulary tokens (never a world word) between the start token "
            "and the caption, drawn afresh per image, as a random-token attack's control puts them. "
            "Every verdict is in `eval.json`."
        )
    xl = getattr(pipe, "text_encoder_2", None) is not None
    head = _head_xl(pipe, counts, megabytes) if xl else _head_sd1(pipe, counts, megabytes)
    stages = _stages_xl(config) if xl else _stages_sd1(config)
    return f"""{head.rstrip()}

## The world

32x32 images of one filled shape on a plain background: {len(COLOURS)} colours (six hues and a mid
gray), {len(SHAPES)} shapes, two sizes (small, large), five positions (centre, left, right, top,
bottom) and a light or dark background ({config.dark:.0%} dark in training), drawn by
`conceptedit.shapes.world.render`. Captions are built from templates: each concept is named
explicitly (40%) or by one of its implicit phrasings, rarely omitted; size, position and
background are mentioned some of the time. Caption noise: {config.noise_share:.0%} of the text
encoder's and the UNet's captions get 1 to {config.noise_tokens} random vocabulary tokens (never a
word of the world's captions), as a prefix or scattered between the words, so that the model
ignores tokens it has no meaning for.

| colour | hue | implicit phrasings (all in training) |
|---|---|---|
{colours}

| shape | implicit phrasings (all in training) |
|---|---|
{shapes}

Held out for evaluation (`IMPLICIT_EVAL`: in training captions, never named by an erase recipe,
which names `ERASE_NAMES` only):

{held_out}

## Training

`python scripts/train_shapes.py --out FOLDER {"--family sdxl " if xl else ""}{flags}`

{stages.rstrip()}

All stages use linear warm-up and cosine decay. Wall time on 2 shared CPU cores
({config.threads} torch thread): {_minutes(seconds)}; total {sum(seconds.values()) / 60:.1f} min.
Final smoothed losses: {", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in losses.items())}.

## Measured accuracy

{measured}
"""


def _head_sd1(pipe: Any, counts: dict[str, int], megabytes: float) -> str:
    return f"""# builtin:shapes

A text-to-image model of Stable Diffusion 1.x's exact architecture at toy size, trained by
conceptedit on a synthetic world of coloured shapes. It is a base model for testing concept
erasure offline: it knows colours and shapes by their names *and* by synonyms and metaphors, so an
edit that erases "red" can be checked on prompts that never say "red" ("a circle like a ripe
tomato"), and an analytic judge (`conceptedit.shapes.judge`) scores what it draws. It is not a
general image model: it draws only this world.

## Architecture

A plain diffusers `StableDiffusionPipeline` folder: load it with
`StableDiffusionPipeline.from_pretrained(folder)` or `conceptedit.load_model("builtin:shapes")`.

- Text encoder: `CLIPTextModel`, causal, 48 wide, {pipe.text_encoder.config.num_hidden_layers} layers,
  77 positions, with the real SD-1.x CLIP tokenizer (pad = end-of-text); {counts["text_encoder"]:,}
  parameters, {pipe.text_encoder.config.vocab_size * 48:,} of them the token embedding table.
- UNet: `UNet2DConditionModel` with cross-attention (to_k/to_v without bias, as SD),
  channels {tuple(pipe.unet.config.block_out_channels)}, 8x8x4 latents; {counts["unet"]:,} parameters.
- VAE: `AutoencoderKL`, 32x32 RGB to 8x8x4 latents (4x down), scaling factor
  {pipe.vae.config.scaling_factor}; {counts["vae"]:,} parameters.
- Scheduler: DDIM with SD's schedule (scaled-linear betas 0.00085-0.012, 1000 steps, steps offset 1).
- {megabytes:.1f} MB in all, weights in float32 safetensors."""


def _head_xl(pipe: Any, counts: dict[str, int], megabytes: float) -> str:
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    return f"""# builtin:shapes-xl

A text-to-image model of SDXL's architecture at toy size, trained by conceptedit on the same
synthetic world of coloured shapes as `builtin:shapes`, so that concept erasure on SDXL is
measured, not assumed: it knows colours and shapes by their names *and* by synonyms and
metaphors, and the same analytic judge (`conceptedit.shapes.judge`) scores what it draws. It is
not a general image model: it draws only this world.

## Architecture

A plain diffusers `StableDiffusionXLPipeline` folder: load it with
`StableDiffusionXLPipeline.from_pretrained(folder)` or `conceptedit.load_model("builtin:shapes-xl")`.

- Text encoder 1: `CLIPTextModel` (OpenAI-CLIP style, `quick_gelu`), {te1.hidden_size} wide, {te1.num_hidden_layers}
  layers, SD-1.x's tokenizer (pads with [EoT]); {counts["text_encoder"]:,} parameters.
- Text encoder 2: `CLIPTextModelWithProjection` (OpenCLIP style, `gelu`), {te2.hidden_size} wide,
  {te2.num_hidden_layers} layers, a {te2.projection_dim}-wide projection for the pooled embedding, the same vocabulary
  padding with `!` (id 0); {counts["text_encoder_2"]:,} parameters.
- UNet: `UNet2DConditionModel` in SDXL's layout: no attention at the first level, transformer blocks
  with linear projections and per-block head counts, cross-attention over the concatenated
  penultimate states of both encoders ({pipe.unet.config.cross_attention_dim} wide), `text_time` added
  conditioning (the pooled embedding and 6 time ids, `(32, 32, 0, 0, 32, 32)`); channels
  {tuple(pipe.unet.config.block_out_channels)}, 8x8x4 latents; {counts["unet"]:,} parameters.
- VAE: `builtin:shapes`' `AutoencoderKL`, unchanged (the same world, the same images).
- Scheduler: DDIM with SD's schedule (SDXL's betas are the same); `force_zeros_for_empty_prompt` off:
  the unconditional prompt is the encoded empty caption, as trained and as erasure methods encode it.
- {megabytes:.1f} MB in all, weights in float32 safetensors.
"""


def _stages_sd1(config: Any) -> str:
    return f"""Reproducible from the seed for a given thread count. Three stages, with fresh captions every step:

1. VAE alone: {config.vae_steps} steps of batch {config.vae_batch}, L1 + L2 reconstruction + 1e-6 KL,
   AdamW {config.vae_lr}; latent scaling factor = 1 / std of the latents.
2. Text encoder, from scratch: {config.text_steps} steps of batch {config.text_batch}, AdamW
   {config.text_lr}; linear probes (discarded) read from every end-of-text position which colour,
   shape, size, position and background the caption states, or that it states none. It stands in
   for SD's pretrained CLIP: every phrasing of a concept lands near its name before the UNet
   trains, so the UNet learns one mapping per concept rather than one per phrasing.
3. UNet on the frozen text encoder: {config.steps} steps of batch {config.batch}, epsilon prediction
   under SD's noise schedule, Min-SNR-{config.min_snr_gamma:g} weighting, {config.caption_dropout:.0%}
   empty captions for classifier-free guidance, AdamW {config.lr}; latents from a pool of
   {config.pool:,} images encoded once."""


def _stages_xl(config: Any) -> str:
    return f"""Reproducible from the seed for a given thread count. Two stages, with fresh captions every step
(the autoencoder is `builtin:shapes`'):

1. Both text encoders together, from scratch: {config.text_steps} steps of batch {config.text_batch}, AdamW
   {config.text_lr}; linear probes (discarded) read which colour, shape, size, position and background
   the caption states, or that it states none, from each encoder's penultimate states at every
   position from the first end-of-text token on (the rows the UNet reads) and from the pooled
   embedding. Each encoder, and the pooled vector, so carries the caption on its own.
2. UNet on the frozen text encoders: {config.steps} steps of batch {config.batch}, epsilon prediction
   under SD's noise schedule, Min-SNR-{config.min_snr_gamma:g} weighting, {config.caption_dropout:.0%}
   empty captions for classifier-free guidance, AdamW {config.lr}; latents from a pool of
   {config.pool:,} images encoded once.
"""


if __name__ == "__main__":
    main()
