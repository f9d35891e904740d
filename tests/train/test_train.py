"""``splice train`` end to end on tiny random HF models and a tiny CSV/JSONL."""

from __future__ import annotations

import json

import pytest
import torch

from splice.errors import SpliceError
from splice.train import TrainConfig, train

transformers = pytest.importorskip("transformers")

WORDS = [
    *("good", "great", "fine", "fun"),
    *("bad", "awful", "poor", "dull"),
    *("movie", "film", "the", "a", "was", "very"),
]
POS, NEG = WORDS[:4], WORDS[4:8]


def tiny_model_dir(tmp_path_factory, name, build):
    """A random HF model dir with a word-level tokenizer; ``build(vocab_size)`` makes the model."""
    path = tmp_path_factory.mktemp(name)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    build(len(vocab)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    def build(vocab):
        return transformers.BertModel(
            transformers.BertConfig(
                vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=32,
            )
        )  # fmt: skip

    return tiny_model_dir(tmp_path_factory, "bert", build)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    def build(vocab):
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                bos_token_id=2, eos_token_id=3,
            )
        )  # fmt: skip

    return tiny_model_dir(tmp_path_factory, "gpt2", build)


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    lines = ["text,label"]
    for i in range(48):
        words = POS if i % 2 else NEG
        pick = [words[j] for j in torch.randint(0, 4, (3,), generator=g).tolist()]
        lines.append(f"the movie was {' '.join(pick)},{'pos' if i % 2 else 'neg'}")
    path = tmp_path_factory.mktemp("data") / "sentiment.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(model_dir, data, out, **kw):
    options = dict(steps=8, batch_size=8, lr=5e-3, progress=False, seed=0) | kw
    return train(TrainConfig(model=model_dir, data=str(data), out=out, **options))


def interrupted(model_dir, data, out, at_step, **kw):
    """Start ``run`` and stop it with Ctrl-C after step ``at_step``."""

    def interrupt(step, loss):
        if step == at_step:
            raise KeyboardInterrupt

    options = dict(steps=8, batch_size=8, lr=5e-3, progress=False, seed=0) | kw
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(model=model_dir, data=str(data), out=out, **options), on_step=interrupt)


def stable(metrics):
    return {k: metrics[k] for k in ("train_loss", "loss_history", "eval", "trainable_parameters")}


def test_lora_classification_end_to_end(bert_dir, csv_file, tmp_path):
    metrics = run(bert_dir, csv_file, tmp_path / "out", checkpoint_every=3)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["eval"] == metrics["eval"]
    assert metrics["objective"] == "classification" and metrics["labels"] == ["neg", "pos"]
    assert metrics["eval"]["examples"] == 5 and 0 <= metrics["eval"]["accuracy"] <= 1
    assert metrics["loss_history"][-1] < metrics["loss_history"][0]
    assert not (tmp_path / "out" / "checkpoint").exists()  # removed once the run is complete
    # the adapter dir alone rebuilds the model: base dir, class and head size are recorded
    from splice.adapters import adapter_layers, load_adapter

    model = load_adapter(None, tmp_path / "out" / "adapter")
    assert sorted(adapter_layers(model)) == [
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
    ]
    assert model.classifier.weight.requires_grad


def test_same_seed_same_metrics_other_seed_differs(bert_dir, csv_file, tmp_path):
    a = run(bert_dir, csv_file, tmp_path / "a")
    b = run(bert_dir, csv_file, tmp_path / "b")
    c = run(bert_dir, csv_file, tmp_path / "c", seed=1)
    assert stable(a) == stable(b)
    assert a["loss_history"] != c["loss_history"]


def test_interrupted_run_resumes_to_the_same_result(bert_dir, csv_file, tmp_path):
    kw = dict(checkpoint_every=3, method="nola", adapter={"k": 32, "l": 32, "dropout": 0.1})
    full = run(bert_dir, csv_file, tmp_path / "full", **kw)

    interrupted(bert_dir, csv_file, tmp_path / "cut", at_step=5, **kw)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 3
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = run(bert_dir, csv_file, tmp_path / "cut", resume=True, **kw)
    assert resumed["resumed_from_step"] == 3
    assert stable(resumed) == stable(full)


def test_a_hook_that_stops_at_a_checkpoint_step_keeps_that_step(bert_dir, csv_file, tmp_path):
    """The checkpoint of a boundary step is written before the step hook runs, so Ctrl-C
    (or a pause) raised by the hook at step 3 resumes from 3, not from the step before."""
    kw = dict(checkpoint_every=3)
    interrupted(bert_dir, csv_file, tmp_path / "cut", at_step=3, **kw)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 3


