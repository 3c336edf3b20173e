"""The README's code blocks run as written: Python blocks against a trained home; shell blocks
name only make targets the Makefile has and environment variables the project reads."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
README = CHECKOUT / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_every_python_block_of_the_readme_runs(trained_pipeline, monkeypatch):
    blocks = _blocks("python")
    assert blocks, "the README has Python examples"
    monkeypatch.setenv("COMIC_PIPELINE_HOME", str(trained_pipeline.home))
    for block in blocks:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own code
        assert "Traceback" not in printed.getvalue()


def test_shell_blocks_name_real_make_targets_and_variables():
    makefile = (CHECKOUT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    sources = makefile + "".join(p.read_text() for p in (CHECKOUT / "comic_pipeline").rglob("*.py"))
    for block in _blocks("bash"):
        for target in re.findall(r"^make ([a-z-]+)", block, flags=re.M):
            assert target in targets, f"README: make {target} is not a Makefile target"
        for variable in re.findall(r"^make [a-z-]+ ([A-Z_]+)=", block, flags=re.M):
            assert f"{variable} ?=" in makefile, f"README: make ... {variable}= is not a Makefile variable"
        for variable in re.findall(r"^export ([A-Z_]+)=", block, flags=re.M):
            assert variable in sources, f"README: {variable} is read nowhere"
