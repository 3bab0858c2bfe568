from pathlib import Path

from lora_core.config import describe_fields

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_readme_documents_every_recipe_key():
    missing = [k for k, _, _ in describe_fields() if f"`{k}`" not in README]
    assert not missing, "regenerate the table with `lora-flow show-config --markdown`"


def test_readme_gives_the_two_commands_and_ci_runs_the_same_tests():
    assert "make run" in README and "make test" in README
    assert "make test" in (REPO / ".ci" / "run").read_text()
