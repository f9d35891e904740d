"""Architecture from tensor names + config.json, on real transformers tensor names (7 families)."""

from __future__ import annotations

import json

import pytest
import torch

from splice.errors import SpliceError
from splice.io import CheckpointWriter, open_checkpoint
from splice.merge import merge
from splice.merge.engine.arch import block_of, infer_architecture
from tests.merge._hf import LAYERS, tiny_hf

# name -> (block, layer, blocks in its stack); None: outside the layer stacks
EXPECTED = {
    "llama": {
        "model.embed_tokens.weight": ("embed", None, None),
        "model.layers.1.self_attn.q_proj.weight": ("attn", 1, 3),
        "model.layers.0.mlp.gate_proj.weight": ("mlp", 0, 3),
        "model.layers.2.input_layernorm.weight": ("norm", 2, 3),
        "model.norm.weight": ("norm", None, None),
        "lm_head.weight": ("head", None, None),
    },
    "mistral": {
        "model.layers.1.post_attention_layernorm.weight": ("norm", 1, 2),
        "model.layers.1.mlp.down_proj.weight": ("mlp", 1, 2),
    },
    "qwen2": {
        "model.layers.0.self_attn.k_proj.bias": ("attn", 0, 2),
        "model.layers.1.self_attn.o_proj.weight": ("attn", 1, 2),
    },
    "gpt2": {
        "transformer.wte.weight": ("embed", None, None),
        "transformer.wpe.weight": ("embed", None, None),
        "transformer.h.2.attn.c_attn.weight": ("attn", 2, 3),
        "transformer.h.0.mlp.c_fc.weight": ("mlp", 0, 3),
        "transformer.h.1.ln_1.bias": ("norm", 1, 3),
        "transformer.ln_f.weight": ("norm", None, None),
    },
    "bert": {
        "bert.embeddings.word_embeddings.weight": ("embed", None, None),
        "bert.embeddings.LayerNorm.weight": ("norm", None, None),
        "bert.encoder.layer.1.attention.self.query.weight": ("attn", 1, 2),
        "bert.encoder.layer.0.attention.output.dense.weight": ("attn", 0, 2),
        "bert.encoder.layer.0.intermediate.dense.weight": ("mlp", 0, 2),
        "bert.encoder.layer.1.output.dense.weight": ("mlp", 1, 2),
        "bert.encoder.layer.0.output.LayerNorm.bias": ("norm", 0, 2),
        "cls.predictions.bias": ("head", None, None),
        "cls.predictions.transform.dense.weight": ("head", None, None),
    },
    "vit": {
        "vit.embeddings.cls_token": ("embed", None, None),
        "vit.embeddings.patch_embeddings.projection.weight": ("embed", None, None),
        "vit.encoder.layer.1.attention.attention.query.weight": ("attn", 1, 2),
        "vit.encoder.layer.0.layernorm_before.weight": ("norm", 0, 2),
        "vit.encoder.layer.0.intermediate.dense.weight": ("mlp", 0, 2),
        "vit.layernorm.weight": ("norm", None, None),
        "classifier.weight": ("head", None, None),
    },
    "t5": {
        "shared.weight": ("embed", None, None),
        "encoder.block.1.layer.0.SelfAttention.q.weight": ("attn", 1, 2),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": ("attn", 0, 2),
        "decoder.block.2.layer.1.EncDecAttention.k.weight": ("attn", 2, 3),
        "encoder.block.0.layer.1.DenseReluDense.wi.weight": ("mlp", 0, 2),
        "decoder.block.0.layer.2.DenseReluDense.wo.weight": ("mlp", 0, 3),
        "encoder.final_layer_norm.weight": ("norm", None, None),
    },
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: tiny_hf(f, root / f) for f in EXPECTED}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_roles_and_stacks_from_real_tensor_names(families, family):
    ckpt = open_checkpoint(families[family])
    arch = infer_architecture(ckpt.names(), ckpt.config, need_layers=True)
    for name, (block, layer, num) in EXPECTED[family].items():
        role = arch.role(name)
        assert (role.block, role.layer, role.num_layers) == (block, layer, num), name
    # every tensor of these seven families gets a block type, and every stack's size is one
    # of the config's layer counts
    assert not [n for n, r in arch.roles.items() if r.block == "other"]
    counts = {LAYERS[family], LAYERS[family] + 1}
    assert arch.stacks and set(arch.stacks.values()) <= counts
    if family == "t5":
        assert arch.stacks == {"encoder.block": 2, "decoder.block": 3}


