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
