"""Benchmark of the bottleneck adapter op ``fusedadapters.ops.linear_adapter``.

What is measured, for every point (mode, dtype, N tokens, D model size, H hidden size, backend):

* ``forward``:  one call of the op under ``torch.no_grad()`` (inference; nothing saved for backward).
* ``backward``: one ``out.backward(dout)``; the forward that produced ``out`` runs before each
  repeat, outside the timed region. Gradients of x, LayerNorm weight and bias, down and up weights
  are all requested, and reset to None between repeats (also untimed), so each repeat writes
  fresh gradients.
* ``full``:     forward with autograd recording plus ``backward(dout)`` (one training step of the op).

Backends: ``eager`` (the pure-PyTorch reference, ``backend='reference'``), ``compile`` and
``compile-max-autotune`` (``torch.compile`` of that same reference call, modes default and
``max-autotune``, compiled afresh per shape with static shapes), ``triton`` (``backend='triton'``),
``native`` (``backend='native'``, the compiled kernels of csrc/; only when asked for, as it is built
first when it is not, and a built library makes it the automatic choice for CPU tensors),
and two self-test backends used by the tests (``selftest-raise`` raises, ``selftest-wrong`` returns a
wrong result), which exist to prove that failures are recorded instead of hidden.

Times are medians of CUDA-event-timed repeats with the L2 cache flushed before each repeat
(``bench/harness.py``). Before anything is timed, every backend's output (and, when a backward
mode is requested, its gradients) is compared once per shape with the eager reference computed in
float64 (float32 inputs) or float32 (16-bit inputs); a backend over tolerance is recorded as an error
at that shape and not timed.

Byte model (the floor any implementation must move; ``e`` = bytes per element of x, ``p`` = bytes
per parameter element, ``W = (2·D + 2·H·D)·p`` = LayerNorm weight and bias, down and up weights):

    forward   2·N·D·e + W        read x, write out, read the weights once
    backward  3·N·D·e + 2·W      read dout and x, write dx; read the weights, write their gradients
    full      5·N·D·e + 3·W      the two above (forward in training also reads the weights)

Dropout masks are regenerated from a seed, so they move no bytes; hidden activations (N·H) are
left out, as H ≪ D. ``GB/s = bytes / time``; ``% copy BW`` divides it by the copy bandwidth
(bytes read + written by a large device-to-device copy) measured at the start of the same run.

Usage (see bench/README.md):

    python bench/bench_linear_adapter.py                       # full sweep on the GPU
    python bench/bench_linear_adapter.py --quick               # a few shapes, for iterating
    TRITON_INTERPRET=1 python bench/bench_linear_adapter.py --device cpu   # CPU-small mode (CI)
    python bench/bench_linear_adapter.py --sweep chain         # K = 1, 2, 4, 8 adapters in a chain
    python bench/bench_linear_adapter.py --sweep mixed         # A = 1, 8, 64, 256 adapters in one batch

The chain and mixed-batch sweeps are described in bench/many_adapters.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import harness  # noqa: E402
import many_adapters  # noqa: E402
from fusedadapters.ops import linear_adapter  # noqa: E402
from fusedadapters.ops.backend import triton_interpreter_enabled  # noqa: E402

OP = "linear_adapter"
SCHEMA_VERSION = 1
MODES = ("forward", "backward", "full")
EAGER = "eager"
COMPILE_MAX = "compile-max-autotune"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GRAD_NAMES = ("dx", "dln_weight", "dln_bias", "ddown_weight", "dup_weight")
# Relative-error bounds of the pre-timing check (docs/design.md, 'Numerics policy', asks ~1e-5 / ~1e-2 of the parity
# tests; the benchmark gate is looser so that it only ever rejects a wrong kernel, not rounding).
TOLERANCES = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 1e-2}

# Sweep presets: (N values, D values, H values, dtypes).
PRESETS = {
    "full": ([4**k for k in range(9)], [1024, 4096, 8192], [16, 64, 256], ["bf16", "fp32"]),
    "quick": ([1, 16, 1024, 16384, 65536], [4096], [64], ["bf16"]),
    "cpu-small": ([1, 64], [64], [16], ["fp32"]),
}


# --------------------------------------------------------------------------------------------
# op configuration, inputs and the byte model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """Keyword arguments of the op that stay fixed across the sweep."""

    activation: str = "swish"
    norm_position: str = "pre"
    residual: bool = True
    dropout_p: float = 0.0
    eps: float = 1e-5

    def kwargs(self, dropout_seed: Optional[torch.Tensor]) -> Dict[str, Any]:
        return dict(
            activation=self.activation,
            norm_position=self.norm_position,
            residual=self.residual,
            dropout_p=self.dropout_p,
            dropout_seed=dropout_seed if self.dropout_p > 0 else None,
            eps=self.eps,
        )


@dataclasses.dataclass(frozen=True)
class Shape:
    n: int
    d: int
    h: int
    dtype: str

    def label(self) -> str:
        return f"{self.dtype} N={self.n} D={self.d} H={self.h}"


@dataclasses.dataclass
class Inputs:
    """x, LayerNorm weight and bias, down and up weights (all in the shape's dtype), dout, seed."""

    args: Tuple[torch.Tensor, ...]
    dout: torch.Tensor
    seed: torch.Tensor

    def detached(self, requires_grad: bool) -> Tuple[torch.Tensor, ...]:
        """Fresh leaf tensors sharing storage with ``args``."""
        return tuple(t.detach().requires_grad_(requires_grad) for t in self.args)


def make_inputs(shape: Shape, device: torch.device, seed: int) -> Inputs:
    """Random non-zero values in every tensor, scaled so that the adapter branch is as large as x
    (so that an error in the branch shows in ``out`` and is not hidden by the residual)."""
    gen = torch.Generator(device=device).manual_seed(seed + 7919 * shape.n + 31 * shape.d + shape.h)
    dtype = DTYPES[shape.dtype]

    def randn(*size: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = torch.randn(*size, generator=gen, dtype=torch.float32, device=device)
        return t.mul_(scale).add_(shift).to(dtype)

    n, d, h = shape.n, shape.d, shape.h
    x = randn(n, d)
    args = (
        x,
        randn(d, scale=0.1, shift=1.0),
        randn(d, scale=0.1),
        randn(h, d, scale=d**-0.5),
        randn(d, h, scale=h**-0.5),
    )
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    return Inputs(args=args, dout=randn(n, d), seed=seed_t)


def weight_bytes(d: int, h: int, param_elem: int) -> int:
    """LayerNorm weight and bias (D each), down weight (H×D), up weight (D×H)."""
    return (2 * d + 2 * h * d) * param_elem


def floor_bytes(mode: str, n: int, d: int, h: int, elem: int, param_elem: int) -> int:
    """Bytes the op must move at least (see the module docstring for the model)."""
    act, w = n * d * elem, weight_bytes(d, h, param_elem)
    if mode == "forward":
        return 2 * act + w
    if mode == "backward":
        return 3 * act + 2 * w
    if mode == "full":
        return 5 * act + 3 * w
    raise ValueError(f"unknown mode {mode!r}")


BYTE_MODEL = {
    "forward": "2*N*D*e + W  (read x, write out, read weights)",
    "backward": "3*N*D*e + 2*W  (read dout and x, write dx; read weights, write weight grads)",
    "full": "5*N*D*e + 3*W  (forward + backward)",
    "W": "(2*D + 2*H*D)*p  (LayerNorm weight and bias, down weight HxD, up weight DxH)",
    "e, p": "bytes per element of x and of the parameters (the same dtype in this sweep)",
}


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------

AdapterFn = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Backend:
    """How to build the function ``fn(x, ln_w, ln_b, wd, wu) -> out`` timed for one backend.

    ``skip_reason(device)`` returns why the backend cannot run on ``device`` (then it is recorded
    as skipped), or None.
    """

    name: str
    description: str
    build: Callable[[OpConfig, torch.Tensor], AdapterFn]
    skip_reason: Callable[[torch.device], Optional[str]] = lambda device: None


def _op_fn(cfg: OpConfig, seed: torch.Tensor, backend: str) -> AdapterFn:
    kwargs = cfg.kwargs(seed)

    def fn(x, ln_w, ln_b, wd, wu):
        return linear_adapter(x, ln_w, ln_b, wd, wu, backend=backend, **kwargs)

    return fn


def _build_eager(cfg: OpConfig, seed: torch.Tensor) -> AdapterFn:
    return _op_fn(cfg, seed, "reference")


def _build_compiled(mode: Optional[str]) -> Callable[[OpConfig, torch.Tensor], AdapterFn]:
    def build(cfg: OpConfig, seed: torch.Tensor) -> AdapterFn:
        return torch.compile(_op_fn(cfg, seed, "reference"), mode=mode, dynamic=False, fullgraph=False)

    return build


def _build_triton(cfg: OpConfig, seed: torch.Tensor) -> AdapterFn:
    return _op_fn(cfg, seed, "triton")


def _triton_skip_reason(device: torch.device) -> Optional[str]:
    if device.type == "cpu" and not triton_interpreter_enabled():
        return "Triton runs on CPU only under its interpreter: set TRITON_INTERPRET=1 before starting"
    return None


def _build_native(cfg: OpConfig, seed: torch.Tensor) -> AdapterFn:
    return _op_fn(cfg, seed, "native")


def _native_skip_reason(device: torch.device) -> Optional[str]:
    """Why the native backend cannot run here (it is built first when it is not: that takes a while)."""
    from fusedadapters.ops import native

    try:
        native.ensure_loaded()
    except native.NativeBuildError as error:
        return str(error)
    supported, why_not = native.supports_device(device)
    return None if supported else why_not


def _build_selftest_raise(cfg: OpConfig, seed: torch.Tensor) -> AdapterFn:
    def fn(*args):
        raise RuntimeError("selftest-raise: deliberate failure, to check that the sweep records errors")

    return fn


def _build_selftest_wrong(cfg: OpConfig, seed: torch.Tensor) -> AdapterFn:
    eager = _build_eager(cfg, seed)

    def fn(*args):
        return eager(*args) * 1.5

    return fn


BACKENDS: Dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(EAGER, "eager PyTorch reference (backend='reference')", _build_eager),
        Backend("compile", "torch.compile(reference), mode default", _build_compiled(None)),
        Backend(COMPILE_MAX, "torch.compile(reference), mode max-autotune", _build_compiled("max-autotune")),
        Backend(
            "compile-max-autotune-no-cudagraphs",
            "torch.compile(reference), mode max-autotune-no-cudagraphs",
            _build_compiled("max-autotune-no-cudagraphs"),
        ),
        Backend("triton", "fused Triton kernels (backend='triton')", _build_triton, _triton_skip_reason),
        Backend("native", "compiled C++/CUDA kernels of csrc/ (backend='native')", _build_native, _native_skip_reason),
        Backend("selftest-raise", "self-test: raises on every call", _build_selftest_raise),
        Backend("selftest-wrong", "self-test: returns 1.5x the reference", _build_selftest_wrong),
    )
}


