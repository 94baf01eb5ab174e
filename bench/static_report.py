"""Static kernel report: compile every kernel launch of the fused adapter for sm_90 and sm_80, without a GPU.

For each point of a grid (direction, norm position, dtype, D, H, feature set, architecture) the script
builds the op's inputs on the ``meta`` device (shapes and dtypes, no data), asks the Triton backend's
launch planner (``plan_forward`` / ``plan_backward`` in ``fusedadapters.ops.triton.linear_adapter``) for
the launches it would make on that device, and for every launch:

1. **Compiles the kernel exactly as launched.** The arguments and meta-parameters of the planned launch
   go through Triton's own argument binder (the code ``JITFunction.run`` uses), built for the target
   architecture, so the specialisation is Triton's by construction: pointers whose address is a
   multiple of 16 bytes and integers divisible by 16 get ``tt.divisibility = 16``, integers equal to 1
   become constants, floats and bools are not specialised. Meta tensors report address 0, which stands
   for a fresh CUDA allocation (256-byte aligned); a meta view whose storage offset breaks the 16-byte
   alignment loses the attribute, as the real pointer would. The resulting signature, constants and
   attributes are compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (sm_90a) or
   ``GPUTarget("cuda", 80, 32)`` (sm_80).
2. **Resources.** Triton's ``ptxas`` runs again on the kernel's PTX with Triton's flags plus ``-v``
   (its cubin must disassemble to the same SASS as Triton's, or the launch is an error); its log gives
   registers per thread, spill stores and loads, the stack frame and the static shared memory.
   Shared memory per block is Triton's dynamic allocation (``metadata.shared``) plus that static
   part; it is checked against what the architecture gives one block (the 1 KB the system reserves per
   block is not part of it; ``cuobjdump -res-usage`` counts it in on sm_90, ptxas does not).
3. **Occupancy** (resident warps per SM), as the CUDA occupancy calculator computes it: registers are
   allocated per warp in units of 256, shared memory per block in units of 128 bytes plus 1 KB the
   system reserves per block; the limits are 64 K registers, 64 warps and 32 blocks per SM, and 228 KB
   (sm_90) or 164 KB (sm_80) of shared memory per SM. The limiter is named.
4. **SASS instructions per element in the hot loops.** ``nvdisasm`` disassembles the cubin; the
   script splits it into basic blocks (branch targets and the instructions after branches, exits and
   returns start blocks; ``CALL`` falls through), computes dominators, and takes the natural loop of
   every back edge (an edge to a block that dominates its source). A tile loop is one that holds no
   loop but short ones (under ``WAIT_LOOP_MAX`` instructions: mbarrier waits, spins), which count as
   part of it. Every tile loop is one of the kernel's ``for`` loops over D chunks or rows, whose
   iteration covers a BM × BD tile (BR × BD for the weight-folding kernel), so its cost is
   ``instructions in the body × num_warps / (BM · BD)`` warp-instructions per element (each warp
   issues every instruction of the body once per iteration); a loop that holds tile loops (the
   forward's grid-stride loop over row blocks) is not one. The kernel's figure is the sum over its tile
   loops, each of which walks all of the launch's ``elements`` (N·D for the row and column kernels)
   once, but for a launch that says only its first k tile loops in code order do
   (``Launch.element_loops``: the post-norm rows pass's second loop steps through an H×H matrix, H / BK
   times per row block). Code outside them (prologue, epilogue, a grid-stride loop's own body) is left
   out; it runs once per row block and is small at large D. A loop that ptxas unrolled would show as one iteration of twice the body; Triton's
   loops over runtime bounds are not unrolled by ptxas in the kernels seen so far.
5. **Traffic model.** The planner states, per launch, its compulsory HBM bytes (``hbm_bytes``), the L2
   re-reads of shared operands (``l2_bytes``), and its second reads of N·D data (``reread_bytes``) with
   the bytes each program keeps live for them (``live_bytes_per_program``). Second reads come from L2
   when the live set of the resident programs (``live_bytes_per_program`` × min(programs, blocks per SM
   × SMs)) fits in L2 (50 MB on the H100, 40 MB on the A100), from HBM otherwise. (The forward's
   stores of out are marked evict-first, so they are not counted in the live set.) The report gives HBM
   and L2 bytes per token (row of x) and passes over N·D (HBM bytes / (N · D · bytes per element)).

Prediction (a model; the first GPU run calibrates it, predicted beside measured)::

    per launch:  t = max(HBM bytes / B_hbm,  L2 bytes / B_l2,  W / (4 · f · S · e)) / balance  +  t_launch
                 W        = SASS warp-instructions per element × elements of the launch (0 where the
                            launch names no tile)
                 e        = min(1, resident warps per SM / 8)       (issue efficiency: 2 warps per scheduler
                                                                     are taken to keep it issuing)
                 balance  = U / (S · ceil(P / S) · ceil(U / P))      (P programs over S SMs sharing U equal
                                                                     units of work: U = P but for persistent
                                                                     grids, whose programs walk U row blocks;
                                                                     the busiest SM sets the time)
    per direction:  predicted fraction of the floor = t_floor / Σ t,
                    t_floor = (2 N D for forward, 3 N D for backward) × bytes per element / B_hbm

Nominal figures (assumptions, see ``GPU_MODELS``): H100 SXM (sm_90): B_hbm = 3.0 TB/s (what a large
device-to-device copy reaches, the class of the 3.35 TB/s peak), B_l2 = 2.5 × B_hbm, f = 1.755 GHz,
S = 132; A100 SXM 80 GB (sm_80): B_hbm = 1.75 TB/s, B_l2 = 2.5 × B_hbm, f = 1.41 GHz, S = 108;
t_launch = 2 µs. Not modelled: memory latency at low occupancy (the model is optimistic there), bank
conflicts, the local-memory traffic of spills, tensor-core throughput (far from the bound at these
intensities), the weight-gradient reduction done by PyTorch after the backward kernels.

CUDA backend: every ``csrc/*.cu`` (if any) is compiled with ``nvcc -cubin -Xptxas -v`` for sm_90a and
sm_80, and the registers, spills and shared memory of each kernel are reported. The cluster forward
(sm_90) also gets its plan per (dtype, D, H), from the launcher's own C++ run on the host, and a time
from nominal rates (``cluster_forward_model``: memory against tensor-core or FMA products; an upper
bound on its fraction of the floor, barriers and distributed shared memory not modelled).

``--check`` exits 1, with the reasons, on a spill in any bf16/fp16 launch (or a CUDA kernel whose name
says bf16/half), on a launch whose shared memory exceeds what the target gives a block, and on a launch
that failed to compile. A planner that refuses a configuration with a clear error (``ValueError``) is
recorded as refused, not as a failure.

Usage::

    python bench/static_report.py                 # full grid -> bench/results/static/report.{json,md}
    python bench/static_report.py --quick --check --out /tmp/static

Needs Triton with its NVIDIA backend (the wheel bundles ptxas and nvdisasm) and no
``TRITON_INTERPRET`` (kernels do not compile under the interpreter).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusedadapters.ops.triton import linear_adapter as kernels  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "static"
ELEMENTS_PER_POINT = 1 << 26  # N · D of every grid point: x is 128 MB in bf16, far over any L2

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HALF_DTYPES = ("bf16", "fp16")
FEATURES = {
    # plain: the adapter as NeMo's LinearAdapter runs it; all: every option that adds work to a kernel
    "plain": dict(activation="swish", dropout_p=0.0, scale=False, row_sq=False),
    "all": dict(activation="gelu", dropout_p=0.1, scale=True, row_sq=True),
}
FULL_GRID = dict(direction=("forward", "backward"), norm=("pre", "post"), dtype=("bf16", "fp16", "fp32"),
                 D=(1024, 4096, 8192), H=(16, 64, 256), features=("plain", "all"), arch=("sm_90", "sm_80"))
QUICK_GRID = dict(FULL_GRID, dtype=("bf16", "fp16"), D=(4096,), H=(16, 64))
FLOOR_PASSES = {"forward": 2, "backward": 3}  # read x, write out / read dout and x, write dx


# ----------------------------------------------------------------------------------------------
# Architectures and the performance model's nominal figures
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """One target: what the occupancy calculator needs, and the nominal rates of the time model."""

    arch: str  # "sm_90"
    capability: int  # 90
    gpu: str
    limits: Any  # the planner's DeviceLimits for this GPU (SM count, shared memory per block)
    shared_memory_per_sm: int
    hbm_gbps: float  # large-copy bandwidth, (read + write bytes) / time
    l2_gbps: float
    clock_ghz: float
    l2_size: int  # bytes
    tensor_macs_per_clock: int = 0  # dense fp16/bf16 multiply-adds per clock per SM, nominal
    fma_per_clock: int = 0  # float32 FMAs per clock per SM
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    schedulers_per_sm: int = 4
    register_unit: int = 256  # registers are allocated per warp in these units
    shared_unit: int = 128
    shared_reserved_per_block: int = 1024
    warps_for_full_issue: int = 8  # 2 per scheduler
    launch_us: float = 2.0

    @property
    def sm_count(self) -> int:
        return self.limits.sm_count

    @property
    def shared_memory_per_block(self) -> int:
        return self.limits.shared_memory_per_block

    def describe(self) -> Dict[str, Any]:
        record = dataclasses.asdict(self)
        record["limits"] = self.limits._asdict()
        return record


GPU_MODELS = {
    "sm_90": GpuModel("sm_90", 90, "H100 SXM", kernels.H100, shared_memory_per_sm=228 * 1024,
                      hbm_gbps=3000.0, l2_gbps=7500.0, clock_ghz=1.755, l2_size=50 << 20,
                      tensor_macs_per_clock=2048, fma_per_clock=128),
    "sm_80": GpuModel("sm_80", 80, "A100 SXM 80GB", kernels.A100, shared_memory_per_sm=164 * 1024,
                      hbm_gbps=1750.0, l2_gbps=4375.0, clock_ghz=1.41, l2_size=40 << 20,
                      tensor_macs_per_clock=1024, fma_per_clock=64),
}


# ----------------------------------------------------------------------------------------------
# Compiling a planned launch as Triton's JIT would
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """Everything ``triton.compile`` needs for one specialisation; picklable, for the worker pool."""

    module: str
    kernel: str
    capability: int
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], Any]
    options: Dict[str, Any]

    def specialization(self, kernel: triton.JITFunction) -> Dict[str, Any]:
        """The runtime arguments Triton turned into constants (ints equal to 1) and those it marked
        divisible by 16 (pointers and ints), by name."""
        names = kernel.arg_names
        constants = {names[path[0]]: value for path, value in self.constexprs.items()
                     if not kernel.params[path[0]].is_constexpr}
        divisible = [names[path[0]] for path, value in sorted(self.attrs.items()) if ["tt.divisibility", 16] in value]
        return dict(specialized_constants=constants, divisible_by_16=divisible)

    @property
    def key(self) -> str:
        return repr((self.module, self.kernel, self.capability, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()), sorted(self.options.items())))


def _misaligned_meta_pointers(kernel: triton.JITFunction, bound_args: Dict[str, Any]) -> List[Tuple[int, ...]]:
    """Argument paths of meta tensors whose storage offset leaves them off a 16-byte boundary."""
    paths = []
    for index, name in enumerate(kernel.arg_names):
        value = bound_args.get(name)
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            if (value.storage_offset() * value.element_size()) % 16:
                paths.append((index,))
    return paths


def compile_job(launch: Any, capability: int) -> CompileJob:
    """The specialisation Triton's JIT would compile for ``launch`` on a GPU of ``capability``."""
    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.meta)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    attrs = dict(attrs)
    for path in _misaligned_meta_pointers(kernel, bound_args):
        attrs[path] = []
    return CompileJob(kernel.fn.__module__, kernel.fn.__name__, capability, signature, constexprs, attrs,
                      dict(options.__dict__))


