"""One command for a GPU machine: install, record, test, sanitize, benchmark, compare, report.

On a bare machine with torch and Triton but no network, ``python bench/gpu_run.py`` does, in order:

1. install: wheels of missing pure-Python dependencies from ``--wheels DIR`` (into a private
   folder put on PYTHONPATH), then the package itself with
   ``pip install --no-index --no-deps --no-build-isolation -e .`` (PYTHONPATH fallback);
2. environment: device, driver, CUDA, torch, Triton, Python, git commit and dirty flag, the exact
   command line, the date (``environment.json``, ``nvidia-smi.txt``);
3. native build: ``python -m fusedadapters.build`` (the native library, with its CUDA kernels on a CUDA
   machine), timed into ``native-build.json``, into a cache that the tests, the sanitizer and the
   benchmark share; then tests: ``python -m pytest`` with a JUnit XML (the whole suite but this script's CPU dry-run test;
   ``--quick`` a chosen subset), then
   ``compute-sanitizer`` memcheck and racecheck over the ``native`` backend's small-shape tests when
   that backend exists (otherwise the step is skipped with the reason);
4. bench: ``bench_linear_adapter.py`` in parts (eager, torch.compile and every fused backend;
   forward, backward, full; the copy bandwidth measured by each part), merged into ``bench/``; in the
   full run and the dry run also its many-adapter sweeps ``--sweep chain`` and ``--sweep mixed``, each
   in its own folder (``chain/``, ``mixed/``) with its own target evaluation;
5. predictions: the static report's predicted fraction of copy bandwidth
   (``bench/results/static/report.json``) beside each measured fused-backend point;
6. summary: ``summary.md`` (per shape and dtype: time, GB/s, fraction of copy bandwidth, speedups
   over eager and torch.compile, each against its target), plots, ``run.json`` with every step;
   ``--archive FILE.tar.gz`` packs the whole folder into one file.

Everything goes to ``bench/results/<YYYY-MM-DD>-<gpu>/`` (``--out`` to choose). The exit status is 1
when a step failed (a test failed or did not finish, the sanitizer found an error, a real backend
failed a benchmark point, the install failed), and everything measured is still written.

A time budget (``--budget-s``; 270 s with ``--quick``, 540 s for the full run) is shared by the steps:
each step gets what is left, a test run still going at its share is interrupted (SIGINT, so pytest
writes its report), and benchmark parts, run in the order of their priority, that no longer fit are
recorded as skipped.

``--dry-run`` does the same on the CPU (Triton's interpreter, tiny shapes, a small test subset), into
the same layout: CI runs it, so the script is known to work before GPU time is spent on it.
See bench/README.md, "One command for a GPU".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402  (imports torch only; the package is imported after the install step)

SCHEMA_VERSION = 1
OK, FAILED, SKIPPED, PARTIAL = "ok", "failed", "skipped", "partial"
DEFAULT_STATIC_REPORT = HERE / "results" / "static" / "report.json"
PREDICTION_FIELDS = ("direction", "norm_position", "dtype", "D", "H", "features", "arch", "predicted_fraction")
BASELINE_BACKENDS = ("eager", "compile", "compile-max-autotune", "compile-max-autotune-no-cudagraphs")
# a prediction and a measurement "differ by more than a third" outside this band of measured / predicted
AGREEMENT_BAND = (2 / 3, 4 / 3)
INTERRUPT_GRACE_S = 20.0  # after SIGINT, how long a child gets to write its reports before SIGKILL
SUMMARY_RESERVE_S = 15.0  # kept back from the steps for merging, the summary and the archive
NATIVE_BUILD_CAP_S = 300.0  # the native library with its CUDA kernels: compiled once per run


# --------------------------------------------------------------------------------------------
# plans: what each mode runs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchPart:
    """One ``bench_linear_adapter.py`` run: a Cartesian sweep of N × D × H × dtypes.

    ``sweep`` is ``op`` (the single-adapter sweep; its parts are merged into ``bench/``) or ``chain`` /
    ``mixed`` (``--sweep chain`` over K = ``counts`` adapters in a chain, ``--sweep mixed`` over A =
    ``counts`` adapters in one batch; each written to its own folder ``<out>/<name>/``, never merged).

    ``backends`` may name ``fused``, which stands for every fused backend the benchmark knows
    (triton, and native once it exists); empty for a many-adapter sweep means all of that sweep's
    backends. ``modes`` empty means the benchmark's default. A part is started only when ``min_s``
    seconds are left. A many-adapter sweep stops only between points and writes its results only at
    its end, so ``point_s`` (about its longest point) is kept back from the budget it is given.
    """

    name: str
    n: Tuple[int, ...]
    d: Tuple[int, ...]
    h: Tuple[int, ...]
    dtypes: Tuple[str, ...]
    backends: Tuple[str, ...] = ("eager", "compile", "fused")
    min_s: float = 30.0
    sweep: str = "op"
    counts: Tuple[int, ...] = ()
    modes: Tuple[str, ...] = ()
    point_s: float = 0.0

    def shapes(self) -> List[Tuple[str, int, int, int]]:
        """(dtype, N, D, H) of every shape, in the benchmark's order."""
        return [(dt, n, d, h) for dt in self.dtypes for d in self.d for h in self.h for n in self.n]

    def points(self, assignments: Sequence[str] = ("-",)) -> List[Tuple[str, int, int, int, int, str]]:
        """(dtype, N, D, H, count, assignment) of every point of a many-adapter sweep, in its order
        (``assignments``: the mixed sweep's row assignments; ``-`` for a chain)."""
        return [(dt, n, d, h, c, a) for dt, n, d, h in self.shapes() for a in assignments for c in self.counts]

    def shape_count(self) -> int:
        return len(self.shapes())


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one mode runs: test selection (None = the whole suite), step caps, benchmark parts."""

    name: str
    budget_s: float
    tests: Optional[Tuple[str, ...]]
    tests_cap_s: float
    sanitizer_cap_s: float
    bench_args: Tuple[str, ...]
    parts: Tuple[BenchPart, ...]
    predict_min_elems: int


QUICK_TESTS = (
    "tests/test_package.py",
    "tests/ops/test_linear_adapter.py::test_dtypes",
    "tests/ops/test_linear_adapter.py::test_shapes",
    "tests/ops/test_linear_adapter.py::test_non_contiguous",
    "tests/ops/test_linear_adapter.py::test_only_some_inputs_need_grad",
    "tests/test_fused_linear_adapter.py",
    "tests/ops/test_native.py::test_cuda_small_shapes",  # the native CUDA kernels, never run before a GPU loan
)
DRY_RUN_TESTS = ("tests/ops/test_linear_adapter.py::test_dtypes", "tests/test_adapter_modules.py")
# The whole suite (testpaths) but two files that are CPU-only by construction and that CI runs: this
# script's own dry run (it forces the CPU) and the static kernel report's check (it compiles kernels,
# it launches none). On the H100 they were the suite's longest tests (218 s for one dry run, 186 s for
# the static report, under eight xdist workers), and with either in it the suite did not finish in 240 s.
# Without them (and with xdist's worksteal) 613 of its 643 tests had finished after 215 s on a fresh H100
# machine: the full run gives the tests 270 s.
FULL_TESTS = ("--ignore=tests/bench/test_gpu_run.py", "--ignore=tests/bench/test_static_report.py")

# The many-adapter sweeps at the shape of their --quick preset: bf16, D=4096, H=64, N=16384 tokens
MANY_ADAPTER_GPU = dict(n=(16384,), d=(4096,), h=(64,), dtypes=("bf16",), modes=("forward", "full"))
MANY_ADAPTER_CPU = dict(n=(64,), d=(64,), h=(16,), dtypes=("fp32",), modes=("forward", "full"), min_s=0.0)

# Parts run in this order, which is their priority: a part that no longer fits the budget is skipped.
# The seconds below come from the first H100 runs. Quick: install 16 s, the quick tests (8 xdist
# workers) 63 s, the sanitizer step (collection only) 12 s; the core part's process start and
# copy-bandwidth measurement about 14 s, its first shape (eager, compile, triton; the native build)
# 26 s, torch.compile dominating. Full: install 12 s, the sanitizer step 10 s; parts core 55 s, chain
# 27 s, mixed 58 s, hidden 27 s, model 24 s, dtypes 33 s, the merge 10 s. With the tests at their full
# 270 s the parts get about 230 s: core, chain, mixed, hidden and model fit, dtypes in part; max-autotune
# (not measured yet) runs only when the tests end early. The run ends by the budget plus the grace an
# interrupted part gets, about 555 s.
PLANS = {
    "dry-run": Plan(
        name="dry-run", budget_s=600.0, tests=DRY_RUN_TESTS, tests_cap_s=240.0, sanitizer_cap_s=60.0,
        # targets evaluated at every point, so that the dry run exercises their marking too
        bench_args=("--device", "cpu", "--cpu-small", "--rep-ms", "5", "--warmup-ms", "1", "--target-min-elems", "1"),
        parts=(
            BenchPart("core", n=(1, 64), d=(64,), h=(16,), dtypes=("fp32",), min_s=0.0),
            BenchPart("chain", sweep="chain", counts=(1, 2), backends=(), **MANY_ADAPTER_CPU),
            BenchPart("mixed", sweep="mixed", counts=(1, 4), backends=(), **MANY_ADAPTER_CPU),
            BenchPart("dtypes", n=(64,), d=(64,), h=(16,), dtypes=("fp16",), backends=("eager", "fused"), min_s=0.0),
        ),
        predict_min_elems=0,
    ),
    "quick": Plan(
        # 210 s measured before the native build (with its CUDA kernels) joined; 60 s more for it is a
        # guess until a GPU run times it (native-build.json)
        name="quick", budget_s=270.0, tests=QUICK_TESTS, tests_cap_s=70.0, sanitizer_cap_s=30.0,
        bench_args=("--device", "cuda"),
        # about 15 s of start-up, 26-30 s for the first shape (with the native backend's build), less for the
        # others; the benchmark starts the second shape only when the first one's time still fits its budget,
        # so the part needs about 80 s, and the steps before it took 91 s and 100 s on two H100 runs
        parts=(BenchPart("core", n=(65536, 16384, 16), d=(4096,), h=(64,), dtypes=("bf16",), min_s=45.0),),
        predict_min_elems=2**26,
    ),
    "full": Plan(
        name="full", budget_s=540.0, tests=FULL_TESTS, tests_cap_s=270.0, sanitizer_cap_s=60.0,
        bench_args=("--device", "cuda"),
        parts=(
            BenchPart("core", n=(65536, 16384, 1024, 16, 1), d=(4096,), h=(64,), dtypes=("bf16",), min_s=45.0),
            # decode: the native backend's one-launch forward (N <= 64) against Triton's row blocks
            BenchPart("decode", n=(2, 4, 8, 32, 64), d=(4096,), h=(64,), dtypes=("bf16",), backends=("eager", "fused"),
                      min_s=30.0),
            BenchPart("chain", sweep="chain", counts=(1, 2, 4, 8), backends=(), min_s=40.0, point_s=10.0,
                      **MANY_ADAPTER_GPU),
            BenchPart("mixed", sweep="mixed", counts=(1, 8, 64, 256), backends=(), min_s=40.0, point_s=15.0,
                      **MANY_ADAPTER_GPU),
            BenchPart("hidden", n=(65536,), d=(4096,), h=(16, 256), dtypes=("bf16",)),
            BenchPart("model", n=(65536,), d=(1024, 8192), h=(64,), dtypes=("bf16",)),
            BenchPart("dtypes", n=(65536,), d=(4096,), h=(64,), dtypes=("fp16", "fp32")),
            BenchPart("max-autotune", n=(65536, 16384), d=(4096,), h=(64,), dtypes=("bf16",),
                      backends=("compile-max-autotune",), min_s=90.0),
        ),
        predict_min_elems=2**26,
    ),
}


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


class Clock:
    """Seconds since the start and seconds left of the budget."""

    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def share(self, plan_cap_s: float, plan_budget_s: float) -> float:
        """A step's cap, scaled with the budget when ``--budget-s`` changes it."""
        return plan_cap_s * self.budget_s / plan_budget_s


