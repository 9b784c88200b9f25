"""notes/week1_answers.md stays true to the code: quoted lines, cited tests, figures."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT / "notes" / "week1_answers.md"
TEXT = NOTES.read_text()

# `quoted code` ([file.py#L12](../proximal/file.py#L12))  or  ...#L12-L14
CODE_CITATION = re.compile(r"`([^`]+)` \(\[[^\]]+\]\(\.\./(proximal/[\w/]+\.py)#L(\d+)(?:-L(\d+))?\)\)")
TEST_CITATION = re.compile(r"tests/(test_\w+\.py)::(test_\w+)")
FIGURE = re.compile(r"!\[[^\]]*\]\((figures/[\w.]+)\)")


def test_every_quoted_line_of_code_is_on_the_line_cited():
    citations = CODE_CITATION.findall(TEXT)
    assert len(citations) >= 10
    for code, path, first, last in citations:
        lines = (ROOT / path).read_text().splitlines()[int(first) - 1:int(last or first)]
        assert any(code in line for line in lines), f"{path}#L{first}: {code!r} not there"


def test_every_cited_test_exists():
    citations = set(TEST_CITATION.findall(TEXT))
    assert len(citations) >= 15
    for module, name in citations:
        assert re.search(rf"^def {name}\(", (ROOT / "tests" / module).read_text(), re.MULTILINE), f"{module}::{name}"


def test_every_figure_is_in_the_repo_and_has_its_command():
    figures = FIGURE.findall(TEXT)
    assert {"figures/clip_objective.png", "figures/critic_ablation.png", "figures/sparse_reward.png"} <= set(figures)
    for figure in figures:
        assert (NOTES.parent / figure).is_file(), figure
        assert f"python notes/make_figures.py {figure.split('/')[1].split('_')[0]}" in TEXT


def test_no_placeholder_is_left():
    assert not re.search(r"\b[A-Z]+_RESULTS\b", TEXT)