def _run_tool(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")


def parse_ptxas_log(log: str) -> Dict[str, Dict[str, int]]:
    """Per function of a ``ptxas -v`` log: registers, stack frame, spill stores/loads, static smem."""
    functions: Dict[str, Dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        entry = _PTXAS_ENTRY.search(line)
        if entry:
            current = functions.setdefault(entry.group(1), dict(registers=0, stack_frame=0, spill_stores=0,
                                                                spill_loads=0, static_shared=0))
            continue
        if current is None:
            continue
        frame = _PTXAS_FRAME.search(line)
        if frame:
            current.update(stack_frame=int(frame.group(1)), spill_stores=int(frame.group(2)),
                           spill_loads=int(frame.group(3)))
        regs = _PTXAS_REGS.search(line)
        if regs:
            current["registers"] = int(regs.group(1))
            smem = _PTXAS_SMEM.search(line)
            if smem:
                current["static_shared"] = int(smem.group(1))
    return functions


def ptxas_resources(ptx: str, capability: int, sass: str) -> Dict[str, int]:
    """Registers, stack frame, spills and static shared memory of the (single) entry function of ``ptx``,
    from ``ptxas -v`` run with the flags Triton's own ptxas call uses (``-lineinfo``, fmad on). Raises
    unless the cubin it makes disassembles to ``sass`` (Triton's), so the log describes that code."""
    arch = sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        log = _run_tool([get_ptxas(capability).path, "-lineinfo", "-v", f"--gpu-name={arch}", str(src),
                         "-o", str(cubin)])
        if disassemble(cubin) != sass:
            raise RuntimeError("ptxas -v made different SASS from the PTX than Triton's cubin holds")
    functions = parse_ptxas_log(log)
    if len(functions) != 1:
        raise RuntimeError(f"expected one function in the ptxas log, found {sorted(functions)}:\n{log[-2000:]}")
    return next(iter(functions.values()))


# ----------------------------------------------------------------------------------------------
# SASS: loops and their instruction counts
# ----------------------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:(@!?U?P(?:T|\d+))\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+|\$[\w.$]+):")
_SASS_TARGET = re.compile(r"`\(([^)]+)\)")


@dataclasses.dataclass
class Instruction:
    address: int
    predicated: bool
    opcode: str
    operands: str


def parse_sass(text: str) -> Tuple[List[Instruction], Dict[str, int]]:
    """Instructions of an ``nvdisasm`` listing (one kernel) and the address of every label."""
    instructions: List[Instruction] = []
    labels: Dict[str, int] = {}
    pending: List[str] = []
    for line in text.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_LINE.search(line)
        if not match:
            continue
        address = int(match.group(1), 16)
        for name in pending:
            labels[name] = address
        pending = []
        predicate = match.group(2)
        instructions.append(Instruction(address, predicate is not None and predicate != "@PT", match.group(3),
                                        match.group(4)))
    return instructions, labels


def _base(opcode: str) -> str:
    return opcode.split(".", 1)[0]


def _successors(instructions: List[Instruction], labels: Dict[str, int], index: int,
                index_of: Dict[int, int]) -> Tuple[List[int], bool]:
    """(instruction indices control may pass to after ``instructions[index]``, whether it ends a block)."""
    inst = instructions[index]
    op = _base(inst.opcode)
    fall = [index + 1] if index + 1 < len(instructions) else []
    if op == "BRA":
        target = _SASS_TARGET.search(inst.operands)
        taken = [index_of[labels[target.group(1)]]] if target and target.group(1) in labels else []
        return (taken + fall if inst.predicated else taken), True
    if op in ("EXIT", "RET", "BRX", "JMX", "JMP", "KILL"):
        return (fall if inst.predicated else []), True
    return fall, False


@dataclasses.dataclass
class Loop:
    header: int  # address of the loop's first block
    instructions: int  # static instructions in the body (NOPs excluded), nested loops included
    opcodes: Dict[str, int]  # counts of the instruction classes that matter for the model
    depth: int = 0  # loops that hold it
    tile: bool = True  # a tile loop: it holds no loop but short wait loops (see ``sass_loops``)


_CLASSES = {
    "global_loads": ("LDG", "LDGSTS", "UTMALDG"),
    "global_stores": ("STG", "UTMASTG", "RED", "ATOMG"),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "local": ("LDL", "STL"),
    "mufu": ("MUFU",),
    "mma": ("HMMA", "HGMMA", "IMMA", "DMMA", "WARPGROUP"),
    "barriers": ("BAR",),
}


@dataclasses.dataclass
class ControlFlowGraph:
    """Basic blocks (ranges of instruction indices) with successor and predecessor block lists."""

    blocks: List[range]
    succs: List[List[int]]
    preds: List[List[int]]


def control_flow_graph(instructions: List[Instruction], labels: Dict[str, int]) -> ControlFlowGraph:
    """Blocks start at the entry, at branch targets and after branches, exits and returns."""
    index_of = {inst.address: i for i, inst in enumerate(instructions)}
    leaders, edges = {0}, []
    for i in range(len(instructions)):
        succ, ends = _successors(instructions, labels, i, index_of)
        edges.append(succ)
        if ends:
            leaders.update(succ)
            if i + 1 < len(instructions):
                leaders.add(i + 1)
    starts = sorted(leaders) + [len(instructions)]
    blocks = [range(a, b) for a, b in zip(starts, starts[1:])]
    block_of = {i: b for b, blk in enumerate(blocks) for i in blk}
    succs = [sorted({block_of[j] for j in edges[blk[-1]]}) for blk in blocks]
    preds: List[List[int]] = [[] for _ in blocks]
    for b, ss in enumerate(succs):
        for s in ss:
            preds[s].append(b)
    return ControlFlowGraph(blocks, succs, preds)


def _reachable(cfg: ControlFlowGraph) -> List[int]:
    """Blocks reachable from the entry (a CALL's target is not followed: it returns)."""
    seen, stack = {0}, [0]
    while stack:
        for s in cfg.succs[stack.pop()]:
            if s not in seen:
                seen.add(s)
                stack.append(s)
    return sorted(seen)


def _dominators(cfg: ControlFlowGraph, order: List[int]) -> Dict[int, int]:
    """Dominator sets of the reachable blocks, as bit sets (iterative data-flow)."""
    everything = sum(1 << b for b in order)
    dom = {b: everything for b in order}
    dom[0] = 1
    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            new = everything
            for p in cfg.preds[b]:
                new &= dom.get(p, everything)
            new |= 1 << b
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


def _natural_loops(cfg: ControlFlowGraph) -> Dict[int, set]:
    """Header block -> blocks of its natural loop, over every back edge (b -> h with h dominating b)."""
    order = _reachable(cfg)
    dom = _dominators(cfg, order)
    bodies: Dict[int, set] = {}
    for b in order:
        for h in cfg.succs[b]:
            if dom[b] >> h & 1:
                body, work = bodies.setdefault(h, {h}), [b]
                while work:
                    n = work.pop()
                    if n not in body:
                        body.add(n)
                        work.extend(p for p in cfg.preds[n] if p in dom)
    return bodies


WAIT_LOOP_MAX = 16  # a nested loop shorter than this is a wait (an mbarrier or a spin), not a tile loop


def sass_loops(text: str) -> List[Loop]:
    """The tile loops of a kernel's SASS and the loops that hold them (see the module docstring): a tile
    loop holds no loop of ``WAIT_LOOP_MAX`` instructions or more; loops inside a tile loop are left out
    (counted with it)."""
    instructions, labels = parse_sass(text)
    if not instructions:
        raise RuntimeError("no SASS instructions found in the nvdisasm output")
    cfg = control_flow_graph(instructions, labels)
    bodies = _natural_loops(cfg)
    counted = {h: [instructions[i] for b in bodies[h] for i in cfg.blocks[b] if _base(instructions[i].opcode) != "NOP"]
               for h in bodies}
    inside = {h: [g for g in bodies if g != h and g in bodies[h]] for h in bodies}
    tile = {h: all(len(counted[g]) < WAIT_LOOP_MAX for g in inside[h]) for h in bodies}
    loops = []
    for h in sorted(bodies):
        holders = [g for g in bodies if g != h and h in bodies[g]]
        if any(tile[g] for g in holders):
            continue  # counted with the tile loop that holds it
        opcodes = {name: sum(_base(inst.opcode) in ops for inst in counted[h]) for name, ops in _CLASSES.items()}
        loops.append(Loop(instructions[cfg.blocks[h][0]].address, len(counted[h]), opcodes, len(holders), tile[h]))
    return loops


def disassemble(cubin_path: Path) -> str:
    return _run_tool([knobs.nvidia.nvdisasm.path, "-c", str(cubin_path)])


# ----------------------------------------------------------------------------------------------
# Compilation worker: one specialisation -> its resources and loops
# ----------------------------------------------------------------------------------------------


def analyse_job(job: CompileJob) -> Dict[str, Any]:
    """Compile ``job`` and measure it; errors come back as ``{"error": ...}``."""
    started = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(job.module), job.kernel)
        compiled = triton.compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs),
                                  target=GPUTarget("cuda", job.capability, 32), options=job.options)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            sass = disassemble(cubin)
        resources = ptxas_resources(compiled.asm["ptx"], job.capability, sass)
        loops = sass_loops(sass)
        return dict(
            registers=resources["registers"], spill_stores=resources["spill_stores"],
            spill_loads=resources["spill_loads"], stack_frame=resources["stack_frame"],
            shared_dynamic=int(compiled.metadata.shared), shared_static=resources["static_shared"],
            num_warps=int(compiled.metadata.num_warps),
            loops=[dataclasses.asdict(loop) for loop in loops], compile_s=time.perf_counter() - started,
        )
    except Exception as exc:  # recorded per launch and failed by --check, never swallowed
        return dict(error=harness.format_error(exc), traceback=harness.format_traceback(exc))


