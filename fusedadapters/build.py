"""``python -m fusedadapters.build``: build the native backend ahead of time into its cache.

The library lands in ``fusedadapters.ops.native.cache_dir()`` (``$FUSEDADAPTERS_CACHE/native/<key>``,
default ``~/.cache/fusedadapters/native/<key>``), where the native backend finds it later without a
compiler. Building again when nothing changed is a quick no-op.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Optional, Sequence

from .ops import native


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedadapters.build", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    parser.add_argument("--json", metavar="PATH", help="also write what was built and how long it took to PATH")
    args = parser.parse_args(argv)
    print(f"building the native backend into {native.cache_dir()} ...", flush=True)
    start = time.perf_counter()
    try:
        library = native.build(verbose=args.verbose)
    except native.NativeBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print(f"built {library} in {seconds:.1f} s", flush=True)
    if args.json:
        import torch

        record = {
            "library": str(library), "seconds": round(seconds, 2), "cflags": native.cflags(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_kernels": native.with_cuda(),
            "cuda_archs": native.cuda_arch_tag() if native.with_cuda() else None,
            "sources": [p.name for p in native.sources()], "machine": platform.machine(),
            "processor": _processor_name(), "command": "python -m fusedadapters.build " + " ".join(argv or sys.argv[1:]),
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
