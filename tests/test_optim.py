"""Tests for client.optim: update rules against hand-written references, in-place
updates, dtypes, state dict round trips, schedules and input validation."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from gradpool.optim import SGD, Adam, AdamW, ConstantLR, CosineLR, Optimizer, Schedule, StepLR

# --------------------------------------------------------------------------
# Hand-written references (float64, new arrays every step, no shared code)


def ref_sgd(p0, grads_seq, lrs, momentum=0.0, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD written out literally; returns the parameters after each step."""
    p = {k: v.astype(np.float64).copy() for k, v in p0.items()}
    buf = {k: None for k in p}
    out = []
    for grads, lr in zip(grads_seq, lrs):
        for k in p:
            g = grads[k] + weight_decay * p[k]
            if momentum != 0.0:
                buf[k] = g.copy() if buf[k] is None else momentum * buf[k] + g
                g = g + momentum * buf[k] if nesterov else buf[k]
            p[k] = p[k] - lr * g
        out.append({k: v.copy() for k, v in p.items()})
    return out


def ref_adam(p0, grads_seq, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    """torch.optim.Adam / AdamW written out literally; returns the parameters after each step."""
    b1, b2 = betas
    p = {k: v.astype(np.float64).copy() for k, v in p0.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out = []
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        for k in p:
            g = grads[k]
            if decoupled:
                p[k] = p[k] - lr * weight_decay * p[k]
            else:
                g = g + weight_decay * p[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append({k: x.copy() for k, x in p.items()})
    return out


def make_params(dtype=np.float64):
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(3, 2)).astype(dtype),
        "b": rng.normal(size=(2,)).astype(dtype),
        "s": np.asarray(rng.normal(), dtype=dtype),  # 0-d parameter
    }


def make_grads_seq(n, dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)
    seq = []
    for _ in range(n):
        seq.append(
            {
                "w": rng.normal(size=(3, 2)).astype(dtype),
                "b": rng.normal(size=(2,)).astype(dtype),
                "s": np.asarray(rng.normal(), dtype=dtype),
            }
        )
    if n > 2:
        # Include an all-zero gradient: Adam must not produce NaN from it.
        seq[2] = {k: np.zeros_like(g) for k, g in seq[2].items()}
    return seq


# (constructor, kwargs, reference, reference kwargs)
CONFIGS = {
    "sgd": (SGD, dict(lr=0.1), ref_sgd, dict()),
    "sgd_wd": (SGD, dict(lr=0.1, weight_decay=0.3), ref_sgd, dict(weight_decay=0.3)),
    "sgd_momentum": (SGD, dict(lr=0.1, momentum=0.9), ref_sgd, dict(momentum=0.9)),
    "sgd_nesterov": (SGD, dict(lr=0.1, momentum=0.9, nesterov=True), ref_sgd, dict(momentum=0.9, nesterov=True)),
    "sgd_nesterov_wd": (
        SGD,
        dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.1),
        ref_sgd,
        dict(momentum=0.5, nesterov=True, weight_decay=0.1),
    ),
    "adam": (Adam, dict(lr=0.01), ref_adam, dict()),
    "adam_l2": (
        Adam,
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.2),
        ref_adam,
        dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.2),
    ),
    "adam_decoupled": (
        Adam,
        dict(lr=0.01, weight_decay=0.2, decoupled_weight_decay=True),
        ref_adam,
        dict(weight_decay=0.2, decoupled=True),
    ),
    "adamw": (AdamW, dict(lr=0.01), ref_adam, dict(weight_decay=0.01, decoupled=True)),
}


def lr_of(kwargs):
    return kwargs["lr"]


# --------------------------------------------------------------------------
# Update rules


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_reference_loop(config):
    cls, kwargs, ref, ref_kwargs = CONFIGS[config]
    params = make_params()
    p0 = {k: v.copy() for k, v in params.items()}
    grads_seq = make_grads_seq(6)
    expected = ref(p0, grads_seq, [lr_of(kwargs)] * len(grads_seq), **ref_kwargs)
    opt = cls(params, **kwargs)
    for t, grads in enumerate(grads_seq):
        opt.step(grads)
        assert opt.step_count == t + 1
        for k in params:
            np.testing.assert_allclose(params[k], expected[t][k], rtol=1e-12, atol=1e-14, err_msg=f"{config} {k} step {t + 1}")
            assert np.all(np.isfinite(params[k]))