# ----------------------------------------------------------------------------------------------
# Occupancy and the time model
# ----------------------------------------------------------------------------------------------


def occupancy(registers: int, shared_bytes: int, num_warps: int, gpu: GpuModel) -> Dict[str, Any]:
    """Resident blocks and warps per SM, and which resource limits them."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / gpu.register_unit) * gpu.register_unit
    limits = {
        "registers": (gpu.registers_per_sm // regs_per_warp) // num_warps,
        "warps": gpu.max_warps_per_sm // num_warps,
        "blocks": gpu.max_blocks_per_sm,
    }
    shared_per_block = math.ceil((shared_bytes + gpu.shared_reserved_per_block) / gpu.shared_unit) * gpu.shared_unit
    limits["shared_memory"] = gpu.shared_memory_per_sm // shared_per_block
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return dict(blocks_per_sm=blocks, resident_warps_per_sm=blocks * num_warps, occupancy_limiter=limiter)


def launch_time_model(record: Dict[str, Any], gpu: GpuModel) -> Dict[str, Any]:
    """The model's time of one compiled launch (see the module docstring), with each term."""
    if record["blocks_per_sm"] == 0:
        return dict(bound="does not fit an SM", predicted_us=None)
    programs = record["programs"]
    units = record.get("work_units") or programs
    per_sm = math.ceil(programs / gpu.sm_count)
    balance = units / (gpu.sm_count * per_sm * math.ceil(units / programs))
    resident_warps = min(record["blocks_per_sm"], per_sm) * record["num_warps"]
    efficiency = min(1.0, resident_warps / gpu.warps_for_full_issue)
    warp_instructions = (record["sass_instructions_per_element"] or 0.0) * record["elements"]
    terms_us = {
        "hbm": record["hbm_bytes_total"] / (gpu.hbm_gbps * 1e3),
        "l2": record["l2_bytes_total"] / (gpu.l2_gbps * 1e3),
        "issue": warp_instructions / (gpu.schedulers_per_sm * gpu.clock_ghz * 1e3 * gpu.sm_count * efficiency),
    }
    bound = max(terms_us, key=lambda k: terms_us[k])
    return dict(
        hbm_us=terms_us["hbm"], l2_us=terms_us["l2"], issue_us=terms_us["issue"], balance=balance,
        issue_efficiency=efficiency, bound=bound,
        predicted_us=terms_us[bound] / balance + gpu.launch_us,
    )


