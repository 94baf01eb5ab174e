"""Only fusedadapters.nemo imports NeMo; without NeMo it says what to install; with NeMo, importing it
changes exactly NeMo's two _target_ allowlists and nothing else in NeMo.

Each check runs in a fresh interpreter, so that what is imported (and what NeMo holds) is known.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_nemo_the_package_imports_and_fusedadapters_nemo_says_what_to_install():
    report = run_python(
        """
        import importlib, json, pkgutil, sys
        sys.modules["nemo"] = None  # NeMo absent (or blocked where it is installed)
        import fusedadapters
        names = sorted(m.name for m in pkgutil.walk_packages(fusedadapters.__path__, "fusedadapters.")
                       if m.name not in ("fusedadapters.nemo", "fusedadapters.__main__"))
        for name in names:
            importlib.import_module(name)
        try:
            import fusedadapters.nemo
            error = None
        except ImportError as exc:
            error = str(exc)
        print(json.dumps({"imported": names, "error": error}))
        """
    )
    assert "fusedadapters.adapter_modules" in report["imported"] and "fusedadapters.ops.linear_adapter" in report["imported"]
    assert report["error"] is not None and 'pip install "fusedadapters[nemo]"' in report["error"]


def nemo_installed() -> bool:
    """Whether nemo-toolkit imports; a bare ``find_spec("nemo")`` also finds this tests/nemo folder."""
    try:
        return importlib.util.find_spec("nemo.core") is not None
    except ImportError:
        return False


@pytest.mark.skipif(not nemo_installed(), reason='needs nemo-toolkit: pip install -e ".[test,nemo]"')
def test_importing_changes_only_nemos_target_allowlists():
    report = run_python(
        """
        import inspect, json, sys
        import nemo.collections.common.parts.adapter_modules, nemo.core.classes.common
        import nemo.core.classes.mixins.adapter_mixins
        from nemo.core.classes.common import UnsafeTargetError, safe_instantiate

        def snapshot():
            # Every attribute of every NeMo module and NeMo class, by identity; containers by content too.
            state = {}
            for module_name, module in list(sys.modules.items()):
                if module is None or not module_name.startswith("nemo"):
                    continue
                for attr, value in list(vars(module).items()):
                    state[(module_name, attr)] = (id(value), repr(value) if isinstance(value, (list, set, dict)) else None)
                    if inspect.isclass(value) and value.__module__ == module_name:
                        for key, member in list(vars(value).items()):
                            state[(module_name, attr, key)] = id(member)
            return state

        cfg = {"_target_": "fusedadapters.nemo.FusedLinearAdapter", "in_features": 8, "dim": 2}
        try:
            safe_instantiate(cfg)
            refused_before = False
        except UnsafeTargetError:
            refused_before = True
        before = snapshot()
        import fusedadapters.nemo
        after = snapshot()
        nemo_modules_before = {key[0] for key in before}
        keys = set(before) | {key for key in after if key[0] in nemo_modules_before}
        changed = sorted(".".join(key) for key in keys if after.get(key) != before.get(key))
        common = nemo.core.classes.common
        built = type(safe_instantiate(cfg)).__name__
        print(json.dumps({
            "refused_before": refused_before,
            "changed": changed,
            "tails": [common.ALLOWED_TARGET_PREFIXES[-1], common.ALLOWED_ADAPTER_STRATEGY_PREFIXES[-1]],
            "built": built,
        }))
        """
    )
    assert report["refused_before"]  # stock NeMo refuses the package's classes
    assert report["changed"] == [
        "nemo.core.classes.common.ALLOWED_ADAPTER_STRATEGY_PREFIXES",
        "nemo.core.classes.common.ALLOWED_TARGET_PREFIXES",
    ]
    assert report["tails"] == ["fusedadapters.", "fusedadapters."]
    assert report["built"] == "FusedLinearAdapter"