def test_reference_differs_between_configs():
    # Guards the test above: the configurations really produce different trajectories.
    finals = {}
    for name, (cls, kwargs, _, _) in CONFIGS.items():
        params = make_params()
        opt = cls(params, **kwargs)
        for g in make_grads_seq(6):
            opt.step(g)
        finals[name] = params["w"].copy()
    names = sorted(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(finals[a], finals[b]), (a, b)


def quad_grad(p):
    """Gradient of f(p) = p**2 (elementwise): 2p."""
    return {"x": 2.0 * p["x"]}


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # g = 2p; buf = 0.9 buf + g; p -= 0.1 buf:
        # p: 1 -> 1-0.1*2 = 0.8 -> (buf 1.8+1.6=3.4) 0.46 -> (buf 3.06+0.92=3.98) 0.062
        (dict(lr=0.1, momentum=0.9), [0.8, 0.46, 0.062]),
        # nesterov: d = g + 0.9 buf
        # step 1: g=2, buf=2, d=3.8, p=0.62
        # step 2: g=1.24, buf=3.04, d=1.24+2.736=3.976, p=0.2224
        # step 3: g=0.4448, buf=2.736+0.4448=3.1808, d=0.4448+2.86272=3.30752, p=-0.108352
        (dict(lr=0.1, momentum=0.9, nesterov=True), [0.62, 0.2224, -0.108352]),
        # plain: p -= 0.1 * 2p, i.e. p *= 0.8
        (dict(lr=0.1), [0.8, 0.64, 0.512]),
    ],
)
def test_sgd_hand_computed(kwargs, expected):
    params = {"x": np.array([1.0])}
    opt = SGD(params, **kwargs)
    got = []
    for _ in range(3):
        opt.step(quad_grad(params))
        got.append(float(params["x"][0]))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_sgd_weight_decay_hand_computed():
    # constant grad 1, wd 0.5: g = 1 + 0.5p, p -= 0.1 g
    # 1 -> 1 - 0.15 = 0.85 -> 0.85 - 0.1425 = 0.7075 -> 0.7075 - 0.135375 = 0.572125
    params = {"x": np.array([1.0])}
    opt = SGD(params, lr=0.1, weight_decay=0.5)
    got = []
    for _ in range(3):
        opt.step({"x": np.array([1.0])})
        got.append(float(params["x"][0]))
    np.testing.assert_allclose(got, [0.85, 0.7075, 0.572125], rtol=1e-12)


def test_adam_hand_computed_constant_gradient():
    # With a constant gradient g, m_t = (1-b1^t) g and v_t = (1-b2^t) g^2, so the
    # bias-corrected step is lr * g / (|g| + eps): Adam moves exactly lr per step.
    params = {"x": np.array([1.0, -1.0])}
    opt = Adam(params, lr=0.1)
    got = []
    for _ in range(3):
        opt.step({"x": np.array([4.0, -0.5])})
        got.append(params["x"].copy())
    np.testing.assert_allclose(got, [[0.9, -0.9], [0.8, -0.8], [0.7, -0.7]], rtol=1e-7)


def test_adam_hand_computed_second_step():
    # g1 = 1, g2 = 3, b1 = 0.9, b2 = 0.999, lr = 1, eps = 0 (almost):
    # step 1 moves by 1 (see above).  step 2: m = 0.09 + 0.3 = 0.39, m_hat = 0.39/0.19;
    # v = 0.000999 + 0.009 = 0.009999, v_hat = 0.009999/0.001999.
    params = {"x": np.array([0.0])}
    opt = Adam(params, lr=1.0, eps=1e-300)
    opt.step({"x": np.array([1.0])})
    np.testing.assert_allclose(params["x"], [-1.0], rtol=1e-14)
    opt.step({"x": np.array([3.0])})
    expected = -1.0 - (0.39 / 0.19) / math.sqrt(0.009999 / 0.001999)
    np.testing.assert_allclose(params["x"], [expected], rtol=1e-12)
    assert expected == pytest.approx(-1.9177811, abs=1e-7)


def test_adamw_hand_computed():
    # Constant grad 1, lr 0.1, wd 0.5: p <- p*(1 - 0.05) - 0.1 each step.
    # 1 -> 0.85 -> 0.7075 -> 0.572125
    params = {"x": np.array([1.0])}
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    got = []
    for _ in range(3):
        opt.step({"x": np.array([1.0])})
        got.append(float(params["x"][0]))
    np.testing.assert_allclose(got, [0.85, 0.7075, 0.572125], rtol=1e-7)


