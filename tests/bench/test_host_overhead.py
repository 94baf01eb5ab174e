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
    before = os.environ.get("TRITON_INTERPRET")
    out = tmp_path / "host.json"
    assert host.main(["--n", "5", "--d", "40", "--h", "8", "--calls", "20", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["forward_us"] > 0 and record["forward_backward_us"] > record["forward_us"]
    assert record["package"].endswith("fusedadapters") and record["environment"]["command"]
    assert f"forward {record['forward_us']:.1f} us" in capsys.readouterr().out
    assert not launched  # the script put its own no-op launcher in place, and restored ours
    assert host.kernels._run is recorder and os.environ.get("TRITON_INTERPRET") == before
