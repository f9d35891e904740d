"""PEFT dirs of DoRA, IA³, LoHa, LoKr, VeRA, OFT and AdaLoRA both ways, against the real ``peft``:
``PeftModel.from_pretrained`` on a splice-written dir and splice on a peft-written dir give the
same outputs (1e-5) on tiny BERT (Linear), GPT-2 (Conv1D) and conv models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.adapters import inject, load_adapter, save_adapter
from splice.errors import SpliceError

from .conftest import perturb
from .test_peft_interop import IDS, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.proj = nn.Conv2d(6, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).tanh())


IMAGES = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
BERT = ["query", "value", "output.dense"]
# method → (splice options, the equivalent peft config builder)
METHODS = {
    "dora": (dict(r=4, alpha=8), lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t,
                                                           use_dora=True)),
    "ia3": (dict(), lambda t: peft.IA3Config(target_modules=t, feedforward_modules=t[-1:])),
    "loha": (dict(r=2, alpha=4), lambda t: peft.LoHaConfig(r=2, alpha=4, target_modules=t)),
    "lokr": (dict(r=2, alpha=4), lambda t: peft.LoKrConfig(r=2, alpha=4, target_modules=t)),
    "lokr_both": (dict(r=1, alpha=2, decompose_both=True, decompose_factor=2),
                  lambda t: peft.LoKrConfig(r=1, alpha=2, target_modules=t, decompose_both=True,
                                            decompose_factor=2)),
    "vera": (dict(r=4, seed=3), lambda t: peft.VeraConfig(r=4, target_modules=t,
                                                          projection_prng_key=3)),
    "oft": (dict(block_size=4), lambda t: peft.OFTConfig(r=0, oft_block_size=4, target_modules=t)),
    "oft_coft_exact": (dict(block_size=4, constrained=True, eps=0.5, neumann=False),
                       lambda t: peft.OFTConfig(r=0, oft_block_size=4, target_modules=t, coft=True,
                                                eps=0.5, use_cayley_neumann=False)),
    "adalora": (dict(r=4, target_r=2, total_step=10),
                lambda t: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                             target_modules=t)),
}  # fmt: skip
MODELS = {  # name → (builder, input kwargs, targets, methods peft supports there)
    "bert": (tiny_bert, lambda: dict(input_ids=IDS), BERT, set(METHODS)),
    "gpt2": (tiny_gpt2, lambda: dict(input_ids=IDS), ["c_attn", "c_fc"], {"dora", "ia3", "vera"}),
    "conv": (ConvNet, lambda: dict(x=IMAGES), ["conv", "proj"], {"dora", "ia3", "loha", "lokr"}),
}
CASES = [(m, k) for k, (_, _, _, ms) in MODELS.items() for m in sorted(METHODS) if m in ms]


def run(model, kind):
    """Outputs O(1) to compare: the last hidden state (and logits) of the HF models."""
    with torch.no_grad():
        if kind == "conv":
            return model(**MODELS[kind][1]())
        out = model(**MODELS[kind][1](), output_hidden_states=True)
    return torch.cat([out.hidden_states[-1].flatten(), out.logits.flatten()])


def _splice_options(case, kind):
    options = dict(METHODS[case][0])
    if case == "ia3":  # the last target is the feed-forward one, as in the peft config
        options["feedforward"] = MODELS[kind][2][-1:]
    return case.split("_")[0], options


@pytest.mark.parametrize(("case", "kind"), CASES)
def test_splice_dir_loads_in_peft(case, kind, tmp_path):
    build, _, targets, _ = MODELS[kind]
    method, options = _splice_options(case, kind)
    model = inject(build(), method, targets, **options)
    perturb(model, std=0.1)
    expected = run(model, kind)
    save_adapter(model, tmp_path / "a", format="peft")
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "a").eval()
    assert torch.allclose(run(loaded, kind), expected, atol=1e-5)
    assert (run(build(), kind) - expected).abs().max() > 1e-3  # the adapter mattered


@pytest.mark.parametrize(("case", "kind"), CASES)
def test_peft_dir_loads_in_splice(case, kind, tmp_path):
    build, _, _, _ = MODELS[kind]
    pm = peft.get_peft_model(build(), METHODS[case][1](MODELS[kind][2]))
    perturb(pm, std=0.1)
    pm.eval()
    expected = run(pm, kind)
    pm.save_pretrained(tmp_path / "p")
    model = load_adapter(build(), tmp_path / "p")
    assert torch.allclose(run(model, kind), expected, atol=1e-5)


def test_modules_to_save_and_layers_to_transform_both_ways(tmp_path):
    config = peft.LoHaConfig(r=2, target_modules=["query", "value"], layers_to_transform=[1],
                             modules_to_save=["classifier"])  # fmt: skip
    pm = peft.get_peft_model(tiny_bert(), config)
    perturb(pm, std=0.1)
    pm.eval()
    expected = run(pm, "bert")
    pm.save_pretrained(tmp_path / "p")
    model = load_adapter(tiny_bert(), tmp_path / "p")
    assert torch.allclose(run(model, "bert"), expected, atol=1e-5)
    ours = inject(tiny_bert(), "loha", ["query", "value"], layers=[1],
                  modules_to_save=["classifier"], r=2)  # fmt: skip
    perturb(ours, std=0.1)
    save_adapter(ours, tmp_path / "s", format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "s").eval()
    assert torch.allclose(run(loaded, "bert"), run(ours, "bert"), atol=1e-5)
    assert not any(".layer.0." in n for n, _ in loaded.named_modules() if n.endswith("hada_w1_a"))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lambda: peft.LoHaConfig(r=2, target_modules=["query"], rank_dropout=0.1),
         "field rank_dropout=0.1 changes"),
        (lambda: peft.OFTConfig(r=2, oft_block_size=0, target_modules=["query", "value"]),
         "OFT config field r=2"),
        (lambda: peft.LoKrConfig(r=2, target_modules=["query"], use_effective_conv2d=True),
         "field use_effective_conv2d=True"),
        (lambda: peft.FourierFTConfig(target_modules=["query"], n_frequency=10),
         r"'FOURIERFT' is not a method splice has.*ADALORA.*DORA.*IA3.*LOHA.*LOKR.*LORA.*OFT"),
    ],
)  # fmt: skip
def test_what_splice_does_not_implement_is_refused_by_name(config, message, tmp_path):
    peft.get_peft_model(tiny_bert(), config()).save_pretrained(tmp_path / "d")
    with pytest.raises(SpliceError, match=message):
        load_adapter(tiny_bert(), tmp_path / "d")


PATTERNED = {  # method → (peft config class, its r/alpha options)
    "lora": ("LoraConfig", dict(lora_alpha=8)),
    "dora": ("LoraConfig", dict(lora_alpha=8, use_dora=True)),
    "loha": ("LoHaConfig", dict(alpha=8)),
    "lokr": ("LoKrConfig", dict(alpha=8)),
}
PATTERNS = dict(rank_pattern={"value": 2}, alpha_pattern={"query": 3.0})


@pytest.mark.parametrize("method", sorted(PATTERNED))
def test_rank_and_alpha_patterns_both_ways(method, tmp_path):
    ours = inject(tiny_bert(), method, BERT[:2], r=4, alpha=8, **PATTERNS)
    a = ours.bert.encoder.layer[0].attention.self
    assert a.value.adapter.scale == 8 / 2 and a.query.adapter.scale == 3.0 / 4
    perturb(ours, std=0.1)
    save_adapter(ours, tmp_path / "s", format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "s").eval()
    assert torch.allclose(run(loaded, "bert"), run(ours, "bert"), atol=1e-5)
    name, options = PATTERNED[method]
    config = getattr(peft, name)(r=4, target_modules=BERT[:2], **options, **PATTERNS)
    pm = peft.get_peft_model(tiny_bert(), config)
    perturb(pm, std=0.1)
    pm.eval()
    pm.save_pretrained(tmp_path / "p")
    assert torch.allclose(run(load_adapter(tiny_bert(), tmp_path / "p"), "bert"), run(pm, "bert"),
                          atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lambda: peft.FourierFTConfig(target_modules=["q_proj"], n_frequency=10),
         "PEFT adapter type 'FOURIERFT' is not a method splice has"),
        (lambda: peft.LoHaConfig(r=2, target_modules=["q_proj"], rank_dropout=0.1),
         "field rank_dropout=0.1 changes"),
    ],
)  # fmt: skip
def test_cli_refuses_a_peft_dir_it_cannot_run_in_one_line_exit_1(config, message, tmp_path):
    from typer.testing import CliRunner

    from splice.cli import app
    from tests.decode.conftest import WORDS, tiny_llama, word_tokenizer

    base = tiny_llama(vocab=len(WORDS))
    base.save_pretrained(tmp_path / "base")
    word_tokenizer(WORDS).save_pretrained(tmp_path / "base")
    peft.get_peft_model(base, config()).save_pretrained(tmp_path / "d")
    args = ["generate", str(tmp_path / "base"), "--prompt", "the", "--adapter", f"x={tmp_path}/d"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1
    assert message in str(r.exception) and len(str(r.exception).splitlines()) == 1
