"""Feature comparisons at each tap's own scale, for every test that checks features against a reference, and
the reference standardization statistics the oracles compute for themselves.

An absolute tolerance cannot see a tap whose values are far below it (a zeroed tap of a random-init network
passes `atol=1e-5` when its features are 5e-9), and a cosine cannot see a scale (a tap stored x2) nor a zero
vector (0/0 is NaN). So: both arrays finite and of the same shape, the reference not all zeros, and the
largest difference at most `rel` times the reference's largest magnitude.
"""

from __future__ import annotations

import numpy as np

# The bounds, as fractions of each tap's largest magnitude. The calibrated random networks amplify rounding
# with depth (MobileNetV2 at 48 px: 1.6e-7 at features.0, 1.8e-5 at features.17), so the deepest taps set them.
# A float32 forward through the same operations, in another order, memory format or with BatchNorm folded
# into the convolutions: measured worst 9.7e-5 (test_backbones: resnet50's layer4.2 at 32 px; MobileNetV2's
# features.18 3.4e-5, the others 1e-5 or less), 1.8e-5 (test_extract), 2.5e-7 (test_predict's logits).
# A zeroed tap is 1 away, a doubled one 1.
FLOAT32 = 1e-3
# The forward pass under bf16 autocast against fp32 (8-bit mantissa): measured worst 0.115, at features.14.
BF16 = 0.3
# fp32 features stored as float16: rounding is at most 2**-11 = 4.9e-4 of each value; measured worst 4.75e-4.
FLOAT16 = 1e-3
# A float32 forward with the weights rounded to float16: measured worst 1.1e-2, at features.14.
HALF_WEIGHTS = 0.05


def assert_features_close(got, ref, rel: float = FLOAT32, name: str = "") -> float:
    """Assert `got` equals the reference `ref` to `rel` of the reference's largest magnitude; returns the
    relative error max|got - ref| / max|ref|."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    where = f"{name}: " if name else ""
    assert got.shape == ref.shape, f"{where}shape {got.shape} != reference {ref.shape}"
    assert got.size > 0, f"{where}no features to compare"
    assert np.isfinite(ref).all(), f"{where}the reference holds NaN or inf"
    assert np.isfinite(got).all(), f"{where}NaN or inf in the features"
    scale = float(np.abs(ref).max())
    assert scale > 0, f"{where}the reference is all zeros: nothing to compare against"
    err = float(np.abs(got - ref).max()) / scale
    assert err <= rel, f"{where}max|got - ref| = {err:.3g} x max|ref| ({scale:.3g}), above {rel:g}"
    return err


def assert_all_taps_close(got: dict, ref: dict, rel: float = FLOAT32, taps=None) -> dict[str, float]:
    """`assert_features_close` for every tap of `got` (or of `taps`), each at its own scale; the same taps on
    both sides. Returns {tap: relative error}."""
    taps = list(got) if taps is None else list(taps)
    assert taps, "no taps to compare"
    missing = [t for t in taps if t not in ref or t not in got]
    assert not missing, f"taps missing from one side: {missing}"
    return {t: assert_features_close(got[t], ref[t], rel, name=t) for t in taps}


def assert_order_one(features, name: str = "", low: float = 0.05, high: float = 100.0) -> float:
    """The synthetic backbones' features are at a real scale: finite, and the largest magnitude of the tap
    in [low, high]. Measured with calibrated BatchNorm (`fusion_cache.synthetic.calibrate_batchnorm`) on the
    tests' images: 0.18 (mobilenet_v3_large's pre_logits, after its classifier's hidden nn.Linear) to 10.4
    (resnet50's layer4.2) over every tap of every tested backbone; uncalibrated, MobileNetV2's features.17 is
    7e-9. Returns that largest magnitude."""
    f = np.asarray(features, np.float64)
    where = f"{name}: " if name else ""
    assert f.size > 0 and np.isfinite(f).all(), f"{where}empty, or NaN or inf in the features"
    scale = float(np.abs(f).max())
    assert low <= scale <= high, f"{where}max|f| = {scale:.3g}, outside [{low:g}, {high:g}]"
    return scale


def train_stats(X) -> tuple[np.ndarray, np.ndarray]:
    """The reference standardization, computed by the tests themselves (never with the package's own):
    float64 mean and population std per column; a constant column keeps scale 1."""
    X = np.asarray(X, np.float64)
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return mean, scale
