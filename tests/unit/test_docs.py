"""The repository carries what it cites: every ``*.md`` path that the code, the tests, the scripts, the
Makefile, the README or the docs name exists, and so does the section its ``#anchor`` names."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [*ROOT.joinpath("rlhf_ds").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py"),
           *ROOT.joinpath("scripts").glob("*"), ROOT / "Makefile", ROOT / "README.md", *ROOT.joinpath("docs").glob("*.md")]
CITATION = re.compile(r"(?<![\w/.-])((?:\.\./)?(?:[\w-]+/)*[\w-]+\.md)(#[\w-]+)?")


def slug(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lstrip("#").strip().replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line) for line in path.read_text().splitlines() if line.startswith("#")}


def citations(path: Path) -> list[tuple[int, str, str]]:
    """(line, cited file, anchor or '') of every Markdown path in ``path``."""
    out = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        out += [(number, m.group(1), (m.group(2) or "")[1:]) for m in CITATION.finditer(line)]
    return out


def resolve(cited: str, where: Path) -> Path:
    """A path in a doc is relative to the doc (Markdown links), elsewhere to the repository root."""
    if where.parent == ROOT / "docs" and not cited.startswith("docs/"):
        return where.parent / cited
    return ROOT / cited


def problems(path: Path) -> list[str]:
    """A line for each citation in ``path`` of a file or section that is not in the repository."""
    out = []
    for line, cited, anchor in citations(path):
        target, where = resolve(cited, path), f"{path.name}:{line}"
        if cited.startswith("../") or "shared/" in cited:
            out.append(f"{where}: {cited} is outside the repository")
        elif not target.is_file():
            out.append(f"{where}: {cited} does not exist")
        elif anchor and anchor not in anchors(target):
            out.append(f"{where}: {cited} has no section #{anchor}")
    return out


def test_every_cited_doc_and_section_exists():
    here = Path(__file__).resolve()   # this file plants bad citations on purpose
    missing = [problem for path in SOURCES if path.is_file() and path.resolve() != here for problem in problems(path)]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("text,problem", [
    ("see DESIGN.md for why", "does not exist"),
    ("see docs/design.md#no-such-section", "has no section"),
    ("see docs/design.md#the-loss-and-gradient-contract", None),
    ("see ../shared/peers.md", "outside the repository"),
])
def test_the_check_finds_a_missing_doc_or_section(tmp_path, text, problem):
    """The negative control: a planted citation of a missing file or section is reported."""
    planted = tmp_path / "planted.py"
    planted.write_text(f"# {text}\n")
    found = problems(planted)
    assert (found == []) if problem is None else (len(found) == 1 and problem in found[0])


def test_headings_become_the_anchors_renderers_make():
    assert slug("### Sum semantics: no accumulation averaging, loss times dp") == \
        "sum-semantics-no-accumulation-averaging-loss-times-dp"
    assert slug("## `make check-gpu`") == "make-check-gpu"
    assert slug("### SFT, reward model, PPO on it") == "sft-reward-model-ppo-on-it"