def test_resume_refuses_a_checkpoint_with_other_settings(bert_dir, csv_file, tmp_path):
    interrupted(bert_dir, csv_file, tmp_path, at_step=2, checkpoint_every=1)
    with pytest.raises(SpliceError, match=r"different settings: \['lr'\]"):
        run(bert_dir, csv_file, tmp_path, steps=8, checkpoint_every=1, lr=1e-3, resume=True)


def test_causal_lm_with_mos_bf16_and_grad_accum(gpt2_dir, tmp_path):
    data = tmp_path / "lm.jsonl"
    data.write_text(
        "".join(json.dumps({"text": "the movie was very good fun"}) + "\n" for _ in range(20))
    )
    metrics = run(
        gpt2_dir,
        data,
        tmp_path / "out",
        method="mos",
        adapter={"r": 2, "e": 1, "l": 4},
        precision="bf16",
        grad_accum=2,
        batch_size=4,
    )
    assert metrics["objective"] == "causal-lm"
    assert metrics["eval"]["perplexity"] > 1
    assert metrics["loss_history"][-1] < metrics["loss_history"][0]
    assert (tmp_path / "out" / "adapter" / "splice_adapter.safetensors").is_file()


def test_full_finetuning_writes_a_loadable_model(bert_dir, csv_file, tmp_path):
    metrics = run(bert_dir, csv_file, tmp_path / "out", method="full", steps=3)
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out" / "model"
    )
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_a_bench_task_name_is_data(bert_dir, tmp_path, monkeypatch):
    import splice.data.registry as registry

    texts = [f"the movie was {'good fun' if i % 2 else 'awful dull'}" for i in range(40)]
    task = registry.Task(
        "toy", "text", lambda: (texts, [i % 2 for i in range(40)], ["neg", "pos"]), key="toy-1"
    )
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "TASKS", {"toy": task})
    metrics = run(bert_dir, "toy", tmp_path / "out", steps=2)
    assert metrics["labels"] == ["neg", "pos"]
    assert metrics["eval_examples"] == 8  # the task's stratified 20 % test split
    val = run(bert_dir, "toy", tmp_path / "val", steps=2, eval_split="val")
    assert val["eval_examples"] == 4  # its 10 % validation split, for choosing settings
    assert val["loss_history"] == metrics["loss_history"]  # same training rows


def test_eval_split_needs_a_bench_task(bert_dir, csv_file, tmp_path):
    with pytest.raises(SpliceError, match="--eval-split val needs a bench task"):
        run(bert_dir, csv_file, tmp_path / "out", eval_split="val")


def test_head_lr_drives_the_new_head_and_lr_the_adapter(bert_dir, csv_file, tmp_path):
    """The new head trains at --head-lr, by default 5e-2 whatever --lr is (issue #21: at the
    adapter's 5e-4 it barely moved in 200 steps); --method head trains it at --lr."""
    from splice.adapters import load_adapter
    from splice.train.config import DEFAULT_HEAD_LR

    frozen = run(bert_dir, csv_file, tmp_path / "frozen", lr=1e-12, head_lr=1e-12)
    head = run(bert_dir, csv_file, tmp_path / "head", lr=1e-12)
    assert head["loss_history"][0] == frozen["loss_history"][0]  # same init, same batch
    assert head["loss_history"][-1] != frozen["loss_history"][-1]
    explicit = run(bert_dir, csv_file, tmp_path / "explicit", lr=1e-12, head_lr=DEFAULT_HEAD_LR)
    assert explicit["loss_history"] == head["loss_history"] and DEFAULT_HEAD_LR == 5e-2
    before, after = (load_adapter(None, tmp_path / d / "adapter") for d in ("frozen", "head"))
    moved = (after.classifier.weight - before.classifier.weight).abs().max().item()
    assert 1e-2 < moved <= 8 * DEFAULT_HEAD_LR  # AdamW: ≤ lr per step (frozen's ≤ 8·1e-12)
    b = [p for n, p in after.named_parameters() if n.endswith("lora_B")]
    assert b and max(p.abs().max().item() for p in b) < 1e-9  # B starts at 0, moved ≤ 8·lr
    probe = [
        run(bert_dir, csv_file, tmp_path / f"probe{i}", method="head", steps=3, **kw)
        for i, kw in enumerate([dict(lr=1e-12), dict(lr=1e-12, head_lr=1e-12), dict(lr=None)])
    ]
    assert probe[0]["loss_history"] == probe[1]["loss_history"]  # --method head: at --lr
    assert probe[0]["loss_history"] != probe[2]["loss_history"]  # without --lr: the default


@pytest.mark.parametrize("method", ["full", "head"])
def test_whole_model_methods_refuse_adapter_options(bert_dir, csv_file, tmp_path, method):
    with pytest.raises(ValueError, match=f"--method {method} takes no adapter options"):
        TrainConfig(
            model=bert_dir, data=str(csv_file), out=tmp_path, method=method, adapter={"r": 2}
        )


