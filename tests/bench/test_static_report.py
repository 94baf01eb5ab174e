"""The static kernel report compiles every planned launch for sm_90 and sm_80 and checks it.

One subprocess runs ``bench/static_report.py --quick --check`` as CI and a user run it (without
``TRITON_INTERPRET``: kernels do not compile under the interpreter). The tests then require a record
for every launch of every grid point with sane values, and a check verdict that agrees with the
records. The pieces that decide the verdict (the check, the SASS loop finder, the occupancy
calculator, the ptxas log parser) are also tested on fabricated inputs whose answers are known.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from helpers import load_script

pytest.importorskip("triton.backends.nvidia.compiler")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "static_report.py"
QUICK = dict(direction=["forward", "backward"], norm=["pre", "post"], dtype=["bf16", "fp16"], D=[4096], H=[16, 64],
             features=["plain", "all"], arch=["sm_90", "sm_80"])


def _load_script():
    return load_script(SCRIPT, "static_report_under_test")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run the quick grid with --check once; return (exit code, report.json, report.md, stdout)."""
    out = tmp_path_factory.mktemp("static_report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--check", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    return proc.returncode, report, (out / "report.md").read_text(), proc.stdout


def _point(r):
    return (r["direction"], r["norm_position"], r["dtype"], r["D"], r["H"], r["features"], r["arch"])


def test_every_point_has_a_prediction_and_launches(quick_run):
    _, report, markdown, _ = quick_run
    expected = set(itertools.product(*QUICK.values()))
    assert {_point(p) for p in report["predictions"]} == expected
    assert len(report["predictions"]) == len(expected)
    launches = {}
    for r in report["launches"]:
        launches.setdefault(_point(r), []).append(r["launch"])
    assert set(launches) == expected
    for point, names in launches.items():
        main = {"forward": f"{point[1]}_norm_fwd", "backward": "bwd_cols"}[point[0]]
        assert main in names, (point, names)
        if point[0] == "backward":
            assert f"{point[1]}_norm_bwd_rows" in names, (point, names)
    for section in ("## Model", "## Predicted fraction of the copy floor", "## Launches", "## CUDA backend",
                    "## Check"):
        assert section in markdown
    assert "static_report.py" in report["environment"]["command"] and "--quick" in report["environment"]["command"]


def test_launch_records_are_sane(quick_run):
    _, report, _, _ = quick_run
    for r in report["launches"]:
        assert r["status"] == "ok", r.get("error")
        assert 0 < r["registers"] <= 255, r
        assert r["spill_stores"] >= 0 and r["spill_loads"] >= 0 and r["stack_frame"] >= 0
        assert r["shared_total"] == r["shared_dynamic"] + r["shared_static"] >= 0
        assert r["num_warps"] == r["meta"]["num_warps"]
        assert 0 < r["resident_warps_per_sm"] <= 64 and r["resident_warps_per_sm"] % r["num_warps"] == 0
        assert r["loops"] and all(loop["instructions"] > 0 for loop in r["loops"]), r["launch"]
        if "BD" in r["meta"]:  # every launch but the post-norm fold's Gram sum, which names no tile
            assert r["sass_instructions_per_element"] > 0
        else:
            assert r["launch"] == "gram_up" and r["sass_instructions_per_element"] is None
        assert r["hbm_bytes_total"] >= r["hbm_bytes"] > 0 and r["l2_bytes_total"] >= r["l2_bytes"] >= 0
        assert r["predicted_us"] > 0 and r["bound"] in ("hbm", "l2", "issue")
        if r["launch"].endswith("_fwd") or r["launch"].endswith("_rows") or r["launch"] == "bwd_cols":
            assert r["loops"][0]["opcodes"]["global_loads"] > 0  # the main loops stream N·D data
            assert r["elements"] >= r["N"] * r["D"]


def test_launches_compile_with_the_jit_specialisation(quick_run):
    """Unit strides become constants, shapes divisible by 16 and fresh tensors get the divisibility hint."""
    _, report, _, _ = quick_run
    for r in report["launches"]:
        if r["launch"] in ("pre_norm_fwd", "post_norm_fwd", "bwd_cols"):
            assert r["specialized_constants"].get("stride_xd") == 1, r["specialized_constants"]
            assert {"X", "D", "N", "stride_xn"} <= set(r["divisible_by_16"]), r["divisible_by_16"]


def test_predictions_are_sane(quick_run):
    _, report, _, _ = quick_run
    for p in report["predictions"]:
        assert p["status"] == "ok", p
        floor_passes = {"forward": 2, "backward": 3}[p["direction"]]
        assert p["passes"] >= floor_passes  # no launch plan moves less than the floor
        assert 0 < p["predicted_fraction"] <= 1
        tokens_bytes = p["D"] * {"bf16": 2, "fp16": 2}[p["dtype"]]
        assert p["hbm_bytes_per_token"] == pytest.approx(p["passes"] * tokens_bytes)
        assert p["l2_bytes_per_token"] >= 0


def test_check_verdict_agrees_with_the_records(quick_run):
    code, report, markdown, stdout = quick_run
    expected = []
    for r in report["launches"]:
        spills = r["dtype"] in ("bf16", "fp16") and (r["spill_stores"] or r["spill_loads"])
        if spills or r["shared_total"] > r["shared_limit"]:
            expected.append(r)
    assert len(report["check_failures"]) == len(expected)
    assert code == (1 if expected else 0), stdout[-3000:]
    assert ("**passed**" in markdown) == (not expected)


def test_quick_grid_passes_the_check(quick_run):
    """No bf16/fp16 launch of the quick grid spills, and every block fits its architecture."""
    code, report, _, _ = quick_run
    assert not report["check_failures"], "\n".join(report["check_failures"])
    assert code == 0


# ----------------------------------------------------------------------------------------------
# The check and its parts, on fabricated inputs
# ----------------------------------------------------------------------------------------------


def _record(**changes):
    record = dict(direction="backward", norm_position="pre", dtype="bf16", D=4096, H=64, features="all",
                  arch="sm_90", launch="bwd_cols", kernel="_bwd_cols_kernel", status="ok", spill_stores=0,
                  spill_loads=0, shared_total=40_000, shared_limit=227 * 1024)
    record.update(changes)
    return record


def test_check_fails_on_half_precision_spills_and_oversized_blocks():
    script = _load_script()
    assert script.check_failures([_record(), _record(dtype="fp16")]) == []
    spilled = script.check_failures([_record(spill_stores=172, spill_loads=120)])
    assert len(spilled) == 1 and "spills 172 B" in spilled[0] and "bwd_cols" in spilled[0]
    labelled = script.check_failures([_record(label="bwd_cols[2]", spill_stores=8)])
    assert "bwd_cols[2]" in labelled[0]
    assert script.check_failures([_record(dtype="fp16", spill_loads=4)])
    assert script.check_failures([_record(dtype="fp32", spill_stores=44_620, spill_loads=44_620)]) == []
    too_big = script.check_failures([_record(dtype="fp32", arch="sm_80", shared_total=193 * 1024,
                                             shared_limit=163 * 1024)])
    assert len(too_big) == 1 and "shared memory" in too_big[0]
    broken = script.check_failures([_record(status="error", error="PTXASError: boom")])
    assert len(broken) == 1 and "did not compile" in broken[0] and "boom" in broken[0]
    cuda = dict(source="csrc/x.cu", arch="sm_90", status="ok", demangled="void k<__nv_bfloat16>(int)",
                spill_stores=8, spill_loads=0, static_shared=0, shared_limit=227 * 1024, shared_ok=True)
    assert script.check_failures([], [cuda]) and not script.check_failures([], [dict(cuda, spill_stores=0)])
    assert not script.check_failures([], [dict(cuda, demangled="void k<float>(int)")])


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x1, PT ;
        /*0020*/               @P0 BRA `(.L_x_2) ;
.L_x_0:
        /*0030*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0040*/                   FADD R3, R3, R2 ;
.L_x_1:
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R6], R7 ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   CALL.REL.NOINC `($__internal_0_slowpath) ;
        /*0080*/                   NOP ;
        /*0090*/                   ISETP.NE.AND P2, PT, R8, RZ, PT ;
        /*00a0*/               @P2 BRA `(.L_x_0) ;
.L_x_2:
        /*00b0*/                   STG.E desc[UR4][R4.64], R3 ;
.L_x_3:
        /*00c0*/                   LDS R9, [R10] ;
        /*00d0*/                   MUFU.EX2 R9, R9 ;
        /*00e0*/               @P3 BRA `(.L_x_3) ;
        /*00f0*/                   EXIT ;
.L_x_4:
        /*0100*/                   BRA `(.L_x_4);
$__internal_0_slowpath:
        /*0110*/                   FADD R0, R0, R1 ;
        /*0120*/               @P0 BRA `($__internal_0_slowpath) ;
        /*0130*/                   RET.REL.NODEC R2 `(_kernel) ;
"""


def test_sass_loops_are_the_tile_loops():
    """Two tile loops, the first holding a wait loop (counted inside it, not listed); the padding
    self-loop after EXIT and the called subroutine's loop are unreachable from the entry and left out;
    NOPs are not counted."""
    loops = _load_script().sass_loops(SASS)
    assert [(loop.header, loop.instructions, loop.depth, loop.tile) for loop in loops] == [(0x30, 7, 0, True),
                                                                                           (0xC0, 3, 0, True)]
    assert loops[0].opcodes["global_loads"] == 1 and loops[0].opcodes["mufu"] == 0
    assert loops[1].opcodes["shared"] == 1 and loops[1].opcodes["mufu"] == 1


def test_a_loop_over_tile_loops_is_not_one():
    """A grid-stride loop holding a 16-instruction loop: the inner one is the tile loop, the outer one is
    listed (not a tile loop) with all 20 of its instructions."""
    body = "\n".join(f"        /*{0x30 + 16 * i:04x}*/                   FADD R3, R3, R2 ;" for i in range(15))
    sass = f"""
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_x_1:
        /*0020*/                   FADD R3, R3, R2 ;
{body}
        /*0120*/               @P1 BRA `(.L_x_1) ;
        /*0130*/                   STG.E desc[UR4][R4.64], R3 ;
        /*0140*/               @P2 BRA `(.L_x_0) ;
        /*0150*/                   EXIT ;
"""
    loops = _load_script().sass_loops(sass)
    assert [(loop.header, loop.instructions, loop.depth, loop.tile) for loop in loops] == [(0x10, 20, 0, False),
                                                                                           (0x20, 17, 1, True)]


def test_repeated_launch_names_are_numbered():
    records = [dict(launch="rows"), dict(launch="cols"), dict(launch="cols")]
    _load_script().label_launches(records)
    assert [r["label"] for r in records] == ["rows", "cols[1]", "cols[2]"]


def test_sass_per_element_counts_warps_and_tile():
    script = _load_script()
    loops = [dict(instructions=600), dict(instructions=200)]
    assert script.sass_per_element(loops, dict(BM=64, BD=64), 4) == pytest.approx(800 * 4 / 4096)
    assert script.sass_per_element(loops, dict(BR=4, BD=256), 4) == pytest.approx(800 * 4 / 1024)
    assert script.sass_per_element(loops, dict(BLOCK=64), 4) is None
    # A grid-stride kernel: the loop over row blocks holds the tile loops and does not count itself.
    nested = [dict(instructions=900, tile=False), dict(instructions=600), dict(instructions=200, tile=True)]
    assert script.sass_per_element(nested, dict(BM=64, BD=64), 4) == pytest.approx(800 * 4 / 4096)


def test_occupancy_calculator():
    script = _load_script()
    h100, a100 = script.GPU_MODELS["sm_90"], script.GPU_MODELS["sm_80"]
    # 255 registers: 8192 per warp, 8 warps fit the register file: two 4-warp blocks
    assert script.occupancy(255, 40_000, 4, h100) == dict(blocks_per_sm=2, resident_warps_per_sm=8,
                                                          occupancy_limiter="registers")
    # 32 registers, no shared memory: 16 blocks of 4 warps fill the 64 warp slots
    assert script.occupancy(32, 0, 4, h100)["resident_warps_per_sm"] == 64
    # 100 KB of shared memory (+1 KB reserved): two blocks on an H100, one on an A100
    assert script.occupancy(64, 100 * 1024, 4, h100) == dict(blocks_per_sm=2, resident_warps_per_sm=8,
                                                             occupancy_limiter="shared_memory")
    assert script.occupancy(64, 100 * 1024, 4, a100)["blocks_per_sm"] == 1
    assert script.occupancy(64, 200 * 1024, 4, a100)["blocks_per_sm"] == 0


def test_balance_counts_the_row_blocks_of_grid_stride_launches():
    """The busiest SM sets the time: 264 one-block programs on 132 SMs are balanced; 132 programs walking
    512 row blocks are not (some walk 4, some 3); 200 programs leave 68 SMs a second program."""
    script = _load_script()
    h100 = script.GPU_MODELS["sm_90"]
    record = dict(blocks_per_sm=2, num_warps=8, sass_instructions_per_element=None, elements=1,
                  hbm_bytes_total=3_000_000, l2_bytes_total=0)

    def balance(programs, work_units=None):
        return script.launch_time_model(dict(record, programs=programs, work_units=work_units), h100)["balance"]

    assert balance(264) == pytest.approx(1.0)
    assert balance(132, 512) == pytest.approx(512 / (132 * 4))
    assert balance(200) == pytest.approx(200 / 264)


def test_ptxas_log_parser():
    log = """ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_bwd_cols_kernel' for 'sm_90a'
ptxas info    : Function properties for _bwd_cols_kernel
    976 bytes stack frame, 976 bytes spill stores, 840 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1200 bytes smem
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
ptxas info    : Function properties for _Z1kPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 360 bytes cmem[0]
"""
    functions = _load_script().parse_ptxas_log(log)
    assert functions == {
        "_bwd_cols_kernel": dict(registers=255, stack_frame=976, spill_stores=976, spill_loads=840,
                                 static_shared=1200),
        "_Z1kPf": dict(registers=10, stack_frame=0, spill_stores=0, spill_loads=0, static_shared=0),
    }


def test_misaligned_meta_views_lose_the_divisibility_hint():
    import torch

    script = _load_script()
    base = torch.empty(64, dtype=torch.bfloat16, device="meta")
    kernel = types.SimpleNamespace(arg_names=["A", "B", "C", "n"])
    args = dict(A=base, B=base[8:], C=base[3:], n=64)  # offsets of 16 and 6 bytes
    assert script._misaligned_meta_pointers(kernel, args) == [(2,)]


CUDA_SOURCE = r"""
#include <cuda_bf16.h>
template <typename T>
__global__ void scale_rows(const T* x, T* out, float s, int n) {
    __shared__ float tile[300];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x % 300] = i < n ? static_cast<float>(x[i]) : 0.f;
    __syncthreads();
    if (i < n) out[i] = static_cast<T>(tile[(threadIdx.x + 1) % 300] * s);
}
template __global__ void scale_rows<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, float, int);
template __global__ void scale_rows<float>(const float*, float*, float, int);
"""


def test_cuda_sources_are_compiled_and_reported(tmp_path):
    """A .cu file is compiled for both architectures; each kernel instantiation gets its registers,
    spills and static shared memory, named readably; an empty folder is skipped with its reason."""
    import shutil

    script = _load_script()
    assert script.cuda_kernel_records(["sm_90"], tmp_path) == ([], f"no {tmp_path.name}/*.cu files")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    (tmp_path / "scale.cu").write_text(CUDA_SOURCE)
    records, skipped = script.cuda_kernel_records(["sm_90", "sm_80"], tmp_path)
    assert skipped is None
    assert {(r["arch"], r["status"]) for r in records} == {("sm_90", "ok"), ("sm_80", "ok")}
    assert len(records) == 4
    for r in records:
        assert "scale_rows" in r["demangled"] and r["registers"] > 0 and r["static_shared"] == 1200
        assert r["shared_ok"] and r["spill_stores"] == 0
    assert sum("bfloat16" in r["demangled"] for r in records) == 2
    assert script.check_failures([], records) == []
    (tmp_path / "broken.cu").write_text("__global__ void k() { undefined_name; }\n")
    records, _ = script.cuda_kernel_records(["sm_80"], tmp_path)
    failures = script.check_failures([], records)
    assert len(failures) == 1 and "broken.cu" in failures[0] and "nvcc failed" in failures[0]


def test_refuses_to_run_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stdout
    assert not (tmp_path / "report.json").exists()


def test_half_cuda_kernels_are_known_by_their_template_arguments():
    """The spill check covers the 16-bit CUDA kernels, anonymous namespace and all."""
    script = _load_script()
    name = "void fa::(anonymous namespace)::forward_rows_kernel<{}>(fa::ForwardArgs<{}>)"
    assert script._is_half_cuda_kernel({"demangled": name.format("fa::BFloat16", "fa::BFloat16")})
    assert script._is_half_cuda_kernel({"demangled": name.format("fa::Half", "fa::Half")})
    assert not script._is_half_cuda_kernel({"demangled": name.format("float", "float")})


def test_cluster_forward_plans_come_from_the_launcher():
    """The plan is the launcher's own (built for the host against the simulator): the smallest cluster
    whose share fits sm_90's 227 KB per CTA, the slice rounded to 16 columns for the tensor cores."""
    script = _load_script()
    shapes = [("bf16", 4096, 64), ("fp32", 4096, 64), ("bf16", 4100, 64), ("bf16", 1 << 20, 64)]
    plans, reason = script.cluster_forward_plans(shapes)
    if reason == "no C++ compiler":
        pytest.skip(reason)
    assert reason is None
    cluster_and_width = {shape: (plans[shape]["cluster"], plans[shape]["width"]) for shape in shapes}
    assert cluster_and_width[("bf16", 4096, 64)] == (8, 512)
    assert cluster_and_width[("fp32", 4096, 64)] == (16, 256)  # float weights: twice the bytes
    assert cluster_and_width[("bf16", 4100, 64)] == (8, 528)  # ceil(4100 / 8) = 513, rounded to 16
    for shape in shapes[:3]:
        assert 0 < plans[shape]["shared_bytes"] <= 227 * 1024
    assert plans[("bf16", 1 << 20, 64)] == dict(cluster=0, width=0, shared_bytes=0)  # the row-block forward's


def test_cluster_forward_model_terms():
    script = _load_script()
    gpu = script.GPU_MODELS["sm_90"]
    n = (1 << 26) // 4096
    bf16 = script.cluster_forward_model(dict(cluster=8, width=512, shared_bytes=1), "bf16", 4096, 64, n, gpu)
    assert bf16["bound"] == "memory" and 0.5 < bf16["fraction_of_floor"] < 1
    assert bf16["rounds"] == 1024 // 16 and bf16["clusters"] == 16
    # float32 on FMAs: 128 rounds of 16 x 256 x 64 x 2 multiply-adds at 128 per clock outlast the memory.
    fp32 = script.cluster_forward_model(dict(cluster=16, width=256, shared_bytes=1), "fp32", 4096, 64, n, gpu)
    assert fp32["bound"] == "FMAs" and fp32["products_us"] > fp32["memory_us"]
    assert fp32["products_us"] == pytest.approx(128 * 2 * 16 * 256 * 64 / (128 * gpu.clock_ghz * 1e3))
    none = script.cluster_forward_model(dict(cluster=0, width=0, shared_bytes=0), "bf16", 1 << 20, 64, 64, gpu)
    assert none["fits"] is False and none["predicted_us"] is None


def test_report_has_the_cluster_forward_model(quick_run):
    _, report, markdown, _ = quick_run
    shapes = {(r["dtype"], r["D"], r["H"]) for r in report["cluster_forward"]}
    assert shapes == set(itertools.product(QUICK["dtype"], QUICK["D"], QUICK["H"]))
    for r in report["cluster_forward"]:
        assert r["cluster"] > 0 and 0 < r["fraction_of_floor"] <= 1
    assert "### The cluster forward (sm_90): plan and model" in markdown
