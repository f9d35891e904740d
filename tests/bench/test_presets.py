"""The bench's method presets: a preset that changes nothing would repeat another row."""

from __future__ import annotations

import torch

from splice.bench.merging import MergeSpec, merge_specs, merge_state


def _models(n: int = 3) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 50, generator=g)}
    return base, [{"w": base["w"] + torch.randn(40, 50, generator=g)} for _ in range(n)]


def test_breadcrumbs_preset_drops_both_tails_unlike_its_defaults():
    base, models = _models()
    spec = merge_specs(["breadcrumbs"], ())[0]
    assert spec.key == "breadcrumbs@density=0.9@gamma=0.01"
    ta, _ = merge_state(MergeSpec("task_arithmetic"), base, models)
    defaults, _ = merge_state(MergeSpec("breadcrumbs"), base, models)
    torch.testing.assert_close(defaults["w"], ta["w"])  # density 1: every entry kept
    preset, _ = merge_state(spec, base, models)
    # each task vector loses 10 % of its entries (the 1 % largest among them): the sum moves
    changed = (preset["w"] != ta["w"]).float().mean().item()
    assert 0.2 < changed < 0.4  # 1 − 0.9³ ≈ 0.27 of the entries lose at least one term
