"""AutoPEFT (spec §15, §22.2 P12): configuration ↔ vector, the paper's size and share rules,
the Pareto front, a search that finds a known front, resuming and a foreign study dir."""

from __future__ import annotations

import itertools
import json

import pytest

from splice.errors import SpliceError
from splice.select import autopeft as ap


def test_sappa_config_round_trips_and_sizes_follow_the_paper():
    space = ap.sappa(n_layers=12, d=768)
    config = {d.name: (i * 7) % (d.high + 1) for i, d in enumerate(space.dims)}
    vector = space.encode(config)
    assert len(vector) == 3 + 12 and space.decode(vector) == config
    sizes = [ap.size_from_log2(k, 768) for k in range(11)]
    assert sizes == [768, 384, 192, 96, 48, 24, 12, 6, 3, 1, 0]
    with pytest.raises(SpliceError, match=r"log2_reduction_serial=11 is outside 0\.\.10"):
        space.encode(config | {"log2_reduction_serial": 11})
    with pytest.raises(SpliceError, match="keys differ"):
        space.encode({"log2_reduction_serial": 1})


def test_sappa_share_counts_active_layers_only():
    space = ap.sappa(n_layers=4, d=64)
    config = {"log2_reduction_serial": 3, "log2_reduction_parallel": 7, "log2_reduction_prefix": 2}
    config |= {"leave_out_0": 1, "leave_out_1": 0, "leave_out_2": 0, "leave_out_3": 1}
    # serial 8, parallel 0 (2^7 > 64), prefix 16; 2 active layers × 2d × 24
    assert ap.sappa_share(space, config, total=100_000) == pytest.approx(100 * 2 * 128 * 24 / 1e5)


def test_lora_space_holds_the_hand_configurations():
    space = ap.lora_space(6, {"qv": ["query", "value"], "rest": ["key", "dense"]})
    qv8 = {"log2_rank": 3, "use_qv": 1, "use_rest": 0} | {f"leave_out_{i}": 0 for i in range(6)}
    assert space.decode(space.encode(qv8)) == qv8


def toy_space():
    return ap.Space("toy", (ap.Dim("k", 0, 5), ap.Dim("b0", 0, 1), ap.Dim("b1", 0, 1)))


def toy(config):
    """Accuracy rises with k, the bits cost accuracy and add share: the front is b0 = b1 = 0."""
    k, b0, b1 = config["k"], config["b0"], config["b1"]
    return k / 5 - 0.3 * b0 - 0.1 * b1, k + 0.7 * b0 + 0.4 * b1


def test_pareto_front_is_the_non_dominated_set():
    grid = itertools.product(range(6), (0, 1), (0, 1))
    configs = [dict(zip(["k", "b0", "b1"], c, strict=True)) for c in grid]
    everything = [ap.TrialResult(i, c, *toy(c)) for i, c in enumerate(configs)]
    front = ap.pareto_front(everything)
    assert [(r.config["k"], r.config["b0"], r.config["b1"]) for r in front] == [
        (k, 0, 0) for k in range(6)
    ]


def test_search_finds_the_known_front_and_resumes(tmp_path):
    space = toy_space()
    results = ap.search(space, toy, tmp_path / "study", trials=20, seed=0)
    assert len(results) == 20
    more = ap.search(space, toy, tmp_path / "study", trials=45, seed=0)  # continues, 25 more
    assert len(more) == 45 and [r.config for r in more[:20]] == [r.config for r in results]
    truth = {(k, 0, 0) for k in range(6)}
    found = {(r.config["k"], r.config["b0"], r.config["b1"]) for r in ap.pareto_front(more)}
    assert found == truth


def test_a_study_dir_of_another_space_is_refused(tmp_path):
    ap.search(toy_space(), toy, tmp_path / "s", trials=2)
    other = ap.sappa(n_layers=2, d=8)
    before = (tmp_path / "s" / "space.json").read_text()
    with pytest.raises(SpliceError, match=r"made for another search space \('toy', 3 dims"):
        ap.search(other, lambda c: (0.0, 0.0), tmp_path / "s", trials=2)
    assert (tmp_path / "s" / "space.json").read_text() == before
    assert json.loads(before)["name"] == "toy"


