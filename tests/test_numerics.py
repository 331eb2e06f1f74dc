"""The one logistic solver (batchplan/core/numerics.py) pinned through its callers on a fixed input.

The plan estimates and the Platt calibrator each had a Newton solver of their own before; the values
below are what those gave on this input, so the shared solver changes no template and no calibrator.
The pair model's old solver used lam^2 for its penalty's curvature and stopped short of its optimum
(gradient 9e-3 here): its values are pinned at the true optimum instead, which the gradient check proves."""

from __future__ import annotations

import numpy as np
import pytest

from batchplan.core.numerics import P_CLIP, Z_CLIP, fit_logistic, logit, logit32, sigmoid
from batchplan.plans.estimates import fit_correct
from batchplan.predictors.calibration import fit_platt
from batchplan.predictors.pairmodel import PairModel

N = 400


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    p = rng.uniform(0.02, 0.98, size=(N, 2))
    lp = np.log(p / (1 - p))
    y = (rng.random(N) < 1 / (1 + np.exp(-(0.3 + 0.8 * lp[:, 0] - 0.5 * lp[:, 1])))).astype(float)
    other = rng.normal(size=N)
    return p, y, np.column_stack([np.ones(N), lp, other])


def test_template_calibrations_are_what_the_old_solvers_gave(data: tuple[np.ndarray, ...]) -> None:
    p, y, _ = data
    logistic = [0.46854995083523315, 0.676826940646112, -0.4019009770669177]
    assert fit_correct("logistic", "cascade", p, 4, y) == pytest.approx(logistic, abs=1e-9)
    assert fit_correct("offset", "cascade", p, 4, y) == pytest.approx([-0.4017528820718137, 1.0], abs=1e-9)


def test_platt_is_what_the_old_solver_gave(data: tuple[np.ndarray, ...]) -> None:
    p, y, _ = data
    calibrator = fit_platt(p[:, 0], y)
    # the old solver stopped at steps < 1e-9, this one at 1e-10: 4e-9 apart
    assert [calibrator.params["a"], calibrator.params["b"]] == pytest.approx(
        [0.656645522635127, 0.4440974094468867], abs=1e-8
    )


def test_pair_model_reaches_its_penalised_optimum(data: tuple[np.ndarray, ...]) -> None:
    _, y, z = data
    mi = np.arange(N) % 2
    model = PairModel.fit(z, y, mi, ["m0", "m1"], ["intercept", "prior_logit", "difficulty", "other"])
    assert model.global_beta.tolist() == pytest.approx(
        [0.46326806819469907, 0.6811698182040843, -0.3566508460014085, 0.04343354740069337], abs=1e-9
    )
    assert model.betas[0].tolist() == pytest.approx(
        [0.30115063567095113, 0.6725259520641766, -0.2728175795448577, 0.12017186113926234], abs=1e-9
    )
    per_model = np.array([1e-2, 30.0, 30.0, 30.0])
    for m in range(2):
        rows = mi == m
        q = sigmoid(z[rows] @ model.betas[m])
        grad = z[rows].T @ (q - y[rows]) + per_model * (model.betas[m] - model.global_beta)
        assert np.abs(grad).max() < 1e-6  # the old solver stopped at 9e-3


def test_offset_calibration_recovers_a_known_shift() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(0.5, 1.2, 40_000)
    y = (rng.random(z.size) < sigmoid(z + 0.7)).astype(float)
    assert fit_logistic(np.ones((z.size, 1)), y, offset=z)[0] == pytest.approx(0.7, abs=0.05)
    # all-positive labels: the free intercept grows without bound, but each step still goes downhill
    # and the solver stops after its iterations with a finite, large value
    b = fit_logistic(np.ones((50, 1)), np.ones(50))[0]
    assert np.isfinite(b)
    assert b > 10


def test_one_clip() -> None:
    assert logit(np.array([0.0, 1.0])).tolist() == pytest.approx(
        [np.log(P_CLIP / (1 - P_CLIP)), np.log((1 - P_CLIP) / P_CLIP)]
    )
    assert logit32(np.array([0.0, 0.5, 1.0])).dtype == np.float32
    assert logit32(np.array([0.0, 0.5, 1.0])) == pytest.approx(logit(np.array([0.0, 0.5, 1.0])), abs=1e-3)
    assert sigmoid(np.array([-1e6, 0.0, 1e6])).tolist() == pytest.approx(
        [1 / (1 + np.exp(Z_CLIP)), 0.5, 1 / (1 + np.exp(-Z_CLIP))]
    )
    assert float(sigmoid(np.float64(0.0))) == 0.5
