"""Relaxed Recursive Transformers (splice.convert.recursive) on tiny Llama models."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from splice.convert import (
    LoopLoRALinear,
    convert_recursive,
    cycle_map,
    generate_early_exit,
    init_shared,
    save_recursive,
    svd_relax,
)
from splice.errors import SpliceError

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 6, tie: bool = True, seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough that layers differ visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            else:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def layer_weight(model, depth: int, name: str = "self_attn.q_proj"):
    return model.state_dict()[f"model.layers.{depth}.{name}.weight"]


def test_cycle_map_and_k_not_dividing_n():
    assert cycle_map(6, 2) == [0, 1, 0, 1, 0, 1]
    assert cycle_map(6, 3) == [0, 1, 2, 0, 1, 2]
    assert cycle_map(4, 4) == [0, 1, 2, 3]
    with pytest.raises(SpliceError, match=r"K=4 .* 6 layers.*\[1, 2, 3, 6\]"):
        cycle_map(6, 4)


@pytest.mark.parametrize(
    ("init", "sources"),
    [
        ("stepwise", [[0], [2], [4]]),  # Φ'_j = Φ_{j·B}, B = 2
        ("lower", [[0], [1], [2]]),
        ("average", [[0, 3], [1, 4], [2, 5]]),  # the depths tied to j: j, j + K
    ],
)
def test_each_initialisation(llama, init, sources):
    rec = convert_recursive(llama, 3, init, rank=0)
    for j, src in enumerate(sources):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            want = sum(layer_weight(llama, s, name) for s in src) / len(src)
            got = getattr(rec.model.layers[j], name.split(".")[0])[name.split(".")[1]].weight
            torch.testing.assert_close(got, want)
    # K = N ties nothing: every init is the original model
    full = convert_recursive(llama, 6, init, rank=0)
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(full(ids).logits, llama(ids).logits, atol=1e-5, rtol=0)


def test_init_shared_rejects_unknown():
    with pytest.raises(SpliceError, match="'middle'"):
        init_shared([torch.zeros(2)] * 4, 2, "middle")


@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_full_rank_relaxation_reproduces_the_original(llama, init):
    rec = convert_recursive(llama, 2, init, rank="full")
    ids = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        assert (rec(ids).logits - llama(ids).logits).abs().max() < 1e-5


def test_relaxation_error_decreases_with_rank(llama):
    """‖W_ℓ − (W' + B_ℓA_ℓ)‖ falls with r and equals the Eckart–Young tail at each r."""
    rec_weights = []
    for rank in (0, 2, 8, 16, "full"):
        rec = convert_recursive(llama, 3, "average", rank=rank)
        lin = rec.model.layers[1].self_attn["q_proj"]
        r = lin.rank
        errors = []
        for loop, depth in enumerate((1, 4)):
            eff = lin.weight + (lin.lora_B[loop] @ lin.lora_A[loop] if r else 0)
            errors.append(torch.linalg.norm(layer_weight(llama, depth) - eff).item())
        residual = layer_weight(llama, 4) - lin.weight
        tail = torch.linalg.svdvals(residual.double())[r:].pow(2).sum().sqrt().item()
        assert errors[1] == pytest.approx(tail, rel=1e-4, abs=1e-5)
        rec_weights.append(sum(errors))
    assert all(a > b for a, b in itertools.pairwise(rec_weights))
    assert lin.rank == 32 and rec_weights[-1] < 1e-4  # full rank: exact


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_svd_relax_is_the_truncated_svd(shape):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(*shape, generator=g)
    a, b = svd_relax(r, 3)
    assert a.shape == (3, shape[1]) and b.shape == (shape[0], 3)
    u, s, vh = torch.linalg.svd(r.double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close((b @ a).double(), best, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.double() @ a.double().T, torch.eye(3, dtype=torch.float64))
    a, b = svd_relax(r, 7)  # full rank: exact
    torch.testing.assert_close(b @ a, r, atol=1e-5, rtol=0)
    a, b = svd_relax(torch.zeros(shape), 2)  # a zero residual: a zero update, no NaN
    assert torch.equal(b @ a, torch.zeros(shape))


def test_per_row_loop_indices_match_one_loop_at_a_time():
    torch.manual_seed(0)
    lin = LoopLoRALinear(5, 4, loops=3, rank=2)
    with torch.no_grad():
        for p in lin.parameters():
            p.normal_()
    x = torch.randn(4, 2, 5)
    loops = torch.tensor([2, 0, 1, 2])
    per_row = torch.cat([lin(x[i : i + 1], int(b)) for i, b in enumerate(loops)])
    torch.testing.assert_close(lin(x, loops), per_row)


def greedy(model, prompt, n):
    seq, new = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            new.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(new[-1])
    return new


def test_early_exit_never_met_returns_the_full_loop_tokens(llama):
    rec = convert_recursive(llama, 2, "average", rank=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    tokens, stats = generate_early_exit(rec, prompts, 6, threshold=1.01)
    assert tokens == [greedy(rec, p, 6) for p in prompts]
    assert stats.exits == [0, 0, 18] and stats.mean_loops == 3


def test_early_exit_mixes_loop_depths_in_a_batch(llama):
    rec = convert_recursive(llama, 2, "average", rank=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    full, _ = generate_early_exit(rec, prompts, 8, threshold=1.01)
    tokens, stats = generate_early_exit(rec, prompts, 8, threshold=0.0)
    assert stats.exits == [14, 0, 2] and stats.ticks == 7  # first tokens: prefill, all loops
    assert stats.mixed_ticks == 0
    assert [len(t) for t in tokens] == [8, 8]
    # a middling threshold exits some tokens early, so rows sit at different loops
    for threshold in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        _, mixed = generate_early_exit(rec, prompts, 8, threshold=threshold)
        if mixed.mixed_ticks:
            break
    assert mixed.mixed_ticks > 0  # one batch, rows at different loops (per-row LoRA indices)
    assert 0 < mixed.exits[0] + mixed.exits[1] < 14 and full != tokens


def test_intermediate_exit_loss(llama):
    rec = convert_recursive(llama, 2, "lower", rank=2, exit_loss_weight=0.5)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        out = rec(ids, labels=ids)
        states = rec.hidden_states_per_loop(ids)

        def ce(h):
            logits = rec.logits_at(h)
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

        want = ce(states[-1]) + 0.5 * (ce(states[0]) + ce(states[1])) / 2
    torch.testing.assert_close(out.loss, want)


def test_bad_input_errors(llama):
    with pytest.raises(SpliceError, match="rank 33 is above min"):
        convert_recursive(llama, 2, rank=33)
    with pytest.raises(SpliceError, match="K=5"):
        convert_recursive(llama, 5)
    with pytest.raises(SpliceError, match="'cyclic'"):
        convert_recursive(llama, 2, "cyclic")
    seq = transformers.LlamaForSequenceClassification(llama.config)
    with pytest.raises(SpliceError, match=r"not a causal LM.*LlamaForSequenceClassification"):
        convert_recursive(seq, 2)


def test_save_load_round_trip_untied_head(tmp_path):
    model = tiny_llama(4, tie=False, seed=3)
    rec = convert_recursive(model, 2, "stepwise", rank=3, private_norms=False)
    save_recursive(rec, tmp_path / "rec")
    cfg = json.loads((tmp_path / "rec" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_recursive.")
    assert (tmp_path / "rec" / "modeling_recursive.py").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rec")
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, rec(ids).logits, atol=0, rtol=0)
    n_params = sum(p.numel() for p in back.parameters())
    d, ff, v = 32, 48, 64
    linears = 2 * (d * d + 2 * d * 16 + d * d) // 2 + 3 * d * ff  # q, k, v (2 kv heads), o, mlp
    lora = 2 * 2 * 3 * ((d + d) * 2 + (d + 16) * 2 + (d + ff) * 3)  # K × loops × r(in + out)
    assert n_params == 2 * v * d + 2 * linears + lora + 2 * 2 * d + d
