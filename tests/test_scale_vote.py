"""The size check of the full pass: candidate sizes are segmented in full and the network's
confidence in their particles decides (segment._vote)."""

import math

import numpy as np
import pytest

from napari_sagegan.engine.analysis.metrics import evaluate_pair
from napari_sagegan.engine.infer import segment as segmod
from napari_sagegan.engine.infer.autoscale import LADDER
from napari_sagegan.engine.infer.scale import ScaleInfo
from napari_sagegan.engine.infer.segment import Segmenter
from napari_sagegan.util.progress import run_to_end


def _info(d):
    return ScaleInfo(d, "network", 32.0 / d, 0.0)


def test_the_ladders_answer_stays_unless_another_is_clearly_more_confident(monkeypatch):
    monkeypatch.setattr(segmod, "VOTE_MARGIN", 0.02)
    a, b, c = _info(20.0), _info(60.0), _info(150.0)
    # another pass 0.01 more confident: not enough, the first stays
    assert segmod._vote([(0.50, 0.0, a, "A"), (0.51, 0.0, b, "B")])[2] is a
    # two clearly more confident: the most confident of them
    chosen = segmod._vote([(0.50, 0.0, a, "A"), (0.60, 0.0, b, "B"), (0.75, 0.0, c, "C")])
    assert chosen[2] is c and chosen[3] == "C"
    # a first pass with no particle (0) loses to any pass with confident ones
    assert segmod._vote([(0.0, math.inf, a, "A"), (0.3, 0.0, b, "B")])[2] is b
    assert segmod._vote([(0.4, 0.0, a, "A")])[2] is a


def test_candidate_sizes_that_give_the_same_pass_are_tried_once():
    tries = [_info(20.0), _info(22.0), _info(60.0), _info(LADDER[0] / 2), _info(65.0)]
    out = segmod._distinct_sizes(tries)
    # 22 is within 1.25x of 20 and 65 of 60; a size under the ladder's smallest rung is noise
    assert [t.diameter for t in out] == [20.0, 60.0]
    assert segmod._mean_confidence(np.array([np.nan, 0.2, 0.4, np.nan])) == pytest.approx(0.3)
    assert segmod._mean_confidence(np.array([np.nan])) == 0.0


@pytest.fixture(scope="module")
def disc_seg(tmp_path_factory):
    from test_tasks import trained_checkpoint

    return Segmenter.load(trained_checkpoint(tmp_path_factory.mktemp("vote")), device="cpu")


def test_a_wrong_ladder_answer_loses_the_vote_to_the_right_size(disc_seg, monkeypatch):
    """The tiny disc segmenter (network scale 32 px) on discs 17 px across: when the ladder
    answers 3x too large with the right size as its next-best rung, the full passes find the
    network more confident at the right size, which is used; with the margin out of reach the
    ladder's answer stays."""
    from test_tasks import disc_scene

    image, truth = disc_scene()
    true_d = 17.0
    wrong = ScaleInfo(3 * true_d, "network", 32.0 / (3 * true_d), 0.3, (true_d,))

    def fake_search(self, ref, config, info, report):
        return wrong
        yield  # a generator, as the real search

    monkeypatch.setattr(Segmenter, "_search", fake_search)
    cfg = disc_seg.default_infer_config(scale_band=(1.0, 1.0), vote_stop=1.01)
    voted = run_to_end(disc_seg.segment(image, cfg))
    assert voted.scale.diameter == pytest.approx(true_d)
    # half as sure as the ladder was of its own answer
    assert voted.scale.confidence == pytest.approx(0.15)
    # the Estimate button answers the size segment() uses
    events = []
    est = run_to_end(disc_seg.estimate_scale(image, cfg), events.append)
    assert est.diameter == pytest.approx(true_d)
    assert events and events[-1].step == events[-1].total
    # a ladder at least as sure as vote_below is not checked: one pass at its answer
    sure = run_to_end(disc_seg.segment(image, cfg.replace(vote_below=0.3)))
    assert sure.scale.diameter == pytest.approx(3 * true_d)
    # a first pass whose particles the network is sure enough of stops the vote there
    stopped = run_to_end(disc_seg.segment(image, cfg.replace(vote_stop=0.0)))
    assert stopped.scale.diameter == pytest.approx(3 * true_d)
    first_conf = float(np.nanmean(stopped.confidence[1:]))
    on = run_to_end(disc_seg.segment(image, cfg.replace(vote_stop=first_conf + 1e-3)))
    assert on.scale.diameter == pytest.approx(true_d)
    monkeypatch.setattr(segmod, "VOTE_MARGIN", 10.0)  # no pass can beat the first
    kept = run_to_end(disc_seg.segment(image, cfg))
    assert kept.scale.diameter == pytest.approx(3 * true_d)
    # the particles of the pass used are the ones its confidence was measured on
    assert np.nanmean(voted.confidence[1:]) > np.nanmean(kept.confidence[1:])
    assert evaluate_pair(voted.labels, truth)["f1@0.5"] >= 0.8


