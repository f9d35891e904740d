"""Tracking pieces (issue #34): synthetic sequences, crops, the head, the loop, the metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splice.data.synthetic.tracking import TrackingConfig, make_sequences
from splice.domains.tracking import (
    MLPHead,
    box_iou,
    crop,
    foreground_tokens,
    head_loss,
    precision,
    success_auc,
    track,
)
from splice.errors import SpliceError


def _digits(n: int = 12) -> np.ndarray:
    rng = np.random.default_rng(0)
    d = np.zeros((n, 28, 28), np.uint8)
    d[:, 6:22, 9:19] = rng.integers(120, 255, (n, 16, 10))  # a solid blob per "digit"
    return d


def test_sequences_are_seeded_and_boxes_hold_the_target():
    cfg = TrackingConfig(length=10, distractors=2, dark_prob=1.0)
    a = make_sequences(_digits(), 4, cfg, seed=3)
    b = make_sequences(_digits(), 4, cfg, seed=3)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    assert not np.array_equal(a.rgb, make_sequences(_digits(), 4, cfg, seed=4).rgb)
    assert a.rgb.shape == a.thermal.shape == (4, 10, 64, 64)
    x0, y0, x1, y1 = np.moveaxis(a.boxes, -1, 0)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 64).all() and (y1 <= 64).all()
    assert ((x1 - x0) >= 4).all() and ((y1 - y0) >= 4).all()
    assert a.dark.any(1).all() and a.dark.sum(1).max() == 8
    for i, t in zip(*np.nonzero(~a.dark), strict=True):
        bx = a.boxes[i, t].astype(int)
        inside = a.rgb[i, t, bx[1] : bx[3], bx[0] : bx[2]]
        assert inside.max() > 0.6  # the target is drawn at full intensity
        assert a.thermal[i, t, bx[1] : bx[3], bx[0] : bx[2]].max() > 0.5
    # dark frames: the visible frame loses its contrast, the thermal one does not
    assert a.rgb[a.dark].std() < a.rgb[~a.dark].std()
    assert abs(a.thermal[a.dark].mean() - a.thermal[~a.dark].mean()) < 0.05


def test_too_few_digits_fail():
    with pytest.raises(SpliceError, match="3 digit images for 4 distractors"):
        make_sequences(_digits(3), 1, TrackingConfig(distractors=4))


def test_crop_cuts_the_window_and_pads_with_zeros():
    frames = torch.arange(2 * 10 * 10, dtype=torch.float32).reshape(2, 10, 10) + 1
    out, corner = crop(frames, torch.tensor([[5.0, 5.0], [1.0, 2.0]]), 4)
    torch.testing.assert_close(out[0], frames[0, 3:7, 3:7])
    assert corner.tolist() == [[3.0, 3.0], [-1.0, 0.0]]
    assert (out[1, :, 0] == 0).all()
    torch.testing.assert_close(out[1, :, 1:], frames[1, 0:4, 0:3])


def test_foreground_tokens_mark_patches_whose_centre_is_in_the_box():
    fg = foreground_tokens(torch.tensor([[0.0, 0.0, 7.0, 3.0]]), 16, 4)
    grid = fg.reshape(4, 4)
    assert grid.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_metrics_against_hand_computed_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([1 / 3, 1.0]))
    # IoU 1/3 exceeds thresholds 0, .05, …, .30 (7 of 21); IoU 1 exceeds all but 1.0 (20)
    assert success_auc(a, b) == pytest.approx((7 / 21 + 20 / 21) / 2)
    assert precision(a, b, px=0.5) == 0.5 and precision(a, b, px=1.0) == 1.0


def test_head_loss_is_lowest_for_the_true_box_and_the_loop_tracks_with_an_oracle():
    head = MLPHead(8, 8, patch=4, search=32)
    scores, boxes = head(torch.randn(2, 64, 8))
    assert scores.shape == (2, 64) and boxes.shape == (2, 64, 4)
    assert (boxes[..., 2:] > boxes[..., :2]).all()
    truth = torch.tensor([[10.0, 10.0, 20.0, 22.0], [3.0, 4.0, 9.0, 8.0]])
    perfect_boxes = truth[:, None].repeat(1, 64, 1)
    perfect_scores = torch.full((2, 64), -20.0)
    perfect_scores[0, 4 * 8 + 3] = perfect_scores[1, 1 * 8 + 1] = 20.0
    assert head_loss(perfect_scores, perfect_boxes, truth, 4) < 1e-6
    assert head_loss(scores, boxes, truth, 4) > 1.0

    seqs = make_sequences(_digits(), 3, TrackingConfig(length=6, distractors=2), seed=1)
    truth = torch.from_numpy(seqs.boxes)
    frame = [1]

    def oracle(templates, searches, fg):  # the true box, in search-crop pixels
        n = len(searches[0])
        centre = (truth[:, frame[0] - 1, :2] + truth[:, frame[0] - 1, 2:]) / 2
        corner = torch.round(centre - 16)
        frame[0] += 1
        assert fg.shape == (n, 16) and fg.sum() > 0
        return truth[:, frame[0] - 1] - corner.repeat(1, 2)

    pred = track(oracle, [torch.from_numpy(seqs.rgb)], truth[:, 0], 16, 32, 4)
    torch.testing.assert_close(pred, truth)
    assert success_auc(pred, truth) == pytest.approx(20 / 21)
