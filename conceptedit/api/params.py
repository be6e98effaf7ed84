"""Parameter models every method builds on: its own ``Params``, and the engine's training loop."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt


class MethodParams(BaseModel):
    """Base of every method's ``Params``: unknown keys are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class TrainingConfig(BaseModel):
    """Settings of the engine's training loop; training methods subclass it to change defaults."""

    model_config = ConfigDict(extra="forbid")

    steps: PositiveInt = Field(100, description="Optimiser steps.")
    lr: PositiveFloat = Field(1e-5, description="Learning rate.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimiser.")
    weight_decay: NonNegativeFloat = Field(0.01, description="Weight decay (AdamW/SGD).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: PositiveFloat = Field(1e-8, description="Adam epsilon.")
    grad_accum: PositiveInt = Field(1, description="Micro-batches summed per optimiser step.")
    max_grad_norm: PositiveFloat | None = Field(None, description="Clip gradients to this norm.")
    zero_grad: bool = Field(
        True,
        description="Zero gradients after every step. False keeps summing them over the whole run, "
        "as some reference implementations do by accident.",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    micro_batch: PositiveInt | None = Field(
        None,
        description="Most samples per denoiser call (None: whole batch). Each call's graph is rebuilt in "
        "backward, one call at a time, so 1 keeps activation memory at one sample's worth (one extra "
        "forward per call).",
    )
    park_idle_modules: bool = Field(
        True,
        description="Free the weights of pipeline parts the loop neither trains nor runs (the text encoder when "
        "it does not train, the VAE; never the denoiser) while it runs, from a temporary safetensors file; they "
        "come back bit for bit, and on demand if a method encodes prompts mid-training.",
    )
    frozen_targets: Literal["cached", "recompute"] = Field(
        "cached",
        description="Frozen-model predictions a trajectory-loss method needs at its cached latents: cached = "
        "computed once when the latents are sampled and stored with them (float16), so a step runs only the "
        "trained model; recompute = run the frozen model again every step (today's path, for comparison).",
    )
    checkpoint_every: PositiveInt | None = Field(
        None, description="Save a resumable checkpoint every N steps (None: only at the end)."
    )