def test_head_is_a_linear_probe_the_backbone_stays_put(bert_dir, csv_file, tmp_path):
    metrics = run(bert_dir, csv_file, tmp_path / "out", method="head", lr=5e-2, steps=6)
    base = transformers.AutoModel.from_pretrained(bert_dir)
    probe = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out" / "model"
    )
    head = ("classifier.weight", "classifier.bias")
    assert metrics["trainable_parameters"] == sum(probe.get_parameter(n).numel() for n in head)
    assert metrics["adapter_parameters"] is None
    backbone = {n.removeprefix("bert."): p for n, p in probe.named_parameters() if n not in head}
    assert backbone.keys() == dict(base.named_parameters()).keys()
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in backbone.items())  # bitwise
    assert metrics["loss_history"][-1] < metrics["loss_history"][0]  # the head learnt


def test_head_needs_a_new_classification_head(gpt2_dir, tmp_path):
    data = tmp_path / "lm.jsonl"
    data.write_text('{"text": "the movie was good fun"}\n' * 20)
    with pytest.raises(SpliceError, match="--method head trains only a new classification head"):
        run(gpt2_dir, data, tmp_path / "out", method="head")


def test_classification_without_labels_is_an_error(bert_dir, tmp_path):
    data = tmp_path / "x.csv"
    data.write_text("text\n" + "the movie\n" * 10)
    with pytest.raises(SpliceError, match="needs a 'label' column"):
        run(bert_dir, data, tmp_path / "out", objective="classification")


