"""SLD (``sld``): Safe Latent Diffusion, safety guidance added to every sampling step.

Schramowski et al., "Safe Latent Diffusion: Mitigating Inappropriate Degeneration in Diffusion
Models", CVPR 2023 (arXiv 2211.05105). No weights change. Each step runs one more UNet branch on
a safety concept ``S`` and, with ``ε_∅, ε_p, ε_S`` the unconditional, prompt and safety
predictions, replaces classifier-free guidance ``ε_∅ + s_g (ε_p − ε_∅)`` by
``ε_∅ + s_g (ε_p − ε_∅ − γ)``:

    μ = min(1, s_S |ε_p − ε_S|), and 0 where ε_p − ε_S ≥ λ_th      (element-wise)
    γ = μ ⊙ (ε_S − ε_∅) + s_m ν ;   ν ← β_m ν + (1 − β_m) γ          (momentum, every step)
    γ is subtracted only from step ``warmup_steps`` on.

The artifact is a guard (the resolved settings, a few hundred bytes of JSON in a safetensors
header) that :func:`conceptedit.load` installs as a pair of UNet forward hooks: the pre-hook
appends the safety branch to the UNet's classifier-free-guidance batch (one batched call, as
diffusers' ``StableDiffusionPipelineSafe`` does), the post-hook folds ``γ`` into the prompt
branch, so the pipeline's own guidance step produces SLD's result. Off (the plain pipeline,
bit for bit) when ``strength`` is 0, when ``guidance_scale`` ≤ 1 (as in diffusers), without
classifier-free guidance, and outside the pipeline's denoising loop.

On a v-prediction model (SD-2.x 768) the settings keep their ε meaning: each step's output
differences are divided by ``k_t = 1/√ᾱ_t`` (``output_per_noise``) before the threshold and
momentum, and ``γ`` is multiplied back, which is SLD run on the ε the outputs imply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, ValidationError, model_validator
from torch import Tensor

from conceptedit import EditContext, EditError, EditMethod, Guard, MethodParams, RunDirError, hookimpl
from conceptedit.toolkit import alphas_cumprod, denoising_state, output_per_noise

if TYPE_CHECKING:
    from conceptedit import BackboneAdapter, PredictionType

_CATEGORIES = (
    "hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, blood, "
    "obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, brutality, cruelty"
)

#: Named safety-concept texts. Both list the same inappropriate-content categories; only the
#: wording around them differs, and that changes the safety embedding, hence the images.
SAFETY_TEXTS: dict[str, str] = {
    # diffusers' StableDiffusionPipelineSafe default; the one the equivalence test checks against
    "diffusers": "an image showing " + _CATEGORIES,
    # the authors' own pipeline (ml-research/safe-latent-diffusion, sld_pipeline.py): the bare list
    "original": _CATEGORIES,
}

#: The default safety concept: diffusers' text, not the original pipeline's (see ``SAFETY_TEXTS``).
DEFAULT_SAFETY_CONCEPT = SAFETY_TEXTS["diffusers"]

#: The paper's four configurations (warm-up, s_S, λ_th, s_m, β_m), named as in its Table / diffusers' SafetyConfig.
PRESETS: dict[str, dict[str, float]] = {
    "weak": {"warmup_steps": 15, "guidance_scale": 20, "threshold": 0.0, "momentum_scale": 0.0, "momentum_beta": 0.0},
    "medium": {
        "warmup_steps": 10,
        "guidance_scale": 1000,
        "threshold": 0.01,
        "momentum_scale": 0.3,
        "momentum_beta": 0.4,
    },
    "strong": {
        "warmup_steps": 7,
        "guidance_scale": 2000,
        "threshold": 0.025,
        "momentum_scale": 0.5,
        "momentum_beta": 0.7,
    },
    "max": {"warmup_steps": 0, "guidance_scale": 5000, "threshold": 1.0, "momentum_scale": 0.5, "momentum_beta": 0.7},
}
_SETTINGS = ("warmup_steps", "guidance_scale", "threshold", "momentum_scale", "momentum_beta")


class SldSettings(BaseModel):
    """Fully resolved SLD settings: what the guard file stores."""

    model_config = ConfigDict(extra="forbid")

    safety_concept: str
    warmup_steps: NonNegativeInt
    guidance_scale: NonNegativeFloat
    threshold: float
    momentum_scale: NonNegativeFloat
    momentum_beta: float = Field(ge=0, le=1)
    strength: NonNegativeFloat

    @property
    def enabled(self) -> bool:
        return self.strength > 0 and self.guidance_scale > 1


class SldParams(MethodParams):
    preset: Literal["weak", "medium", "strong", "max"] | None = Field(
        "medium",
        description="The paper's configuration (medium is diffusers' default); the five settings below "
        "override it one by one. null: give all five.",
    )
    safety_text: Literal["diffusers", "original"] = Field(
        "diffusers",
        description="Named text of the safety concept S: diffusers = StableDiffusionPipelineSafe's "
        "('an image showing hate, harassment, ...'); original = the authors' sld_pipeline.py, the same list "
        "without the prefix. Used unless safety_concept is given.",
    )
    safety_concept: str | None = Field(
        None, min_length=1, description="Own text of the safety concept S (null: the safety_text one)."
    )
    warmup_steps: NonNegativeInt | None = Field(None, description="Steps before γ is applied (preset's if null).")
    guidance_scale: NonNegativeFloat | None = Field(
        None, description="s_S, the safety guidance scale; ≤ 1 turns SLD off (preset's if null)."
    )
    threshold: float | None = Field(None, description="λ_th: elements with ε_p − ε_S ≥ λ_th get no safety guidance.")
    momentum_scale: NonNegativeFloat | None = Field(None, description="s_m, weight of the momentum ν in γ.")
    momentum_beta: float | None = Field(None, ge=0, le=1, description="β_m, the momentum's decay.")
    strength: NonNegativeFloat = Field(
        1.0, description="Multiplies γ where it is applied; 0 gives the plain pipeline's images bit for bit."
    )

    @model_validator(mode="after")
    def _complete(self) -> SldParams:
        if self.safety_concept is not None and "safety_text" in self.model_fields_set:
            raise ValueError(
                "give either safety_text (a named text: diffusers, original) or safety_concept (your own text), "
                "not both"
            )
        if self.preset is None:
            missing = [name for name in _SETTINGS if getattr(self, name) is None]
            if missing:
                raise ValueError(
                    f"preset is null, so every setting must be given; missing: {', '.join(missing)} "
                    "(or choose a preset: weak, medium, strong, max)"
                )
        return self

    def resolved(self) -> SldSettings:
        """The preset with this edit's overrides applied."""
        values: dict[str, Any] = dict(PRESETS[self.preset]) if self.preset else {}
        values.update({name: getattr(self, name) for name in _SETTINGS if getattr(self, name) is not None})
        concept = self.safety_concept if self.safety_concept is not None else SAFETY_TEXTS[self.safety_text]
        return SldSettings(safety_concept=concept, strength=self.strength, **values)


