"""Fits the rational normal CDF of the GELU forward kernel (`crates/kernels/src/act.rs`).

    Φ(x) − ½ ≈ x · P(x²) / Q(x²),  |x| ≤ 5.3,  Q(0) = 1

by least squares on the linearised residual x·P − (Φ − ½)·Q, reweighted by the error
of each pass (Lawson's iteration) so the fit tends towards equal ripple; the best pass
is kept. It prints the coefficients rounded to f32 and the largest error of Φ in exact
arithmetic and with every step rounded to f32 (FMAs rounded once).

NumPy and SciPy are not project dependencies: run this in a throwaway virtual
environment outside the repository::

    python3 -m venv /tmp/fit && /tmp/fit/bin/pip install numpy scipy
    /tmp/fit/bin/python scripts/fit_normal_cdf.py
"""

import numpy as np
from scipy.special import ndtr

CAP = 5.3
DEG_P, DEG_Q = 4, 5


def fit(p, q, cap, passes=300, n=20000):
    x = np.linspace(0.0, cap, n)
    s = x * x
    f = ndtr(x) - 0.5
    a = np.hstack(
        [
            np.stack([x * s**i for i in range(p + 1)], 1),
            np.stack([-f * s**j for j in range(1, q + 1)], 1),
        ]
    )
    w = np.ones(n)
    den = np.ones(n)
    best = None
    for _ in range(passes):
        scale = w / den
        sol, *_ = np.linalg.lstsq(a * scale[:, None], f * scale, rcond=None)
        pc, qc = sol[: p + 1], np.concatenate([[1.0], sol[p + 1 :]])
        den = np.polyval(qc[::-1], s)
        err = x * np.polyval(pc[::-1], s) / den - f
        worst = np.abs(err).max()
        if best is None or worst < best[0]:
            best = (worst, pc.copy(), qc.copy())
        w = w * np.abs(err)
        w /= w.sum()
    return best


def f32(v):
    return np.asarray(v, dtype=np.float32).astype(np.float64)


def phi_f32(pc, qc, x):
    """Φ as the kernel computes it, each operation rounded to f32."""
    xc = np.clip(x, f32(-CAP), f32(CAP))
    s = f32(xc * xc)
    num = np.full_like(s, pc[-1])
    for c in pc[-2::-1]:
        num = f32(num * s + c)
    den = np.full_like(s, qc[-1])
    for c in qc[-2::-1]:
        den = f32(den * s + c)
    r = f32(f32(xc * num) * f32(1.0 / den))
    return np.where(x < -CAP, 0.0, f32(r + 0.5))


def main():
    exact, pc, qc = fit(DEG_P, DEG_Q, CAP)
    pc, qc = f32(pc), f32(qc)
    x = f32(np.linspace(-8.0, 8.0, 1_600_001))
    rounded = np.abs(phi_f32(pc, qc, x) - ndtr(x)).max()
    print("P:", ", ".join(repr(float(np.float32(c))) for c in pc))
    print("Q:", ", ".join(repr(float(np.float32(c))) for c in qc))
    print(f"largest error of Φ: {exact:.2e} exact, {rounded:.2e} in f32")


if __name__ == "__main__":
    main()