def test_cli_train_json(bert_dir, csv_file, tmp_path):
    from typer.testing import CliRunner

    from splice.cli import app

    out = tmp_path / "out"
    args = [
        "train",
        str(bert_dir),
        str(csv_file),
        "--out",
        str(out),
        "--steps",
        "2",
        "--method",
        "lora",
        "--set",
        "r=2",
        "--targets",
        "query",
        "--format",
        "peft",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    lora = 2 * 2 * (16 + 16)  # 2 layers x r=2 x (d_in + d_out); the head is 2 x 16 + 2
    assert metrics["trainable_parameters"] == lora + 2 * 16 + 2
    assert metrics["adapter_parameters"] == lora
    assert (out / "adapter" / "adapter_config.json").is_file()
    bad = CliRunner().invoke(app, [*args[:6], "--precision", "fp8"])
    assert bad.exit_code == 2


def test_a_loss_that_barely_moved_is_a_warning(bert_dir, csv_file, tmp_path):
    from typer.testing import CliRunner

    from splice.cli import app

    metrics = run(bert_dir, csv_file, tmp_path / "m", lr=1e-12, head_lr=1e-12)
    assert len(metrics["warnings"]) == 1 and "loss barely moved" in metrics["warnings"][0]
    written = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert written["warnings"] == metrics["warnings"]
    args = ["train", str(bert_dir), str(csv_file), "--out", str(tmp_path / "cli")]
    args += ["--steps", "4", "--lr", "1e-12", "--head-lr", "1e-12", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "warning: the training loss barely moved" in result.stderr
    assert json.loads(result.stdout)["warnings"] == [result.stderr.split("warning: ")[1].strip()]


@pytest.mark.parametrize(
    ("objective", "history", "warns"),
    [
        ("classification", [2.708] * 10 + [2.39] * 10, True),  # the run: −12 %
        ("classification", [2.708] * 10 + [1.9] * 10, False),  # −30 %
        ("causal-lm", [3.0] * 10 + [2.97] * 10, True),  # −1 %
        ("causal-lm", [3.0] * 10 + [2.8] * 10, False),  # −7 %
        ("classification", [0.69, 0.7, 0.3, 0.2, 0.25], False),  # windows of 1 on 5 steps
    ],
)
def test_stall_rule(objective, history, warns):
    from splice.train.hf import _stalled

    assert (_stalled(history, objective) is not None) is warns


def _two_task_csv(path):
    """Task "sent" labels pos/neg, task "len" labels short/long: one head over the four."""
    g = torch.Generator().manual_seed(1)
    lines = ["text,label,task"]
    for i in range(40):
        words = POS if i % 2 else NEG
        pick = " ".join(words[j] for j in torch.randint(0, 4, (2,), generator=g).tolist())
        lines.append(f"the film was {pick},{'pos' if i % 2 else 'neg'},sent")
    for i in range(24):
        lines.append(f"{'a movie ' * (1 + 3 * (i % 2))}was,{'long' if i % 2 else 'short'},len")
    path.write_text("\n".join(lines) + "\n")
    return path


def _record_tasks(monkeypatch, seen):
    """Record (training?, routed task, input_ids) of every forward of the trained model."""
    import splice.train.hf as hf
    from splice.adapters import adapter_layers

    def adapt(cfg, model, new_modules, total):
        original(cfg, model, new_modules, total)
        ept = next(iter(adapter_layers(model).values())).adapter

        def hook(module, args, kwargs):
            seen.append((module.training, ept.task, kwargs["input_ids"]))

        model.register_forward_pre_hook(hook, with_kwargs=True)

    original = hf._adapt
    monkeypatch.setattr(hf, "_adapt", adapt)


def test_ept_multi_task_batches_route_by_their_task(bert_dir, tmp_path, monkeypatch):
    data = _two_task_csv(tmp_path / "two.csv")
    seen = []
    _record_tasks(monkeypatch, seen)
    options = {"r": 2, "kernels": [2, 4], "top_k": 1, "dropout": 0.0}
    metrics = run(bert_dir, data, tmp_path / "out", method="ept", adapter=options, steps=10)
    assert metrics["tasks"] == ["len", "sent"]  # task id = index
    assert metrics["labels"] == ["long", "neg", "pos", "short"]  # one head over both tasks
    film = 5 + WORDS.index("film")  # token id: only rows of task "sent" (id 1) have it

    def task_of(ids):
        return {int((row == film).any()) for row in ids}

    train = [(task, task_of(ids)) for training, task, ids in seen if training]
    assert len(train) == 10 and {task for task, _ in train} == {0, 1}
    assert all(rows == {task} for task, rows in train)  # each batch is its task's, routed so
    evaluated = [(task, task_of(ids)) for training, task, ids in seen if not training]
    assert {task for task, _ in evaluated} == {0, 1}
    assert all(rows == {task} for task, rows in evaluated)
    assert sorted(metrics["eval_by_task"]) == ["len", "sent"]
    by_task = metrics["eval_by_task"].values()
    assert metrics["eval"]["examples"] == sum(r["examples"] for r in by_task) == 6
    mean = sum(r["loss"] * r["examples"] for r in by_task) / 6
    assert metrics["eval"]["loss"] == pytest.approx(mean)


def test_multi_task_errors(bert_dir, tmp_path):
    data = _two_task_csv(tmp_path / "two.csv")
    with pytest.raises(SpliceError, match=r"2 tasks in the data, ept has 1 task slots.*tasks=2"):
        run(bert_dir, data, tmp_path / "a", method="ept", adapter={"tasks": 1})
    with pytest.raises(SpliceError, match="a PEFT LoRA holds one ΔW"):
        run(bert_dir, data, tmp_path / "b", method="ept", format="peft")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label,task\nthe film,pos,a\nthe movie,neg,\n")
    with pytest.raises(SpliceError, match="row 2 has no task"):
        run(bert_dir, bad, tmp_path / "c")


def test_a_method_without_a_peft_form_fails_before_the_first_step(bert_dir, csv_file, tmp_path):
    steps = []
    config = TrainConfig(
        model=bert_dir, data=str(csv_file), out=tmp_path / "o", method="parallel", format="peft",
        steps=4, batch_size=8, progress=False,
    )  # fmt: skip
    with pytest.raises(SpliceError, match="parallel has no PEFT adapter format"):
        train(config, on_step=lambda step, loss: steps.append(step))
    assert steps == []
    assert not (tmp_path / "o" / "adapter").exists()


def test_methods_without_tasks_train_as_before_and_evaluate_per_task(bert_dir, tmp_path):
    data = _two_task_csv(tmp_path / "two.csv")
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(line.rsplit(",", 1)[0] for line in data.read_text().splitlines()))
    with_tasks = run(bert_dir, data, tmp_path / "a")
    without = run(bert_dir, plain, tmp_path / "b")
    assert with_tasks["loss_history"] == without["loss_history"]  # mixed batches, unchanged
    assert without["tasks"] is None and without["eval_by_task"] is None
    assert with_tasks["eval"]["accuracy"] == pytest.approx(without["eval"]["accuracy"])
    assert with_tasks["eval"]["loss"] == pytest.approx(without["eval"]["loss"], rel=1e-5)
    assert sorted(with_tasks["eval_by_task"]) == ["len", "sent"]


def test_an_epoch_based_adalora_run_schedules_its_ranks_over_the_run(bert_dir, csv_file, tmp_path):
    # No --steps: the run's length comes from --epochs, and AdaLoRA's total_step must be it
    # (unset, the rank allocation never runs).
    metrics = run(bert_dir, csv_file, tmp_path / "o", steps=None, epochs=2, method="adalora",
                  adapter={"r": 4, "target_r": 2, "tinit": 1, "tfinal": 1})  # fmt: skip
    saved = json.loads((tmp_path / "o" / "adapter" / "splice_adapter.json").read_text())
    assert metrics["steps"] == 10 and saved["config"]["total_step"] == 10
