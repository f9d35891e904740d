"""Generation tasks from the packaged data: answers, templates, normalization, the model cache."""

from __future__ import annotations

import json

import pytest

from splice.data.causal_lm import MANIFEST, converted
from splice.data.llm_tasks import LLM_TASKS, load_gen_task, normalize, render
from splice.data.registry import Caps
from tests.bench._llm_fixture import INSTRUCTION, tokenizer


@pytest.mark.parametrize("name", sorted(LLM_TASKS))
def test_packaged_tasks_give_answers_from_their_label_set(name):
    data = load_gen_task(name, Caps(60, 10, 20), 0, max_words=12)
    labels = data.task.labels
    for split in (data.train, data.val, data.test):
        assert len(split) > 0 and len(split.inputs) == len(split.answers)
        assert all(len(x.split()) <= 13 for x in split.inputs)  # 12 words and "…"
        if labels is not None:
            assert set(split.answers) <= set(labels)
        else:  # headword: one lowercase word
            assert all(a.isalpha() and a.islower() for a in split.answers)
    assert set(data.test.inputs).isdisjoint(data.train.inputs) or name == "tweet"
    assert load_gen_task(name, Caps(60, 10, 20), 0, max_words=12).key == data.key


def test_sentiment_answers_follow_the_classification_labels():
    from splice.data.registry import TASKS, load_task

    source = load_task(TASKS.get("rt_sentiment"), Caps(40, 10, 10), 0)
    data = load_gen_task("sentiment", Caps(40, 10, 10), 0)
    words = {"rotten": "negative", "fresh": "positive"}
    assert data.test.answers == [words[source.classes[y]] for y in source.test.y]


def test_templates_render_with_and_without_a_chat_template():
    chat = render(tokenizer(chat=True), INSTRUCTION, "the cat")
    assert chat == (
        f"<|im_start|> system {INSTRUCTION} <|im_end|> <|im_start|> user the cat <|im_end|> "
        "<|im_start|> assistant "
    )
    assert render(tokenizer(), INSTRUCTION, "the cat") == f"{INSTRUCTION}\nInput: the cat\nAnswer:"


@pytest.mark.parametrize(
    ("text", "want"),
    [(" Positive.", "positive"), ('"art"\nbecause …', "art"), ("**Law**", "law"),
     ("", ""), ("new york", "new york")],
)  # fmt: skip
def test_normalize_parses_answers(text, want):
    assert normalize(text) == want


def test_conversion_cache_is_rebuilt_when_damaged(tmp_path):
    builds = []

    def build(tmp):
        builds.append(tmp)
        (tmp / "model.safetensors").write_bytes(b"weights" * 10)
        (tmp / "config.json").write_text("{}")

    out = tmp_path / "models" / "m"
    assert converted(out, build) == out and len(builds) == 1
    assert converted(out, build) == out and len(builds) == 1  # intact: reused
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert set(files) == {"model.safetensors", "config.json"}
    (out / "model.safetensors").write_bytes(b"weights" * 9 + b"WEIGHTS")  # same size
    converted(out, build)
    assert len(builds) == 2 and (out / "model.safetensors").read_bytes() == b"weights" * 10
    (out / "config.json").unlink()
    converted(out, build)
    assert len(builds) == 3 and not list(tmp_path.glob("models/*.tmp*"))
