"""README.md and docs/: the two commands, the generated recipe reference, links that resolve."""

import re
from pathlib import Path

from flows.cli import main
from lora_core.config import describe_fields

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
REFERENCE = REPO / "docs" / "recipes.md"
BEGIN, END = "<!-- generated: lora-flow show-config --markdown -->", "<!-- end generated -->"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_recipe_reference_is_the_generated_table(capsys):
    assert main(["show-config", "--markdown"]) == 0
    generated = capsys.readouterr().out.strip()
    missing = [k for k, _, _ in describe_fields() if f"| `{k}` |" not in generated]
    assert not missing, f"show-config --markdown leaves out {missing}"
    pasted = REFERENCE.read_text().split(BEGIN)[1].split(END)[0].strip()
    assert pasted == generated, (
        "docs/recipes.md is stale: paste the output of `lora-flow show-config --markdown` between its markers"
    )


def test_readme_gives_the_two_commands_and_ci_runs_the_same_tests():
    text = README.read_text()
    assert "make run" in text and "make test" in text
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert len(text.splitlines()) <= 300, "README.md is the front page: move long chapters into docs/"


def test_readme_links_every_docs_page_and_each_page_states_its_purpose():
    text = README.read_text()
    assert DOCS, "docs/ holds no page"
    for page in DOCS:
        assert f"](docs/{page.name})" in text, f"README.md does not link docs/{page.name}"
        lines = [line for line in page.read_text().splitlines() if line.strip()]
        assert lines[0].startswith("# ") and lines[1].startswith("Purpose: "), (
            f"docs/{page.name} must open with a title and a one-line 'Purpose: ...'"
        )


def test_every_relative_link_resolves_to_a_file_and_heading():
    broken = []
    for doc in [README, *DOCS]:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.is_file():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and anchor not in {
                _slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
            }:
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