def default_backends(device: torch.device) -> List[str]:
    if device.type == "cpu":
        return [EAGER, "compile", "triton"]
    return [EAGER, "compile", COMPILE_MAX, "triton"]


# --------------------------------------------------------------------------------------------
# correctness check (once per shape and backend, before timing)
# --------------------------------------------------------------------------------------------


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error ‖actual − expected‖ / ‖expected‖ (computed in float32 or wider)."""
    wide = torch.promote_types(expected.dtype, torch.float32)
    a, e = actual.detach().to(wide), expected.detach().to(wide)
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    return num / den if den > 0 else num


def reference_result(inputs: Inputs, cfg: OpConfig, with_grads: bool) -> Dict[str, torch.Tensor]:
    """Eager reference in float64 (float32 inputs) or float32 (16-bit inputs): out and, when asked,
    the gradients of every input for ``dout``."""
    wide = torch.float64 if inputs.args[0].dtype == torch.float32 else torch.float32
    args = tuple(t.detach().to(wide).requires_grad_(with_grads) for t in inputs.args)
    with torch.set_grad_enabled(with_grads):
        out = linear_adapter(*args, backend="reference", **cfg.kwargs(inputs.seed))
    result = {"out": out.detach()}
    if with_grads:
        grads = torch.autograd.grad(out, args, inputs.dout.to(wide))
        result.update(zip(GRAD_NAMES, (g.detach() for g in grads)))
    return result


def check_backend(
    fn: AdapterFn, inputs: Inputs, ref: Dict[str, torch.Tensor], with_grads: bool
) -> Dict[str, float]:
    """Relative errors of ``fn`` against ``ref``: the inference forward ("out") and, with grads,
    the training forward ("out_train") and every gradient. The first call also compiles."""
    errors: Dict[str, float] = {}
    with torch.no_grad():
        out = fn(*inputs.detached(False))
        errors["out"] = rel_err(out, ref["out"])
        del out
    if with_grads:
        args = inputs.detached(True)
        out = fn(*args)
        errors["out_train"] = rel_err(out, ref["out"])
        grads = torch.autograd.grad(out, args, inputs.dout)
        for name, g in zip(GRAD_NAMES, grads):
            errors[name] = rel_err(g, ref[name])
        del out, grads, args
    return errors


# --------------------------------------------------------------------------------------------
# timing of one point
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TimingConfig:
    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int
    flush_l2: bool
    rounds: int = 1


def time_mode(
    fn: AdapterFn, inputs: Inputs, mode: str, device: torch.device, tc: TimingConfig
) -> harness.Timing:
    """Time one mode of ``fn`` (see the module docstring for what each mode contains)."""
    bench = dict(
        device=device,
        warmup_ms=tc.warmup_ms,
        rep_ms=tc.rep_ms,
        min_reps=tc.min_reps,
        max_reps=tc.max_reps,
        flush_l2=tc.flush_l2,
    )
    if mode == "forward":
        args = inputs.detached(False)
        with torch.no_grad():
            return harness.do_bench(lambda: fn(*args), **bench)
    args = inputs.detached(True)
    dout = inputs.dout
    if mode == "backward":
        # a fresh forward before every repeat, outside the timed region (retain_graph=True would
        # not be representative, and torch.compile's donated buffers forbid it)
        return harness.do_bench(lambda out: out.backward(dout), setup=lambda: fn(*args), grad_to_none=args, **bench)
    if mode == "full":
        return harness.do_bench(lambda: fn(*args).backward(dout), grad_to_none=args, **bench)
    raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------


def _row(shape: Shape, backend: str, mode: str, **fields: Any) -> Dict[str, Any]:
    row = {
        "op": OP,
        "run": 0,
        "mode": mode,
        "dtype": shape.dtype,
        "n": shape.n,
        "d": shape.d,
        "h": shape.h,
        "backend": backend,
        "status": "ok",
        "stage": None,
        "error": None,
        "ms": None,
        "timing": None,
        "bytes": None,
        "max_rel_err": None,
    }
    row.update(fields)
    return row


def _configure_dynamo() -> None:
    """Make a recompile-limit hit an error (recorded) instead of a silent fallback to eager."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