# ----------------------------------------------------------------------------------------------
# The grid: meta inputs, planned launches
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    direction: str
    norm: str
    dtype: str
    D: int
    H: int
    features: str
    arch: str

    @property
    def N(self) -> int:
        return ELEMENTS_PER_POINT // self.D

    def as_fields(self) -> Dict[str, Any]:
        return dict(direction=self.direction, norm_position=self.norm, dtype=self.dtype, D=self.D, H=self.H,
                    N=self.N, features=self.features, arch=self.arch)


def grid_points(grid: Dict[str, Sequence[Any]]) -> List[Point]:
    keys = ("direction", "norm", "dtype", "D", "H", "features", "arch")
    return [Point(*values) for values in itertools.product(*(grid[k] for k in keys))]


def _meta_tensor(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def plan_point(point: Point) -> List[Any]:
    """The planner's launches for ``point`` (backward: planned after the forward, from its outputs)."""
    dtype = DTYPES[point.dtype]
    feat = FEATURES[point.features]
    limits = GPU_MODELS[point.arch].limits
    n, d, h = point.N, point.D, point.H
    x = _meta_tensor(n, d, dtype=dtype)
    params = tuple(_meta_tensor(*shape, dtype=dtype) for shape in ((d,), (d,), (h, d), (d, h)))  # γ, β, Wd, Wu
    seed = _meta_tensor(1, dtype=torch.int64) if feat["dropout_p"] > 0 else None
    scale = _meta_tensor(1, dtype=dtype) if feat["scale"] else None
    common = dict(activation=feat["activation"], norm_position=point.norm, dropout_p=feat["dropout_p"],
                  residual=True)
    outputs, launches = kernels.plan_forward(x, *params, seed, scale, eps=1e-5, compute_row_sq=feat["row_sq"],
                                             limits=limits, **common)
    if point.direction == "forward":
        return launches
    _, _, hidden, mean, rstd, proj = outputs
    grad_row_sq = _meta_tensor(n, dtype=torch.float32) if feat["row_sq"] else None
    _, launches = kernels.plan_backward(_meta_tensor(n, d, dtype=dtype), grad_row_sq, x, *params, seed, scale,
                                        hidden, mean, rstd, proj, need_dx=True, need_dln=True, need_dwd=True,
                                        need_dwu=True, limits=limits, **common)
    return launches


def _constexpr_fields(launch: Any) -> Dict[str, Any]:
    return {k: v for k, v in launch.meta.items() if isinstance(v, (bool, int, float, str))}


ROW_TILE_NAMES = ("BM", "BR")  # the constexpr that names a loop iteration's rows, per kernel family


def sass_per_element(loops: List[Dict[str, Any]], meta: Dict[str, Any], num_warps: int,
                     element_loops: int = 0) -> Optional[float]:
    """Warp-instructions per element summed over the tile loops (an iteration covers a BM (or BR) × BD
    tile; the fused chain's BDS, one per adapter, where they are all equal), or over the first
    ``element_loops`` of them in code order where the launch says only those walk its elements; None
    when the launch's meta names no tile."""
    rows = next((meta[k] for k in ROW_TILE_NAMES if k in meta), None)
    columns = meta.get("BD") or (meta["BDS"][0] if len(set(meta.get("BDS", ()))) == 1 else None)
    if rows is None or columns is None:
        return None
    tiles = sorted((loop for loop in loops if loop.get("tile", True)), key=lambda loop: loop.get("header", 0))
    if element_loops:
        tiles = tiles[:element_loops]
    return sum(loop["instructions"] for loop in tiles) * num_warps / (rows * columns)


def traffic(launch: Any, resident_programs: Optional[int], gpu: GpuModel) -> Dict[str, Any]:
    """The launch's HBM and L2 bytes: compulsory HBM traffic and L2 re-reads of shared operands as the
    planner states them, plus its second reads, served by L2 when the live set of the resident
    programs fits in L2 and by HBM otherwise (unknown occupancy: counted as HBM)."""
    reread = int(launch.reread_bytes)
    live = int(launch.live_bytes_per_program) * (resident_programs or 0)
    from_l2 = resident_programs is not None and live <= gpu.l2_size
    return dict(
        hbm_bytes=int(launch.hbm_bytes), l2_bytes=int(launch.l2_bytes), reread_bytes=reread, live_bytes=live,
        reread_from=("l2" if from_l2 else "hbm") if reread else None,
        hbm_bytes_total=int(launch.hbm_bytes) + (0 if from_l2 else reread),
        l2_bytes_total=int(launch.l2_bytes) + (reread if from_l2 else 0),
    )


def launch_record(point: Point, launch: Any, job: CompileJob, analysis: Dict[str, Any]) -> Dict[str, Any]:
    """One launch of one grid point: its configuration, compiled resources, occupancy, SASS per element,
    traffic and modelled time."""
    gpu = GPU_MODELS[point.arch]
    record = dict(point.as_fields())
    record.update(
        launch=launch.name, kernel=launch.kernel.fn.__name__, grid=list(launch.grid),
        programs=math.prod(launch.grid), work_units=int(launch.work_units) or math.prod(launch.grid),
        meta=_constexpr_fields(launch), elements=int(launch.elements),
        shared_limit=gpu.shared_memory_per_block, **job.specialization(launch.kernel),
    )
    resident_programs = None
    if "error" in analysis:
        record.update(status="error", error=analysis["error"], traceback=analysis["traceback"])
    else:
        shared_total = analysis["shared_dynamic"] + analysis["shared_static"]
        record.update(analysis)
        record.update(status="ok", shared_total=shared_total, shared_ok=shared_total <= gpu.shared_memory_per_block)
        record.update(occupancy(analysis["registers"], shared_total, analysis["num_warps"], gpu))
        record["sass_instructions_per_element"] = sass_per_element(analysis["loops"], launch.meta,
                                                                   analysis["num_warps"], launch.element_loops)
        resident_programs = min(record["programs"], record["blocks_per_sm"] * gpu.sm_count)
    record["resident_programs"] = resident_programs
    record.update(traffic(launch, resident_programs, gpu))
    record["hbm_bytes_per_token"] = record["hbm_bytes_total"] / point.N
    record["l2_bytes_per_token"] = record["l2_bytes_total"] / point.N
    record["passes"] = record["hbm_bytes_total"] / (point.N * point.D * DTYPES[point.dtype].itemsize)
    if record["status"] == "ok":
        record.update(launch_time_model(record, gpu))
    return record


def label_launches(records: List[Dict[str, Any]]) -> None:
    """Give each launch of a point a unique ``label``: its name, numbered from 1 where names repeat."""
    names = [r["launch"] for r in records]
    seen: Dict[str, int] = {}
    for r in records:
        if names.count(r["launch"]) > 1:
            seen[r["launch"]] = seen.get(r["launch"], 0) + 1
            r["label"] = f"{r['launch']}[{seen[r['launch']]}]"
        else:
            r["label"] = r["launch"]


def prediction_record(point: Point, records: List[Dict[str, Any]], refused: Optional[str]) -> Dict[str, Any]:
    """Predicted fraction of the copy floor for one grid point, from its launches."""
    gpu = GPU_MODELS[point.arch]
    elem_bytes = DTYPES[point.dtype].itemsize
    floor_us = FLOOR_PASSES[point.direction] * point.N * point.D * elem_bytes / (gpu.hbm_gbps * 1e3)
    record = dict(point.as_fields(), backend="triton", gpu=gpu.gpu, floor_us=floor_us,
                  launches=[r["label"] for r in records])
    if refused is not None:
        return dict(record, status="refused", reason=refused, predicted_fraction=None, predicted_us=None)
    hbm = sum(r["hbm_bytes_total"] for r in records)
    record.update(hbm_bytes_per_token=hbm / point.N,
                  l2_bytes_per_token=sum(r["l2_bytes_total"] for r in records) / point.N,
                  passes=hbm / (point.N * point.D * elem_bytes))
    if any(r["status"] != "ok" or r["predicted_us"] is None for r in records):
        return dict(record, status="error", predicted_fraction=None, predicted_us=None)
    total = sum(r["predicted_us"] for r in records)
    return dict(record, status="ok", predicted_us=total, predicted_fraction=floor_us / total)


# ----------------------------------------------------------------------------------------------
# CUDA backend (csrc/*.cu)
# ----------------------------------------------------------------------------------------------

_NVCC_ARCHS = {"sm_90": "sm_90a", "sm_80": "sm_80"}


def _demangle(names: Iterable[str]) -> Dict[str, str]:
    names = list(names)
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, timeout=60)
        demangled = out.stdout.splitlines()
        if out.returncode == 0 and len(demangled) == len(names):
            return dict(zip(names, demangled))
    except OSError:
        pass
    return {n: n for n in names}


