"""The EMPS splits the benchmarks and the campaign rely on: the few-shot episodes' articles
are whole articles outside the leave-source-out validation, and a few-shot base campaign
(``scripts/campaign.py --exclude-fewshot``) trains on none of their images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import emps  # noqa: E402

pytestmark = pytest.mark.skipif(not emps.available(), reason="../shared/data/emps-train absent")


def test_fewshot_articles_are_whole_articles_outside_the_validation():
    articles = emps.fewshot_articles(10)
    assert len(articles) == 10
    assert articles == sorted(articles)
    doi = emps.articles()
    val = emps.lso_validation_ids()
    for article in articles:
        stems = [s for s, d in doi.items() if d == article]
        assert len(stems) >= 3
        assert not set(stems) & val
    # the first n are a prefix of the first n + 2: --articles 10 and --exclude-fewshot 10 agree
    assert emps.fewshot_articles(12)[:10] == articles


def test_campaign_exclusion_drops_every_image_of_the_articles(monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import campaign

    articles = tuple(emps.fewshot_articles(2))
    doi = emps.articles()
    n_excluded = sum(1 for d in doi.values() if d in articles)

    seen = {}

    def fake_selection(train):
        seen["stems"] = [s for s, _i, _l in train]
        return [], []

    # the recipe's EMPS part only: no generated pairs, and the selection split intercepted
    monkeypatch.setattr(campaign, "split_selection", fake_selection)
    monkeypatch.setattr(emps, "load_lso", lambda: ([(s, None, None) for s in doi], []))
    campaign.recipe(0, n_generated=0, exclude=articles)
    assert len(seen["stems"]) == len(doi) - n_excluded
    assert not {doi[s] for s in seen["stems"]} & set(articles)


def test_a_fewshot_base_never_starts_from_a_model_that_saw_the_articles(tmp_path, monkeypatch):
    import argparse

    sys.path.insert(0, str(ROOT / "scripts"))
    import campaign

    from napari_sagegan.engine.checkpoint import Checkpoint
    from napari_sagegan.engine.config import ArchConfig
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet

    excluded = tuple(emps.fewshot_articles(3))
    weights = tmp_path / "segmenter.pt"
    monkeypatch.setattr(campaign, "WEIGHTS", weights)

    def args(init):
        return argparse.Namespace(init=init, excluded=excluded, exclude_fewshot=3)

    assert campaign._seen_excluded(args("default")) == "the bundled model"
    assert campaign._seen_excluded(args("scratch")) == ""
    arch = ArchConfig(base_channels=4, depth=2)
    for recorded, refused in ((excluded[:2], True), (excluded, False)):
        Checkpoint.from_model(
            AttentionUNet(arch), arch=arch, extra={"excluded_articles": list(recorded)}
        ).save(weights)
        assert (campaign._seen_excluded(args("scratch")) == str(weights)) is refused