def run_shape(
    shape: Shape,
    backends: Sequence[str],
    modes: Sequence[str],
    cfg: OpConfig,
    device: torch.device,
    tc: TimingConfig,
    tol: float,
    seed: int,
    log: Callable[[str], None],
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Check, then time, every backend at one shape. Returns (rows, checks); never raises."""
    rows: List[Dict[str, Any]] = []
    checks: List[Dict[str, Any]] = []
    elem = torch.empty((), dtype=DTYPES[shape.dtype]).element_size()
    with_grads = any(m != "forward" for m in modes)

    def fail_all(names: Sequence[str], stage: str, exc: BaseException, **extra: Any) -> None:
        msg = harness.format_error(exc)
        log(f"  {shape.label()} {','.join(names)}: {stage} failed: {msg}")
        tb = harness.format_traceback(exc)
        for name in names:
            rows.extend(
                _row(shape, name, m, status="error", stage=stage, error=msg, traceback=tb, **extra) for m in modes
            )

    torch._dynamo.reset()  # fresh compile caches per shape: static shapes, no recompile limit
    try:
        inputs = make_inputs(shape, device, seed)
        ref = reference_result(inputs, cfg, with_grads)
    except Exception as exc:  # e.g. out of memory for the float64 reference
        fail_all(backends, "reference", exc)
        harness.free_memory(device)
        return rows, checks

    # 1. build and check every backend while the reference is alive
    fns: Dict[str, AdapterFn] = {}
    max_errs: Dict[str, float] = {}
    for name in backends:
        backend = BACKENDS[name]
        reason = backend.skip_reason(device)
        if reason is not None:
            rows.extend(_row(shape, name, m, status="skipped", stage="build", error=reason) for m in modes)
            continue
        try:
            fn = backend.build(cfg, inputs.seed)
            errors = check_backend(fn, inputs, ref, with_grads)
        except Exception as exc:
            checks.append(dict(shape=dataclasses.asdict(shape), backend=name, passed=False, error=harness.format_error(exc)))
            fail_all([name], "check", exc)
            harness.free_memory(device)
            continue
        worst = max(errors.values())
        passed = math.isfinite(worst) and worst <= tol
        checks.append(
            dict(shape=dataclasses.asdict(shape), backend=name, rel_err=errors, max_rel_err=worst, tol=tol, passed=passed)
        )
        if not passed:
            bad = ", ".join(f"{k} {v:.3g}" for k, v in errors.items() if not v <= tol)
            msg = f"correctness: relative error over tolerance {tol:.1g} ({bad}); not timed"
            log(f"  {shape.label()} {name}: {msg}")
            rows.extend(
                _row(shape, name, m, status="error", stage="check", error=msg, max_rel_err=worst) for m in modes
            )
            continue
        fns[name] = fn
        max_errs[name] = worst
    del ref
    harness.free_memory(device)

    # 2. time the backends that passed: with rounds > 1, each (backend, mode) is timed rounds times for
    # rep_ms / rounds, the backends taking turns within every round
    round_tc = dataclasses.replace(tc, rep_ms=tc.rep_ms / tc.rounds)
    timings: Dict[Tuple[str, str], List[harness.Timing]] = {}
    failed: Dict[Tuple[str, str], BaseException] = {}
    for _ in range(tc.rounds):
        for name, fn in fns.items():
            for mode in modes:
                if (name, mode) in failed:
                    continue
                try:
                    timings.setdefault((name, mode), []).append(time_mode(fn, inputs, mode, device, round_tc))
                except Exception as exc:
                    failed[(name, mode)] = exc
                    harness.free_memory(device)
    for name in fns:
        for mode in modes:
            nbytes = floor_bytes(mode, shape.n, shape.d, shape.h, elem, elem)
            exc = failed.get((name, mode))
            if exc is not None:
                msg = harness.format_error(exc)
                log(f"  {shape.label()} {name} {mode}: timing failed: {msg}")
                rows.append(
                    _row(shape, name, mode, status="error", stage="time", error=msg,
                         traceback=harness.format_traceback(exc), max_rel_err=max_errs[name])
                )
                continue
            timing = harness.combine_rounds(timings[(name, mode)])
            rows.append(
                _row(shape, name, mode, ms=timing.median_ms, timing=dict(timing.as_dict(), rounds=tc.rounds),
                     bytes=nbytes, max_rel_err=max_errs[name])
            )
            log(f"  {shape.label()} {mode:8s} {name:22s} {timing.median_ms:10.4f} ms "
                f"{harness.gbps(nbytes, timing.median_ms):9.1f} GB/s")
    del fns, inputs
    harness.free_memory(device)
    return rows, checks


# --------------------------------------------------------------------------------------------
# derived metrics, targets
# --------------------------------------------------------------------------------------------


def _point_key(row: Dict[str, Any]) -> Tuple:
    return (row["mode"], row["dtype"], row["n"], row["d"], row["h"])


def derive(rows: List[Dict[str, Any]], runs: List[Dict[str, Any]]) -> None:
    """Fill GB/s, fraction of copy bandwidth and speedups over eager and compile-max-autotune."""
    by_point: Dict[Tuple, Dict[str, Dict[str, Any]]] = {}
    for row in rows:
        by_point.setdefault(_point_key(row), {})[row["backend"]] = row
    for row in rows:
        copy = runs[row["run"]]["copy_bandwidth"]
        copy_gbps = copy.get("gbps") if copy else None
        ok = row["status"] == "ok" and row["ms"]
        row["gbps"] = harness.gbps(row["bytes"], row["ms"]) if ok else None
        row["copy_gbps"] = copy_gbps
        row["frac_copy_bw"] = row["gbps"] / copy_gbps if ok and copy_gbps else None
        peers = by_point[_point_key(row)]
        for base, field in ((EAGER, "speedup_vs_eager"), (COMPILE_MAX, "speedup_vs_compile_max_autotune")):
            other = peers.get(base)
            good = ok and other is not None and other["status"] == "ok" and other["ms"]
            row[field] = other["ms"] / row["ms"] if good else None


@dataclasses.dataclass(frozen=True)
class Target:
    """A target of docs/design.md, 'Floors and targets': ``field >= threshold`` for ``mode`` rows of the target backend."""

    name: str
    mode: str
    field: str
    threshold: float
    text: str


TARGETS = (
    Target("fwd-bandwidth", "forward", "frac_copy_bw", 0.85, "forward ≥ 85 % of copy bandwidth"),
    Target("fwd-vs-eager", "forward", "speedup_vs_eager", 3.0, "forward ≥ 3× eager reference"),
    Target("fwd-vs-compile", "forward", "speedup_vs_compile_max_autotune", 1.5,
           "forward ≥ 1.5× torch.compile max-autotune"),
    Target("bwd-bandwidth", "backward", "frac_copy_bw", 0.70, "backward ≥ 70 % of copy bandwidth (3·N·D floor)"),
    Target("bwd-vs-eager", "backward", "speedup_vs_eager", 2.5, "backward ≥ 2.5× eager reference"),
)


def evaluate_targets(rows: List[Dict[str, Any]], backend: str, min_elems: int) -> List[Dict[str, Any]]:
    """One entry per (target, point in scope): points of ``backend`` with N·D ≥ ``min_elems``.

    status is 'met', 'missed', or 'not evaluated' (the backend or the baseline has no time there)."""
    results = []
    for t in TARGETS:
        for row in rows:
            if row["backend"] != backend or row["mode"] != t.mode or row["n"] * row["d"] < min_elems:
                continue
            value = row.get(t.field)
            if value is None:
                status = "not evaluated"
            else:
                status = "met" if value >= t.threshold else "missed"
            results.append(
                dict(target=t.name, text=t.text, threshold=t.threshold, value=value, status=status,
                     dtype=row["dtype"], n=row["n"], d=row["d"], h=row["h"], backend=backend,
                     row_status=row["status"], row_error=row["error"])
            )
    return results


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _sort_key(row: Dict[str, Any], backend_order: Sequence[str]) -> Tuple:
    order = {b: i for i, b in enumerate(backend_order)}
    return (MODES.index(row["mode"]), row["dtype"], row["d"], row["h"], row["n"], order.get(row["backend"], 99))


def _backend_order(rows: List[Dict[str, Any]]) -> List[str]:
    present = {r["backend"] for r in rows}
    return [b for b in BACKENDS if b in present] + sorted(present - set(BACKENDS))


def render_report(data: Dict[str, Any], plot_note: str) -> str:
    rows, runs = data["rows"], data["runs"]
    order = _backend_order(rows)
    rows = sorted(rows, key=lambda r: _sort_key(r, order))
    f = harness.fmt
    out: List[str] = [f"# `{OP}` benchmark", ""]
    out.append("Every figure below was produced by the command(s) listed here; see bench/README.md for the columns.")
    out.append("")

    out.append("## Runs")
    out.append("")
    for i, run in enumerate(runs):
        env, copy = run["environment"], run["copy_bandwidth"]
        out.append(f"Run {i}: `{env['command']}`")
        out.append("")
        items = [
            ("timestamp (UTC)", env["timestamp_utc"]),
            ("device", env.get("device_name")),
            ("compute capability / SMs", f"{env.get('compute_capability', '–')} / {env.get('sm_count', '–')}"),
            ("driver", env.get("driver") or "–"),
            ("torch / triton / CUDA runtime", f"{env['torch']} / {env.get('triton')} / {env.get('cuda_runtime')}"),
            ("python / platform", f"{env['python']} / {env['platform']}"),
            ("git commit", f"{env['git'].get('commit')}{' (dirty tree)' if env['git'].get('dirty') else ''}"),
            ("TRITON_INTERPRET", env["env"].get("TRITON_INTERPRET")),
            ("copy bandwidth",
             f"{f(copy.get('gbps'), '.1f')} GB/s ({copy.get('method')}, {copy.get('bytes', 0) / 2**20:.0f} MiB)"
             if copy and copy.get("gbps") else f"not measured: {copy.get('error') if copy else '–'}"),
            ("op config", json.dumps(run["config"]["op"])),
            ("timing", json.dumps(run["config"]["timing"])),
        ]
        out.append(harness.markdown_table(["", "value"], items))
        out.append("")

    out.append("## Byte model")
    out.append("")
    out.append(harness.markdown_table(["", "bytes"], [(k, f"`{v}`") for k, v in BYTE_MODEL.items()]))
    out.append("")

    cfg = runs[-1]["config"]
    tb, min_elems = cfg["target_backend"], cfg["target_min_elems"]
    out.append("## Targets (docs/design.md, 'Floors and targets')")
    out.append("")
    out.append(f"Evaluated on backend `{tb}` at every measured point with N·D ≥ {min_elems} "
               f"(2^{math.log2(min_elems):.0f}); speedups at smaller N are in the tables below.")
    out.append("")
    targets = data["targets"]
    summary = []
    for t in TARGETS:
        sel = [r for r in targets if r["target"] == t.name]
        vals = [r["value"] for r in sel if r["value"] is not None]
        summary.append((t.text, len(sel), sum(r["status"] == "met" for r in sel),
                        sum(r["status"] == "missed" for r in sel), sum(r["status"] == "not evaluated" for r in sel),
                        f(min(vals)) if vals else "–"))
    out.append(harness.markdown_table(["target", "points", "met", "missed", "not evaluated", "worst"], summary))
    out.append("")
    if targets:
        out.append(harness.markdown_table(
            ["target", "dtype", "N", "D", "H", "value", "threshold", "status"],
            [(r["target"], r["dtype"], r["n"], r["d"], r["h"], f(r["value"]), r["threshold"],
              r["status"] if r["status"] != "not evaluated" else f"not evaluated ({r['row_error'] or 'no baseline'})")
             for r in targets]))
    else:
        out.append(f"No point in scope (no `{tb}` row with N·D ≥ {min_elems}).")
    out.append("")

    out.append("## Correctness checks (before timing, once per shape)")
    out.append("")
    out.append("Max over out and every gradient of ‖backend − reference‖/‖reference‖; reference = eager in float64 "
               "(float32 inputs) or float32 (16-bit inputs).")
    out.append("")
    per: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for c in data["checks"]:
        per.setdefault((c["backend"], c["shape"]["dtype"]), []).append(c)
    check_rows = []
    for (b, dt), cs in sorted(per.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0][1])):
        errs = [c["max_rel_err"] for c in cs if c.get("max_rel_err") is not None]
        check_rows.append((b, dt, len(cs), sum(bool(c["passed"]) for c in cs), sum(not c["passed"] for c in cs),
                           f(max(errs)) if errs else "–", f(cs[0].get("tol"))))
    out.append(harness.markdown_table(["backend", "dtype", "shapes checked", "passed", "failed", "worst rel err", "tol"],
                                      check_rows) if check_rows else "No check ran.")
    out.append("")

    errors = [r for r in rows if r["status"] == "error"]
    out.append(f"## Errors ({len(errors)} points)")
    out.append("")
    if errors:
        merged: Dict[Tuple, List[str]] = {}  # the same failure in several modes is one line
        for r in errors:
            merged.setdefault((r["dtype"], r["n"], r["d"], r["h"], r["backend"], r["stage"], r["error"]), []).append(r["mode"])
        out.append(harness.markdown_table(
            ["modes", "dtype", "N", "D", "H", "backend", "stage", "error"],
            [(",".join(m), *k) for k, m in merged.items()]))
    else:
        out.append("None.")
    out.append("")
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        out.append(f"## Skipped ({len(skipped)})")
        out.append("")
        reasons: Dict[Tuple[str, str], int] = {}
        for r in skipped:
            reasons[(r["backend"], r["error"])] = reasons.get((r["backend"], r["error"]), 0) + 1
        out.append(harness.markdown_table(["backend", "points", "reason"], [(b, n, e) for (b, e), n in reasons.items()]))
        out.append("")

    out.append("## Results")
    out.append("")
    out.append("ms = median time; GB/s = floor bytes / ms; % BW = GB/s / copy bandwidth; ×eager and ×c-max = "
               "speedup over eager and over compile-max-autotune at the same point (> 1 is faster).")
    out.append("")
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["dtype"], r["d"], r["h"]), []).append(r)
    for (mode, dtype, d, h), grp in groups.items():
        out.append(f"### {mode} · {dtype} · D={d} · H={h}")
        out.append("")
        out.append(harness.markdown_table(
            ["N", "backend", "ms", "GB/s", "% BW", "×eager", "×c-max", "rel err", "status"],
            [(r["n"], r["backend"], f(r["ms"], ".4g"), f(r["gbps"], ".4g"),
              f(100 * r["frac_copy_bw"], ".3g") if r["frac_copy_bw"] is not None else "–",
              f(r["speedup_vs_eager"], ".3g"), f(r["speedup_vs_compile_max_autotune"], ".3g"),
              f(r["max_rel_err"], ".2g"), r["status"] if r["status"] == "ok" else f"{r['status']} ({r['stage']})")
             for r in grp]))
        out.append("")

    out.append("## Plots")
    out.append("")
    out.append(plot_note)
    out.append("")
    return "\n".join(out)


def write_plots(data: Dict[str, Any], out_dir: Path) -> str:
    """GB/s against N, one line per backend, one panel per (dtype, D, H), one figure per mode.
    Returns the markdown note for the report (file names, or why plotting was skipped)."""
    ok, reason = harness.matplotlib_available()
    if not ok:
        return f"Plots skipped: {reason}. Install matplotlib and re-render with `--merge {out_dir} --out {out_dir}`."
    copy = data["runs"][-1]["copy_bandwidth"]
    hline = (copy["gbps"], "copy bandwidth") if copy and copy.get("gbps") else None
    notes = []
    for mode in MODES:
        panels: Dict[str, Dict[str, List[Tuple[float, float]]]] = {}
        for r in sorted(data["rows"], key=lambda r: (r["dtype"], r["d"], r["h"])):
            if r["mode"] != mode or r["status"] != "ok":
                continue
            panel = panels.setdefault(f"{r['dtype']} D={r['d']} H={r['h']}", {})
            panel.setdefault(r["backend"], []).append((r["n"], r["gbps"]))
        if not panels:
            continue
        path = out_dir / f"gbps_{mode}.png"
        written, why = harness.plot_panels(
            path, panels, xlabel="N (tokens)", ylabel="GB/s (floor bytes / time)",
            title=f"{OP} {mode}: achieved bandwidth against N", hline=hline)
        notes.append(f"![{mode}]({path.name})" if written else f"{mode}: not plotted ({why})")
    return "\n\n".join(notes) if notes else "Nothing to plot (no successful point)."


def write_outputs(data: Dict[str, Any], out_dir: Path, plot: bool) -> None:
    """results.json, report.md and (with ``plot``) gbps_<mode>.png in ``out_dir``."""
    derive(data["rows"], data["runs"])
    cfg = data["runs"][-1]["config"]
    data["targets"] = evaluate_targets(data["rows"], cfg["target_backend"], cfg["target_min_elems"])
    data["errors"] = [
        {k: r[k] for k in ("mode", "dtype", "n", "d", "h", "backend", "stage", "error")}
        for r in data["rows"] if r["status"] == "error"
    ]
    plot_note = write_plots(data, out_dir) if plot else "Plots not drawn (--no-plot, or the sweep is still running)."
    harness.write_json(out_dir / "results.json", data)
    (out_dir / "report.md").write_text(render_report(data, plot_note) + "\n")


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _int(text: str) -> int:
    """``65536`` or ``2**16``."""
    base, _, exp = text.strip().partition("**")
    return int(base) ** int(exp) if exp else int(base)


def _ints(text: str) -> List[int]:
    return [_int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See bench/README.md for the columns and the byte model.")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    p.add_argument("--out", type=Path, default=_HERE / "results" / OP, help="output directory (created)")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help=f"small sweep for iterating: {PRESETS['quick']}")
    preset.add_argument("--cpu-small", action="store_true",
                        help=f"tiny CI sweep {PRESETS['cpu-small']} (the default on CPU)")
    p.add_argument("--backends", type=_names, default=None,
                   help=f"comma list from {list(BACKENDS)} (default: eager,compile,compile-max-autotune,triton; "
                        "on CPU eager,compile,triton)")
    p.add_argument("--modes", type=_names, default=list(MODES), help="comma list of forward,backward,full")
    p.add_argument("--n", type=_ints, default=None, help="token counts, e.g. 1,16,2**16 (overrides the preset)")
    p.add_argument("--d", type=_ints, default=None, help="model sizes D (overrides the preset)")
    p.add_argument("--h", type=_ints, default=None, help="adapter hidden sizes H (overrides the preset)")
    p.add_argument("--dtypes", type=_names, default=None, help=f"comma list from {list(DTYPES)}")
    p.add_argument("--activation", default="swish")
    p.add_argument("--norm-position", default="pre", choices=("pre", "post"))
    p.add_argument("--no-residual", action="store_true", help="residual=False (out = adapter(x))")
    p.add_argument("--dropout-p", type=float, default=0.0)
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--warmup-ms", type=float, default=None, help="warmup budget per point (25 GPU, 2 CPU)")
    p.add_argument("--rep-ms", type=float, default=None, help="timed budget per point (100 GPU, 20 CPU)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time each point in this many rounds of rep-ms/rounds, the backends taking turns in "
                        "every round, and report the median of the rounds' medians (steadier comparisons on a "
                        "shared machine)")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=1000)
    p.add_argument("--no-flush-l2", action="store_true", help="do not flush the L2 cache before each repeat")
    p.add_argument("--copy-bytes", type=_ints, default=None, help="copy-bandwidth buffer size (1 GiB GPU, 16 MiB CPU)")
    p.add_argument("--tol", type=float, default=None, help=f"max relative error of the check (default {TOLERANCES})")
    p.add_argument("--target-backend", default="triton", help="backend the targets of docs/design.md are evaluated on")
    p.add_argument("--target-min-elems", type=_ints, default=[2**26], help="targets apply where N*D >= this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads on CPU (default 1: steadier on CI)")
    p.add_argument("--no-plot", action="store_true", help="skip the plots (they need matplotlib)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                   help="do not run: merge the results.json of these directories (later wins) into --out")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="after the first shape, start no new one once the time spent plus the last shape's time "
                        "would exceed this; the shapes left are recorded as skipped (stage 'budget')")
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit with status 1 when any point of a non-selftest backend failed")
    many_adapters.add_arguments(p)
    return p


def _resolve(args: argparse.Namespace) -> Tuple[torch.device, str, List[Shape], List[str]]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = "cpu-small" if (args.cpu_small or (device.type == "cpu" and not args.quick)) else (
        "quick" if args.quick else "full")
    ns, ds, hs, dts = PRESETS[preset]
    ns, ds, hs, dts = args.n or ns, args.d or ds, args.h or hs, args.dtypes or dts
    unknown = [d for d in dts if d not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown dtypes {unknown}; expected {list(DTYPES)}")
    backends = args.backends or default_backends(device)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; expected {list(BACKENDS)}")
    bad_modes = [m for m in args.modes if m not in MODES]
    if bad_modes:
        raise SystemExit(f"unknown modes {bad_modes}; expected {list(MODES)}")
    shapes = [Shape(n, d, h, dt) for dt in dts for d in ds for h in hs for n in ns]
    return device, preset, shapes, backends


def _merge(dirs: Sequence[Path]) -> Dict[str, Any]:
    runs: List[Dict[str, Any]] = []
    rows: Dict[Tuple, Dict[str, Any]] = {}
    checks: List[Dict[str, Any]] = []
    for d in dirs:
        data = json.loads((Path(d) / "results.json").read_text())
        base = len(runs)
        runs.extend(data["runs"])
        for r in data["rows"]:
            r["run"] += base
            rows[_point_key(r) + (r["backend"],)] = r
        checks.extend(data["checks"])
    return {"schema": SCHEMA_VERSION, "op": OP, "runs": runs, "rows": list(rows.values()), "checks": checks}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.sweep != "op":  # chains and mixed batches: bench/many_adapters.py
        return many_adapters.main(args, argv, script=str(Path(__file__)))
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    if args.merge:
        data = _merge(args.merge)
        write_outputs(data, out_dir, plot=not args.no_plot)
        log(f"merged {len(args.merge)} result sets into {out_dir}")
        return 0

    device, preset, shapes, backends = _resolve(args)
    gpu = device.type == "cuda"
    tc = TimingConfig(
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else (25.0 if gpu else 2.0),
        rep_ms=args.rep_ms if args.rep_ms is not None else (100.0 if gpu else 20.0),
        min_reps=args.min_reps,
        max_reps=args.max_reps,
        flush_l2=gpu and not args.no_flush_l2,
        rounds=max(1, args.rounds),
    )
    cfg = OpConfig(activation=args.activation, norm_position=args.norm_position, residual=not args.no_residual,
                   dropout_p=args.dropout_p, eps=args.eps)
    if gpu and device.index is not None:
        torch.cuda.set_device(device)
    if not gpu:
        torch.set_num_threads(args.cpu_threads)  # fewer threads: less noise on a shared CI machine
    _configure_dynamo()

    env = harness.environment_record(argv, device, script=str(Path(__file__)))
    log(f"{OP} benchmark on {env['device_name']} ({preset}: {len(shapes)} shapes x {backends} x {args.modes})")
    try:
        copy_bytes = args.copy_bytes[0] if args.copy_bytes else (None if gpu else 16 << 20)
        copy = harness.measure_copy_bandwidth(device, copy_bytes)
        log(f"copy bandwidth: {copy['gbps']:.1f} GB/s")
    except Exception as exc:
        copy = {"gbps": None, "error": harness.format_error(exc)}
        log(f"copy bandwidth not measured: {copy['error']}")
    run = {
        "environment": env,
        "copy_bandwidth": copy,
        "config": {
            "preset": preset,
            "device": str(device),
            "backends": {b: BACKENDS[b].description for b in backends},
            "modes": list(args.modes),
            "shapes": [dataclasses.asdict(s) for s in shapes],
            "op": dataclasses.asdict(cfg),
            "timing": dataclasses.asdict(tc),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "torch_threads": torch.get_num_threads(),
            "tolerances": {dt: (args.tol or TOLERANCES[dt]) for dt in {s.dtype for s in shapes}},
            "target_backend": args.target_backend,
            "target_min_elems": args.target_min_elems[0],
            "seed": args.seed,
        },
    }
    data: Dict[str, Any] = {"schema": SCHEMA_VERSION, "op": OP, "runs": [run], "rows": [], "checks": []}
    start, last_shape_s = time.monotonic(), 0.0
    for i, shape in enumerate(shapes):
        spent = time.monotonic() - start
        if args.time_budget_s is not None and i > 0 and spent + last_shape_s > args.time_budget_s:
            reason = (f"time budget: {spent:.0f} s of {args.time_budget_s:g} s spent and the last shape took "
                      f"{last_shape_s:.0f} s")
            log(f"stopping before {shape.label()}: {reason}; {len(shapes) - i} shapes not measured")
            data["rows"].extend(_row(s, b, m, status="skipped", stage="budget", error=reason)
                                for s in shapes[i:] for b in backends for m in args.modes)
            break
        log(f"[{i + 1}/{len(shapes)}] {shape.label()}")
        rows, checks = run_shape(shape, backends, args.modes, cfg, device, tc,
                                 args.tol or TOLERANCES[shape.dtype], args.seed, log)
        data["rows"].extend(rows)
        data["checks"].extend(checks)
        write_outputs(data, out_dir, plot=False)  # partial results survive an interrupted sweep
        last_shape_s = time.monotonic() - start - spent
    write_outputs(data, out_dir, plot=not args.no_plot)
    n_err = len(data["errors"])
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.md'}; {n_err} error rows")
    real_errors = [e for e in data["errors"] if not e["backend"].startswith("selftest")]
    return 1 if (args.fail_on_error and real_errors) else 0


if __name__ == "__main__":
    sys.exit(main())
