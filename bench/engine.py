"""The engine's fwd+bwd step vs hand-written numpy backprop vs PyTorch CPU.

    python bench/engine.py [--batches 512,4096] [--repeats 20] [--warmup 3] [--models sigmoid,relu]
                           [--threads 1] [--convs digits,layer] [--conv-batches 512]

Models: MLP 784-256-256-10 with sigmoid or relu hidden layers, float32, loss =
softmax cross-entropy summed over the batch. Candidates, all in this process
and on the same BLAS:

* numpy  -- hand-written backprop (below): the baseline;
* engine -- `Program.run` of the gradpool graph (what `local_gradients` and
            every worker run per shard);
* torch  -- the same model with torch.autograd on the CPU, if torch is
            installed (optional: `pip install torch`, or `pip install -e
            '.[bench]'`).

Conv rows (`--convs`): engine vs torch only (no hand-written baseline), float32:

* digits -- the digits CNN of examples/digits_cnn.py on 8x8x1 images: conv
            1->16 3x3 pad 1, relu, max pool 2, conv 16->32 3x3 pad 1, relu,
            max pool 2, dense 128->10, softmax cross-entropy;
* layer  -- one 32x32x3 CNN layer: conv 3->16 3x3 pad 1 (+ bias), relu, max
            pool 2, loss = the sum of its output.

The images are inputs (no gradient), as in training; torch gets its fused
conv bias and runs its own (oneDNN) CPU kernels.

Before timing, the engine's loss and gradients (and torch's) are checked
against the numpy baseline, so all candidates compute the same thing. Within
each repeat the candidates run one after another in a rotating order, so
machine noise hits them alike. The table gives min/median/max milliseconds
per step over the repeats, and engine/numpy and engine/torch: the median over
repeats of the ratio of the two times within a repeat (paired, so a slow
stretch of the machine cancels out), all from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradpool as gp  # noqa: E402

SIZES = (784, 256, 256, 10)
Grads = dict[str, np.ndarray]


def mlp(activation: str, sizes: tuple[int, ...] = SIZES) -> gp.Graph:
    """MLP with `activation` hidden layers, softmax cross-entropy summed over the batch, float32."""
    g = gp.Graph(f"{activation}_mlp_" + "_".join(map(str, sizes)))
    x = g.input("x", (sizes[0],))
    y = g.input("y", (), dtype="int64")
    h = x
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = g.param(f"W{i}", (fan_in, fan_out), init="he" if activation == "relu" else "glorot")
        b = g.param(f"b{i}", (fan_out,))
        h = h @ W + b
        if i < len(sizes) - 2:
            h = getattr(gp, activation)(h)
    g.set_loss(gp.softmax_cross_entropy(h, y).sum())
    return g


# ---------------------------------------------------------------- hand-written numpy backprop

def _sigmoid(z: np.ndarray) -> np.ndarray:
    """In place: 1 / (1 + e^-z), the textbook form (e^-z may overflow to inf for
    z < -88, which gives the right 0). 0.5 tanh(z / 2) + 0.5 is a few percent
    faster but rounds sigmoid to 0 from z = -17 on in float32; the engine uses
    this form too, so the two compute the same numbers."""
    np.negative(z, out=z)
    with np.errstate(over="ignore"):
        np.exp(z, out=z)
    z += 1
    return np.reciprocal(z, out=z)


def numpy_step(activation: str, params: Grads, x: np.ndarray, y: np.ndarray) -> tuple[float, Grads]:
    """Forward and backward of the MLP by hand, as one would write it in numpy."""
    n_layers = len(SIZES) - 1
    hs = [x]  # layer inputs
    for i in range(n_layers):
        z = hs[-1] @ params[f"W{i}"]
        z += params[f"b{i}"]
        if i < n_layers - 1:
            z = _sigmoid(z) if activation == "sigmoid" else np.maximum(z, 0, out=z)
        hs.append(z)
    logits = hs.pop()
    rows = np.arange(len(y))
    logits -= logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits).sum(axis=1, keepdims=True))
    logits -= lse  # log-probabilities
    loss = -float(logits[rows, y].sum())
    dz = np.exp(logits, out=logits)  # d loss / d logits = softmax - onehot
    dz[rows, y] -= 1
    grads: Grads = {}
    for i in reversed(range(n_layers)):
        h = hs[i]
        grads[f"W{i}"] = h.T @ dz
        grads[f"b{i}"] = dz.sum(axis=0)
        if i == 0:
            break
        dh = dz @ params[f"W{i}"].T
        if activation == "sigmoid":
            dh *= h
            dh *= 1 - h
        else:
            dh *= h > 0
        dz = dh
    return loss, grads


# ---------------------------------------------------------------- torch (optional)

def import_torch():
    """torch, or None with the reason (not installed, or a broken install)."""
    try:
        import torch
    except ImportError as err:
        return None, f"torch is not installed ({err})"
    except Exception as err:  # a wheel missing its native libraries raises OSError
        return None, f"torch failed to import ({type(err).__name__}: {err})"
    return torch, ""


def torch_step_factory(activation: str, params: Grads, x: np.ndarray, y: np.ndarray
                       ) -> Optional[Callable[[], tuple[float, Grads]]]:
    torch, _ = import_torch()
    if torch is None:
        return None
    tp = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in params.items()}
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    act = torch.sigmoid if activation == "sigmoid" else torch.relu
    n_layers = len(SIZES) - 1

    def step() -> tuple[float, Grads]:
        for p in tp.values():
            p.grad = None
        h = tx
        for i in range(n_layers):
            h = torch.addmm(tp[f"b{i}"], h, tp[f"W{i}"])
            if i < n_layers - 1:
                h = act(h)
        loss = torch.nn.functional.cross_entropy(h, ty, reduction="sum")
        loss.backward()
        return float(loss.detach()), {k: p.grad.numpy() for k, p in tp.items()}

    return step


# ---------------------------------------------------------------- conv rows (engine vs torch)

CONVS = ("digits", "layer")


def cnn(which: str) -> tuple[gp.Graph, tuple[int, ...], int]:
    """The graph, one example's image shape and the number of classes (0: loss = sum of the output)."""
    g = gp.Graph(f"{which}_cnn")
    if which == "digits":
        x = g.input("x", (1, 8, 8))
        y = g.input("y", (), dtype="int64")
        K1, b1 = g.param("K1", (16, 1, 3, 3), init="normal"), g.param("b1", (16, 1, 1), init="normal")
        K2, b2 = g.param("K2", (32, 16, 3, 3), init="normal"), g.param("b2", (32, 1, 1), init="normal")
        W, b = g.param("W", (128, 10)), g.param("b", (10,), init="normal")
        h = gp.max_pool2d(gp.relu(gp.conv2d(x, K1, padding=1) + b1), 2)
        h = gp.max_pool2d(gp.relu(gp.conv2d(h, K2, padding=1) + b2), 2)
        g.set_loss(gp.softmax_cross_entropy(h.reshape(128) @ W + b, y).sum())
        return g, (1, 8, 8), 10
    x = g.input("x", (3, 32, 32))
    K1, b1 = g.param("K1", (16, 3, 3, 3), init="normal"), g.param("b1", (16, 1, 1), init="normal")
    g.set_loss(gp.max_pool2d(gp.relu(gp.conv2d(x, K1, padding=1) + b1), 2).sum())
    return g, (3, 32, 32), 0