def test_vote_below_must_be_a_confidence():
    from napari_sagegan.engine.config import InferConfig

    with pytest.raises(ValueError, match="vote_below"):
        InferConfig(vote_below=-0.1)
    with pytest.raises(ValueError, match="vote_below"):
        InferConfig(vote_below=float("nan"))
    with pytest.raises(ValueError, match="vote_stop"):
        InferConfig(vote_stop=-1.0)
    assert InferConfig().vote_below == 0.7


def test_the_running_vote_leads_as_the_vote_over_all_passes(monkeypatch):
    monkeypatch.setattr(segmod, "VOTE_MARGIN", 0.02)
    rng = np.random.default_rng(3)
    for _ in range(200):
        scores = list(rng.choice([0.0, 0.3, 0.31, 0.32, 0.5, 0.51, 0.7], size=rng.integers(1, 5)))
        passes = [(v, 0.0, _info(10.0 + 10 * i), i) for i, v in enumerate(scores)]
        lead = 0
        for i, v in enumerate(scores[1:], 1):
            if segmod._leads(v, scores[0], scores[lead] if lead else None):
                lead = i
        assert segmod._vote(passes)[3] == lead, scores


def _three_sizes_recorded(seg, monkeypatch) -> list:
    """The ladder answers 51 px with 17 (the discs' size: the winner, not the last pass)
    and 36 px next; returns the list of ``(diameter, tta)`` of every full pass to come."""
    wrong = ScaleInfo(51.0, "network", 32.0 / 51.0, 0.3, (17.0, 36.0))

    def fake_search(self, ref, config, info, report):
        return wrong
        yield

    monkeypatch.setattr(Segmenter, "_search", fake_search)
    passes = []
    plane = seg._plane

    def counted(p, config, info, *a, **k):
        passes.append((info.diameter, config.tta))
        return plane(p, config, info, *a, **k)

    monkeypatch.setattr(seg, "_plane", counted)
    return passes


def test_a_large_image_keeps_one_pass_and_segments_the_winner_again(disc_seg, monkeypatch):
    """Above _VOTE_KEEP_PIXELS the vote keeps no pass but the running one: when the winner
    is not the last size tried, its pass is run again, to the same labels."""
    from test_tasks import disc_scene

    image, _ = disc_scene()
    passes = _three_sizes_recorded(disc_seg, monkeypatch)
    cfg = disc_seg.default_infer_config(scale_band=(1.0, 1.0), vote_stop=1.01)
    kept = run_to_end(disc_seg.segment(image, cfg))
    assert kept.scale.diameter == pytest.approx(17.0)
    assert [d for d, _t in passes] == [51.0, 17.0, 36.0]
    passes.clear()
    monkeypatch.setattr(segmod, "_VOTE_KEEP_PIXELS", 0)
    events = []
    again = run_to_end(disc_seg.segment(image, cfg), events.append)
    assert [d for d, _t in passes] == [51.0, 17.0, 36.0, 17.0]
    np.testing.assert_array_equal(again.labels, kept.labels)
    assert events[-1].step == events[-1].total
    # the Estimate button wants the size alone: no pass again
    passes.clear()
    est = run_to_end(disc_seg.estimate_scale(image, cfg))
    assert est.diameter == pytest.approx(17.0)
    assert [d for d, _t in passes] == [51.0, 17.0, 36.0]


def test_with_test_time_views_single_passes_vote_and_the_winner_gets_the_views(
    disc_seg, monkeypatch
):
    """``tta > 1``: the candidate sizes vote by single passes (the confidences the vote was
    tuned on), then the winning size is segmented with the views; with nothing to vote on,
    one pass with the views."""
    from test_tasks import disc_scene

    image, _ = disc_scene()
    passes = _three_sizes_recorded(disc_seg, monkeypatch)
    cfg = disc_seg.default_infer_config(scale_band=(1.0, 1.0), vote_stop=1.01)
    plain = run_to_end(disc_seg.segment(image, cfg))
    assert plain.scale.diameter == pytest.approx(17.0)
    passes.clear()
    views = run_to_end(disc_seg.segment(image, cfg.replace(tta=4)))
    assert passes == [(51.0, 1), (17.0, 1), (36.0, 1), (17.0, 4)]
    assert views.scale.diameter == pytest.approx(17.0)
    # the same labels as the views at that size given
    given = run_to_end(disc_seg.segment(image, cfg.replace(tta=4, diameter=17.0)))
    np.testing.assert_array_equal(views.labels, given.labels)
    # the Estimate button votes as segment() does, by single passes
    passes.clear()
    est = run_to_end(disc_seg.estimate_scale(image, cfg.replace(tta=4)))
    assert est.diameter == pytest.approx(17.0) and {t for _d, t in passes} == {1}
    # a ladder sure enough: nothing to vote on, one pass, with the views
    passes.clear()
    run_to_end(disc_seg.segment(image, cfg.replace(tta=4, vote_below=0.3)))
    assert passes == [(51.0, 4)]
