"""The README's option table is generated from the option list; they must not drift."""

from pathlib import Path

from amqproxy.config import options_markdown


def test_readme_holds_the_generated_option_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert options_markdown() in readme, "regenerate with: python -m amqproxy.config --write-docs"