def conv_params(graph: gp.Graph, seed: int) -> Grads:
    """He-scaled conv kernels (fan-in = in * kh * kw), small biases, glorot dense weights."""
    rng = np.random.default_rng(seed)
    params = graph.init_params(seed)
    for name, (shape, dtype) in graph.params.items():
        if len(shape) == 4:
            params[name] = rng.normal(0, (2 / np.prod(shape[1:])) ** 0.5, size=shape).astype(dtype)
        elif name.startswith("b"):
            params[name] = rng.normal(0, 0.1, size=shape).astype(dtype)
    return params


def torch_cnn_factory(which: str, params: Grads, data: dict[str, np.ndarray]
                      ) -> Optional[Callable[[], tuple[float, Grads]]]:
    torch, _ = import_torch()
    if torch is None:
        return None
    F = torch.nn.functional
    tp = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in params.items()}
    tx = torch.from_numpy(data["x"])
    ty = torch.from_numpy(data["y"]) if "y" in data else None

    def step() -> tuple[float, Grads]:
        for p in tp.values():
            p.grad = None
        h = F.max_pool2d(torch.relu(F.conv2d(tx, tp["K1"], tp["b1"].view(-1), padding=1)), 2)
        if which == "digits":
            h = F.max_pool2d(torch.relu(F.conv2d(h, tp["K2"], tp["b2"].view(-1), padding=1)), 2)
            loss = F.cross_entropy(torch.addmm(tp["b"], h.reshape(len(h), -1), tp["W"]), ty, reduction="sum")
        else:
            loss = h.sum()
        loss.backward()
        return float(loss.detach()), {k: p.grad.numpy() for k, p in tp.items()}

    return step