def test_adam_l2_differs_from_decoupled():
    # L2 decay goes through Adam's normalisation: with a zero gradient the step
    # is still ~lr in size, while decoupled decay shrinks by lr*wd*p only.
    p_l2 = {"x": np.array([1.0])}
    p_dec = {"x": np.array([1.0])}
    Adam(p_l2, lr=0.1, weight_decay=0.5).step({"x": np.array([0.0])})
    Adam(p_dec, lr=0.1, weight_decay=0.5, decoupled_weight_decay=True).step({"x": np.array([0.0])})
    np.testing.assert_allclose(p_l2["x"], [0.9], rtol=1e-7)
    np.testing.assert_allclose(p_dec["x"], [0.95], rtol=1e-12)


def test_schedule_drives_the_step():
    sched = StepLR(0.1, step_size=2, gamma=0.5)
    params = make_params()
    p0 = {k: v.copy() for k, v in params.items()}
    grads_seq = make_grads_seq(5)
    lrs = [sched(t) for t in range(5)]
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025]
    expected = ref_sgd(p0, grads_seq, lrs, momentum=0.9)
    opt = SGD(params, lr=sched, momentum=0.9)
    for t, grads in enumerate(grads_seq):
        assert opt.lr == lrs[t]
        opt.step(grads)
    for k in params:
        np.testing.assert_allclose(params[k], expected[-1][k], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------
# In place, dtypes


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_updates_in_place_and_leaves_grads_alone(config):
    cls, kwargs, _, _ = CONFIGS[config]
    params = make_params()
    arrays = {k: v for k, v in params.items()}
    before = {k: v.copy() for k, v in params.items()}
    opt = cls(params, **kwargs)
    for grads in make_grads_seq(4):
        grads_copy = {k: g.copy() for k, g in grads.items()}
        opt.step(grads)
        for k in grads:
            np.testing.assert_array_equal(grads[k], grads_copy[k])  # caller's grads untouched
    for k in params:
        assert params[k] is arrays[k]
        assert opt.params[k] is arrays[k]
        assert not np.array_equal(params[k], before[k])


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("grad_dtype", [np.float32, np.float64])
def test_float32_stays_float32(config, grad_dtype):
    cls, kwargs, ref, ref_kwargs = CONFIGS[config]
    params = make_params(np.float32)
    p0 = {k: v.copy() for k, v in params.items()}
    grads_seq = make_grads_seq(5, grad_dtype)
    opt = cls(params, **kwargs)
    for grads in grads_seq:
        opt.step(grads)
    expected = ref(p0, grads_seq, [lr_of(kwargs)] * 5, **ref_kwargs)[-1]
    for k in params:
        assert params[k].dtype == np.float32
        np.testing.assert_allclose(params[k], expected[k], rtol=1e-4, atol=1e-5)
    state = opt.state_dict()
    for k, slots in state["slots"].items():
        for slot, a in slots.items():
            assert a.dtype == np.float32, (k, slot)


def test_float32_arithmetic_is_float32():
    # Plain SGD in float32 must equal p - float32(lr) * g done in float32, bit for bit;
    # computing in float64 and rounding at the end gives different last bits.
    rng = np.random.default_rng(3)
    p = rng.normal(size=1000).astype(np.float32)
    g = rng.normal(size=1000).astype(np.float32)
    expected = p - g * np.float32(0.1)
    params = {"p": p}
    SGD(params, lr=0.1).step({"p": g})
    assert params["p"].tobytes() == expected.tobytes()
    assert (p.astype(np.float64) - 0.1 * g.astype(np.float64)).astype(np.float32).tobytes() != expected.tobytes()


def test_float16_adam_rejects_eps_that_rounds_to_zero():
    with pytest.raises(ValueError, match="'h'"):
        Adam({"h": np.zeros(3, np.float16)}, eps=1e-8)
    Adam({"h": np.zeros(3, np.float16)}, eps=1e-3)


# --------------------------------------------------------------------------
# State dict


def run_steps(opt, params, grad_fn, n):
    for _ in range(n):
        opt.step(grad_fn(params))


LSQ_X = np.array([[1.0, 2.0, -1.0], [0.5, -1.0, 3.0], [2.0, 0.0, 1.0], [-1.0, 1.0, 0.5]])
LSQ_Y = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]])


def lsq_residual(params):
    return LSQ_X @ params["w"] + params["b"] + params["s"] - LSQ_Y


def lsq_loss(params):
    """A small least-squares problem, 0.5 * ||X w + b + s - y||^2."""
    r = lsq_residual(params)
    return 0.5 * float(np.sum(r * r))


