"""
SP 800-90B cut-offs: the run length (RCT, §4.4.1) or window count (APT,
§4.4.2) at which a health test fails, given the entropy per sample and the
false-alarm probability alpha.

Both are computed from the standard's formulas, not looked up, so any credit
and any alpha work:

* RCT (§4.4.1): ``C = 1 + ceil(-log2(alpha) / H)``. A run of C equal samples
  has probability at most ``2^(-H·(C-1)) ≤ alpha`` on a source with H bits
  of min-entropy per sample.
* APT (§4.4.2): ``C = 1 + CRITBINOM(W, 2^-H, 1 - alpha)``, capped at W, where
  CRITBINOM(n, p, q) is the smallest k with ``P(Binomial(n, p) ≤ k) ≥ q``:
  the window's first value occurring C times or more among its W samples is
  then (by the standard's binomial bound) no likelier than alpha. W is 512 for
  non-binary samples and 1024 for binary ones.

For example, H = 8 and alpha = 2^-30 give an RCT cut-off of 1 + ceil(30/8) = 5
and an APT cut-off of 16 (W = 512). ``tests/broker/test_health.py`` checks
both functions against a table of cut-offs over H and alpha.
"""

import math
from decimal import Decimal, localcontext
from functools import lru_cache

APT_WINDOW = 512
"""SP 800-90B APT window for non-binary samples."""
APT_WINDOW_BINARY = 1024
"""SP 800-90B APT window for binary samples."""

# Relative slack for -log2(alpha)/H so that e.g. 30 / 0.6 counts as 50, not
# 50.000000000000007: the table is defined on the decimal values.
_CEIL_SLACK = 1e-9


def rct_cutoff(h: float, alpha_log2: float) -> int:
    """
    SP 800-90B RCT cut-off: ``1 + ceil(-log2(alpha) / H)``.

    Args:
        h: min-entropy per sample, in bits (> 0).
        alpha_log2: log2 of the false-positive probability per decision (< 0).

    Returns:
        The run length at which the test fails.

    Raises:
        ValueError: ``h`` or ``alpha_log2`` out of range.
    """
    if not h > 0:
        raise ValueError("entropy per sample must be positive")
    if not alpha_log2 < 0:
        raise ValueError("alpha_log2 must be negative")
    ratio = -alpha_log2 / h
    return 1 + math.ceil(ratio - ratio * _CEIL_SLACK)


@lru_cache(maxsize=64)
def apt_cutoff(h: float, alpha_log2: float, window: int = APT_WINDOW) -> int:
    """
    SP 800-90B APT cut-off: ``1 + CRITBINOM(W, 2^-H, 1 - alpha)``, capped at W.

    CRITBINOM(n, p, q) is the smallest k with Binomial(n, p).cdf(k) ≥ q; it is
    computed with 60 significant digits, so that a tail probability landing
    next to alpha is never misjudged by rounding.

    Args:
        h: min-entropy per sample, in bits (> 0).
        alpha_log2: log2 of the false-positive probability per window (< 0).
        window: W, 512 for non-binary samples, 1024 for binary ones.

    Returns:
        The count of the window's first value at which the test fails.

    Raises:
        ValueError: an argument is out of range.
    """
    if not h > 0:
        raise ValueError("entropy per sample must be positive")
    if not alpha_log2 < 0:
        raise ValueError("alpha_log2 must be negative")
    if window < 2:
        raise ValueError("the window must hold at least 2 samples")
    with localcontext() as ctx:
        ctx.prec = 60
        p = Decimal(2) ** Decimal(-h)
        q = 1 - p
        alpha = Decimal(2) ** Decimal(alpha_log2)
        ratio = p / q
        pmf = [q**window]
        for k in range(window):
            pmf.append(pmf[-1] * (window - k) / (k + 1) * ratio)
        # Walk down from k = W keeping tail = P(X > k) ≤ alpha; stop at the
        # smallest such k, which is CRITBINOM.
        tail = Decimal(0)
        k = window
        while k > 0 and tail + pmf[k] <= alpha:
            tail += pmf[k]
            k -= 1
    return min(1 + k, window)
