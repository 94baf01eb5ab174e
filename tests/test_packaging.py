"""Packaging metadata: the license text matches the declared license, the typing marker ships, the console script runs."""

import subprocess
import sys
import tomllib
from pathlib import Path

import fusedadapters
from fusedadapters import demo

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def test_license_file_is_the_declared_license():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_py_typed_marker_ships_as_package_data():
    assert (Path(fusedadapters.__file__).parent / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["fusedadapters"]


def test_classifiers_match_requires_python():
    assert PROJECT["requires-python"] == ">=3.11" and sys.version_info >= (3, 11)
    versions = [c.rsplit(":: ", 1)[1] for c in PROJECT["classifiers"] if c.startswith("Programming Language :: Python :: 3.")]
    assert versions and all(tuple(map(int, v.split("."))) >= (3, 11) for v in versions)
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert PROJECT["urls"]


def test_console_script_is_the_main_job_and_named_in_the_readme():
    (name, target), = PROJECT["scripts"].items()
    assert target == "fusedadapters.demo:main" and demo.main is fusedadapters.demo.main
    assert f"`{name}`" in (ROOT / "README.md").read_text()


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-c", "import sys; from fusedadapters.demo import main; sys.exit(main())",
                             "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--seed SEED" in result.stdout and "--out DIR" in result.stdout