def test_first_configurations_are_evaluated_first(tmp_path):
    seen = []
    ap.search(
        toy_space(), lambda c: seen.append(c) or toy(c), tmp_path / "s", trials=3,
        first=[{"k": 2, "b0": 1, "b1": 0}],
    )  # fmt: skip
    assert seen[0] == {"k": 2, "b0": 1, "b1": 0} and len(seen) == 3


def test_a_search_killed_mid_way_continues_from_its_finished_trials(tmp_path):
    calls = []

    def dies_at_the_sixth(config):
        calls.append(config)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return toy(config)

    with pytest.raises(KeyboardInterrupt):
        ap.search(toy_space(), dies_at_the_sixth, tmp_path / "s", trials=10)
    evaluated = list(calls[:5])
    first = [r.config for r in ap.search(toy_space(), dies_at_the_sixth, tmp_path / "s", trials=5)]
    assert len(calls) == 6  # nothing re-run: the finished trials already meet a budget of 5
    assert len(first) >= 5 and all(c in evaluated for c in first)  # repeats are not re-run
    results = ap.search(toy_space(), toy, tmp_path / "s", trials=10)
    assert len(results) == 10 and [r.config for r in results[: len(first)]] == first


def test_a_configuration_proposed_again_is_not_evaluated_again(tmp_path):
    calls = []
    results = ap.search(
        toy_space(), lambda c: calls.append(c) or toy(c), tmp_path / "s", trials=30
    )  # 24 configurations in the space: some are proposed twice
    keys = [tuple(c.values()) for c in calls]
    assert len(keys) == len(set(keys)) and len(results) == 30
    for r in results:
        assert (r.accuracy, r.share) == toy(r.config)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_decoded_sappa_configuration_injects_what_it_says(seed):
    """Vector → configuration → ``sappa`` adapter: its modules sit on the kept layers only, and
    the trainable count is the paper's share (of the backbone) plus the bottleneck biases."""
    import random

    from splice.adapters import adapter_layers, inject, trainable_parameters
    from tests.adapters._tiny_hf import tiny_bert

    model = tiny_bert(layers=3)
    total = sum(p.numel() for p in model.parameters())
    space = ap.sappa(n_layers=3, d=16)
    rng = random.Random(seed)
    vector = [rng.choice([1, 2, 3]) for _ in range(3)] + [0, 1, 0]  # layer 1 left out
    vector[seed] = 5 if seed else 4  # 2^5 > 16: absent; 2^4 = 16: size 1
    config = space.decode(vector)
    assert space.encode(config) == vector
    sizes, layers = ap.sappa_options(space, config)
    assert layers == [0, 2]
    assert sizes == {k: 16 // 2 ** vector[i] if 2 ** vector[i] <= 16 else 0
                     for i, k in enumerate(("serial", "parallel", "prefix"))}  # fmt: skip
    inject(model, "sappa", ["query", "value"], layers=layers, **sizes)
    wrapped = sorted(adapter_layers(model))
    ffn = sizes["serial"] or sizes["parallel"]
    modules = [m for m, on in (("attention.self", sizes["prefix"]), ("output.dense", ffn)) if on]
    want = [f"encoder.layer.{i}.{m}" for i in layers for m in modules]
    assert wrapped == sorted(want)
    count = trainable_parameters(model).trainable
    assert count == ap.sappa_count(space, config)
    biases = len(layers) * sum(s + 16 for k, s in sizes.items() if k != "prefix" and s)
    assert 100 * (count - biases) / total == pytest.approx(ap.sappa_share(space, config, total))


def test_sappa_with_every_size_zero_or_every_layer_left_out_adapts_nothing():
    space = ap.sappa(n_layers=2, d=16)
    none = space.decode([5, 6, 10, 0, 0])
    assert ap.sappa_options(space, none)[0] == {"serial": 0, "parallel": 0, "prefix": 0}
    assert ap.sappa_count(space, none) == 0 == ap.sappa_share(space, none, total=1000)
    gone = space.decode([1, 1, 1, 1, 1])
    assert ap.sappa_options(space, gone)[1] == [] and ap.sappa_count(space, gone) == 0
