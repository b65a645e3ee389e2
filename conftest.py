"""Every Python block of README.md and docs/ runs as a test (Sybil): the blocks of one page run in
order in one namespace, as a reader pasting them into one Python session would run them, from a
temporary working directory (whatever they write lands there)."""

from __future__ import annotations

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser


@pytest.fixture
def _docs_workdir(tmp_path, monkeypatch):
    """Run a page's blocks in a fresh temporary directory, with one torch thread."""
    import torch

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser()],
    patterns=["README.md", "docs/*.md", "docs/**/*.md"],
    fixtures=["_docs_workdir"],
).pytest()