def lsq_grad(params):
    """Gradient of lsq_loss; depends on the parameters, in their dtypes."""
    r = lsq_residual(params)
    return {
        "w": (LSQ_X.T @ r).astype(params["w"].dtype),
        "b": r.sum(0).astype(params["b"].dtype),
        "s": np.asarray(r.sum(), dtype=params["s"].dtype),
    }


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_round_trip_is_bitwise(config, dtype):
    cls, kwargs, _, _ = CONFIGS[config]
    kwargs = dict(kwargs, lr=CosineLR(kwargs["lr"], total_steps=12, min_lr=kwargs["lr"] / 10, warmup_steps=3))

    full = make_params(dtype)
    opt_full = cls(full, **kwargs)
    run_steps(opt_full, full, lsq_grad, 10)

    part = make_params(dtype)
    opt_part = cls(part, **kwargs)
    run_steps(opt_part, part, lsq_grad, 4)
    saved_params = {k: v.copy() for k, v in part.items()}
    # Pickling proves the state is plain data and that nothing aliases the live optimizer.
    saved_state = pickle.loads(pickle.dumps(opt_part.state_dict()))
    run_steps(opt_part, part, lsq_grad, 3)  # keep going: must not leak into the saved state

    resumed = {k: v.copy() for k, v in saved_params.items()}
    # Constructed with different hyperparameters: the state dict must restore them.
    if cls is SGD:
        opt_resumed = SGD(resumed, lr=1.0, momentum=0.1 if kwargs.get("momentum") else 0.0)
    else:
        opt_resumed = cls(resumed, lr=1.0)
    opt_resumed.load_state_dict(saved_state)
    assert opt_resumed.step_count == 4
    assert opt_resumed.hyperparams == opt_full.hyperparams
    assert opt_resumed.schedule == opt_full.schedule
    run_steps(opt_resumed, resumed, lsq_grad, 6)

    for k in full:
        assert resumed[k].dtype == dtype
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
        assert resumed[k].tobytes() == full[k].tobytes()
    a, b = opt_resumed.state_dict(), opt_full.state_dict()
    assert a["step_count"] == b["step_count"] == 10
    for k in a["slots"]:
        for slot in a["slots"][k]:
            assert a["slots"][k][slot].tobytes() == b["slots"][k][slot].tobytes()


def test_state_dict_contents():
    params = make_params()
    opt = SGD(params, lr=StepLR(0.5, 3), momentum=0.9, weight_decay=0.01)
    opt.step(make_grads_seq(1)[0])
    state = opt.state_dict()
    assert state["optimizer"] == "SGD"
    assert state["step_count"] == 1
    assert state["hyperparams"] == {"momentum": 0.9, "nesterov": False, "weight_decay": 0.01}
    assert state["schedule"] == {"type": "StepLR", "lr": 0.5, "step_size": 3, "gamma": 0.1}
    assert state["param_shapes"] == {"w": (3, 2), "b": (2,), "s": ()}
    assert set(state["slots"]["w"]) == {"momentum_buffer"}
    assert SGD(make_params(), lr=0.1).state_dict()["slots"]["w"] == {}
    assert set(Adam(make_params()).state_dict()["slots"]["b"]) == {"exp_avg", "exp_avg_sq"}


def test_state_dict_is_a_snapshot():
    params = make_params()
    opt = Adam(params, lr=0.01)
    opt.step(make_grads_seq(1)[0])
    state = opt.state_dict()
    snapshot = pickle.dumps(state)
    opt.step(make_grads_seq(1, seed=5)[0])
    assert pickle.dumps(state) == snapshot  # later steps do not write into a saved state


def test_load_state_dict_copies_slots():
    params = make_params()
    opt = Adam(params, lr=0.01)
    opt.step(make_grads_seq(1)[0])
    state = opt.state_dict()
    other = Adam({k: v.copy() for k, v in params.items()}, lr=0.01)
    other.load_state_dict(state)
    state["slots"]["w"]["exp_avg"][...] = 1e9  # mutating the dict afterwards must not matter
    assert np.all(other.state_dict()["slots"]["w"]["exp_avg"] < 1e3)


# --------------------------------------------------------------------------
# Schedules


def test_constant_lr():
    s = ConstantLR(0.3)
    assert [s(t) for t in (0, 1, 1000)] == [0.3, 0.3, 0.3]


