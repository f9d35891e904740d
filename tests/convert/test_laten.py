"""LaTen and the slicer/injector: a zero hypernetwork changes nothing; merge-then-save keeps ΔW."""

from __future__ import annotations

import pytest
import torch

from splice.convert.attribution import attribute
from splice.convert.laten import LaTen, check_same_tokenizer
from splice.convert.prune import depth_prune
from splice.convert.slicer import SliceDelta, attach_slices, merge_slices
from splice.errors import SpliceError
from tests.convert.test_recursive import tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    teacher = tiny_llama(6, seed=1)
    student = depth_prune(teacher, [0, 2, 5])
    with torch.no_grad():  # a student that differs from the teacher's layers
        for p in student.model.layers.parameters():
            p.mul_(0.9)
    ids, w = torch.tensor([3, 9, 27, 5]), 11
    return teacher, student, attribute(teacher, ids, w), attribute(student, ids, w)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits


def test_zero_hypernetwork_leaves_the_student_unchanged(pair):
    teacher, student, ts, ss = pair
    laten = LaTen(teacher, student, ts, ss, rate=0.25)
    for h in laten.hyper.values():
        torch.nn.init.zeros_(h.w2)
    ids = torch.tensor([1, 2, 3, 4, 5])
    before = logits(student, ids)
    laten.attach(student)
    try:
        assert torch.equal(logits(student, ids), before)
        assert laten.penalty().item() == 0.0
    finally:
        for s in laten.slices:
            s.handle.remove()
    assert len(laten.plan) == 3 * 3  # 3 paired layers × (up, down, o)
    assert all(len(idx) == (12 if kind != "o" else 8) for kind, _, _, idx in laten.plan)


def test_merge_then_save_keeps_delta(pair, tmp_path):
    teacher, _, ts, ss = pair
    student = depth_prune(teacher, [0, 2, 5])
    laten = LaTen(teacher, student, ts, ss, rate=0.25, init_std=0.2)
    ids = torch.tensor([1, 2, 3, 4, 5])
    plain = logits(student, ids)
    laten.attach(student)
    hooked = logits(student, ids)
    assert (hooked - plain).abs().max() > 1e-4
    # gradients reach the hypernetworks only
    batch = {"input_ids": ids[None], "labels": ids[None]}
    laten.loss(student, batch).backward()
    assert all(p.grad is not None for p in laten.hyper.parameters())
    assert all(p.grad is None for p in student.parameters())
    laten.merge(student)
    torch.testing.assert_close(logits(student, ids), hooked, atol=1e-5, rtol=1e-5)
    student.save_pretrained(tmp_path / "fused")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    torch.testing.assert_close(logits(back, ids), hooked, atol=1e-5, rtol=1e-5)


def test_slice_hook_equals_dense_delta():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 4, bias=False)
    ref = torch.nn.Linear(5, 4, bias=False)
    x = torch.randn(3, 5)
    for axis, index, shape in [("rows", [0, 3], (2, 5)), ("cols", [1, 2, 4], (4, 3))]:
        values = torch.randn(shape)
        s = SliceDelta("", axis, torch.tensor(index), lambda v=values: v)
        with torch.no_grad():
            ref.weight.copy_(lin.weight)
            if axis == "rows":
                ref.weight[index] += values
            else:
                ref.weight[:, index] += values
        attach_slices(lin, [s])
        with torch.no_grad():
            torch.testing.assert_close(lin(x), ref(x))
        merge_slices(lin, [s])
        with torch.no_grad():
            torch.testing.assert_close(lin.weight, ref.weight)
            lin.weight.copy_(ref.weight)


def test_different_tokenizers_are_refused(tmp_path):
    vocab_a = ["[PAD]", "[UNK]", "a", "b"]
    vocab_b = ["[PAD]", "[UNK]", "a", "c", "d"]
    toks = []
    for name, vocab in (("a", vocab_a), ("b", vocab_b)):
        (tmp_path / f"{name}.txt").write_text("\n".join(vocab) + "\n")
        toks.append(transformers.BertTokenizerFast(vocab=str(tmp_path / f"{name}.txt")))
    check_same_tokenizer(toks[0], toks[0])
    with pytest.raises(SpliceError, match=r"tokenizers differ \(vocab sizes 7 vs 8"):
        check_same_tokenizer(*toks)


def test_postpkt_extracts_top_rows_and_cols_and_inits_lora(pair):
    from splice.convert.postpkt import LowRankDelta, extract_slice, inject_postpkt

    w = torch.arange(20.0).reshape(4, 5)
    score = torch.zeros(4, 5)
    score[3, 1] = score[1, 4] = 5.0
    assert torch.equal(extract_slice(w, score, (2, 2)), w[[1, 3]][:, [1, 4]])
    with pytest.raises(SpliceError, match=r"larger than the teacher's \(4, 5\)"):
        extract_slice(w, score, (5, 2))

    teacher, _, _, _ = pair
    student = tiny_llama(3, seed=9)
    scores = {n: p.detach().abs() for n, p in teacher.named_parameters()}
    ids = torch.tensor([1, 2, 3, 4])
    replaced = inject_postpkt(teacher, student, scores, [(1, 0), (4, 2)], rank=32)
    assert replaced == [
        f"model.layers.{s}.{p}"
        for s in (0, 2)
        for p in ("mlp.up_proj", "mlp.down_proj", "self_attn.o_proj")
    ]
    layer = student.get_submodule("model.layers.2.mlp.up_proj")
    assert isinstance(layer, LowRankDelta)
    # full rank (32 = min(48, 32)): B A is the teacher's slice (same shapes here: all rows/cols)
    torch.testing.assert_close(
        layer.lora_B @ layer.lora_A,
        teacher.get_submodule("model.layers.4.mlp.up_proj").weight.detach(),
        atol=1e-5, rtol=0,
    )  # fmt: skip
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert len(trainable) == 12 and all("lora_" in n for n in trainable)
    before = logits(student, ids)
    student.get_submodule("model.layers.2.mlp").up_proj = layer.merged()
    torch.testing.assert_close(logits(student, ids), before, atol=1e-4, rtol=1e-4)