def cuda_kernel_records(archs: Sequence[str], csrc: Path = REPO / "csrc") -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Resources of every kernel in ``csrc/*.cu`` per arch; ``(records, reason)`` with the reason for
    skipping when there is nothing to compile or no nvcc."""
    sources = sorted(csrc.glob("*.cu"))
    if not sources:
        return [], f"no {csrc.name}/*.cu files"
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return [], "nvcc not found"
    records = []
    for source, arch in itertools.product(sources, archs):
        gpu = GPU_MODELS[arch]
        base = dict(source=f"{csrc.name}/{source.name}", arch=arch, shared_limit=gpu.shared_memory_per_block)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [nvcc, f"-arch={_NVCC_ARCHS[arch]}", "-cubin", "-O3", "-std=c++17", "-Xptxas", "-v",
                   "-I", str(csrc), str(source), "-o", str(Path(tmp) / "out.cubin")]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            records.append(dict(base, status="error", error=(proc.stderr or proc.stdout)[-2000:]))
            continue
        functions = parse_ptxas_log(proc.stderr + proc.stdout)
        names = _demangle(functions)
        for name, res in sorted(functions.items()):
            records.append(dict(base, status="ok", kernel=name, demangled=names[name], **res,
                                shared_ok=res["static_shared"] <= gpu.shared_memory_per_block))
    return records, None


CLUSTER_ROWS = 16  # rows per block of the cluster forward (kRows in csrc/linear_adapter_cluster.cu)
_CLUSTER_TYPES = {"bf16": "fa::BFloat16", "fp16": "fa::Half", "fp32": "float"}
_CLUSTER_PLAN_DRIVER = """\
#include "linear_adapter_cluster.cu"
#include <cstdio>
#include <cstring>
// Reads lines "dtype D H", prints "cluster width shared_bytes" from the launcher's own plan.
int main() {
  char dtype[8];
  long long d, h;
  while (std::scanf("%7s %lld %lld", dtype, &d, &h) == 3) {
    fa::ClusterPlan p{};
""" + "".join(f"""    if (!std::strcmp(dtype, "{name}")) p = fa::linear_adapter_cluster_forward_plan<{cpp}>(d, h);
""" for name, cpp in _CLUSTER_TYPES.items()) + """\
    std::printf("%d %lld %zu\\n", p.cluster, static_cast<long long>(p.width), p.shared_bytes);
  }
}
"""


def cluster_forward_plans(shapes: Sequence[Tuple[str, int, int]], csrc: Path = REPO / "csrc"
                          ) -> Tuple[Dict[Tuple[str, int, int], Dict[str, int]], Optional[str]]:
    """The cluster forward's plan (CTAs per cluster, slice width, shared memory per CTA) for each
    (dtype, D, H), from ``linear_adapter_cluster_forward_plan`` itself: a host program built with the
    host compiler against the simulator (no GPU, no nvcc). ``(plans, reason)``, the reason for an empty
    result."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        return {}, "no C++ compiler"
    with tempfile.TemporaryDirectory() as tmp:
        driver, program = Path(tmp) / "cluster_plans.cpp", Path(tmp) / "cluster_plans"
        driver.write_text(_CLUSTER_PLAN_DRIVER)
        build = subprocess.run([cxx, "-std=c++20", "-O1", "-DFA_CUDA_SIM", f"-I{csrc}", str(driver), "-o", str(program)],
                               capture_output=True, text=True, timeout=600)
        if build.returncode != 0:
            return {}, f"the plan program did not build: {build.stderr[-500:]}"
        run = subprocess.run([str(program)], input="".join(f"{t} {d} {h}\n" for t, d, h in shapes),
                             capture_output=True, text=True, timeout=60, check=True)
    plans = {}
    for shape, line in zip(shapes, run.stdout.splitlines()):
        cluster, width, shared_bytes = (int(v) for v in line.split())
        plans[shape] = dict(cluster=cluster, width=width, shared_bytes=shared_bytes)
    return plans, None


def cluster_forward_model(plan: Dict[str, int], dtype: str, d: int, h: int, n: int, gpu: GpuModel) -> Dict[str, Any]:
    """The cluster forward's time from nominal rates: the larger of streaming x and out once (and each
    cluster's weight slices once) at the copy bandwidth, and the products of every round of row blocks
    (one block per cluster at a time; tensor cores in 16 bits with W and H padded to 16, float FMAs in
    float32), plus a launch. Not modelled: its cluster barriers, the exchange over distributed shared
    memory, and how far wmma falls short of the nominal rate: an optimistic bound."""
    if plan["cluster"] == 0:
        return dict(fits=False, predicted_us=None, fraction_of_floor=None, bound="no cluster fits")
    item = DTYPES[dtype].itemsize
    cluster, width = plan["cluster"], plan["width"]
    clusters = max(1, gpu.sm_count // cluster)
    rounds = math.ceil(math.ceil(n / CLUSTER_ROWS) / clusters)
    tensor = dtype in HALF_DTYPES
    padded_h = math.ceil(h / 16) * 16 if tensor else h
    rate = gpu.tensor_macs_per_clock if tensor else gpu.fma_per_clock
    floor_us = 2 * n * d * item / (gpu.hbm_gbps * 1e3)
    terms_us = {
        "memory": floor_us + clusters * cluster * 2 * h * width * item / (gpu.hbm_gbps * 1e3),
        "tensor cores" if tensor else "FMAs": rounds * 2 * CLUSTER_ROWS * width * padded_h / (rate * gpu.clock_ghz * 1e3),
    }
    bound = max(terms_us, key=lambda k: terms_us[k])
    predicted = terms_us[bound] + gpu.launch_us
    return dict(fits=True, clusters=clusters, rounds=rounds, memory_us=terms_us["memory"],
                products_us=terms_us["tensor cores" if tensor else "FMAs"], bound=bound, floor_us=floor_us,
                predicted_us=predicted, fraction_of_floor=floor_us / predicted)


def cluster_forward_records(grid: Dict[str, Sequence[Any]]) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """The cluster forward's plan and model at every (dtype, D, H) of the grid, on sm_90 (the only
    architecture that runs it), N = ELEMENTS_PER_POINT / D."""
    if "sm_90" not in grid["arch"] or "forward" not in grid["direction"]:
        return [], "the grid has no sm_90 forward"
    shapes = [(t, d, h) for t, d, h in itertools.product(grid["dtype"], grid["D"], grid["H"])]
    plans, reason = cluster_forward_plans(shapes)
    if reason:
        return [], reason
    gpu = GPU_MODELS["sm_90"]
    records = []
    for dtype, d, h in shapes:
        n = ELEMENTS_PER_POINT // d
        plan = plans[(dtype, d, h)]
        records.append(dict(dtype=dtype, D=d, H=h, N=n, arch="sm_90", **plan,
                            **cluster_forward_model(plan, dtype, d, h, n, gpu)))
    return records, None


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------


def _is_half_cuda_kernel(record: Dict[str, Any]) -> bool:
    """A kernel of a 16-bit storage type: its demangled name (template arguments included) names one."""
    name = record.get("demangled", "").lower()
    return "bfloat16" in name or "half" in name


def check_failures(launches: List[Dict[str, Any]], cuda: List[Dict[str, Any]] = ()) -> List[str]:
    """Why the report fails ``--check``: spills in bf16/fp16 launches, shared memory over the block limit,
    launches that failed to compile (empty when it passes)."""
    failures = []
    for r in launches:
        where = (f"{r['direction']} {r['norm_position']}-norm {r['dtype']} D={r['D']} H={r['H']} "
                 f"{r['features']} {r['arch']} {r.get('label', r['launch'])} ({r['kernel']})")
        if r["status"] != "ok":
            failures.append(f"{where}: did not compile: {r.get('error')}")
            continue
        if r["dtype"] in HALF_DTYPES and (r["spill_stores"] or r["spill_loads"]):
            failures.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
        if r["shared_total"] > r["shared_limit"]:
            failures.append(f"{where}: shared memory {r['shared_total']} B over the {r['shared_limit']} B "
                            f"a block gets")
    for r in cuda:
        where = f"{r['source']} {r['arch']} {r.get('demangled', '')}".rstrip()
        if r["status"] != "ok":
            failures.append(f"{where}: nvcc failed: {r['error'][-300:]}")
            continue
        if _is_half_cuda_kernel(r) and (r["spill_stores"] or r["spill_loads"]):
            failures.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
        if not r["shared_ok"]:
            failures.append(f"{where}: static shared memory {r['static_shared']} B over the {r['shared_limit']} B")
    return failures


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _refusal(exc: ValueError) -> str:
    return harness.format_error(exc, 300)


def build_report(grid: Dict[str, Sequence[Any]], jobs: int, log=print) -> Dict[str, Any]:
    """Plan, compile and model every point of ``grid``; returns the report's JSON object."""
    points = grid_points(grid)
    planned: Dict[Point, Tuple[List[Any], List[CompileJob], Optional[str]]] = {}
    for point in points:
        try:
            launches = plan_point(point)
        except ValueError as exc:  # the planner refusing a configuration it cannot run on this device
            planned[point] = ([], [], _refusal(exc))
            continue
        planned[point] = (launches, [compile_job(l, GPU_MODELS[point.arch].capability) for l in launches], None)
    unique = {job.key: job for _, jobs_, _ in planned.values() for job in jobs_}
    log(f"static_report: {len(points)} points, {sum(len(v[0]) for v in planned.values())} launches, "
        f"{len(unique)} distinct compilations, {jobs} worker(s)")
    started = time.perf_counter()
    results: Dict[str, Dict[str, Any]] = {}
    if jobs > 1 and len(unique) > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            futures = {pool.submit(analyse_job, job): key for key, job in unique.items()}
            for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
                try:
                    results[futures[future]] = future.result()
                except Exception as exc:  # a compiler process that died (e.g. a crash inside Triton)
                    results[futures[future]] = dict(error=harness.format_error(exc),
                                                    traceback=harness.format_traceback(exc))
                if i % 20 == 0 or i == len(futures):
                    log(f"  compiled {i}/{len(futures)} ({time.perf_counter() - started:.0f} s)")
    else:
        for i, (key, job) in enumerate(unique.items(), 1):
            results[key] = analyse_job(job)
            if i % 20 == 0 or i == len(unique):
                log(f"  compiled {i}/{len(unique)} ({time.perf_counter() - started:.0f} s)")

    launch_records, predictions = [], []
    for point in points:
        launches, compile_jobs, refused = planned[point]
        records = [launch_record(point, l, j, results[j.key]) for l, j in zip(launches, compile_jobs)]
        label_launches(records)
        launch_records.extend(records)
        predictions.append(prediction_record(point, records, refused))
    cuda, cuda_skipped = cuda_kernel_records(grid["arch"])
    cluster, cluster_skipped = cluster_forward_records(grid)
    return dict(
        model={arch: GPU_MODELS[arch].describe() for arch in grid["arch"]},
        grid={k: list(v) for k, v in grid.items()},
        elements_per_point=ELEMENTS_PER_POINT,
        compile_seconds=time.perf_counter() - started,
        launches=launch_records,
        predictions=predictions,
        cuda_kernels=cuda,
        cuda_skipped=cuda_skipped,
        cluster_forward=cluster,
        cluster_forward_skipped=cluster_skipped,
    )


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------

fmt = harness.fmt


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _kb(value: Optional[int]) -> str:
    return "–" if value is None else f"{value / 1024:.1f}"


def _point_cells(r: Dict[str, Any]) -> List[Any]:
    return [r["direction"][:3], r["norm_position"], r["dtype"], r["D"], r["H"], r["features"], r["arch"]]


CONFIG_KEYS = ("BM", "BR", "BD", "BH", "num_warps", "num_stages")
POINT_HEADERS = ["dir", "norm", "dtype", "D", "H", "features", "arch"]


HEADLINE = dict(D=4096, arch="sm_90")


def headline_tables(predictions: List[Dict[str, Any]]) -> List[str]:
    """Predicted fraction at D = 4096 on sm_90, one row per (direction, norm, dtype, features), H across."""
    chosen = [p for p in predictions if all(p[k] == v for k, v in HEADLINE.items())]
    if not chosen:
        return []
    hs = sorted({p["H"] for p in chosen})
    rows: Dict[Tuple, Dict[int, Any]] = {}
    for p in chosen:
        rows.setdefault((p["direction"], p["norm_position"], p["dtype"], p["features"]), {})[p["H"]] = p
    table = [[*key, *(_pct(cells[h]["predicted_fraction"]) if h in cells else "–" for h in hs)]
             for key, cells in rows.items()]
    return ["## Headline: predicted fraction of the copy floor, D = 4096, sm_90 (H100)", "",
            harness.markdown_table(["direction", "norm", "dtype", "features", *(f"H={h}" for h in hs)], table), ""]


def render_markdown(report: Dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Static kernel report",
        "",
        "Every kernel launch of the fused adapter, compiled as the Triton backend would launch it, for sm_90 "
        "(H100) and sm_80 (A100), on a machine without a GPU. Written by `bench/static_report.py`; the method "
        "and the model are in that script's docstring and in `bench/README.md`.",
        "",
        f"- command: `{env['command']}`",
        f"- commit: {env['git']['commit']} (dirty: {env['git']['dirty']}), {env['timestamp_utc']}",
        f"- triton {env['triton']}, ptxas: {report['tools']['ptxas']}",
        "- grid: " + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in report["grid"].items())
        + f"; N = 2^{int(math.log2(report['elements_per_point']))} / D",
        f"- check: **{'passed' if not report['check_failures'] else 'FAILED'}**"
        + ("" if not report["check_failures"] else f" ({len(report['check_failures'])} reasons below)"),
        "",
        "## Model (assumptions, to be calibrated by the first GPU run)",
        "",
        "`t = max(HBM bytes / B_hbm, L2 bytes / B_l2, W / (4 f S e)) / balance + t_launch` per launch, summed "
        "per direction; predicted fraction = copy floor time / Σ t, floor = (2 N D forward, 3 N D backward) × "
        "bytes per element / B_hbm. W = SASS warp-instructions per element × elements, e = min(1, resident "
        "warps / 8), balance = U / (S ⌈P / S⌉ ⌈U / P⌉) for P programs on S SMs sharing U row blocks (U = P "
        "but for the forward's grid-stride launches). The first GPU run measured the streaming launches "
        "within 10 % of this model and others up to 6× slower: see bench/NOTES.md.",
        "",
        harness.markdown_table(
            ["arch", "GPU", "SMs", "B_hbm GB/s", "B_l2 GB/s", "clock GHz", "smem/SM KB", "smem/block KB",
             "t_launch µs"],
            [[a, m["gpu"], m["limits"]["sm_count"], fmt(m["hbm_gbps"], ".0f"), fmt(m["l2_gbps"], ".0f"), m["clock_ghz"],
              _kb(m["shared_memory_per_sm"]), _kb(m["limits"]["shared_memory_per_block"]), m["launch_us"]]
             for a, m in report["model"].items()]),
        "",
        *headline_tables(report["predictions"]),
        "## Predicted fraction of the copy floor",
        "",
        "Per grid point: HBM and L2 bytes per token (row of x) summed over the point's launches, passes over "
        "N·D (HBM bytes / (N·D·bytes per element)), the predicted fraction, and each launch's bound.",
        "",
    ]
    by_point: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in report["launches"]:
        by_point.setdefault(tuple(_point_cells(r)), []).append(r)
    rows = []
    for p in report["predictions"]:
        launches = by_point.get(tuple(_point_cells(p)), [])
        bounds = ", ".join(f"{r['label']}: {r.get('bound', r['status'])}" for r in launches)
        if p["status"] == "refused":
            bounds = f"refused: {p['reason']}"
        rows.append(_point_cells(p) + [fmt(p.get("hbm_bytes_per_token"), ".0f"),
                                       fmt(p.get("l2_bytes_per_token"), ".0f"), fmt(p.get("passes"), ".2f"),
                                       _pct(p["predicted_fraction"]), bounds])
    lines += [harness.markdown_table(POINT_HEADERS + ["HBM B/token", "L2 B/token", "passes", "predicted",
                                                      "bound"], rows), ""]
    lines += [
        "## Launches",
        "",
        "regs: registers per thread; spills: spill stores / loads (bytes per thread); smem: shared memory per "
        "block (KB, dynamic + static); warps/SM: resident warps per SM and the limiting resource; SASS/elem: "
        "warp-instructions per element summed over the hot loops (per-loop body sizes in report.json).",
        "",
    ]
    rows = []
    for r in report["launches"]:
        cfg = " ".join(f"{k}={r['meta'][k]}" for k in CONFIG_KEYS if k in r["meta"])
        if r["status"] != "ok":
            rows.append(_point_cells(r) + [r["label"], r["programs"], cfg] + ["–"] * 5 + [f"error: {r['error']}"])
            continue
        loops = "+".join(str(loop["instructions"]) for loop in r["loops"])
        rows.append(_point_cells(r) + [
            r["label"], r["programs"], cfg, r["registers"], f"{r['spill_stores']}/{r['spill_loads']}",
            _kb(r["shared_total"]), f"{r['resident_warps_per_sm']} ({r['occupancy_limiter']})",
            f"{fmt(r['sass_instructions_per_element'], '.2f')} ({loops})", r.get("bound", "–")])
    lines += [harness.markdown_table(POINT_HEADERS + ["launch", "programs", "config", "regs", "spills", "smem KB",
                                                      "warps/SM", "SASS/elem (loop sizes)", "bound"], rows), ""]
    lines += ["## CUDA backend (csrc)", ""]
    if report["cuda_skipped"]:
        lines += [f"Skipped: {report['cuda_skipped']}.", ""]
    else:
        rows = [[r["source"], r["arch"], r.get("demangled", "–"), r.get("registers", "–"),
                 f"{r.get('spill_stores', '–')}/{r.get('spill_loads', '–')}", _kb(r.get("static_shared")),
                 r["status"] if r["status"] == "ok" else "error"] for r in report["cuda_kernels"]]
        lines += [harness.markdown_table(["source", "arch", "kernel", "regs", "spills", "static smem KB", "status"],
                                         rows), "",
                  "Shared memory sized at launch (`extern __shared__`) is not in this table: ptxas sees only static "
                  "arrays. The launchers size it from the shape (csrc/README.md); the cluster forward's is below.", ""]
    lines += ["### The cluster forward (sm_90): plan and model", ""]
    if report.get("cluster_forward_skipped") or "cluster_forward" not in report:
        lines += [f"Skipped: {report.get('cluster_forward_skipped', 'not in this report')}.", ""]
    else:
        lines += ["The launcher's own plan (`linear_adapter_cluster_forward_plan`, run on the host) and a time from "
                  "nominal rates: the larger of the memory term (x and out once, the weight slices once per "
                  "cluster) and the products (per round of one row block per cluster, tensor cores in 16 bits, "
                  "FMAs in float32), plus a launch. Its cluster barriers, the exchange over distributed shared "
                  "memory and wmma's shortfall from the nominal rate are not modelled: the fraction is an upper "
                  "bound. Where no cluster fits, the row-block forward runs.", ""]
        rows = [[r["dtype"], r["D"], r["H"], r["N"], r["cluster"] or "–", r["width"] or "–", _kb(r["shared_bytes"]),
                 fmt(r.get("memory_us")), fmt(r.get("products_us")), r["bound"], fmt(r["predicted_us"]),
                 _pct(r["fraction_of_floor"])] for r in report["cluster_forward"]]
        lines += [harness.markdown_table(["dtype", "D", "H", "N", "CTAs per cluster", "W", "smem KB per CTA",
                                          "memory µs", "products µs", "bound", "predicted µs", "of floor"], rows), ""]
    lines += ["## Check", ""]
    lines += ["Passed: no spill in any bf16/fp16 launch, every launch within the shared memory of a block, every "
              "launch compiled."] if not report["check_failures"] else [f"- {f}" for f in report["check_failures"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def _tool_version(path: str) -> str:
    text = harness._run([path, "--version"]) or ""
    return text.strip().splitlines()[-1] if text.strip() else "unknown"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="the CI subset: bf16/fp16, D=4096, H in {16, 64}, both norms, directions, feature "
                             "sets and archs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a bf16/fp16 spill, shared memory over a block's limit, or a compile error")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compiler processes (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("static_report: unset TRITON_INTERPRET (kernels cannot be compiled under the interpreter)")
        return 2
    grid = QUICK_GRID if args.quick else FULL_GRID
    report = build_report(grid, max(1, args.jobs))
    report["environment"] = harness.environment_record(sys.argv[1:] if argv is None else list(argv),
                                                       torch.device("cpu"), script="bench/static_report.py")
    report["tools"] = {"ptxas": _tool_version(get_ptxas(90).path),
                       "nvdisasm": _tool_version(knobs.nvidia.nvdisasm.path)}
    report["check_failures"] = check_failures(report["launches"], report["cuda_kernels"])
    args.out.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.out / "report.json", report)
    (args.out / "report.md").write_text(render_markdown(report))
    print(f"static_report: wrote {args.out / 'report.json'} and report.md "
          f"({report['compile_seconds']:.0f} s of compilation)")
    if report["check_failures"]:
        print(f"static_report: check: {len(report['check_failures'])} failure(s)")
        for failure in report["check_failures"]:
            print(f"  {failure}")
        if args.check:
            return 1
    elif args.check:
        print("static_report: check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
