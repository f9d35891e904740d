"""benchmarks/_recursive_uptrain.py: a full uptraining cut into resumed segments (paused for
evaluations and by a time budget) ends exactly where the unbroken run ends."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from splice.train import TrainConfig, train

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "_recursive_uptrain", ROOT / "benchmarks/_recursive_uptrain.py"
)
uptrain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(uptrain)

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "log", "far"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS]))
    transformers.BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=14, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    rng = torch.Generator().manual_seed(0)
    docs = [
        " ".join(WORDS[i] for i in torch.randint(0, 10, (6,), generator=rng)) for _ in range(24)
    ]
    for name, rows in (("data", docs[:20]), ("eval", docs[20:])):
        (path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


def config(model: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        model=model, data=str(model / "data.jsonl"), eval_data=str(model / "eval.jsonl"),
        out=out, method="full", objective="causal-lm", steps=4, batch_size=4, lr=1e-2,
        checkpoint_every=1, progress=False, seed=0,
    )  # fmt: skip


def weights(out: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_segments_paused_by_evaluations_and_budget_equal_the_unbroken_run(llama_dir, tmp_path):
    whole = train(config(llama_dir, tmp_path / "whole"))
    cfg, now, seen = config(llama_dir, tmp_path / "cut"), [0.0], []

    def on_eval(step: int, checkpoint: Path) -> None:
        model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
        before = model.model.embed_tokens.weight.clone()
        uptrain.load_checkpoint_weights(model, checkpoint)
        changed = not torch.equal(before, model.model.embed_tokens.weight)
        seen.append((step, uptrain.checkpoint_step(tmp_path / "cut"), changed))
        now[0] += 100.0  # the evaluation spends the budget: pause after it

    assert uptrain.segments(cfg, [2, 3], 50.0, on_eval, reserve_s=0, clock=lambda: now[0]) is None
    assert seen == [(2, 2, True)]
    resumed = uptrain.segments(cfg, [2, 3], None, on_eval)
    assert seen[1:] == [(3, 3, True)]
    assert resumed["resumed_from_step"] == 3
    assert resumed["loss_history"] == whole["loss_history"]
    assert resumed["eval"] == whole["eval"]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stops_off_the_checkpoint_grid_and_a_foreign_checkpoint_are_refused(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"stops \[4\] .* checkpoint_every=3"):
        uptrain.segments(
            config(llama_dir, tmp_path).model_copy(update={"checkpoint_every": 3}),
            [4],
            None,
            lambda s, c: None,
        )
    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=14, hidden_size=8, intermediate_size=8,
                                 num_hidden_layers=1, num_attention_heads=1)
    )  # fmt: skip
    cfg = config(llama_dir, tmp_path / "a")  # a zero budget pauses at the first checkpoint
    assert uptrain.segments(cfg, [], 0.0, lambda s, c: None) is None
    assert uptrain.checkpoint_step(cfg.out) == 1
    with pytest.raises(ValueError, match="does not match the model"):
        uptrain.load_checkpoint_weights(other, cfg.out / "checkpoint")
