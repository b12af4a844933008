"""Student's t distribution for the verdict rule, in plain Python: the rule needs a few one-sided
levels at fractional degrees of freedom (Welch), and the runner must not need scipy."""

import math


def student_t_cdf(x, dof, intervals=400):
    """P(T <= x) for Student's t with dof degrees of freedom (Simpson's rule on the density)."""
    scale = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    density = lambda u: scale * (1 + u * u / dof) ** (-(dof + 1) / 2)  # noqa: E731
    a = min(abs(x), 100.0)  # beyond 100 the tail is negligible at the levels used
    h = a / intervals
    area = density(0) + density(a) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    upper_half = area * h / 3
    return 0.5 + upper_half if x >= 0 else 0.5 - upper_half


_QUANTILES = {}


def student_t_quantile(p, dof):
    """x with P(T <= x) = p, by bisection (cached by rounded dof: the rule asks for a few levels)."""
    key = (p, round(dof, 1))
    if key not in _QUANTILES:
        low, high = -100.0, 100.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if student_t_cdf(middle, key[1]) < p else (low, middle)
        _QUANTILES[key] = (low + high) / 2
    return _QUANTILES[key]
