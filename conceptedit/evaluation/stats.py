"""Uncertainty of the rates suites report: Wilson score intervals.

A benchmark rate is ``k`` successes in ``n`` images (erased, correct, ...). With the few dozen
images a shapes suite judges, "100% erased" can mean anything from 91% to 100%; the Wilson score
interval says how much, and unlike the normal approximation it stays inside [0, 1] and is
sensible at ``k = 0`` and ``k = n``:

    centre = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2),   p = k / n

Edges: ``k = 0`` gives a low of exactly 0 and ``k = n`` a high of exactly 1 (the closed form, with
rounding removed); ``n = 0`` (nothing measured) gives ``(0, 1)``, every rate being possible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The two-sided 95% normal quantile.
Z95 = 1.959964


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of ``successes`` in ``n`` trials (95% by default).

    ``n == 0`` gives ``(0.0, 1.0)``; ``successes == 0`` a low of 0.0 and ``successes == n`` a high
    of 1.0, exactly. Raises ``ValueError`` for negative counts, ``successes > n`` or ``z <= 0``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not z > 0:
        raise ValueError(f"z must be positive, got {z}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` as a rate with its Wilson interval; ``rate`` is NaN when ``n == 0``."""

    k: int
    n: int
    rate: float
    low: float
    high: float

    @classmethod
    def of(cls, k: int, n: int, z: float = Z95) -> Rate:
        low, high = wilson_interval(k, n, z)
        return cls(k, n, k / n if n else math.nan, low, high)

    def as_dict(self, name: str | None = None) -> dict[str, float]:
        """``{k, n, rate, low, high}``; with a ``name``, flat metrics ``{name: rate, name_n: n,
        name_low: low, name_high: high}`` (all floats, as suites report them)."""
        if name is None:
            return {"k": float(self.k), "n": float(self.n), "rate": self.rate, "low": self.low, "high": self.high}
        return {name: self.rate, f"{name}_n": float(self.n), f"{name}_low": self.low, f"{name}_high": self.high}