def conv_rows(which: str, batches: list[int], args: argparse.Namespace) -> list[tuple[int, dict[str, list[float]]]]:
    graph, image, classes = cnn(which)
    program = graph.program()
    params = conv_params(graph, args.seed)
    rows = []
    for n in batches:
        rng = np.random.default_rng(args.seed + n)
        data = {"x": rng.normal(size=(n, *image)).astype(np.float32)}
        if classes:
            data["y"] = rng.integers(0, classes, size=n)

        def engine(data: dict = data) -> tuple[float, Grads]:
            result = program.run(params, data)
            return result.loss, result.grads

        candidates: dict[str, Callable[[], object]] = {"engine": engine}
        torch_step = torch_cnn_factory(which, params, data)
        if torch_step is not None:
            candidates["torch"] = torch_step
            check_same("engine", engine(), torch_step(), reference="torch")
        rows.append((n, measure(candidates, args.repeats, args.warmup)))
    return rows


# ---------------------------------------------------------------- harness

def set_threads(threads: int, torch) -> str:
    """Caps BLAS (through threadpoolctl, when installed) and torch at `threads`;
    says what numpy's BLAS runs with."""
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threads and torch is not None:
        torch.set_num_threads(threads)
    if threadpoolctl is None:
        if threads:
            print("threadpoolctl is not installed, so BLAS threads are left as they are "
                  "(set OPENBLAS_NUM_THREADS before starting instead)")
        return "threads unknown (no threadpoolctl)"
    if threads:
        threadpoolctl.threadpool_limits(threads, user_api="blas")
    info = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    return ", ".join(f"{i['internal_api']} {i.get('version', '')} {i['num_threads']} thread(s)" for i in info) or "?"


def check_same(name: str, got: tuple[float, Grads], want: tuple[float, Grads], reference: str = "numpy") -> None:
    loss, grads = got
    assert abs(loss - want[0]) <= 1e-4 * max(1.0, abs(want[0])), f"{name} loss {loss} vs {reference} {want[0]}"
    for key, expected in want[1].items():
        assert grads[key].dtype == expected.dtype == np.float32, (name, key, grads[key].dtype)
        np.testing.assert_allclose(grads[key], expected, rtol=2e-3, atol=2e-4 * float(np.abs(expected).max()),
                                   err_msg=f"{name} gradient {key}")


