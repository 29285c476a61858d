"""The demo's corpora: shipped inside installed packages, real labels, deterministic split."""

from __future__ import annotations

import pytest

from bca.demo.data import DataUnavailableError, load_dataset, package_dir


def test_tweets_split_deterministic_and_disjoint() -> None:
    try:
        a = load_dataset("tweets")
    except DataUnavailableError as exc:
        pytest.skip(str(exc))
    b = load_dataset("tweets")
    assert a.train_texts == b.train_texts and a.test_labels == b.test_labels
    assert not set(a.train_texts) & set(a.test_texts)
    assert a.labels == ["negative", "neutral", "positive"]
    assert len(a.train_texts) > 20000 and len(a.test_texts) > 5000
    assert {0, 1, 2} == set(a.train_labels) == set(a.test_labels)
    frac = len(a.test_texts) / (len(a.train_texts) + len(a.test_texts))
    assert 0.17 < frac < 0.23
    assert 0.45 < a.majority_accuracy() < 0.55


def test_subset_is_seeded() -> None:
    try:
        d = load_dataset("tweets")
    except DataUnavailableError as exc:
        pytest.skip(str(exc))
    s1, s2, s3 = d.subset(50, 20, 0), d.subset(50, 20, 0), d.subset(50, 20, 1)
    assert s1.train_texts == s2.train_texts and s1.train_texts != s3.train_texts
    assert len(s1.train_texts) == 50 and len(s1.test_texts) == 20


def test_bbc_news() -> None:
    try:
        d = load_dataset("bbc-news")
    except DataUnavailableError as exc:
        pytest.skip(str(exc))
    assert d.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(d.train_texts) + len(d.test_texts) > 2000
    assert not set(d.train_texts) & set(d.test_texts)


def test_unknown_dataset_and_package() -> None:
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imdb")
    with pytest.raises(DataUnavailableError, match="not installed"):
        package_dir("no_such_package_bca_xyz")
