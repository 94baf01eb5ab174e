"""Shared benchmark harness: timing, copy bandwidth, environment record, writers, plots.

Every benchmark script in ``bench/`` uses these helpers so that all numbers are taken the same way:

* ``do_bench(fn, device=...)`` times ``fn`` and returns a :class:`Timing` (milliseconds).
  On CUDA each repeat is bracketed by its own pair of CUDA events (optionally after flushing the
  L2 cache by overwriting a 256 MiB buffer, outside the timed region), the device is synchronized
  once at the end, and the median over the repeats is the figure reported. On CPU the same loop
  uses ``time.perf_counter``. The number of warmup and timed repeats is derived from a time budget
  (``warmup_ms``, ``rep_ms``) and a short estimate, like ``triton.testing.do_bench``.
* ``measure_copy_bandwidth(device)`` times a large device-to-device ``dst.copy_(src)`` and reports
  ``(bytes read + bytes written) / time``, the practical bandwidth ceiling that kernels are
  compared against; it is meant to run in the same process as the kernels it is compared with.
* ``environment_record(argv)`` describes where and how numbers were taken (device, versions,
  driver, git commit, exact command line, UTC timestamp).
* ``write_json``, ``markdown_table`` and ``plot_panels`` write results; plotting is optional and
  returns a reason instead of failing when matplotlib is not installed.

Nothing here knows about adapters; the scripts supply the functions to time and the byte models.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "Timing",
    "do_bench",
    "synchronize",
    "measure_copy_bandwidth",
    "environment_record",
    "format_error",
    "free_memory",
    "gbps",
    "write_json",
    "markdown_table",
    "fmt",
    "plot_panels",
]

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2 (H100: 50 MB)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Times of one benchmarked function, in milliseconds; ``median_ms`` is the reported figure."""

    median_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    reps: int
    warmup: int

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def combine_rounds(rounds: Sequence[Timing]) -> Timing:
    """One Timing from several rounds of the same function (interleaved with other functions' rounds,
    so that a slow phase of the machine falls on every function): the median of the rounds' medians,
    the extremes over all, the mean of the means, the repeats and warmups summed."""
    return Timing(
        median_ms=statistics.median(t.median_ms for t in rounds),
        min_ms=min(t.min_ms for t in rounds),
        max_ms=max(t.max_ms for t in rounds),
        mean_ms=statistics.fmean(t.mean_ms for t in rounds),
        reps=sum(t.reps for t in rounds),
        warmup=sum(t.warmup for t in rounds),
    )


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _L2Flusher:
    """Overwrites a buffer larger than the L2 cache, so that the next kernel starts with a cold cache."""

    def __init__(self, device: torch.device, nbytes: int = L2_FLUSH_BYTES):
        self.buffer = torch.empty(nbytes, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def _set_grads_to_none(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _estimate_ms(fn: Callable[[], Any], device: torch.device, calls: int = 3) -> float:
    """Wall time per call of ``fn`` over a few synchronized calls (only used to size the loops)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return max((time.perf_counter() - start) * 1e3 / calls, 1e-4)


def do_bench(
    fn: Callable[[], Any],
    *,
    device: torch.device,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 1000,
    flush_l2: bool = True,
    grad_to_none: Sequence[torch.Tensor] = (),
    setup: Optional[Callable[[], Any]] = None,
) -> Timing:
    """Time ``fn()``: warm up for about ``warmup_ms``, then time ``min_reps``..``max_reps`` repeats
    filling about ``rep_ms``, and return their statistics (median is the figure to report).

    Measured per repeat: one call of ``fn``, nothing else. Outside the timed region, before each
    repeat: the ``.grad`` of every tensor in ``grad_to_none`` is set to None (so that backward
    writes fresh gradients instead of accumulating); with ``setup``, ``state = setup()`` runs and
    the timed call is ``fn(state)`` (e.g. setup runs a forward, fn its backward); then, on CUDA with
    ``flush_l2``, the L2 cache is flushed. CUDA: one event pair per repeat, one synchronize at the
    end. CPU: ``perf_counter`` around each call (``flush_l2`` is ignored).
    """
    if setup is None:
        timed, untimed = fn, fn
    else:
        timed, untimed = fn, (lambda: fn(setup()))
    untimed()  # first call outside everything: compilation, autotuning, allocator growth
    synchronize(device)
    est = _estimate_ms(untimed, device)  # includes setup: only sizes the loops
    n_warmup = int(min(max(1, warmup_ms / est), 1000))
    n_rep = int(min(max(min_reps, rep_ms / est), max_reps))
    for _ in range(n_warmup):
        _set_grads_to_none(grad_to_none)
        untimed()
    synchronize(device)

    if device.type == "cuda":
        flush = _L2Flusher(device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            _set_grads_to_none(grad_to_none)
            args = () if setup is None else (setup(),)
            if flush is not None:
                flush()
            starts[i].record()
            timed(*args)
            ends[i].record()
            del args
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        del flush
    else:
        times = []
        for _ in range(n_rep):
            _set_grads_to_none(grad_to_none)
            args = () if setup is None else (setup(),)
            t0 = time.perf_counter()
            timed(*args)
            times.append((time.perf_counter() - t0) * 1e3)
            del args
    _set_grads_to_none(grad_to_none)
    return Timing(
        median_ms=statistics.median(times),
        min_ms=min(times),
        max_ms=max(times),
        mean_ms=statistics.fmean(times),
        reps=n_rep,
        warmup=n_warmup,
    )


def gbps(nbytes: float, ms: float) -> float:
    """Bytes per millisecond expressed in GB/s (10⁹ bytes per second)."""
    return nbytes / (ms * 1e6)


# --------------------------------------------------------------------------------------------
# copy bandwidth
# --------------------------------------------------------------------------------------------


def default_copy_bytes(device: torch.device) -> int:
    """Size of the source buffer for the copy measurement: 1 GiB on CUDA, 64 MiB on CPU."""
    return (1 << 30) if device.type == "cuda" else (64 << 20)


def measure_copy_bandwidth(
    device: torch.device, nbytes: Optional[int] = None, *, rep_ms: float = 200.0
) -> Dict[str, Any]:
    """Copy bandwidth of ``device``: median time of ``dst.copy_(src)`` for ``nbytes``-byte buffers.

    Returns ``{"bytes": nbytes, "bytes_moved": 2 * nbytes, "ms": ..., "gbps": ...}`` where
    ``gbps = (bytes read + bytes written) / median time``. The buffers are far larger than any
    cache, so no L2 flush is needed.
    """
    nbytes = int(nbytes or default_copy_bytes(device))
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = do_bench(lambda: dst.copy_(src), device=device, rep_ms=rep_ms, flush_l2=False, max_reps=200)
    if not torch.equal(dst[:: max(1, nbytes // 4096)], src[:: max(1, nbytes // 4096)]):
        raise RuntimeError("copy bandwidth measurement: destination differs from source")
    moved = 2 * nbytes
    result = {
        "bytes": nbytes,
        "bytes_moved": moved,
        "ms": timing.median_ms,
        "gbps": gbps(moved, timing.median_ms),
        "timing": timing.as_dict(),
        "method": "dst.copy_(src), uint8 buffers, (read + write bytes) / median time",
    }
    del src, dst
    free_memory(device)
    return result


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached device memory (after a shape or an out-of-memory error)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_error(exc: BaseException, limit: int = 600) -> str:
    """``Type: message`` of an exception on one line, cut to ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_traceback(exc: BaseException, limit: int = 4000) -> str:
    """The full traceback of ``exc`` (for results.json), cut to its last ``limit`` characters."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return text[-limit:]


# --------------------------------------------------------------------------------------------
# environment record
# --------------------------------------------------------------------------------------------


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: Sequence[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_record(repo: Path) -> Dict[str, Any]:
    commit = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment_record(
    argv: Sequence[str], device: torch.device, *, script: Optional[str] = None
) -> Dict[str, Any]:
    """Where and how the numbers were taken: device, versions, driver, git commit, command, time."""
    repo = Path(__file__).resolve().parent.parent
    script = script or sys.argv[0]
    record: Dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, script, *argv]),
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda_runtime": torch.version.cuda,
        "git": _git_record(repo),
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "FUSEDADAPTERS_BACKEND", "CUDA_VISIBLE_DEVICES")},
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device_type": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(
            device_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            device_memory_gib=round(props.total_memory / 2**30, 2),
            driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    else:
        record.update(device_name=record["cpu"], driver=None)
    return record


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _sanitize(obj: Any) -> Any:
    """Replace non-finite floats by None (JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (a partial sweep never leaves a torn file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_sanitize(obj), indent=1, default=_json_default) + "\n")
    tmp.replace(path)


def fmt(value: Any, spec: str = ".3g", missing: str = "–") -> str:
    """Format a number for a markdown cell (``missing`` for None or non-finite)."""
    if value is None:
        return missing
    if isinstance(value, float):
        if not math.isfinite(value):
            return missing
        return format(value, spec)
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are str()-ed and pipes escaped."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# plots (optional)
# --------------------------------------------------------------------------------------------


def matplotlib_available() -> Tuple[bool, str]:
    """Whether matplotlib imports; the reason when it does not."""
    try:
        import matplotlib  # noqa: F401
    except Exception as exc:  # ImportError, or a broken backend
        return False, f"matplotlib not available ({format_error(exc, 200)})"
    return True, ""


def plot_panels(
    path: Path,
    panels: Dict[str, Dict[str, List[Tuple[float, float]]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    hline: Optional[Tuple[float, str]] = None,
    logx: bool = True,
    logy: bool = True,
    ncols: int = 3,
) -> Tuple[bool, str]:
    """One figure with a panel per key of ``panels``; each panel draws one line per series.

    ``panels[panel_title][series_name] = [(x, y), ...]``. ``hline = (y, label)`` draws a dashed
    reference line in every panel (e.g. the measured copy bandwidth). Returns ``(written, reason)``:
    when matplotlib is missing nothing is written and ``reason`` says so.
    """
    ok, reason = matplotlib_available()
    if not ok:
        return False, reason
    if not panels:
        return False, "nothing to plot"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (panel_title, series) in zip(axes.flat, panels.items()):
        for name, points in sorted(series.items()):
            pts = sorted(p for p in points if p[1] is not None and math.isfinite(p[1]) and p[1] > 0)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name)
        if hline is not None:
            ax.axhline(hline[0], color="black", linestyle="--", linewidth=0.8, label=hline[1])
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:  # one legend for the figure, every series that appears in any panel
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if handles:  # below the panels, so that it never covers a title or a curve
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(labels), 6), fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True, ""
