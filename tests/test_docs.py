"""The documentation a user gets with a clone points only at things the clone holds."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"


def tracked_text_files() -> dict[Path, str]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    texts = {}
    for name in names.splitlines():
        path = ROOT / name
        text_like = path.suffix in {".py", ".md", ".proto", ".pyi", ".js", ".json", ".sh", ".toml"}
        if (text_like or name == ".ci/run") and path.is_file():
            texts[path] = path.read_text(errors="replace")
    return texts


def design_rules() -> set[int]:
    return {int(n) for n in re.findall(r"^(\d+)\. ", DESIGN.read_text(), re.MULTILINE)}


def test_nothing_points_outside_the_repository() -> None:
    """No tracked file sends a reader to the team's shared folder, which a clone lacks."""
    offenders = [
        str(path.relative_to(ROOT))
        for path, text in tracked_text_files().items()
        if path != Path(__file__) and re.search(r"\.\./shared|shared folder|DESIGN\.md", text)
    ]
    assert offenders == []


def test_every_cited_design_rule_exists() -> None:
    """Each "rule N" cited beside docs/design.md is a numbered rule there (numbers are stable)."""
    rules = design_rules()
    assert set(range(1, 12)) <= rules
    citation = re.compile(r"rule (\d+) of docs/design\.md|docs/design\.md rule (\d+)")
    cited = {
        (str(path.relative_to(ROOT)), int(m.group(1) or m.group(2)))
        for path, text in tracked_text_files().items()
        for m in citation.finditer(text)
    }
    assert cited, "nothing cites docs/design.md by rule number"
    assert [c for c in cited if c[1] not in rules] == []


def test_readme_links_resolve() -> None:
    """Every relative link and #anchor in the README reaches a file or heading that exists."""
    readme = (ROOT / "README.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", readme, re.MULTILINE)
    }
    broken = []
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            if target[1:] not in headings:
                broken.append(target)
        elif not (ROOT / target).exists():
            broken.append(target)
    assert broken == []


def test_participant_proto_states_every_rule_it_cites() -> None:
    """participant.proto defines each rule R1..R10 it refers to."""
    proto = (ROOT / "protos" / "twopc" / "v1" / "participant.proto").read_text()
    defined = {int(n) for n in re.findall(r"^//   R(\d+) ", proto, re.MULTILINE)}
    cited = {int(n) for n in re.findall(r"\bR(\d+)\b", proto)}
    assert defined == set(range(1, 11))
    assert cited <= defined


SRC = ROOT / "src" / "twopc"
# Each part of twopc, by floor: an import may only point to a lower floor (or within its
# own part). The roles use what is below them; ops sits above the roles; dev (test
# tooling) is imported by nothing in the library. docs/design.md ("Layout") draws this.
FLOORS = {
    "errors": 0,
    "types": 0,
    "faults": 0,
    "v1": 0,
    "security": 1,
    "config": 2,
    "rpc": 3,
    "observe": 3,
    "stores": 3,
    "decisions": 4,
    "participant": 5,
    "coordinator": 5,
    "ops": 6,
    "dev": 6,
}


def library_modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "v1" not in p.relative_to(SRC).parts)


def part(module: str) -> str:
    """`twopc.participant.helper` -> "participant"; `twopc.errors` -> "errors"."""
    return module.split(".")[1]


def test_design_names_every_module() -> None:
    """docs/design.md's layout names every module of src/twopc (a new one must be placed)."""
    design = DESIGN.read_text()
    missing = [
        str(p.relative_to(ROOT))
        for p in library_modules()
        if p.name != "__init__.py" or p.parent == SRC
        if str(p.relative_to(ROOT)) not in design
    ]
    assert missing == []


def test_imports_point_down() -> None:
    """No module imports a part of twopc on its own floor or above it (no circle, and dev
    and ops stay out of the protocol's imports)."""
    import ast

    upward = []
    for path in library_modules():
        rel = path.relative_to(SRC)
        here = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"
        if here == "__init__":
            continue  # the public names re-export from every part
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                if not name.startswith("twopc.") or part(name) == here:
                    continue
                if FLOORS[part(name)] >= FLOORS[here]:
                    upward.append(f"{rel}: {name}")
    assert upward == []


def test_every_doc_link_resolves() -> None:
    """Every relative link and #anchor in the README and in docs/*.md reaches a file or a
    heading that exists."""

    def anchors(text: str) -> set[str]:
        found = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
        return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in found}

    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text())):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_readme_is_a_front_page() -> None:
    """The README fits a front page (about 500 lines) and carries no measurement table:
    those live in docs/performance.md."""
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 500
    assert "txn/s" not in readme


def test_the_wheel_holds_only_twopc(tmp_path: Path) -> None:
    """`pip install .` installs the library alone: no top-level `services`, `tests` or
    `bench` package that would clash with an application's own."""
    import sys
    import zipfile

    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*build, str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("twopc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"twopc"}
    assert "twopc/py.typed" in names and "twopc/dev/pgserver.py" in names
