"""What methods read and return: prompt encodings, key/value edits, guards, prompt pairs.

Prompt encoding: text-encoder embeddings plus the token positions edit methods read.

Closed-form methods pick particular token rows of a prompt's encoding: the start token
(SoT), the first end token ([EoT]), the last padding token, the last word token, or the
tokens of a keyword. Those positions come from token ids, never from counting words: a word
like "Nudity" is two BPE pieces, so a word count lands on the wrong row. They come from the
end-of-text id, never from the pad id: SD-1.x pads with [EoT] itself, SD-2.x with ``!`` (id 0),
which is also an ordinary token ("a cat!"), so the first pad id is not where the words end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from conceptedit.errors import EditError

TokenRow = Literal["sot", "eot", "last_pad", "last_word"]


@dataclass
class PromptEncoding:
    """Encoded prompts.

    Attributes:
        prompts: The prompts as given.
        input_ids: Token ids, ``[batch, length]``.
        hidden: Text-encoder output (the embeddings cross-attention reads), ``[batch, length, dim]``.
        eot_index: Position of the first end token (the tokenizer's end-of-text id, whatever it
            pads with) in each prompt, ``[batch]``; the prompt's real tokens are ``0..eot_index``.
            SDXL: the later of its two tokenizers' first [EoT] (they split ``!`` differently).
        eos_token_id: The tokenizer's end-of-text id.
        pooled: The pooled text embedding, ``[batch, pooled_dim]``, for backbones whose denoiser
            also reads one (SDXL: text encoder 2's projected [EoT] output); None for SD-1.x/2.x.
            The adapter that encoded the prompts finds it again for any copy of these ``hidden``
            rows handed to ``predict_noise`` (docs/backbones.md), so methods need not carry it.

    Rows: ``sot`` is position 0, ``eot`` the first [EoT], ``last_word`` the position before it
    (the start token for an empty prompt), ``last_pad`` the last position of the padded context
    (``length - 1``: 76 for full 77-token encodings, whatever token the tokenizer pads with).
    """

    prompts: list[str]
    input_ids: Tensor
    hidden: Tensor
    eot_index: Tensor
    eos_token_id: int
    pooled: Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def positions(self, row: TokenRow) -> Tensor:
        """Index of the named token row in each prompt, ``[batch]``."""
        batch = len(self)
        if row == "sot":
            return torch.zeros(batch, dtype=torch.long)
        if row == "eot":
            return self.eot_index.clone()
        if row == "last_word":
            return (self.eot_index - 1).clamp(min=0)
        if row == "last_pad":
            return torch.full((batch,), self.input_ids.shape[1] - 1, dtype=torch.long)
        raise EditError(f"unknown token row {row!r}; use one of sot, eot, last_pad, last_word")

    def rows(self, positions: Tensor) -> Tensor:
        """Gather one embedding per prompt at ``positions``: ``[batch, dim]``."""
        if positions.shape != (len(self),):
            raise EditError(f"expected {len(self)} positions, got shape {tuple(positions.shape)}")
        index = positions.to(self.hidden.device).view(-1, 1, 1).expand(-1, 1, self.hidden.shape[-1])
        return self.hidden.gather(1, index).squeeze(1)

    def row(self, row: TokenRow) -> Tensor:
        """Shortcut for ``rows(positions(row))``."""
        return self.rows(self.positions(row))

    def keyword_positions(self, keyword_ids: Sequence[Sequence[int]]) -> Tensor:
        """Position of the first token of each prompt's keyword among its words, ``[batch]``; -1 where absent.

        Only the words (before the first end-of-text id) are searched, never the padding (SD-2.x
        pads with ``!``, so a keyword of ``!`` would otherwise be found in it).

        Args:
            keyword_ids: Per prompt, the token ids of its keyword (without SoT/EoT).
        """
        if len(keyword_ids) != len(self):
            raise EditError(f"expected {len(self)} keywords, got {len(keyword_ids)}")
        found = []
        for ids, key in zip(self.input_ids.tolist(), keyword_ids, strict=True):
            key = list(key)
            words = ids[: ids.index(self.eos_token_id)] if self.eos_token_id in ids else ids
            hit = next((i for i in range(len(words) - len(key) + 1) if key and words[i : i + len(key)] == key), -1)
            found.append(hit)
        return torch.tensor(found, dtype=torch.long)


#: ``(parameter name, W) -> [N, d_out]``: explicit goal outputs of one projection.
TargetFn = Callable[[str, Tensor], Tensor]

#: ``(parameter name, W) -> [D, D]``: the projector one projection's change must act through.
ProjectorFn = Callable[[str, Tensor], Tensor]


@dataclass
class KVEdit:
    """One closed-form key/value edit, as a method describes it to the engine.

    Attributes:
        keys: ``[N, D]`` text embeddings whose projections should move.
        targets: ``[N, D]`` embeddings whose *current* projections are the goals
            (``v_i = W t_i``). Give this or ``target_fn``.
        target_fn: ``(parameter name, W) -> [N, d_out]`` explicit goal outputs per layer.
        weights: ``[N]`` weight of each key row (default 1 each).
        preserve: ``[M, D]`` embeddings whose outputs must not change.
        preserve_scale: ``s`` above.
        prior: ``[D, D]`` second-moment matrix ``C`` of embeddings to preserve.
        prior_scale: ``η`` above.
        ridge: ``λ`` above.
        projector: ``[D, D]`` projector ``Π`` (symmetric, ``Π² = Π``) onto the directions the
            change may act on: the new weight is ``W + ΔΠ``, so inputs ``Π`` maps to zero (the
            retained keys of a null-space edit, AlphaEdit/SPEED) keep their outputs exactly. The
            terms above then apply to ``ΔΠ``; needs ``ridge > 0``.
        projector_fn: ``(parameter name, W) -> [D, D]``: ``Π`` per layer, for a retained set
            that depends on the layer's weight. Give at most one of ``projector``/``projector_fn``.
        invariant: ``[E, D]`` embeddings whose outputs must not change at all (equality
            constraints ``ΔΠ e = 0``, solved with Lagrange multipliers); needs ``ridge > 0``.
        invariant_ridge: ``μ`` added to the diagonal of the multipliers' ``E x E`` system;
            0 keeps the invariant rows exactly, ``μ > 0`` loosens them (SPEED's ``lamb``).
        projections: Which projections to edit: ``"k"``, ``"v"`` or both (on FLUX one linear map
            carries both, so only both).
        layers: Names of cross-attention layers to edit (default: all of them).
        label: Shown in progress output and errors.
        stream: What ``keys`` are: ``rows``, text rows, solved on every cross-attention layer's
            maps; ``pooled``, pooled text vectors (``PromptEncoding.pooled``), solved on the maps
            that read the pooled vector alone (``BackboneAdapter.pooled_layers``: FLUX's).
    """

    keys: Tensor
    targets: Tensor | None = None
    target_fn: TargetFn | None = None
    weights: Tensor | None = None
    preserve: Tensor | None = None
    preserve_scale: float = 1.0
    prior: Tensor | None = None
    prior_scale: float = 0.0
    ridge: float = 0.0
    projector: Tensor | None = None
    projector_fn: ProjectorFn | None = None
    invariant: Tensor | None = None
    invariant_ridge: float = 0.0
    projections: tuple[str, ...] = ("k", "v")
    layers: Sequence[str] | None = None
    label: str = "kv-edit"
    stream: Literal["rows", "pooled"] = "rows"

    @property
    def constrained(self) -> bool:
        """Whether the change is restricted (a projector or invariant rows): the null-space solve."""
        return self.projector is not None or self.projector_fn is not None or self.invariant is not None

    def validate(self, dim: int) -> None:
        """Check shapes and options against the width ``dim`` of the text rows (or pooled vectors)."""
        if self.keys.ndim != 2 or self.keys.shape[1] != dim:
            raise EditError(f"{self.label}: keys must be [N, {dim}], got {tuple(self.keys.shape)}")
        n = self.keys.shape[0]
        if n == 0:
            raise EditError(f"{self.label}: no key rows to edit")
        if (self.targets is None) == (self.target_fn is None):
            raise EditError(f"{self.label}: give exactly one of targets or target_fn")
        if self.targets is not None and tuple(self.targets.shape) != (n, dim):
            raise EditError(f"{self.label}: targets must be [{n}, {dim}], got {tuple(self.targets.shape)}")
        if self.weights is not None and tuple(self.weights.shape) != (n,):
            raise EditError(f"{self.label}: weights must be [{n}], got {tuple(self.weights.shape)}")
        if self.preserve is not None and (self.preserve.ndim != 2 or self.preserve.shape[1] != dim):
            raise EditError(f"{self.label}: preserve must be [M, {dim}], got {tuple(self.preserve.shape)}")
        if self.prior is not None and tuple(self.prior.shape) != (dim, dim):
            raise EditError(f"{self.label}: prior must be [{dim}, {dim}], got {tuple(self.prior.shape)}")
        if not set(self.projections) <= {"k", "v"} or not self.projections:
            raise EditError(f"{self.label}: projections must be a non-empty subset of ('k', 'v')")
        if self.stream not in ("rows", "pooled"):
            raise EditError(f"{self.label}: stream must be 'rows' or 'pooled', got {self.stream!r}")
        if self.projector is not None and self.projector_fn is not None:
            raise EditError(f"{self.label}: give at most one of projector or projector_fn")
        if self.projector is not None and tuple(self.projector.shape) != (dim, dim):
            raise EditError(f"{self.label}: projector must be [{dim}, {dim}], got {tuple(self.projector.shape)}")
        if self.invariant is not None and (
            self.invariant.ndim != 2 or self.invariant.shape[1] != dim or self.invariant.shape[0] == 0
        ):
            raise EditError(f"{self.label}: invariant must be [E, {dim}] with E > 0, got {tuple(self.invariant.shape)}")
        for name, value in (
            ("preserve_scale", self.preserve_scale),
            ("prior_scale", self.prior_scale),
            ("ridge", self.ridge),
            ("invariant_ridge", self.invariant_ridge),
        ):
            if value < 0:
                raise EditError(f"{self.label}: {name} must be >= 0, got {value}")
        if self.constrained and self.ridge <= 0:
            raise EditError(
                f"{self.label}: a projector or invariant rows need ridge > 0 (the change is pinned down "
                "only by the ridge in the directions no key reaches)"
            )
        for name in ("keys", "targets", "weights", "preserve", "prior", "projector", "invariant"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                raise EditError(f"{self.label}: {name} contains NaN or inf")


@dataclass
class Guard:
    """What an inference-time method saves: enough to re-install it on a fresh pipeline.

    Attributes:
        config: JSON-serialisable settings (strings, numbers, lists, dicts).
        tensors: Small tensors the guard needs (concept directions, ...); may be empty.
    """

    config: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptPair:
    """A prompt carrying a concept and the prompt it should behave like afterwards.

    Attributes:
        source: The prompt with the concept to edit (``"A snapshot of nudity"``).
        target: The same template filled with the target (``"A snapshot of a person wearing clothes"``).
        concept: The bare concept (``"nudity"``), for methods that locate its tokens.
        target_concept: The bare target.
    """

    source: str
    target: str
    concept: str
    target_concept: str
