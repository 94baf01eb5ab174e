"""Every reference to the design document resolves inside the repository."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".pytest_cache"}
# The team's notes and seed files outside the repository (spelled so that this file does not match itself).
OUTSIDE = re.compile("DESIGN" + r"\.md|(?<![\w.])" + "seed" + "/|" + r"\.\./" + "shared")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".h", ".cpp", ".cu", ".cfg", ".sh"}


def _repo_text_files():
    """The repository's text files: the tracked ones when git can say, else every file under the root."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        paths = [ROOT / line for line in listed.stdout.splitlines()] if listed.returncode == 0 else None
    except OSError:
        paths = None
    if not paths:
        paths = [p for p in ROOT.rglob("*") if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]
    for path in paths:
        if path.suffix in TEXT_SUFFIXES and path.is_file():
            yield path


def test_design_document_has_the_sections_the_issue_asks_for():
    headings = re.findall(r"^#+ (.+)$", DESIGN.read_text(), flags=re.M)
    for title in ("Architecture and layering", "The kernel math", "Folding the LayerNorm into the down-projection",
                  "Backward", "Numerics policy", "Testing without a GPU", "Benchmark method", "Floors and targets"):
        assert title in headings


def test_cited_sections_exist():
    headings = set(re.findall(r"^#+ (.+)$", DESIGN.read_text(), flags=re.M))
    cited = {}
    for path in _repo_text_files():
        text = path.read_text(errors="replace")
        for title in re.findall(r"docs/design\.md[,:]?\s*\(?\s*[\"']([^\"'\n]+)[\"']", text):
            cited.setdefault(title, path.relative_to(ROOT))
    assert cited, "no file cites a section of docs/design.md"
    missing = {title: str(where) for title, where in cited.items() if title not in headings}
    assert not missing, f"cited sections that docs/design.md does not have: {missing}"


def test_no_reference_points_outside_the_repository():
    offenders = []
    for path in _repo_text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert not offenders, "\n".join(offenders)
