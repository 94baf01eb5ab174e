"""``python -m fusedadapters.build``: build the native backend ahead of time into its cache.

The library lands in ``fusedadapters.ops.native.cache_dir()`` (``$FUSEDADAPTERS_CACHE/native/<key>``,
default ``~/.cache/fusedadapters/native/<key>``), where the native backend finds it later without a
compiler. Building again when nothing changed is a quick no-op.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from .ops import native


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedadapters.build", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    print(f"building the native backend into {native.cache_dir()} ...", flush=True)
    start = time.perf_counter()
    try:
        library = native.build(verbose=args.verbose)
    except native.NativeBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"built {library} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