def test_step_lr():
    s = StepLR(1.0, step_size=3, gamma=0.5)
    assert [s(t) for t in range(8)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert StepLR(0.2, step_size=10)(25) == pytest.approx(0.002)


def test_cosine_lr():
    s = CosineLR(1.0, total_steps=10, min_lr=0.1, warmup_steps=2)
    assert s(0) == pytest.approx(0.5)  # warmup (t+1)/warmup
    assert s(1) == pytest.approx(1.0)
    assert s(2) == pytest.approx(1.0)  # cosine starts at the peak
    assert s(4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert s(6) == pytest.approx(0.55)  # halfway through the cosine
    assert s(10) == pytest.approx(0.1)
    assert s(1000) == pytest.approx(0.1)
    values = [s(t) for t in range(2, 11)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay

    s0 = CosineLR(2.0, total_steps=4)
    assert [s0(t) for t in range(6)] == pytest.approx([2.0, 1 + math.cos(math.pi / 4), 1.0, 1 - math.cos(math.pi / 4), 0.0, 0.0])


def test_schedule_config_round_trip():
    for s in (ConstantLR(0.1), StepLR(0.1, 5, 0.3), CosineLR(0.1, 100, 0.001, 10)):
        rebuilt = Schedule.from_config(s.config())
        assert rebuilt == s and type(rebuilt) is type(s)
        assert [rebuilt(t) for t in range(0, 120, 7)] == [s(t) for t in range(0, 120, 7)]
    with pytest.raises(ValueError, match="unknown schedule type"):
        Schedule.from_config({"type": "Nope", "lr": 0.1})
    with pytest.raises(ValueError, match="StepLR"):
        Schedule.from_config({"type": "StepLR", "lr": 0.1})  # missing step_size


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ConstantLR(0.0), "lr"),
        (lambda: ConstantLR(-1), "lr"),
        (lambda: ConstantLR(float("nan")), "lr"),
        (lambda: StepLR(0.1, 0), "step_size"),
        (lambda: StepLR(0.1, 2, gamma=0.0), "gamma"),
        (lambda: CosineLR(0.1, 0), "total_steps"),
        (lambda: CosineLR(0.1, 10, min_lr=0.2), "min_lr"),
        (lambda: CosineLR(0.1, 10, warmup_steps=11), "warmup_steps"),
        (lambda: CosineLR(0.1, 10)(-1), "step"),
    ],
)
def test_bad_schedules(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: SGD(p, lr=0.0), "lr"),
        (lambda p: SGD(p, lr=-0.1), "lr"),
        (lambda p: SGD(p, lr=0.1, momentum=-0.1), "momentum"),
        (lambda p: SGD(p, lr=0.1, momentum=1.0), "momentum"),
        (lambda p: SGD(p, lr=0.1, nesterov=True), "nesterov"),
        (lambda p: SGD(p, lr=0.1, weight_decay=-1.0), "weight_decay"),
        (lambda p: Adam(p, lr=0.1, betas=(1.0, 0.999)), r"betas\[0\]"),
        (lambda p: Adam(p, lr=0.1, betas=(0.9, -0.1)), r"betas\[1\]"),
        (lambda p: Adam(p, lr=0.1, eps=0.0), "eps"),
        (lambda p: AdamW(p, weight_decay=float("inf")), "weight_decay"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_params())