def log(msg: str) -> None:
    print(f"[gpu_run] {msg}", flush=True)


def slug(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def relpath(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def run_streamed(label: str, cmd: Sequence[str], log_path: Path, timeout_s: float, env: Dict[str, str],
                 cwd: Path = REPO) -> Dict[str, Any]:
    """Run ``cmd``, copying its output to ``log_path`` and to stdout; at ``timeout_s`` send SIGINT
    to its process group (pytest and the benchmark then write what they have), SIGKILL after a grace.

    Returns ``{"returncode", "seconds", "interrupted", "log"}``.
    """
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        log_file.write(f"$ {shlex.join(cmd)}\n")
        log_file.flush()
        # SIGINT restored to its default in the command: a shell's background job inherits it ignored, and
        # Python then installs no KeyboardInterrupt handler, so the interruption below would not reach it.
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

        def pump() -> None:
            for line in proc.stdout:
                log_file.write(line)
                sys.stdout.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        interrupted = False
        try:
            proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            interrupted = True
            log(f"{label}: {timeout_s:.0f} s spent; interrupting (SIGINT)")
            signal_group(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        signal_group(proc.pid, signal.SIGKILL)  # whatever the command left behind (workers, compilers)
        proc.wait()
        reader.join(timeout=10)
    return {"returncode": proc.returncode, "seconds": round(time.monotonic() - start, 1),
            "interrupted": interrupted, "log": log_path.name}


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to the process group a command of this run was started in, if any of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def capture(cmd: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
            timeout: float = 60) -> Tuple[int, str]:
    """(return code, stdout + stderr) of a short command; (-1, reason) when it cannot run."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return -1, harness.format_error(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def prepend_path(env: Dict[str, str], key: str, path: Path) -> None:
    parts = [str(path)] + [p for p in env.get(key, "").split(os.pathsep) if p]
    env[key] = os.pathsep.join(dict.fromkeys(parts))


# --------------------------------------------------------------------------------------------
# step 1: install
# --------------------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """PEP 503 normalisation: ``PyYAML`` -> ``pyyaml``, ``antlr4_python3_runtime`` -> ``antlr4-python3-runtime``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path, extras: Sequence[str] = ("test",)) -> List[str]:
    """The requirement strings of ``[project].dependencies`` and the given optional extras."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def unmet_requirement(req: str) -> Optional[str]:
    """Why ``req`` is not satisfied in this interpreter (None when it is, or its marker excludes it)."""
    from packaging.requirements import Requirement

    parsed = Requirement(req)
    if parsed.marker is not None and not parsed.marker.evaluate():
        return None
    try:
        version = importlib.metadata.version(parsed.name)
    except importlib.metadata.PackageNotFoundError:
        return f"{parsed.name} is not installed"
    if parsed.specifier and not parsed.specifier.contains(version, prereleases=True):
        return f"{parsed.name} {version} does not satisfy {parsed.specifier}"
    return None


def is_installed(project: str) -> bool:
    try:
        importlib.metadata.version(project)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def wheel_project(path: Path) -> str:
    """Canonical project name from a wheel file name (``name-version-tags.whl``)."""
    return canonical_name(path.name.split("-", 1)[0])


def missing_requirements(reqs: Sequence[str]) -> Dict[str, str]:
    importlib.invalidate_caches()
    unmet = {req: unmet_requirement(req) for req in reqs}
    return {req: why for req, why in unmet.items() if why}


def package_location(env: Dict[str, str]) -> Tuple[Optional[str], str]:
    """Where ``import fusedadapters`` resolves from outside the checkout (None and why if it fails)."""
    code = "import fusedadapters, os; print(os.path.dirname(os.path.abspath(fusedadapters.__file__)))"
    rc, out = capture([sys.executable, "-c", code], env=env, cwd=Path(tempfile.gettempdir()))
    return (out.splitlines()[-1], "") if rc == 0 and out else (None, out[-600:])


def install_wheels(folder: Path, ctx: "Context", lines: List[str]) -> Dict[str, Any]:
    """Install the wheels in ``folder`` whose project is not installed into a private folder, put on
    PYTHONPATH here and for every command the run starts."""
    wheels = sorted(p for p in folder.glob("*.whl") if not is_installed(wheel_project(p)))
    record: Dict[str, Any] = {"wheels_installed": [p.name for p in wheels]}
    if not wheels:
        lines.append(f"{folder}: no wheel of a project that is not installed")
        return record
    site = Path(tempfile.gettempdir()) / "fusedadapters-gpu-run-site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, wheels)]
    rc, out = capture(cmd, env=ctx.env, timeout=300)
    lines += [f"$ {shlex.join(cmd)}", out]
    if rc == 0:
        prepend_path(ctx.env, "PYTHONPATH", site)
        sys.path.insert(0, str(site))
    record["wheels_returncode"] = rc
    return record


def from_checkout(location: Optional[str]) -> bool:
    return location is not None and Path(location).resolve() == (REPO / "fusedadapters").resolve()


def install_package(how: str, ctx: "Context", lines: List[str]) -> Tuple[str, Optional[str], str]:
    """Make ``import fusedadapters`` resolve to this checkout from anywhere: (method, location, why not)."""
    location, why = package_location(ctx.env)
    if from_checkout(location):
        return "already installed from this checkout", location, why
    method = "PYTHONPATH (--install pythonpath)"
    if how == "auto":
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
               "-e", str(REPO)]
        rc, out = capture(cmd, env=ctx.env, timeout=300)
        lines += [f"$ {shlex.join(cmd)}", out]
        location, why = package_location(ctx.env)
        if rc == 0 and from_checkout(location):
            return "pip install --no-index --no-deps --no-build-isolation -e .", location, why
        method = f"PYTHONPATH (pip install -e failed with status {rc})"
    prepend_path(ctx.env, "PYTHONPATH", REPO)
    location, why = package_location(ctx.env)
    return method, location, why


def step_install(args: argparse.Namespace, ctx: "Context") -> Dict[str, Any]:
    """Missing pure-Python dependencies from ``--wheels``, then the package (editable, no network)."""
    lines: List[str] = []
    record: Dict[str, Any] = {}
    try:
        reqs = project_requirements(REPO / "pyproject.toml")
        record["missing_before"] = missing_requirements(reqs)
    except Exception as exc:  # no tomllib (Python < 3.11) or no packaging: say so, go on
        reqs = []
        record["requirements_error"] = harness.format_error(exc)
    record["requirements"] = reqs
    lines.append(f"requirements: {reqs}; missing: {record.get('missing_before') or 'none'}")
    if args.wheels:
        record.update(install_wheels(Path(args.wheels), ctx, lines))
    missing = missing_requirements(reqs) if reqs else {}
    record["missing_after"] = missing
    if missing and not args.wheels:
        lines.append("no --wheels folder given: the missing dependencies stay missing")

    method, location, why = install_package(args.install, ctx, lines)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    record.update(method=method, package_location=location)
    lines.append(f"package: {method}; import resolves to {location or why}")
    (ctx.out / "install.log").write_text("\n".join(lines) + "\n")

    problems = ([] if location else [f"import fusedadapters fails: {why}"]) + (
        ["missing: " + "; ".join(missing.values())] if missing else [])
    record.update(status=FAILED if problems else OK, reason="; ".join(problems) or None)
    return record


# --------------------------------------------------------------------------------------------
# step 2: environment
# --------------------------------------------------------------------------------------------

PACKAGES = ("torch", "triton", "numpy", "omegaconf", "antlr4-python3-runtime", "pyyaml", "safetensors", "pytest",
            "pytest-xdist", "pytest-benchmark", "matplotlib", "packaging", "setuptools")


def arch_of(capability: Optional[str]) -> Optional[str]:
    """``"9.0"`` -> ``"sm_90"``."""
    if not capability:
        return None
    major, _, minor = capability.partition(".")
    return f"sm_{major}{minor or 0}"


def step_environment(args: argparse.Namespace, ctx: "Context") -> Dict[str, Any]:
    env = harness.environment_record(ctx.argv, ctx.device, script=str(Path(__file__)))
    env["mode"] = ctx.plan.name
    env["python_executable"] = sys.executable
    env["packages"] = {}
    for name in PACKAGES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    if env["git"].get("commit") is None:
        env["git"]["note"] = "no git repository here"
        if args.commit:
            env["git"].update(commit=args.commit, note="no git repository here; commit from --commit")
    elif args.commit and not env["git"]["commit"].startswith(args.commit):
        env["git"]["note"] = f"--commit {args.commit} differs from the checkout's commit"
    tools = {}
    for name, flag in (("nvcc", "--version"), ("compute-sanitizer", "--version"), ("nvidia-smi", "--version")):
        path = shutil.which(name)
        version = capture([path, flag])[1].splitlines() if path else []
        tools[name] = {"path": path, "version": version[-1] if version else None}
    env["tools"] = tools
    if ctx.device.type == "cuda":
        import torch

        props = torch.cuda.get_device_properties(ctx.device)
        env["arch"] = arch_of(env.get("compute_capability"))
        env["l2_cache_mib"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None
        rc, smi = capture(["nvidia-smi"])
        (ctx.out / "nvidia-smi.txt").write_text(smi + "\n")
        rc, query = capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                             "clocks.max.mem,power.limit,temperature.gpu,pstate", "--format=csv"])
        env["nvidia_smi_query"] = query if rc == 0 else None
    else:
        env["arch"] = None
    env["cuda_device_count"] = ctx.cuda_count
    harness.write_json(ctx.out / "environment.json", env)
    (ctx.out / "command.txt").write_text(env["command"] + "\n")
    ctx.environment = env
    return {"status": OK, "device": env["device_name"], "arch": env["arch"], "commit": env["git"].get("commit"),
            "dirty": env["git"].get("dirty")}


# --------------------------------------------------------------------------------------------
# step 3: tests and the sanitizer
# --------------------------------------------------------------------------------------------


def parse_junit(path: Path) -> Dict[str, Any]:
    """Counts and failures of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    counts = {"total": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "unfinished": 0}
    failures: List[Dict[str, str]] = []
    skip_reasons: Dict[str, int] = {}
    for case in root.iter("testcase"):
        if not case.get("name"):  # the test running when pytest was interrupted
            counts["unfinished"] += 1
            continue
        counts["total"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = " ".join((child.get("message") or child.text or "").split())[:400]
                failures.append({"test": name, "kind": child.tag, "message": message})
                break
            if child.tag == "skipped":
                outcome = "skipped"
                reason = " ".join((child.get("message") or "").split())[:200]
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        counts[outcome] += 1
    return dict(counts, failures=failures, skip_reasons=skip_reasons)


def xdist_workers(args: argparse.Namespace, ctx: "Context") -> int:
    """pytest-xdist workers: ``--test-workers``, else half the cores (at most 8) on CUDA when xdist is
    installed (kernel compilation dominates the suite there), else 0 (no xdist)."""
    if args.test_workers is not None:
        return args.test_workers
    if ctx.device.type != "cuda" or importlib.util.find_spec("xdist") is None:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def xdist_dist(workers: int) -> Optional[str]:
    """``worksteal`` where pytest-xdist has it (3.2 and later): a worker that runs out of tests takes
    tests queued behind a long one on another worker, which shortens the suite's tail. None otherwise."""
    if not workers:
        return None
    try:
        version = importlib.metadata.version("pytest-xdist")
    except importlib.metadata.PackageNotFoundError:
        return None
    major, minor = (int(x) if x.isdigit() else 0 for x in (version.split(".") + ["0"])[:2])
    return "worksteal" if (major, minor) >= (3, 2) else None


def step_native_build(args: argparse.Namespace, ctx: "Context") -> Dict[str, Any]:
    """``python -m fusedadapters.build`` into the run's native cache (with the CUDA kernels on a CUDA
    machine), timed: ``native-build.json``. The tests, the sanitizer and the benchmark then load it."""
    record_path = ctx.out / "native-build.json"
    cmd = [sys.executable, "-m", "fusedadapters.build", "--json", str(record_path)]
    cap = max(min(NATIVE_BUILD_CAP_S, ctx.clock.left() - SUMMARY_RESERVE_S - 60.0), 10.0)
    proc = run_streamed("native build", cmd, ctx.out / "native-build.log", cap, ctx.env)
    record: Dict[str, Any] = {"command": shlex.join(cmd), **proc}
    if proc["returncode"] == 0 and record_path.exists():
        built = json.loads(record_path.read_text())
        return dict(record, status=OK, seconds=built["seconds"], cuda_kernels=built.get("cuda_kernels"))
    reason = f"interrupted at {cap:.0f} s" if proc["interrupted"] else f"exit status {proc['returncode']}"
    return dict(record, status=FAILED, reason=f"the native build failed ({reason}; native-build.log)")


def step_tests(args: argparse.Namespace, ctx: "Context") -> Dict[str, Any]:
    selection = shlex.split(args.tests) if args.tests is not None else list(ctx.plan.tests or ())
    workers = xdist_workers(args, ctx)
    junit = ctx.out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", *selection, "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "--durations=25"]
    dist = xdist_dist(workers)
    if workers:
        cmd += ["-n", str(workers)] + (["--dist", dist] if dist else [])
    cap = min(ctx.clock.share(ctx.plan.tests_cap_s, ctx.plan.budget_s),
              max(ctx.clock.left() - SUMMARY_RESERVE_S - 30.0, 30.0))
    log(f"tests: {shlex.join(cmd[3:])} (up to {cap:.0f} s)")
    proc = run_streamed("pytest", cmd, ctx.out / "pytest.log", cap, ctx.env)
    record: Dict[str, Any] = {"selection": selection or ["(whole suite: testpaths)"], "workers": workers, "dist": dist,
                              "command": shlex.join(cmd), **proc}
    if junit.exists():
        record.update(parse_junit(junit))
    else:
        record["reason"] = "pytest wrote no JUnit report"
    if ctx.plan.name == "dry-run" and args.tests is None:
        record["quick_selection"] = collect_only(QUICK_TESTS, ctx)
    bad = record.get("failed", 0) + record.get("errors", 0)
    if proc["interrupted"]:
        record["reason"] = (f"interrupted at its share of the budget ({cap:.0f} s) after {record.get('total', 0)} "
                            f"tests ({bad} failed)")
    elif proc["returncode"] != 0 and not record.get("reason"):
        record["reason"] = f"pytest exit status {proc['returncode']}" + (f": {bad} failed" if bad else "")
    record["status"] = OK if proc["returncode"] == 0 and not proc["interrupted"] and bad == 0 else FAILED
    harness.write_json(ctx.out / "tests.json", record)
    return record


def collect_only(selection: Sequence[str], ctx: "Context") -> Dict[str, Any]:
    """Whether a test selection resolves (so that a renamed test shows in the dry run, not on the GPU)."""
    rc, out = capture([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *selection],
                      env=ctx.env, cwd=REPO, timeout=120)
    return {"selection": list(selection), "returncode": rc, "collected": collected_count(out),
            "error": None if rc in (0, 5) else out[-800:]}


def collected_count(output: str) -> int:
    """Tests selected, from pytest's ``N tests collected`` or ``N/M tests collected (K deselected)``."""
    found = re.search(r"(\d+)/\d+ tests? collected", output) or re.search(r"(\d+) tests? collected", output)
    return int(found.group(1)) if found else 0


def native_backend_files() -> List[str]:
    return sorted(relpath(p, REPO) for p in (REPO / "fusedadapters" / "ops").glob("native*"))


def native_test_files() -> List[str]:
    return sorted(relpath(p, REPO) for p in (REPO / "tests").rglob("test_*native*.py"))


def step_sanitizer(args: argparse.Namespace, ctx: "Context") -> Dict[str, Any]:
    """compute-sanitizer memcheck and racecheck over the native backend's small-shape tests."""
    native, tests = native_backend_files(), native_test_files()
    record: Dict[str, Any] = {"native_backend": native, "tests": tests, "k": args.sanitizer_k, "tools": {}}
    tool = shutil.which("compute-sanitizer") or (
        "/usr/local/cuda/bin/compute-sanitizer" if Path("/usr/local/cuda/bin/compute-sanitizer").exists() else None)
    reason = None
    if not native:
        reason = "no native backend in this checkout (fusedadapters/ops/native* absent)"
    elif ctx.device.type != "cuda":
        reason = "compute-sanitizer needs a CUDA device (dry run on the CPU)"
    elif not tests:
        reason = "no native tests (tests/**/test_*native*.py) to run under the sanitizer"
    elif tool is None:
        reason = "compute-sanitizer not found on PATH or in /usr/local/cuda/bin"
    if reason is None and args.sanitizer_k:
        selected = collect_only([*tests, "-k", args.sanitizer_k], ctx)
        record["selected"] = selected["collected"]
        if selected["error"]:
            reason = f"collecting the native tests failed: {selected['error'][-300:]}"
        elif not selected["collected"]:
            reason = (f"no native test matches -k {args.sanitizer_k!r} in {tests}: name the native backend's "
                      "small-shape CUDA tests so that it selects them (or pass --sanitizer-k)")
    if reason:
        return dict(record, status=SKIPPED, reason=reason)
    failures = []
    for name in ("memcheck", "racecheck"):
        cap = min(ctx.clock.share(ctx.plan.sanitizer_cap_s, ctx.plan.budget_s) / 2,
                  max(ctx.clock.left() - SUMMARY_RESERVE_S - 60.0, 10.0))
        cmd = [tool, "--tool", name, "--error-exitcode", "86", "--print-limit", "50",
               sys.executable, "-m", "pytest", *tests, "-q", "-x", "-p", "no:cacheprovider"]
        if args.sanitizer_k:
            cmd += ["-k", args.sanitizer_k]
        proc = run_streamed(f"compute-sanitizer {name}", cmd, ctx.out / f"sanitizer-{name}.log", cap, ctx.env)
        rc = proc["returncode"]
        verdict = {0: "no errors", 86: "sanitizer reported errors", 5: "no test selected"}.get(
            rc, f"tests failed or crashed under the sanitizer (status {rc})")
        if proc["interrupted"]:
            verdict = f"interrupted at {cap:.0f} s"
        record["tools"][name] = dict(proc, verdict=verdict)
        if rc != 0 or proc["interrupted"]:
            failures.append(f"{name}: {verdict}")
    record["status"] = FAILED if failures else OK
    record["reason"] = "; ".join(failures) or None
    harness.write_json(ctx.out / "sanitizer.json", record)
    return record


# --------------------------------------------------------------------------------------------
# step 4: the benchmark
# --------------------------------------------------------------------------------------------


def bench_module():
    """``bench/bench_linear_adapter.py`` (imports the package, so only after the install step)."""
    return importlib.import_module("bench_linear_adapter")


def fused_backends() -> List[str]:
    """The benchmark's fused backends: everything but the baselines and the self-tests."""
    return [b for b in bench_module().BACKENDS if b not in BASELINE_BACKENDS and not b.startswith("selftest")]


def many_adapters_module():
    """``bench/many_adapters.py``, the chain and mixed-batch sweeps (imports the package)."""
    return importlib.import_module("many_adapters")


# the fused op of each many-adapter sweep (bench/many_adapters.py), the backend its targets are on
SWEEP_FUSED = {"chain": "chain", "mixed": "routed"}


def part_backends(part: BenchPart, override: Optional[str]) -> List[str]:
    """The backends of a part. ``--bench-backends`` replaces those of the single-adapter parts only: the
    many-adapter sweeps have backends of their own."""
    if part.sweep != "op":
        return list(part.backends or many_adapters_module().BACKENDS[part.sweep])
    if override:
        return [b.strip() for b in override.split(",") if b.strip()]
    names: List[str] = []
    for b in part.backends:
        names += fused_backends() if b == "fused" else [b]
    return names


def sweep_points(part: BenchPart) -> List[Tuple[str, int, int, int, int, str]]:
    """Every point a many-adapter part asks its sweep for, in the sweep's order."""
    return part.points(many_adapters_module().ASSIGNMENTS if part.sweep == "mixed" else ("-",))


def point_label(part: BenchPart, point: Tuple[str, int, int, int, int, str]) -> str:
    dt, n, d, h, count, assignment = point
    return many_adapters_module().Point(part.sweep, n, d, h, dt, count, assignment).label()


def part_dir(part: BenchPart, ctx: "Context") -> Path:
    """``bench/parts/<name>/`` for a single-adapter part (merged into ``bench/``), ``<name>/`` for a sweep."""
    return ctx.out / "bench" / "parts" / part.name if part.sweep == "op" else ctx.out / part.name


def part_command(part: BenchPart, ctx: "Context", out: Path, backends: Sequence[str], budget_s: float) -> List[str]:
    ints = lambda values: ",".join(map(str, values))  # noqa: E731
    cmd = [sys.executable, str(HERE / "bench_linear_adapter.py"), *ctx.plan.bench_args, "--out", str(out),
           "--n", ints(part.n), "--d", ints(part.d), "--h", ints(part.h), "--dtypes", ",".join(part.dtypes),
           "--backends", ",".join(backends), "--no-plot", "--time-budget-s", f"{budget_s:.0f}"]
    if part.sweep != "op":
        cmd[2:2] = ["--sweep", part.sweep]
        cmd += ["--k" if part.sweep == "chain" else "--a", ints(part.counts)]
    if part.modes:
        cmd += ["--modes", ",".join(part.modes)]
    return cmd


def part_budget(part: BenchPart, left: float) -> float:
    """The ``--time-budget-s`` of a part that may run ``left`` seconds: room for its start-up and the
    copy-bandwidth measurement (20 s), and for a sweep the point it may still start at its budget."""
    return max(left - 20.0 - part.point_s, 1.0)


def read_op_part(part: BenchPart, record: Dict[str, Any], results: Path, proc: Dict[str, Any]) -> None:
    """Status, counts and unmeasured shapes of a single-adapter part, from its results.json."""
    data = json.loads(results.read_text())
    rows = data["rows"]
    record["rows"] = len(rows)
    record["copy_bandwidth"] = data["runs"][-1]["copy_bandwidth"]
    record["budget_skipped_rows"] = sum(r["stage"] == "budget" for r in rows)
    measured_shapes = {(r["dtype"], r["n"], r["d"], r["h"]) for r in rows if r["stage"] != "budget"}
    record["unmeasured_shapes"] = [f"{dt} N={n} D={d} H={h}" for dt, n, d, h in part.shapes()
                                   if (dt, n, d, h) not in measured_shapes]
    record["error_rows"] = sum(r["status"] == "error" and not r["backend"].startswith("selftest") for r in rows)
    set_part_status(record, proc, bool(record["budget_skipped_rows"]), "shapes")


def read_sweep_part(part: BenchPart, record: Dict[str, Any], results: Path, proc: Dict[str, Any]) -> None:
    """Status, counts, unmeasured points and the sweep's own target evaluation of a many-adapter part.

    The sweep leaves the points past its time budget out of results.json: they are the planned points
    without a row. A point that failed (an error row of any backend) is counted in ``error_rows``, which
    fails the bench step as a failed point of the single-adapter sweep does."""
    data = json.loads(results.read_text())
    rows = data["rows"]
    record["rows"] = len(rows)
    record["copy_bandwidth"] = data["runs"][-1]["copy_bandwidth"]
    measured = {(r["dtype"], r["n"], r["d"], r["h"], r["count"], r["assignment"]) for r in rows}
    record["unmeasured_shapes"] = [point_label(part, p) for p in sweep_points(part) if p not in measured]
    record["error_rows"] = sum(r["status"] == "error" for r in rows)
    record["targets"] = data.get("targets", [])
    set_part_status(record, proc, bool(record["unmeasured_shapes"]), "points")


def set_part_status(record: Dict[str, Any], proc: Dict[str, Any], unmeasured: bool, what: str) -> None:
    """A part failed when its process did (and was not stopped by the budget), is partial when the
    budget stopped it or left ``what`` unmeasured, else ok."""
    if proc["returncode"] != 0 and not proc["interrupted"]:
        record.update(status=FAILED, reason=f"exit status {proc['returncode']}")
    elif proc["interrupted"] or unmeasured:
        record.update(status=PARTIAL, reason=f"time budget: {what} left unmeasured")
    else:
        record["status"] = OK


def run_part(part: BenchPart, args: argparse.Namespace, ctx: "Context") -> Dict[str, Any]:
    """Run one part if it fits the time left; its record for run.json."""
    backends = part_backends(part, args.bench_backends)
    out = part_dir(part, ctx)
    record: Dict[str, Any] = {"name": part.name, "sweep": part.sweep, "backends": backends, "n": part.n, "d": part.d,
                              "h": part.h, "dtypes": part.dtypes, "dir": relpath(out, ctx.out)}
    if part.sweep == "op":
        record["shapes"] = part.shape_count()
    else:
        record.update(shapes=len(sweep_points(part)), counts=part.counts, modes=part.modes)
    left = ctx.clock.left() - SUMMARY_RESERVE_S
    if left < max(part.min_s, 5.0):
        record.update(status=SKIPPED, reason=f"time budget: {max(left, 0):.0f} s left, the part needs about "
                                             f"{max(part.min_s, 5.0):.0f} s")
        log(f"bench part {part.name}: skipped ({record['reason']})")
        return record
    out.mkdir(parents=True, exist_ok=True)
    cmd = part_command(part, ctx, out, backends, part_budget(part, left))
    what = "shapes" if part.sweep == "op" else f"points of the {part.sweep} sweep"
    log(f"bench part {part.name}: {record['shapes']} {what} x {backends}")
    proc = run_streamed(f"bench part {part.name}", cmd, out / "bench.log", left, ctx.env)
    record.update(proc, command=shlex.join(cmd))
    results = out / "results.json"
    if not results.exists():
        planned = ([f"{dt} N={n} D={d} H={h}" for dt, n, d, h in part.shapes()] if part.sweep == "op"
                   else [point_label(part, p) for p in sweep_points(part)])
        record["unmeasured_shapes"] = planned
        if proc["interrupted"]:  # the budget ran out, nothing failed
            record.update(status=PARTIAL, reason="time budget: interrupted before it wrote any result")
        else:
            record.update(status=FAILED, reason=f"no results written (exit status {proc['returncode']})")
    elif part.sweep == "op":
        read_op_part(part, record, results, proc)
    else:
        read_sweep_part(part, record, results, proc)
    return record


def selected_parts(plan: Plan, names: Optional[str]) -> List[BenchPart]:
    """The plan's parts, or those ``--bench-parts`` names (in the plan's order)."""
    if not names:
        return list(plan.parts)
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    return [p for p in plan.parts if p.name in wanted]


def bench_problems(parts: Sequence[Dict[str, Any]], merged: Optional[Dict[str, Any]]) -> List[str]:
    """Why the bench step failed: parts that failed, failed points of real backends (single-adapter
    points from the merged results, many-adapter points per part)."""
    failed_parts = [p["name"] for p in parts if p["status"] == FAILED]
    problems = [f"parts failed: {failed_parts}"] if failed_parts else []
    if merged is not None:
        real_errors = [e for e in merged["errors"] if not e["backend"].startswith("selftest")]
        if real_errors:
            problems.append(f"{len(real_errors)} benchmark points of real backends failed")
    for p in parts:
        if p.get("sweep", "op") != "op" and p.get("error_rows"):
            problems.append(f"{p['error_rows']} points of the {p['sweep']} sweep (part {p['name']}) failed")
    return problems


def step_bench(args: argparse.Namespace, ctx: "Context") -> Dict[str, Any]:
    """Run the plan's parts in order while time is left, then merge the single-adapter ones into ``bench/``
    (the many-adapter sweeps stay in their own folders)."""
    bench_dir = ctx.out / "bench"
    (bench_dir / "parts").mkdir(parents=True, exist_ok=True)
    parts = [run_part(part, args, ctx) for part in selected_parts(ctx.plan, args.bench_parts)]

    measured = [ctx.out / p["dir"] for p in parts
                if p["sweep"] == "op" and (ctx.out / p["dir"] / "results.json").exists()]
    summary: Dict[str, Any] = {"parts": parts, "dir": relpath(bench_dir, ctx.out)}
    if measured:
        bench_module().main(["--merge", *map(str, measured), "--out", str(bench_dir)])
        ctx.bench = json.loads((bench_dir / "results.json").read_text())
        summary["error_points"] = len(ctx.bench["errors"])
        summary["crossover"] = write_crossover(ctx)
    elif not any(p.get("rows") is not None for p in parts):
        return dict(summary, status=FAILED, reason="no benchmark part produced results")
    problems = bench_problems(parts, ctx.bench)
    if problems:
        return dict(summary, status=FAILED, reason="; ".join(problems))
    unfinished = [p["name"] for p in parts if p["status"] in (SKIPPED, PARTIAL)]
    if unfinished:
        return dict(summary, status=PARTIAL, reason=f"time budget: parts {unfinished} not (fully) measured")
    return dict(summary, status=OK)


def write_crossover(ctx: "Context") -> Dict[str, Any]:
    """``native_crossover.json``: where native was at least as fast as Triton, per (mode, dtype, D, H), for
    the automatic backend choice (fusedadapters/ops/crossover.py; commit it into the package to use it)."""
    from fusedadapters.ops import crossover

    env = ctx.environment or {}
    table = crossover.from_bench_rows(ctx.bench["rows"], device=env.get("device_name") or str(ctx.device),
                                      capability=env.get("compute_capability"), source=ctx.out.name)
    path = ctx.out / "native_crossover.json"
    harness.write_json(path, table)
    return {"file": relpath(path, ctx.out), "rules": len(table["rules"])}


# --------------------------------------------------------------------------------------------
# step 5: the static prediction beside each measurement
# --------------------------------------------------------------------------------------------


def prediction_records(obj: Any) -> Iterator[Dict[str, Any]]:
    """Every dict in a static report that carries all of ``PREDICTION_FIELDS``."""
    if isinstance(obj, dict):
        if all(k in obj for k in PREDICTION_FIELDS):
            yield obj
            return
        for value in obj.values():
            yield from prediction_records(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from prediction_records(value)


def load_predictions(path: Path) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """(records, None), or ([], why there are none)."""
    if not path.exists():
        return [], f"no static report: {relpath(path, REPO)} not found (bench/static_report.py writes it)"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [], f"static report {relpath(path, REPO)} unreadable: {harness.format_error(exc, 200)}"
    records = list(prediction_records(data))
    if not records:
        return [], f"static report {relpath(path, REPO)} holds no prediction records with fields {PREDICTION_FIELDS}"
    return records, None


def nearest_prediction(records: Sequence[Dict[str, Any]], *, direction: str, norm: str, dtype: str, d: int, h: int,
                       arch: str, backend: str, features: str = "plain") -> Tuple[Optional[Dict[str, Any]], str]:
    """The prediction for (direction, norm, dtype, features, arch, backend) whose (D, H) is nearest to
    (d, h) in log2 distance; ``(None, why)`` when there is none with a predicted fraction."""
    same = [r for r in records if r["direction"] == direction and r["norm_position"] == norm and r["dtype"] == dtype
            and r["features"] == features and r["arch"] == arch and r.get("backend", "triton") == backend]
    usable = [r for r in same if isinstance(r["predicted_fraction"], (int, float))]
    if not usable:
        if same:
            return None, f"prediction {same[0].get('status', 'without a value')}: {same[0].get('reason') or '–'}"
        return None, f"no prediction for {direction}/{norm}/{dtype}/{features}/{arch}/{backend}"

    def distance(r: Dict[str, Any]) -> Tuple[float, int, int]:
        return abs(math.log2(r["D"] / d)) + abs(math.log2(r["H"] / h)), r["D"], r["H"]

    best = min(usable, key=distance)
    exact = best["D"] == d and best["H"] == h
    return best, "exact" if exact else f"nearest: D={best['D']} H={best['H']}"


def prediction_arch(args: argparse.Namespace, ctx: "Context",
                    records: Sequence[Dict[str, Any]]) -> Tuple[Optional[str], str]:
    """The architecture whose predictions apply: the device's, else one of the same major version."""
    if args.predict_arch:
        return args.predict_arch, f"{args.predict_arch} (--predict-arch)"
    device_arch = ctx.environment.get("arch") if ctx.environment else None
    if device_arch is None:
        return "sm_90", "sm_90 as a stand-in: a dry run on the CPU has no GPU architecture (plumbing check only)"
    archs = sorted({r["arch"] for r in records})
    if device_arch in archs:
        return device_arch, device_arch
    major = re.sub(r"\d$", "", device_arch)
    same_major = [a for a in archs if re.sub(r"\d$", "", a) == major]
    if same_major:
        return same_major[0], f"{same_major[0]} as a stand-in for the device's {device_arch}"
    return None, f"no predictions for the device's {device_arch} (report has {archs})"


def step_predictions(args: argparse.Namespace, ctx: "Context") -> Dict[str, Any]:
    records, reason = load_predictions(Path(args.static_report))
    record: Dict[str, Any] = {"static_report": relpath(Path(args.static_report), REPO), "records": len(records)}
    if ctx.bench is None:
        return dict(record, status=SKIPPED, reason="no benchmark results to compare", matches=[])
    if reason:
        return dict(record, status=SKIPPED, reason=reason, matches=[])
    arch, arch_note = prediction_arch(args, ctx, records)
    record["arch"] = arch_note
    if arch is None:
        return dict(record, status=SKIPPED, reason=arch_note, matches=[])
    bench = bench_module()
    min_elems = args.predict_min_elems if args.predict_min_elems is not None else ctx.plan.predict_min_elems
    runs = ctx.bench["runs"]
    fused = set(fused_backends())
    matches = []
    for row in ctx.bench["rows"]:
        if row["backend"] not in fused or row["n"] * row["d"] < min_elems:
            continue
        op = runs[row["run"]]["config"]["op"]
        features = "plain" if op["dropout_p"] == 0 else "all"
        key = dict(norm=op["norm_position"], dtype=row["dtype"], d=row["d"], h=row["h"], arch=arch,
                   backend=row["backend"], features=features)
        if row["mode"] == "full":
            fwd, note_f = nearest_prediction(records, direction="forward", **key)
            bwd, note_b = nearest_prediction(records, direction="backward", **key)
            if fwd and bwd:
                elem = {"bf16": 2, "fp16": 2, "fp32": 4}[row["dtype"]]
                b_fwd = bench.floor_bytes("forward", row["n"], row["d"], row["h"], elem, elem)
                b_bwd = bench.floor_bytes("backward", row["n"], row["d"], row["h"], elem, elem)
                predicted = (b_fwd + b_bwd) / (b_fwd / fwd["predicted_fraction"] + b_bwd / bwd["predicted_fraction"])
                match, note = fwd, f"forward and backward combined ({note_f})"
            else:
                predicted, match, note = None, None, note_f if not fwd else note_b
        else:
            match, note = nearest_prediction(records, direction=row["mode"], **key)
            predicted = match["predicted_fraction"] if match else None
        measured = row["frac_copy_bw"] if row["status"] == "ok" else None
        ratio = measured / predicted if measured is not None and predicted else None
        matches.append(dict(
            mode=row["mode"], dtype=row["dtype"], n=row["n"], d=row["d"], h=row["h"], backend=row["backend"],
            measured_fraction=measured, predicted_fraction=predicted, measured_over_predicted=ratio,
            within_a_third=None if ratio is None else AGREEMENT_BAND[0] <= ratio <= AGREEMENT_BAND[1],
            prediction_D=match["D"] if match else None, prediction_H=match["H"] if match else None, note=note))
    record.update(matches=matches, min_elems=min_elems, status=OK if matches else SKIPPED,
                  reason=None if matches else f"no fused-backend point with N*D >= {min_elems}")
    harness.write_json(ctx.out / "predictions.json", record)
    return record


# --------------------------------------------------------------------------------------------
# step 6: summary, plots, archive
# --------------------------------------------------------------------------------------------

STEP_ORDER = ("install", "environment", "native-build", "tests", "sanitizer", "bench", "predictions")


def _target_cell(value: Optional[float], threshold: Optional[float], in_scope: bool, percent: bool = False) -> str:
    f = harness.fmt
    text = f(100 * value, ".3g") if percent and value is not None else f(value, ".3g")
    if value is None or threshold is None or not in_scope:
        return text
    shown = f"{100 * threshold:g} %" if percent else f"{threshold:g}×"
    return f"{text} ({'met' if value >= threshold else 'MISSED'} ≥ {shown})"


def fused_rows_table(ctx: "Context", mode: str, predictions: Dict[Tuple, Dict[str, Any]], min_elems: int) -> str:
    """Per shape and dtype, the fused backends' figures against the targets and the prediction."""
    bench = bench_module()
    rows = [r for r in ctx.bench["rows"] if r["mode"] == mode and r["backend"] in set(fused_backends())]
    by_point = {}
    for r in ctx.bench["rows"]:
        by_point[(r["mode"], r["dtype"], r["n"], r["d"], r["h"], r["backend"])] = r
    thresholds = {t.field: t.threshold for t in bench.TARGETS if t.mode == mode}
    f = harness.fmt
    table = []
    for r in sorted(rows, key=lambda r: (r["dtype"], r["d"], r["h"], r["n"], r["backend"])):
        in_scope = r["n"] * r["d"] >= min_elems
        compile_row = by_point.get((mode, r["dtype"], r["n"], r["d"], r["h"], "compile"))
        vs_compile = (compile_row["ms"] / r["ms"] if compile_row and compile_row["status"] == "ok"
                      and compile_row["ms"] and r["status"] == "ok" and r["ms"] else None)
        pred = predictions.get((mode, r["dtype"], r["n"], r["d"], r["h"], r["backend"]))
        status = r["status"] if r["status"] == "ok" else f"{r['status']} ({r['stage']}): {r['error']}"
        table.append((
            r["n"], r["d"], r["h"], r["dtype"], r["backend"], f(r["ms"], ".4g"), f(r["gbps"], ".4g"),
            _target_cell(r["frac_copy_bw"], thresholds.get("frac_copy_bw"), in_scope, percent=True),
            _target_cell(r["speedup_vs_eager"], thresholds.get("speedup_vs_eager"), in_scope),
            f(vs_compile, ".3g"),
            _target_cell(r["speedup_vs_compile_max_autotune"], thresholds.get("speedup_vs_compile_max_autotune"),
                         in_scope),
            f(100 * pred["predicted_fraction"], ".3g") if pred and pred["predicted_fraction"] is not None else "–",
            f(pred["measured_over_predicted"], ".3g") if pred else "–",
            status,
        ))
    headers = ["N", "D", "H", "dtype", "backend", "ms", "GB/s", "% copy BW", "× eager", "× compile",
               "× compile max-autotune", "predicted % BW", "measured / predicted", "status"]
    return harness.markdown_table(headers, table) if table else "No fused-backend point in this mode."


def render_summary(ctx: "Context", steps: Dict[str, Dict[str, Any]], exit_status: int, failures: List[str]) -> str:
    env = ctx.environment or {}
    f = harness.fmt
    out: List[str] = [f"# GPU run ({ctx.plan.name}): {env.get('device_name', ctx.device)}", ""]
    if ctx.plan.name == "dry-run":
        out += ["**Dry run on the CPU** (Triton's interpreter, tiny shapes): it checks that the script works; "
                "its figures say nothing about GPU performance.", ""]
    git = env.get("git", {})
    out += [f"Command: `{env.get('command', '–')}`", "",
            f"Date (UTC): {env.get('timestamp_utc', '–')}; commit {git.get('commit') or '–'}"
            f"{' (dirty tree)' if git.get('dirty') else ''}; wall time {ctx.clock.elapsed():.0f} s of a "
            f"{ctx.clock.budget_s:.0f} s budget.", "",
            f"**Exit status {exit_status}**: " + ("every step passed." if not failures else "; ".join(failures)), ""]

    out += ["## Steps", ""]
    out.append(harness.markdown_table(["step", "status", "seconds", "detail"], [
        (name, steps[name]["status"], f(steps[name].get("seconds"), ".1f"), steps[name].get("reason") or "")
        for name in STEP_ORDER if name in steps]))
    out.append("")

    out += ["## Environment", ""]
    packages = env.get("packages", {})
    out.append(harness.markdown_table(["", "value"], [
        ("device", f"{env.get('device_name', '–')} ({env.get('device_type', '–')}"
                   f"{', ' + env['arch'] if env.get('arch') else ''})"),
        ("driver / CUDA runtime", f"{env.get('driver') or '–'} / {env.get('cuda_runtime') or '–'}"),
        ("torch / triton / python", f"{env.get('torch')} / {env.get('triton')} / {env.get('python')}"),
        ("omegaconf / safetensors / pytest", f"{packages.get('omegaconf')} / {packages.get('safetensors')} / "
                                             f"{packages.get('pytest')}"),
        ("git", f"{git.get('commit')} dirty={git.get('dirty')} {git.get('note', '')}".strip()),
        ("install", steps.get("install", {}).get("method") or "–"),
        ("TRITON_INTERPRET", (env.get("env") or {}).get("TRITON_INTERPRET")),
    ]))
    smi = ", `nvidia-smi.txt`" if ctx.device.type == "cuda" else ""
    out += ["", f"Full record: `environment.json`{smi}.", ""]

    tests = steps.get("tests", {})
    out += ["## Tests", ""]
    if tests.get("status") == SKIPPED:
        out.append(f"Not run: {tests.get('reason')}")
    else:
        out.append(f"`{tests.get('command', '–')}`: {tests.get('total', 0)} tests, {tests.get('passed', 0)} passed, "
                   f"{tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, {tests.get('skipped', 0)} "
                   f"skipped, {tests.get('unfinished', 0)} unfinished, in {f(tests.get('seconds'), '.0f')} s "
                   f"(`junit.xml`, `pytest.log`).")
        if tests.get("reason"):
            out += ["", f"**{tests['reason']}**"]
        if tests.get("failures"):
            out += ["", harness.markdown_table(["failed test", "kind", "message"],
                                               [(x["test"], x["kind"], x["message"]) for x in tests["failures"]])]
        if tests.get("skip_reasons"):
            out += ["", harness.markdown_table(["skipped", "reason"],
                                               [(n, reason) for reason, n in tests["skip_reasons"].items()])]
        quick = tests.get("quick_selection")
        if quick:
            out += ["", f"The `--quick` test selection collects {quick['collected']} tests"
                        + (f" (error: {quick['error']})" if quick["error"] else "") + "."]
    out.append("")

    san = steps.get("sanitizer", {})
    out += ["## compute-sanitizer (native backend)", ""]
    if san.get("status") == SKIPPED:
        out.append(f"Skipped: {san.get('reason')}.")
    else:
        out.append(harness.markdown_table(["tool", "verdict", "seconds", "log"], [
            (name, t["verdict"], t["seconds"], t["log"]) for name, t in san.get("tools", {}).items()]))
    out.append("")

    out += ["## Benchmark", ""]
    bench_step = steps.get("bench", {})
    all_parts = bench_step.get("parts", [])
    if all_parts:
        out.append(harness.markdown_table(
            ["part", "sweep", "shapes / points", "backends", "status", "seconds", "folder", "detail"],
            [(p["name"], p.get("sweep", "op"), p["shapes"], ",".join(p["backends"]), p["status"],
              f(p.get("seconds"), ".0f"), f"`{p['dir']}/`" if p.get("dir") else "–", p.get("reason") or "")
             for p in all_parts]))
        out.append("")
        measured = [p for p in all_parts if p.get("copy_bandwidth")]
        if measured:
            out.append(harness.markdown_table(["part", "copy bandwidth GB/s", "buffer MiB"], [
                (p["name"], f(p["copy_bandwidth"].get("gbps"), ".1f"),
                 f(p["copy_bandwidth"].get("bytes", 0) / 2**20, ".0f")) for p in measured]))
            out.append("")
    if ctx.bench is None:
        why = bench_step.get("reason") if bench_step.get("status") != OK else None
        out += [f"No single-adapter results: {why or 'no single-adapter part ran'}.", ""]
    else:
        out += [_bench_legend(ctx), ""]
        pred_step = steps.get("predictions", {})
        predictions = {(m["mode"], m["dtype"], m["n"], m["d"], m["h"], m["backend"]): m
                       for m in pred_step.get("matches", [])}
        if pred_step.get("status") != OK:
            out += [f"Predicted column empty: {pred_step.get('reason')}.", ""]
        else:
            out += [f"Predictions: `{pred_step['static_report']}`, architecture {pred_step['arch']}; "
                    f"{_agreement(pred_step['matches'])}", ""]
            unmatched: Dict[str, int] = {}
            for m in pred_step["matches"]:
                if m["predicted_fraction"] is None:
                    unmatched[m["note"]] = unmatched.get(m["note"], 0) + 1
            out += [f"- without a prediction ({n} point{'s' if n > 1 else ''}): {note}"
                    for note, n in unmatched.items()]
            out += [""] if unmatched else []
        min_elems = ctx.bench["runs"][-1]["config"]["target_min_elems"]
        for mode in bench_module().MODES:
            out += [f"### {mode}", "", fused_rows_table(ctx, mode, predictions, min_elems), ""]
        out += ["### Targets", "", _targets_table(ctx), ""]
        out += ["Every backend at every point, checks and errors: `bench/report.md`; raw figures: "
                "`bench/results.json`.", ""]
    unmeasured = _unmeasured(bench_step)
    if unmeasured:
        out += ["### Not measured", "", *unmeasured, ""]
    sweeps = [p for p in all_parts if p.get("sweep", "op") != "op"]
    if sweeps:
        out += ["## Many adapters", "", _many_adapters_legend(), ""]
        for p in sweeps:
            out += _sweep_section(ctx, p)
    out += ["## Plots", ""]
    plots = sorted(p.relative_to(ctx.out) for p in ctx.out.rglob("*.png"))
    out.append("\n\n".join(f"![{p.stem}]({p})" for p in plots) if plots else
               (f"None: {harness.matplotlib_available()[1] or 'nothing to plot'}."))
    out.append("")
    return "\n".join(out)


def _bench_legend(ctx: "Context") -> str:
    min_elems = ctx.bench["runs"][-1]["config"]["target_min_elems"]
    return (f"Fused backends only (eager and torch.compile rows: `bench/report.md`). ms = median; GB/s = floor "
            f"bytes / ms (bench/README.md, 'Byte model'); % copy BW = GB/s over the copy bandwidth of the same "
            f"part; × = speedup (> 1 is faster). Targets (docs/design.md, 'Floors and targets') are marked "
            f"met / MISSED where N·D ≥ {min_elems}.")


def _agreement(matches: Sequence[Dict[str, Any]]) -> str:
    rated = [m for m in matches if m["within_a_third"] is not None]
    inside = sum(m["within_a_third"] for m in rated)
    return (f"{len(matches)} points compared, {inside} of {len(rated)} measured within a third of the prediction "
            f"(measured / predicted in [{AGREEMENT_BAND[0]:.2f}, {AGREEMENT_BAND[1]:.2f}]).")


def _targets_table(ctx: "Context") -> str:
    bench = bench_module()
    targets = ctx.bench.get("targets", [])
    rows = []
    for t in bench.TARGETS:
        sel = [r for r in targets if r["target"] == t.name]
        values = [r["value"] for r in sel if r["value"] is not None]
        count = lambda status: sum(r["status"] == status for r in sel)  # noqa: E731
        rows.append((t.text, len(sel), count("met"), count("missed"), count("not evaluated"),
                     harness.fmt(min(values)) if values else "–"))
    backend = ctx.bench["runs"][-1]["config"]["target_backend"]
    return (f"On backend `{backend}` (the benchmark's target backend):\n\n"
            + harness.markdown_table(["target", "points", "met", "missed", "not evaluated", "worst"], rows))


def _unmeasured(bench_step: Dict[str, Any]) -> List[str]:
    lines = []
    for p in bench_step.get("parts", []):
        what = "shapes" if p.get("sweep", "op") == "op" else "points"
        if p["status"] == SKIPPED:
            lines.append(f"- part `{p['name']}` ({p['shapes']} {what}, {','.join(p['backends'])}): {p['reason']}")
        elif p.get("unmeasured_shapes"):
            lines.append(f"- part `{p['name']}`, {len(p['unmeasured_shapes'])} of {p['shapes']} {what} "
                         f"({p['reason'] or p['status']}): " + ", ".join(p["unmeasured_shapes"]))
    return lines


def _many_adapters_legend() -> str:
    return ("`bench_linear_adapter.py --sweep chain` (K adapters one after another) and `--sweep mixed` (A adapters "
            "in one batch), bench/many_adapters.py. ms = median per backend; ×one = ms of the fused op over ms of "
            "one fused adapter (lower is better); ×loop = ms of the loop of single-adapter launches (chain) or of "
            "the masked loop (mixed) over ms of the fused op (higher is better). Targets as the sweep evaluated "
            "them (its `results.json`; docs/design.md, 'Floors and targets').")


def _sweep_section(ctx: "Context", part: Dict[str, Any]) -> List[str]:
    """A many-adapter part in the summary: its fused op's figures beside every backend's time, the
    targets as the sweep itself evaluated them, its failed points."""
    f = harness.fmt
    sweep, folder = part["sweep"], part["dir"]
    out = [f"### {part['name']} (`--sweep {sweep}`, `{folder}/`)", ""]
    results = ctx.out / folder / "results.json"
    if not results.exists():
        return out + [f"No results: {part.get('reason') or part['status']}.", ""]
    data = json.loads(results.read_text())
    backends = part["backends"]
    fused = SWEEP_FUSED.get(sweep, backends[0] if backends else "")
    count = "K" if sweep == "chain" else "A"
    mixed = sweep == "mixed"
    points: Dict[Tuple, Dict[str, Dict[str, Any]]] = {}
    for r in data["rows"]:
        key = (r["mode"], r["dtype"], r["n"], r["d"], r["h"]) + ((r["assignment"],) if mixed else ()) + (r["count"],)
        points.setdefault(key, {})[r["backend"]] = r
    modes = list(many_adapters_module().MODES)
    table = []
    for key in sorted(points, key=lambda k: (modes.index(k[0]) if k[0] in modes else len(modes),) + k[1:]):
        by_backend = points[key]
        main = by_backend.get(fused, {})
        ok = main.get("status") == "ok"
        frac = main.get("frac_copy_bw") if ok else None
        table.append((*key, *(f(by_backend[b]["ms"], ".4g") if b in by_backend and by_backend[b]["status"] == "ok"
                               else (by_backend[b]["status"] if b in by_backend else "–") for b in backends),
                      f(main.get("gbps"), ".4g"), f(100 * frac, ".3g") if frac is not None else "–",
                      f(main.get("ratio_vs_one_adapter"), ".3g"), f(main.get("speedup_vs_loop"), ".3g")))
    headers = ["mode", "dtype", "N", "D", "H", *(["assignment"] if mixed else []), count,
               *(f"{b} ms" for b in backends),
               f"{fused} GB/s", f"{fused} % copy BW", f"{fused} ×one", f"{fused} ×loop"]
    out += [harness.markdown_table(headers, table) if table else "No point measured.", ""]
    targets = data.get("targets", [])
    if targets:
        out.append(harness.markdown_table(
            ["target", "mode", "dtype", "N", "D", "H", "assignment", "value", "threshold", "status"],
            [(t["target"], t["mode"], t["dtype"], t["n"], t["d"], t["h"], t["assignment"], f(t["value"], ".3g"),
              t["threshold"], t["status"].upper() if t["status"] == "missed" else t["status"]) for t in targets]))
    else:
        out.append(f"Targets: none in `{folder}/results.json` (the sweep evaluates them on GPU runs only).")
    errors = [r for r in data["rows"] if r["status"] == "error"]
    if errors:
        out += ["", harness.markdown_table(["mode", "N", count, "assignment", "backend", "stage", "error"], [
            (r["mode"], r["n"], r["count"], r["assignment"], r["backend"], r["stage"], r["error"]) for r in errors])]
    out += ["", f"Every backend, checks and errors: `{folder}/report.md`; raw figures: `{folder}/results.json`.", ""]
    return out


def write_prediction_plot(ctx: "Context", pred: Dict[str, Any]) -> Optional[str]:
    """Measured and predicted fraction of copy bandwidth against N, one panel per (mode, dtype, D, H)."""
    panels: Dict[str, Dict[str, List[Tuple[float, float]]]] = {}
    for m in pred.get("matches", []):
        panel = panels.setdefault(f"{m['mode']} {m['dtype']} D={m['d']} H={m['h']}", {})
        if m["measured_fraction"] is not None:
            panel.setdefault(f"{m['backend']} measured", []).append((m["n"], m["measured_fraction"]))
        if m["predicted_fraction"] is not None:
            panel.setdefault(f"{m['backend']} predicted", []).append((m["n"], m["predicted_fraction"]))
    if not panels:
        return None
    written, why = harness.plot_panels(ctx.out / "predicted_vs_measured.png", panels, xlabel="N (tokens)",
                                       ylabel="fraction of copy bandwidth", logy=False,
                                       title="static prediction against measurement")
    return None if written else why


def write_archive(out: Path, archive: Path) -> None:
    """``archive`` (.tar.gz) holding ``out`` as one top-level folder of the same name."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    tmp.replace(archive)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """State shared by the steps."""

    plan: Plan
    out: Path
    argv: List[str]
    device: Any
    cuda_count: int
    clock: Clock
    env: Dict[str, str]
    environment: Optional[Dict[str, Any]] = None
    bench: Optional[Dict[str, Any]] = None


def default_out_dir(plan: Plan, device_name: str) -> Path:
    """``bench/results/<YYYY-MM-DD>-<device>[-quick|-dry-run]``; ``-2``, ``-3``... when it is taken."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    suffix = "" if plan.name == "full" else f"-{plan.name}"
    base = HERE / "results" / f"{date}-{slug(device_name)}{suffix}"
    path, i = base, 2
    while path.exists() and any(path.iterdir()):
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See bench/README.md, 'One command for a GPU'.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="a test subset and one benchmark part (about 3 min on an H100)")
    mode.add_argument("--dry-run", action="store_true",
                      help="the same steps on the CPU: Triton interpreter, tiny shapes, a small test subset")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default bench/results/<YYYY-MM-DD>-<device>[-quick|-dry-run])")
    p.add_argument("--archive", type=Path, default=None, help="also pack the output folder into this .tar.gz")
    p.add_argument("--wheels", type=Path, default=None, help="folder of wheels for missing pure-Python dependencies")
    p.add_argument("--install", choices=("auto", "pythonpath"), default="auto",
                   help="auto: pip install -e . unless the package already imports from this checkout (PYTHONPATH "
                        "if that fails); pythonpath: PYTHONPATH only")
    p.add_argument("--commit", default=None, help="commit to record when the copy has no git repository")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget of the whole run (quick 210, full 540, dry run 600); the tests' and the "
                        "sanitizer's shares scale with it")
    p.add_argument("--skip", default="",
                   help="comma list of steps not to run: native-build,tests,sanitizer,bench")
    p.add_argument("--tests", default=None,
                   help="pytest arguments replacing the mode's selection (one string, shell-split)")
    p.add_argument("--test-workers", type=int, default=None,
                   help="pytest-xdist workers (default: half the cores, at most 8, on CUDA when xdist is installed)")
    p.add_argument("--sanitizer-k", default="small", help="pytest -k expression of the sanitizer's native tests")
    p.add_argument("--bench-backends", default=None,
                   help="comma list replacing the backends of every single-adapter part (the chain and mixed "
                        "sweeps keep their own)")
    p.add_argument("--bench-parts", default=None,
                   help="comma list of the mode's benchmark parts to run (default: all, in the mode's order)")
    p.add_argument("--static-report", type=Path, default=DEFAULT_STATIC_REPORT, help="the static report's JSON")
    p.add_argument("--predict-arch", default=None,
                   help="architecture of the predictions to use (default: the device's)")
    p.add_argument("--predict-min-elems", type=int, default=None,
                   help="compare with predictions where N*D >= this (default 2**26; 0 in a dry run)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    steps_to_skip = {"native-build", "tests", "sanitizer", "bench"}
    if skip - steps_to_skip:
        parser.error(f"--skip: unknown steps {sorted(skip - steps_to_skip)}; expected {', '.join(sorted(steps_to_skip))}")
    plan = PLANS["dry-run" if args.dry_run else "quick" if args.quick else "full"]
    if args.bench_parts is not None:
        unknown = {n.strip() for n in args.bench_parts.split(",") if n.strip()} - {p.name for p in plan.parts}
        if unknown or not selected_parts(plan, args.bench_parts):
            parser.error(f"--bench-parts: unknown parts {sorted(unknown)}; the {plan.name} run has "
                         f"{[p.name for p in plan.parts]}")
    if args.dry_run:  # before anything touches CUDA or imports triton
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.pop("FUSEDADAPTERS_BACKEND", None)
    import torch

    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device("cuda" if cuda_count else "cpu")
    clock = Clock(args.budget_s if args.budget_s is not None else plan.budget_s)
    device_name = torch.cuda.get_device_name(device) if cuda_count else harness._cpu_name()
    out = (args.out or default_out_dir(plan, device_name)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The native library (with its CUDA kernels: minutes to build) is built once, into a cache that the
    # tests, the sanitizer's runs and the benchmark share, outside the results folder.
    native_cache = tempfile.mkdtemp(prefix="fusedadapters-native-")
    env = dict(os.environ, PYTHONUNBUFFERED="1", FUSEDADAPTERS_TEST_NATIVE_CACHE=native_cache,
               FUSEDADAPTERS_CACHE=native_cache)
    ctx = Context(plan=plan, out=out, argv=argv, device=device, cuda_count=cuda_count, clock=clock, env=env)
    log(f"{plan.name} run on {device_name}; writing {out}; budget {clock.budget_s:.0f} s")

    steps: Dict[str, Dict[str, Any]] = {}

    def run_step(name: str, fn) -> None:
        if name in skip:
            steps[name] = {"status": SKIPPED, "reason": "--skip"}
            return
        started = time.monotonic()
        log(f"step {name} ({clock.elapsed():.0f} s in)")
        try:
            steps[name] = fn(args, ctx)
        except Exception as exc:  # a broken step is recorded and the run goes on
            steps[name] = {"status": FAILED, "reason": harness.format_error(exc),
                           "traceback": harness.format_traceback(exc)}
        steps[name]["seconds"] = round(time.monotonic() - started, 1)
        reason = steps[name].get("reason")
        log(f"step {name}: {steps[name]['status']}" + (f" ({reason})" if reason else ""))

    if device.type != "cuda" and not args.dry_run:
        run_step("environment", step_environment)
        steps["environment"].update(status=FAILED, reason="no CUDA device: use --dry-run on a machine without a GPU")
    else:
        run_step("install", step_install)
        run_step("environment", step_environment)
        if steps["install"]["status"] == FAILED:
            for name in ("native-build", "tests", "sanitizer", "bench"):
                steps[name] = {"status": SKIPPED, "reason": "the install step failed"}
        else:
            run_step("native-build", step_native_build)
            run_step("tests", step_tests)
            run_step("sanitizer", step_sanitizer)
            run_step("bench", step_bench)
            run_step("predictions", step_predictions)

    failures = [f"{name}: {s.get('reason') or 'failed'}" for name, s in steps.items() if s["status"] == FAILED]
    exit_status = 1 if failures else 0
    pred = steps.get("predictions", {})
    if pred.get("status") == OK:
        why = write_prediction_plot(ctx, pred)
        if why:
            pred["plot"] = f"not drawn: {why}"
    summary = render_summary(ctx, steps, exit_status, failures) if ctx.environment else "# GPU run\n\nNo environment."
    (out / "summary.md").write_text(summary + "\n")
    harness.write_json(out / "run.json", {
        "schema": SCHEMA_VERSION, "mode": plan.name, "command": shlex.join([sys.executable, __file__, *argv]),
        "out": str(out), "budget_s": clock.budget_s, "wall_s": round(clock.elapsed(), 1),
        "exit_status": exit_status, "failures": failures, "steps": steps,
    })
    if args.archive:
        write_archive(out, args.archive.resolve())
        log(f"archive: {args.archive}")
    print("\n" + summary.split("## Environment")[0] + _bench_tail(summary), flush=True)
    log(f"done in {clock.elapsed():.0f} s: exit status {exit_status}; {out}")
    return exit_status


def _bench_tail(summary: str) -> str:
    """The benchmark section of the summary, for the end of the console output."""
    if "## Benchmark" not in summary:
        return ""
    return "## Benchmark" + summary.split("## Benchmark", 1)[1].split("## Plots")[0]


if __name__ == "__main__":
    sys.exit(main())
