"""Temperature scaling and reliability bins on synthetic probabilities with a known true temperature."""

import json

import numpy as np
import pytest

from prodfuse.inference.calibration import apply_temperature, fit_temperature, negative_log_likelihood, reliability_bins
from prodfuse.modeling.metrics import expected_calibration_error
from prodfuse.modeling.run import load_temperature, save_temperature


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _calibrated_world(n=4000, k=10, seed=0):
    """Logits z and labels drawn from softmax(z): softmax(z) is perfectly calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, k))
    p = _softmax(z)
    y = np.minimum((rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1), k - 1)  # one draw per row
    return z, y


def test_apply_temperature_matches_softmax_of_scaled_logits():
    z = np.array([[2.0, 1.0, -1.0], [0.0, 0.0, 3.0]])
    p = _softmax(z)
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, atol=1e-12)
    np.testing.assert_allclose(apply_temperature(p, 2.0), _softmax(z / 2.0), atol=1e-12)
    np.testing.assert_allclose(apply_temperature(p, 0.5), _softmax(z * 2.0), atol=1e-12)
    # argmax never changes, so accuracy is unaffected by calibration
    assert (apply_temperature(p, 7.0).argmax(1) == p.argmax(1)).all()
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(p, 0.0)


def test_temperature_scaling_fixes_an_over_confident_model():
    z, y = _calibrated_world()
    over = _softmax(5.0 * z)  # logits scaled x5: the same ranking, far too confident
    t = fit_temperature(y, over)
    assert 4.5 < t < 5.5
    cal = apply_temperature(over, t)
    before, after = expected_calibration_error(y, over), expected_calibration_error(y, cal)
    assert before > 0.2
    assert after < 0.03 and after < before / 5
    assert negative_log_likelihood(y, cal) < negative_log_likelihood(y, over)


def test_temperature_scaling_sharpens_an_under_confident_model():
    z, y = _calibrated_world(seed=1)
    t = fit_temperature(y, _softmax(z / 3.0))
    assert 0.28 < t < 0.38


def test_calibrated_model_keeps_temperature_near_one():
    z, y = _calibrated_world(seed=2)
    assert 0.9 < fit_temperature(y, _softmax(z)) < 1.1
    with pytest.raises(ValueError, match="0 validation items"):
        fit_temperature(np.zeros(0, int), np.zeros((0, 3)))


def test_reliability_bins_add_up_to_the_ece():
    z, y = _calibrated_world(n=1500, seed=3)
    p = _softmax(3.0 * z)
    b = reliability_bins(y, p, bins=15)
    assert b["count"].sum() == len(y)
    ok = b["count"] > 0
    ece = np.sum(b["count"][ok] / len(y) * np.abs(b["accuracy"][ok] - b["confidence"][ok]))
    assert ece == pytest.approx(expected_calibration_error(y, p, bins=15), abs=1e-12)


def test_temperature_file_round_trip(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"model one")
    assert load_temperature(tmp_path) == (1.0, False)
    save_temperature(tmp_path, 2.5, {"n": 10})
    assert load_temperature(tmp_path) == (2.5, True)
    assert json.loads((tmp_path / "temperature.json").read_text())["n"] == 10
    # fitted on another model: ignored, T = 1
    (tmp_path / "model.keras").write_bytes(b"model two")
    assert load_temperature(tmp_path) == (1.0, False)
    (tmp_path / "model.keras").write_bytes(b"model one")
    (tmp_path / "temperature.json").write_text('{"temperature": -1}')
    with pytest.raises(ValueError, match="-1"):
        load_temperature(tmp_path)


def test_reliability_plot_writes_a_png(tmp_path):
    from prodfuse.evaluation.plots import plot_reliability

    z, y = _calibrated_world(n=300, seed=4)
    p = _softmax(4 * z)
    q = apply_temperature(p, 4.0)
    plot_reliability(reliability_bins(y, p), reliability_bins(y, q), 0.3, 0.02, 4.0, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
