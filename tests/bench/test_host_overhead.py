"""bench/host_overhead.py runs on the CPU, launches nothing, and writes what it printed."""

import json
import os
from pathlib import Path

from helpers import load_script

REPO = Path(__file__).resolve().parents[2]
host = load_script(REPO / "bench" / "host_overhead.py", "host_overhead")


def test_host_overhead_measures_without_launching(tmp_path, monkeypatch, capsys):
    launched = []

    def recorder(launches, limits):
        launched.append(launches)

    monkeypatch.setattr(host.kernels, "_run", recorder)
    monkeypatch.setattr(host.routed_kernels, "_run", recorder)
    before = os.environ.get("TRITON_INTERPRET")
    out = tmp_path / "host.json"
    assert host.main(["--n", "5", "--d", "40", "--h", "8", "--calls", "20", "--chain", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["forward_us"] > 0 and record["forward_backward_us"] > record["forward_us"]
    for way in ("fused", "loop"):
        assert record[f"chain2_{way}_forward_backward_us"] > record[f"chain2_{way}_forward_us"] > 0
    assert record["package"].endswith("fusedadapters") and record["environment"]["command"]
    printed = capsys.readouterr().out
    assert f"forward: {record['forward_us']:.1f} us" in printed
    assert f"chain2_fused_forward: {record['chain2_fused_forward_us']:.1f} us" in printed
    assert not launched  # the script put its own no-op launchers in place, and restored ours
    assert host.kernels._run is recorder and host.routed_kernels._run is recorder
    assert os.environ.get("TRITON_INTERPRET") == before
