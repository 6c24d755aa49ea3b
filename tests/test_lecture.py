"""The lecture's worked examples, against their closed-form backward passes."""

from __future__ import annotations

import numpy as np
import pytest

import gradpool as gp

from models import LAMBDA, batch_for, logistic_regression, params_for, two_layer_net


def sigma(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def test_single_example_matches_the_calculus_class_derivation() -> None:
    """Section 2.1: w_bar = (y - t) s'(z) x + lambda w, b_bar = (y - t) s'(z)."""
    graph = logistic_regression()
    w, b, x, t = 0.7, -0.3, 1.5, 1.0
    loss, grads = gp.local_gradients(graph, {"w": np.array(w), "b": np.array(b)},
                                     {"x": np.array([x]), "t": np.array([t])})
    z = w * x + b
    y = sigma(z)
    assert loss == pytest.approx(0.5 * (y - t) ** 2 + LAMBDA * 0.5 * w ** 2, rel=1e-14)
    assert grads["w"] == pytest.approx((y - t) * y * (1 - y) * x + LAMBDA * w, rel=1e-12)
    assert grads["b"] == pytest.approx((y - t) * y * (1 - y), rel=1e-12)


def test_regularizer_reaches_w_through_two_paths() -> None:
    """Figure 1: w feeds both z and R; w_bar sums both children's contributions."""
    graph = logistic_regression()
    params = {"w": np.array(0.0), "b": np.array(0.0)}
    batch = batch_for(graph, 5)
    _, with_reg = gp.local_gradients(graph, {"w": np.array(2.0), "b": np.array(0.0)}, batch)
    _, without = gp.local_gradients(logistic_regression(lam=0.0), {"w": np.array(2.0), "b": np.array(0.0)}, batch)
    assert with_reg["w"] - without["w"] == pytest.approx(LAMBDA * 2.0, rel=1e-12)
    assert with_reg["b"] == pytest.approx(without["b"], rel=1e-14)
    _, at_zero = gp.local_gradients(graph, params, batch)
    assert np.isfinite(at_zero["w"])


def test_batched_logistic_regression_sums_examples() -> None:
    graph = logistic_regression()
    batch = batch_for(graph, 9, seed=3)
    w, b = 0.4, 0.2
    _, grads = gp.local_gradients(graph, {"w": np.array(w), "b": np.array(b)}, batch)
    x, t = batch["x"], batch["t"]
    y = sigma(w * x + b)
    z_bar = (y - t) * y * (1 - y)
    assert grads["w"] == pytest.approx(np.sum(z_bar * x) + LAMBDA * w, rel=1e-12)
    assert grads["b"] == pytest.approx(np.sum(z_bar), rel=1e-12)


@pytest.mark.parametrize("n", [1, 6])
def test_two_layer_net_matches_the_vectorized_backward_pass(n: int) -> None:
    """Section 3: y_bar = y - t, W2_bar = y_bar h^T, b2_bar = y_bar, h_bar = W2^T y_bar,
    z_bar = h_bar * s'(z), W1_bar = z_bar x^T, b1_bar = z_bar (summed over examples)."""
    graph = two_layer_net()
    params = params_for(graph)
    batch = batch_for(graph, n, seed=n)
    loss, grads = gp.local_gradients(graph, params, batch)
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    X, T = batch["x"], batch["t"]
    Z = X @ W1.T + b1
    H = sigma(Z)
    Y = H @ W2.T + b2
    assert loss == pytest.approx(0.5 * np.sum((T - Y) ** 2), rel=1e-12)
    Y_bar = Y - T
    H_bar = Y_bar @ W2
    Z_bar = H_bar * H * (1 - H)
    np.testing.assert_allclose(grads["W2"], Y_bar.T @ H, rtol=1e-12)
    np.testing.assert_allclose(grads["b2"], Y_bar.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(grads["W1"], Z_bar.T @ X, rtol=1e-12)
    np.testing.assert_allclose(grads["b1"], Z_bar.sum(axis=0), rtol=1e-12)


def test_gradient_descent_on_the_lecture_model_lowers_the_loss() -> None:
    graph = logistic_regression()
    rng = np.random.default_rng(0)
    x = rng.normal(size=64)
    batch = {"x": x, "t": (x > 0.2).astype(np.float64)}
    params = {"w": np.array(0.0), "b": np.array(0.0)}
    first, _ = gp.local_gradients(graph, params, batch)
    for _ in range(50):
        loss, grads = gp.local_gradients(graph, params, batch)
        for name in params:
            params[name] = params[name] - 0.05 * grads[name]
    assert loss < 0.6 * first