def measure(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # rotate who goes first
            started = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="512,4096", help="batch sizes, comma separated (default %(default)s)")
    parser.add_argument("--models", default="sigmoid,relu", help="hidden activations (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per candidate (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS and torch threads; 0 leaves both at their library defaults (default "
                             "%(default)s: the thread pools of numpy's BLAS and of torch spin after each call, "
                             "so with more threads, interleaved on a few cores, each slows the other down)")
    parser.add_argument("--convs", default=",".join(CONVS),
                        help="conv rows: digits (the digits CNN), layer (a 32x32x3 conv+relu+pool layer), "
                             "or none (default %(default)s)")
    parser.add_argument("--conv-batches", default="512", help="batch sizes of the conv rows (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")] if args.batches not in ("", "none") else []
    models = [m.strip() for m in args.models.split(",")] if args.models not in ("", "none") else []
    convs = [c.strip() for c in args.convs.split(",")] if args.convs not in ("", "none") else []
    if set(convs) - set(CONVS):
        parser.error(f"--convs takes {', '.join(CONVS)} or none, got {args.convs}")
    conv_batches = [int(b) for b in args.conv_batches.split(",")]

    torch, why_not = import_torch()
    blas = set_threads(args.threads, torch)
    print(f"MLP {'-'.join(map(str, SIZES))}, float32, softmax cross-entropy summed over the batch, fwd+bwd; "
          f"{os.cpu_count()} CPU core(s); {args.repeats} repeats after {args.warmup} warm-up, candidates "
          f"interleaved")
    print(f"numpy {np.__version__}, BLAS: {blas}")
    if torch is None:
        print(f"{why_not}: its rows are skipped; get it with `pip install torch` (or `pip install -e '.[bench]'`)")
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    for activation in models:
        graph = mlp(activation)
        program = graph.program()
        params = graph.init_params(args.seed)
        rows = []
        for n in batches:
            rng = np.random.default_rng(args.seed + n)
            x = rng.normal(size=(n, SIZES[0])).astype(np.float32)
            y = rng.integers(0, SIZES[-1], size=n)
            data = {"x": x, "y": y}

            def engine(data: dict = data) -> tuple[float, Grads]:
                result = program.run(params, data)
                return result.loss, result.grads

            candidates: dict[str, Callable[[], object]] = {
                "numpy": lambda x=x, y=y: numpy_step(activation, params, x, y), "engine": engine}
            torch_step = torch_step_factory(activation, params, x, y)
            if torch_step is not None:
                candidates["torch"] = torch_step
            want = numpy_step(activation, params, x, y)
            check_same("engine", engine(), want)
            # local_gradients is the SDK's path to the same Program
            check_same("local_gradients", gp.local_gradients(graph, params, data), want)
            if torch_step is not None:
                check_same("torch", torch_step(), want)
            rows.append((n, measure(candidates, args.repeats, args.warmup)))

        print()
        print(f"{activation} MLP")
        header = (f"{'batch':>6}  {'candidate':<8}  {'min ms':>8}  {'median ms':>9}  {'max ms':>8}  "
                  f"{'engine/numpy':>12}  {'engine/torch':>12}")
        print(header)
        print("-" * len(header))
        for n, times in rows:
            med = {name: statistics.median(t) for name, t in times.items()}
            ratio = {name: statistics.median(e / o for e, o in zip(times["engine"], t)) for name, t in times.items()}
            for name, t in times.items():
                ratios = ""
                if name == "engine":
                    ratios = f"  {ratio['numpy']:>11.2f}x"
                    ratios += f"  {ratio['torch']:>11.2f}x" if "torch" in ratio else f"  {'-':>12}"
                print(f"{n:>6}  {name:<8}  {min(t) * 1e3:>8.2f}  {med[name] * 1e3:>9.2f}  {max(t) * 1e3:>8.2f}"
                      + ratios)

    titles = {"digits": "digits CNN (8x8x1: conv 16 3x3, pool, conv 32 3x3, pool, dense 10), fwd+bwd",
              "layer": "32x32x3 CNN layer (conv 3->16 3x3 pad 1 + bias, relu, max pool 2), fwd+bwd"}
    for which in convs:
        rows = conv_rows(which, conv_batches, args)
        print()
        print(titles[which] + ("" if torch is not None else f" -- no torch row: {why_not}"))
        header = f"{'batch':>6}  {'candidate':<8}  {'min ms':>8}  {'median ms':>9}  {'max ms':>8}  {'engine/torch':>12}"
        print(header)
        print("-" * len(header))
        for n, times in rows:
            for name, t in times.items():
                ratio = ""
                if name == "engine":
                    ratio = (f"  {statistics.median(e / o for e, o in zip(times['engine'], times['torch'])):>11.2f}x"
                             if "torch" in times else f"  {'-':>12}")
                print(f"{n:>6}  {name:<8}  {min(t) * 1e3:>8.2f}  {statistics.median(t) * 1e3:>9.2f}  "
                      f"{max(t) * 1e3:>8.2f}" + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