class _SafetyGuidance:
    """The UNet hooks of one installed SLD guard, and its per-image state (step, momentum)."""

    def __init__(
        self,
        pipeline: Any,
        settings: SldSettings,
        embedding: Tensor,
        prediction: PredictionType,
        pooled: Tensor | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.embedding = embedding  # [1, L, D]
        self.pooled = pooled  # [1, P]: SDXL's pooled embedding of the safety concept, else None
        self.state = denoising_state(pipeline)
        self.generation = -1
        self.step = 0
        self.momentum: Tensor | None = None
        self.half: int | None = None
        self.prediction = prediction
        self.alphas = alphas_cumprod(pipeline.scheduler.config) if prediction != "epsilon" else None
        self.per_noise: Tensor | None = None  # k_t of the step being guided (None: an ε model)

    def _per_noise(self, timestep: Any) -> Tensor | None:
        """The step's ``k_t`` (output per unit of ε at a fixed latent), so that SLD's thresholds and
        momentum, set in ε units, read v-prediction outputs in ε; None for an ε model (nothing to convert)."""
        if self.alphas is None or timestep is None:
            return None
        t = torch.as_tensor(timestep).reshape(-1)[:1].long().cpu()
        return output_per_noise(self.alphas, t, prediction=self.prediction).reshape(())

    def _applies(self, sample: Tensor) -> bool:
        cfg = bool(getattr(self.pipeline, "do_classifier_free_guidance", False))
        return self.state.active and self.state.enabled and cfg and sample.shape[0] % 2 == 0

    def before(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.half = None
        if len(args) > 3:
            return None  # a call shape the pipeline's loop never makes: leave it alone
        call = dict(zip(("sample", "timestep", "encoder_hidden_states"), args, strict=False)) | kwargs
        sample = call.get("sample")
        hidden = call.get("encoder_hidden_states")
        if not isinstance(sample, Tensor) or not isinstance(hidden, Tensor) or not self._applies(sample):
            return None
        if self.generation != self.state.generation:  # a new image: restart warm-up and momentum
            self.generation, self.step, self.momentum = self.state.generation, 0, None
        n = sample.shape[0]
        half = n // 2
        if hidden.shape[1] != self.embedding.shape[1]:
            raise EditError(
                f"SLD guard: the prompt embeddings have {hidden.shape[1]} tokens but the safety concept "
                f"{self.embedding.shape[1]}; SLD supports the standard 77-token prompt embeddings"
            )
        safety = self.embedding.to(hidden.device, hidden.dtype).expand(half, -1, -1)
        call["sample"] = torch.cat([sample, sample[half:]])
        call["encoder_hidden_states"] = torch.cat([hidden, safety])
        call["timestep"] = _extend(call.get("timestep"), n, half)
        if "timestep_cond" in call:
            call["timestep_cond"] = _extend(call["timestep_cond"], n, half)
        if isinstance(call.get("added_cond_kwargs"), dict):
            call["added_cond_kwargs"] = self._added(call["added_cond_kwargs"], n, half)
        self.half = half
        self.per_noise = self._per_noise(call.get("timestep"))
        return (), call

    def _added(self, added: dict[str, Any], n: int, half: int) -> dict[str, Any]:
        """The UNet's added conditioning for the extended batch: the prompts' (SDXL's time ids), but
        the safety branch reads the safety concept's pooled embedding (``text_embeds``)."""
        extended = {k: _extend(v, n, half) for k, v in added.items()}
        embeds = extended.get("text_embeds")
        if self.pooled is not None and isinstance(embeds, Tensor) and embeds.shape[0] == n + half:
            safety = self.pooled.to(embeds.device, embeds.dtype).expand(half, -1)
            extended["text_embeds"] = torch.cat([embeds[:n], safety])
        return extended

    def after(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if self.half is None:
            return None
        half, self.half = self.half, None
        s = self.settings
        noise = output[0] if isinstance(output, tuple) else output.sample
        uncond, text, safety = noise[:half], noise[half : 2 * half], noise[2 * half :]
        k = None if self.per_noise is None else self.per_noise.to(noise.device, noise.dtype)
        diff = text - safety if k is None else (text - safety) / k  # in ε units either way
        scale = torch.where(diff >= s.threshold, torch.zeros_like(diff), (diff.abs() * s.guidance_scale).clamp(max=1.0))
        gamma = (safety - uncond) * scale if k is None else (safety - uncond) / k * scale
        if self.momentum is None:
            self.momentum = torch.zeros_like(gamma)
        gamma = gamma + s.momentum_scale * self.momentum
        self.momentum = s.momentum_beta * self.momentum + (1 - s.momentum_beta) * gamma
        if self.step >= s.warmup_steps:
            shift = gamma if k is None else gamma * k  # back to the output's units
            text = text - s.strength * shift  # the pipeline's CFG then gives ε_∅ + s_g (ε_p − ε_∅ − γ)
        self.step += 1
        merged = torch.cat([uncond, text])
        if isinstance(output, tuple):
            return (merged, *output[1:])
        return type(output)(sample=merged)


def _extend(value: Any, n: int, half: int) -> Any:
    """A per-sample tensor of batch ``n`` with its prompt half appended (for the safety branch)."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n:
        return torch.cat([value, value[half:]])
    return value


class Sld(EditMethod[SldParams]):
    """SLD: an extra safety-concept branch that steers every sampling step away from it."""

    name = "sld"
    summary = "SLD: Safe Latent Diffusion safety guidance at sampling time (presets weak/medium/strong/max)"
    kind = "inference_time"
    paper = "Schramowski et al., Safe Latent Diffusion, CVPR 2023, arXiv:2211.05105"
    Params = SldParams
    backbones = frozenset({"sd1", "sd2", "sdxl"})
    unsupported_backbones: ClassVar[dict[str, str]] = {
        "flux": (
            "its guard appends the safety branch to the UNet's one batched classifier-free-guidance call; "
            "FluxPipeline calls the transformer once per branch (true CFG, and none at all without a negative "
            "prompt), so there is no batched call to add the branch to"
        )
    }

    def inference_guard(self, ctx: EditContext) -> Guard:
        p = self.params
        return Guard(config={"sld": p.resolved().model_dump(), "preset": p.preset})

    @classmethod
    def install_guard(cls, pipeline: Any, guard: Guard, adapter: BackboneAdapter) -> None:
        try:
            settings = SldSettings.model_validate(guard.config.get("sld"))
        except ValidationError as exc:
            raise RunDirError(f"the SLD guard's settings are invalid (was the file edited?): {exc}") from exc
        unet = getattr(pipeline, "unet", None)
        if unet is None:
            raise EditError(f"SLD needs a pipeline with a UNet; {type(pipeline).__name__} has none")
        if not settings.enabled:
            return  # no hooks at all: the pipeline samples exactly as before
        encoding = adapter.encode_prompts([settings.safety_concept])
        hooks = _SafetyGuidance(pipeline, settings, encoding.hidden, adapter.prediction_type, encoding.pooled)
        unet.register_forward_pre_hook(hooks.before, with_kwargs=True)
        unet.register_forward_hook(hooks.after, with_kwargs=True)


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Sld)
