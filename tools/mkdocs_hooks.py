"""mkdocs hooks: the README is the site's home page (its links into docs/ made relative to the
site), so the front page and the repository's README are one text."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_files(files, config):
    text = (ROOT / "README.md").read_text()
    text = re.sub(r"\]\(docs/", "](", text)  # README links docs/x.md; on the site that is x.md
    text = re.sub(r"`\.\./shared/PAPERS\.md`", "`PAPERS.md` (beside the repository)", text)
    files.append(File.generated(config, "index.md", content=text))
    return files