def test_tied_heads_come_from_the_config(families):
    gpt2 = open_checkpoint(families["gpt2"])
    assert "lm_head.weight" not in gpt2  # saved tied
    assert ("lm_head.weight", "transformer.wte.weight") in infer_architecture(
        gpt2.names(), gpt2.config
    ).tied
    llama = open_checkpoint(families["llama"])
    assert infer_architecture(llama.names(), llama.config).tied == []  # untied by config


def _ta(tmp_path, root, lam, family="gpt2"):
    return merge(
        {
            "method": "task_arithmetic",
            "base": str(root / "base"),
            "models": [str(root / "ft")],
            "params": {"lambda": lam},
        },
        tmp_path / "out",
        force=True,
    )


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2pair")
    tiny_hf("gpt2", root / "base", seed=0)
    tiny_hf("gpt2", root / "ft", seed=1)
    return root


def _load(path):
    ckpt = open_checkpoint(path)
    return {n: ckpt[n] for n in ckpt}


def test_gradient_over_depth_uses_the_stack_found_from_names(gpt2_pair, tmp_path):
    base, ft = _load(gpt2_pair / "base"), _load(gpt2_pair / "ft")
    got = _load(_ta(tmp_path, gpt2_pair, {"gradient": [0.0, 1.0]}))
    for name, b in base.items():
        layer = infer_architecture(list(base), None).role(name).layer
        depth = 0.0 if layer is None else layer / 2  # 3 blocks: depths 0, 0.5, 1
        ref = b + depth * (ft[name] - b)
        torch.testing.assert_close(got[name], ref, atol=1e-6, rtol=0, msg=name)


def test_block_filters_work_across_families(gpt2_pair, tmp_path):
    base, ft = _load(gpt2_pair / "base"), _load(gpt2_pair / "ft")
    got = _load(_ta(tmp_path, gpt2_pair, [{"block": "attn", "value": 0.0}, {"value": 1.0}]))
    for name in base:
        want = base[name] if block_of(name) == "attn" else ft[name]
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0, msg=name)
    assert block_of("encoder.block.0.layer.0.SelfAttention.q.weight") == "attn"
    with pytest.raises(SpliceError, match=r"unknown block type 'atn'.*did you mean 'attn'"):
        _ta(tmp_path, gpt2_pair, [{"block": "atn", "value": 0.0}])


def test_unparseable_names_give_a_clear_error_only_when_depth_is_needed(tmp_path):
    names = ["encoder.weight", "decoder.weight"]
    assert infer_architecture(names).stacks == {}
    with pytest.raises(SpliceError, match=r"no layer stack found.*per-layer parameters"):
        infer_architecture(names, need_layers=True)
    with pytest.raises(SpliceError, match=r"block 1 of model.layers.\* has no tensors"):
        infer_architecture(["model.layers.0.w", "model.layers.2.w"], need_layers=True)
    with pytest.raises(
        SpliceError, match=r"num_hidden_layers=4 but .* 3 blocks .*\[1, 3\] missing"
    ):
        infer_architecture(["model.layers.0.w", "model.layers.2.w"], {"num_hidden_layers": 4})
    # a recipe whose gradient cannot be placed fails before any tensor is read
    for name in ("base", "ft"):
        with CheckpointWriter(tmp_path / name) as w:
            for n in names:
                w.write(n, torch.ones(2))
    with pytest.raises(SpliceError, match="no layer stack found"):
        merge(
            {
                "method": "task_arithmetic",
                "base": str(tmp_path / "base"),
                "models": [str(tmp_path / "ft")],
                "params": {"lambda": {"gradient": [0, 1]}},
            },
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_ledger_records_block_and_layer(gpt2_pair, tmp_path):
    out = _ta(tmp_path, gpt2_pair, 0.5)
    ledger = json.loads((out / "splice-ledger.json").read_text())
    entry = next(e for e in ledger["tensors"] if e["name"] == "transformer.h.1.attn.c_proj.weight")
    assert (entry["block"], entry["layer"]) == ("attn", 1)
    assert ledger["architecture"]["stacks"] == {"transformer.h": 3}
