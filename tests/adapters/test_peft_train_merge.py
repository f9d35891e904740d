"""``splice train --format peft`` → ``splice merge`` → ``transformers``: an adapter trained on
the task-head class (``bert.encoder.…``) merges into the bare base it names (``encoder.…``),
and the merged encoder equals peft's ``merge_and_unload()`` of the same adapter."""

from __future__ import annotations

import json

import pytest
import torch

from splice.errors import SpliceError
from splice.merge import merge
from splice.train import TrainConfig, train

from ..train.test_train import WORDS, tiny_model_dir

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(bare BertModel dir, the peft-format adapter ``splice train`` wrote for it)."""

    def build(vocab):
        cfg = transformers.BertConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32,
        )  # fmt: skip
        return transformers.BertModel(cfg)

    base = tiny_model_dir(tmp_path_factory, "bare-bert", build)
    out = tmp_path_factory.mktemp("run")
    rows = [f"the movie was {WORDS[i % 8]},{'pos' if i % 8 < 4 else 'neg'}" for i in range(32)]
    (out / "data.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    config = TrainConfig(
        model=base, data=str(out / "data.csv"), out=out / "run", steps=3, batch_size=8,
        lr=5e-2, progress=False, seed=0, format="peft",
    )  # fmt: skip
    train(config)
    return base, out / "run" / "adapter"


def test_trained_adapter_merges_into_its_bare_base(trained, tmp_path) -> None:
    base, adapter = trained
    names = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert names[0].startswith("bert.encoder.")  # the task-head class's names
    recipe = {"method": "task_arithmetic", "base": str(base), "models": [str(adapter)]}
    out = merge(recipe, tmp_path / "merged", allow_missing=True, checksums=False)

    ids = torch.randint(5, 19, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = transformers.AutoModel.from_pretrained(out).eval()(input_ids=ids)
        wrapped = transformers.BertForSequenceClassification.from_pretrained(base, num_labels=2)
        ref = peft.PeftModel.from_pretrained(wrapped, adapter).merge_and_unload().eval()
        expect = ref.bert(input_ids=ids)
    untrained = transformers.AutoModel.from_pretrained(base).eval()(input_ids=ids)
    assert not torch.allclose(untrained.last_hidden_state, expect.last_hidden_state, atol=1e-4)
    assert torch.allclose(got.last_hidden_state, expect.last_hidden_state, atol=1e-5)
    assert torch.allclose(got.pooler_output, expect.pooler_output, atol=1e-5)

    ledger = json.loads((out / "splice-ledger.json").read_text())
    notes = {t["name"]: t.get("notes", []) for t in ledger["tensors"]}
    query = "encoder.layer.0.attention.self.query.weight"
    assert any("wrapper prefix 'bert.' stripped" in n for n in notes[query])
    dropped = {d["name"] for d in ledger["dropped"]}
    assert dropped == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}


def test_the_new_head_the_base_lacks_needs_allow_missing(trained, tmp_path) -> None:
    base, adapter = trained
    recipe = {"method": "task_arithmetic", "base": str(base), "models": [str(adapter)]}
    with pytest.raises(SpliceError, match=r"saves 'classifier\.\w+' whole .* --allow-missing"):
        merge(recipe, tmp_path / "merged", checksums=False)