def test_bad_params():
    with pytest.raises(TypeError):
        SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(TypeError, match="'w'"):
        SGD({"w": [1.0, 2.0]}, lr=0.1)
    with pytest.raises(ValueError, match="'i'"):
        SGD({"i": np.zeros(2, dtype=np.int64)}, lr=0.1)
    ro = np.zeros(2)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="'r'"):
        SGD({"r": ro}, lr=0.1)
    shared = np.zeros(2)
    with pytest.raises(ValueError, match="same array"):
        SGD({"a": shared, "b": shared}, lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        SGD({}, lr=0.1)


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_bad_grads_raise_and_change_nothing(cls):
    params = make_params()
    opt = cls(params, lr=0.1)
    opt.step(make_grads_seq(1)[0])
    before_params = {k: v.copy() for k, v in params.items()}
    before_state = pickle.dumps(opt.state_dict())
    good = make_grads_seq(1, seed=7)[0]

    missing = {k: v for k, v in good.items() if k != "b"}
    with pytest.raises(ValueError, match="missing.*'b'"):
        opt.step(missing)
    with pytest.raises(ValueError, match="'extra'"):
        opt.step({**good, "extra": np.zeros(1)})
    # Wrong shape on the last-checked parameter: earlier ones must not be updated either.
    with pytest.raises(ValueError, match=r"'s'.*\(1,\)"):
        opt.step({**good, "s": np.zeros(1)})
    with pytest.raises(ValueError, match=r"'w'.*\(2, 3\)"):
        opt.step({**good, "w": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="'b'"):
        opt.step({**good, "b": np.array(["x", "y"])})
    with pytest.raises(TypeError):
        opt.step([good["w"]])

    for k in params:
        np.testing.assert_array_equal(params[k], before_params[k])
    assert opt.step_count == 1
    assert pickle.dumps(opt.state_dict()) == before_state
    opt.step(good)  # still usable
    assert opt.step_count == 2


def test_bad_state_dicts():
    params = make_params()
    opt = SGD(params, lr=0.1, momentum=0.9)
    opt.step(make_grads_seq(1)[0])
    state = opt.state_dict()
    fresh = lambda: SGD({k: v.copy() for k, v in params.items()}, lr=0.1, momentum=0.9)  # noqa: E731

    with pytest.raises(ValueError, match="'SGD'.*Adam"):
        Adam({k: v.copy() for k, v in params.items()}).load_state_dict(state)
    with pytest.raises(ValueError, match="'SGD'.*AdamW"):
        AdamW({k: v.copy() for k, v in params.items()}).load_state_dict(state)
    with pytest.raises(ValueError):
        fresh().load_state_dict({"step_count": 3})
    with pytest.raises(ValueError):
        fresh().load_state_dict("not a state dict")

    other_names = {"w": params["w"].copy(), "b": params["b"].copy(), "t": params["s"].copy()}
    with pytest.raises(ValueError, match="'t'.*unknown.*'s'"):
        SGD(other_names, lr=0.1, momentum=0.9).load_state_dict(state)

    wrong_shape = {"w": np.zeros((2, 3)), "b": params["b"].copy(), "s": params["s"].copy()}
    with pytest.raises(ValueError, match="'w'"):
        SGD(wrong_shape, lr=0.1, momentum=0.9).load_state_dict(state)

    bad_slot = opt.state_dict()
    bad_slot["slots"]["b"]["momentum_buffer"] = np.zeros(5)
    with pytest.raises(ValueError, match="'b'"):
        fresh().load_state_dict(bad_slot)

    missing_slot = opt.state_dict()
    missing_slot["slots"]["w"] = {}
    with pytest.raises(ValueError, match="'w'"):
        fresh().load_state_dict(missing_slot)

    bad_hp = opt.state_dict()
    bad_hp["hyperparams"]["momentum"] = 2.0
    with pytest.raises(ValueError, match="momentum"):
        fresh().load_state_dict(bad_hp)

    bad_sched = opt.state_dict()
    bad_sched["schedule"] = {"type": "CosineLR", "lr": 0.1}
    with pytest.raises(ValueError, match="CosineLR"):
        fresh().load_state_dict(bad_sched)

    # A failed load leaves the optimizer as it was.
    target = fresh()
    target.step(make_grads_seq(1)[0])
    before = pickle.dumps(target.state_dict())
    with pytest.raises(ValueError):
        target.load_state_dict(bad_slot)
    assert pickle.dumps(target.state_dict()) == before


def test_bad_custom_schedule_is_caught():
    class Negative(Schedule):
        def __call__(self, step: int) -> float:
            return -0.1

        def config(self):
            return {"type": "Negative"}

    params = make_params()
    before = params["w"].copy()
    opt = SGD(params, lr=Negative())
    with pytest.raises(ValueError, match="invalid lr"):
        opt.step(make_grads_seq(1)[0])
    np.testing.assert_array_equal(params["w"], before)


# --------------------------------------------------------------------------
# Convergence on a small quadratic


@pytest.mark.parametrize(
    "make",
    [
        lambda p: SGD(p, lr=0.02),
        lambda p: SGD(p, lr=0.02, momentum=0.9),
        lambda p: SGD(p, lr=0.02, momentum=0.9, nesterov=True),
        lambda p: SGD(p, lr=CosineLR(0.02, 200, warmup_steps=10), momentum=0.5, weight_decay=1e-4),
        lambda p: Adam(p, lr=0.05),
        lambda p: AdamW(p, lr=0.05, weight_decay=1e-3),
        lambda p: Adam(p, lr=StepLR(0.05, 50, 0.5), weight_decay=1e-3),
    ],
    ids=["sgd", "momentum", "nesterov", "sgd_cosine_wd", "adam", "adamw", "adam_step_l2"],
)
def test_reduces_quadratic_loss(make):
    params = make_params()
    opt = make(params)
    start = lsq_loss(params)
    losses = [start]
    for _ in range(200):
        opt.step(lsq_grad(params))
        losses.append(lsq_loss(params))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.2 * start, (start, losses[-1])
    assert min(losses[-10:]) <= min(losses[:10])


def test_base_optimizer_is_abstract():
    with pytest.raises(NotImplementedError):
        Optimizer(make_params(), lr=0.1).step(make_grads_seq(1)[0])


# --------------------------------------------------------------------------
# Gradient clipping by global norm


def test_clipping_rescales_by_the_global_norm_as_torch_does():
    grads = {"w": np.full((3, 2), 3.0), "b": np.array([4.0, 0.0]), "s": np.asarray(-2.0)}
    norm = math.sqrt(6 * 9.0 + 16.0 + 4.0)
    params = make_params()
    before = {k: v.copy() for k, v in params.items()}
    opt = SGD(params, lr=0.5, clip_grad_norm=2.0)
    opt.step(grads)
    assert opt.last_grad_norm == pytest.approx(norm, rel=1e-15)
    scale = 2.0 / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_
    for k in params:
        np.testing.assert_allclose(params[k], before[k] - 0.5 * scale * grads[k], rtol=1e-14, atol=1e-15)
    assert grads["w"][0, 0] == 3.0  # the caller's gradients are not scaled in place
    clipped = {k: (before[k] - params[k]) / 0.5 for k in params}
    assert optim_global_norm(clipped) == pytest.approx(2.0, rel=1e-6)


def optim_global_norm(grads):
    from gradpool.optim import global_norm

    return global_norm(grads)


def test_clipping_below_the_threshold_changes_nothing_bitwise():
    grads_seq = make_grads_seq(5)
    plain, clipped = make_params(), make_params()
    opt_plain = Adam(plain, lr=0.01)
    opt_clipped = Adam(clipped, lr=0.01, clip_grad_norm=1e6)
    for g in grads_seq:
        opt_plain.step(g)
        opt_clipped.step(g)
        assert opt_plain.last_grad_norm == opt_clipped.last_grad_norm == optim_global_norm(g)
    for k in plain:
        assert plain[k].tobytes() == clipped[k].tobytes()


def test_clipping_keeps_float32_and_refuses_a_non_finite_norm():
    params = make_params(np.float32)
    opt = Adam(params, lr=0.01, clip_grad_norm=0.1)
    opt.step(make_grads_seq(1, dtype=np.float32)[0])
    assert all(p.dtype == np.float32 for p in params.values())
    before = pickle.dumps((opt.state_dict(), params))
    bad = make_grads_seq(1)[0]
    bad["w"][0, 0] = np.inf
    with pytest.raises(ValueError, match="gradient norm is inf at step 2"):
        opt.step(bad)
    assert pickle.dumps((opt.state_dict(), params)) == before
    with pytest.raises(ValueError, match="clip_grad_norm must be > 0"):
        SGD(make_params(), lr=0.1, clip_grad_norm=0.0)


# --------------------------------------------------------------------------
# Parameter groups


def sub(d, names):
    return {k: d[k] for k in names}


def test_groups_equal_separate_optimizers_per_group():
    """No decay on 'b' and 's' and other momentum for 's': as three optimizers over the pieces."""
    grads_seq = make_grads_seq(6)
    grouped = make_params()
    opt = SGD(grouped, lr=StepLR(0.1, 2, gamma=0.5), momentum=0.9, weight_decay=0.01,
              groups=[{"params": ["b"], "weight_decay": 0.0}, {"params": ["s"], "weight_decay": 0.0, "momentum": 0.5}])
    apart = make_params()
    pieces = [SGD(sub(apart, ["w"]), lr=StepLR(0.1, 2, gamma=0.5), momentum=0.9, weight_decay=0.01),
              SGD(sub(apart, ["b"]), lr=StepLR(0.1, 2, gamma=0.5), momentum=0.9),
              SGD(sub(apart, ["s"]), lr=StepLR(0.1, 2, gamma=0.5), momentum=0.5)]
    for grads in grads_seq:
        opt.step(grads)
        for piece in pieces:
            piece.step(sub(grads, piece.params))
    for k in grouped:
        assert grouped[k].tobytes() == apart[k].tobytes(), k
    assert opt.groups == [{"params": ["b"], "weight_decay": 0.0},
                          {"params": ["s"], "weight_decay": 0.0, "momentum": 0.5}]


def test_a_group_lr_follows_the_schedule_scaled_or_its_own():
    schedule = CosineLR(0.5, total_steps=6, warmup_steps=2)
    opt = Adam(make_params(), lr=schedule,
               groups=[{"params": ["w"], "lr": 0.05}, {"params": ["b"], "lr": StepLR(0.2, 1, gamma=0.5)}])
    for t in range(6):
        assert opt.lr == schedule(t)
        w_lr, b_lr = opt.group_lrs
        assert w_lr == pytest.approx(0.1 * schedule(t), rel=1e-15)
        assert b_lr == 0.2 * 0.5 ** t
        opt.step(make_grads_seq(1, seed=t)[0])
    reference = ref_adam(sub(make_params(), ["w"]), [sub(g, ["w"]) for g in make_grads_seq(1)], [0.05 / 2])
    fresh = make_params()
    Adam(fresh, lr=schedule, groups=[{"params": ["w"], "lr": 0.05}]).step(make_grads_seq(1)[0])
    np.testing.assert_allclose(fresh["w"], reference[0]["w"], rtol=1e-14)


@pytest.mark.parametrize("groups, error, match", [
    ({"params": ["w"]}, TypeError, "groups must be a list"),
    ([{"params": "w"}], TypeError, r"groups\[0\]\['params'\] must be a list"),
    ([{"params": []}], ValueError, r"groups\[0\] has no params"),
    ([{"params": ["nope"]}], ValueError, "'nope', which is not a parameter"),
    ([{"params": ["w"]}, {"params": ["b", "w"]}], ValueError, r"'w' is in groups\[0\] and groups\[1\]"),
    ([{"params": ["w"], "momentun": 0.9}], TypeError, "unknown setting.*'momentun'"),
    ([{"params": ["w"], "momentum": 1.5}], ValueError, r"groups\[0\]: momentum must be in"),
    ([{"params": ["w"], "lr": -1.0}], ValueError, r"groups\[0\]\['lr'\] must be > 0"),
])
def test_bad_groups_are_refused(groups, error, match):
    with pytest.raises(error, match=match):
        SGD(make_params(), lr=0.1, momentum=0.9, groups=groups)


def test_a_float_group_lr_needs_a_schedule_with_a_base_lr():
    class Halving(Schedule):
        def __call__(self, step):
            return 0.5 ** step

        def config(self):
            return {"type": "Halving"}

    with pytest.raises(ValueError, match="has no base_lr"):
        SGD(make_params(), lr=Halving(), groups=[{"params": ["w"], "lr": 0.1}])


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_state_dict_round_trip_with_groups_and_clipping_is_bitwise(cls):
    kwargs = {"momentum": 0.9} if cls is SGD else {}
    settings = dict(lr=CosineLR(0.05, total_steps=10, warmup_steps=2), clip_grad_norm=0.5,
                    groups=[{"params": ["b", "s"], "weight_decay": 0.0, "lr": 0.01},
                            {"params": ["w"], "lr": StepLR(0.02, 3)}], **kwargs)
    full = make_params()
    opt_full = cls(full, **settings)
    run_steps(opt_full, full, lsq_grad, 8)

    part = make_params()
    opt_part = cls(part, **settings)
    run_steps(opt_part, part, lsq_grad, 3)
    saved = pickle.loads(pickle.dumps(opt_part.state_dict()))
    assert saved["clip_grad_norm"] == 0.5 and saved["groups"][1]["lr"]["type"] == "StepLR"
    resumed = {k: v.copy() for k, v in part.items()}
    opt_resumed = cls(resumed, lr=1.0, **kwargs)  # no groups, no clipping: the state dict brings them
    opt_resumed.load_state_dict(saved)
    assert opt_resumed.clip_grad_norm == 0.5 and opt_resumed.groups == opt_full.groups
    run_steps(opt_resumed, resumed, lsq_grad, 5)
    for k in full:
        assert resumed[k].tobytes() == full[k].tobytes(), k


def test_a_state_dict_from_before_groups_still_loads_and_keeps_the_constructors():
    params = make_params()
    opt = SGD(params, lr=0.1, momentum=0.9)
    opt.step(make_grads_seq(1)[0])
    old = opt.state_dict()
    del old["groups"], old["clip_grad_norm"]
    target = SGD({k: v.copy() for k, v in params.items()}, lr=0.1, momentum=0.9, clip_grad_norm=1.0,
                 groups=[{"params": ["b"], "weight_decay": 0.5}])
    target.load_state_dict(old)
    assert target.step_count == 1 and target.clip_grad_norm == 1.0
    assert target.groups == [{"params": ["b"], "weight_decay": 0.5}]


def test_a_group_without_momentum_has_no_slot_and_bad_group_state_is_refused():
    opt = SGD(make_params(), lr=0.1, momentum=0.9, groups=[{"params": ["s"], "momentum": 0.0}])
    state = opt.state_dict()
    assert state["slots"]["s"] == {} and set(state["slots"]["w"]) == {"momentum_buffer"}
    state["groups"] = [{"params": ["s", "zz"]}]
    with pytest.raises(ValueError, match="bad SGD state dict.*'zz'"):
        opt.load_state_dict(state)
