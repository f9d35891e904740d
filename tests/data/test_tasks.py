"""Task loaders on the real packaged data, split determinism and stratification, hash pins."""

from __future__ import annotations

import gzip
import importlib
import json
import pickle
import pkgutil

import numpy as np
import pytest

from splice.data.local import local_task, resolve_task
from splice.data.registry import TASKS, Caps, Source, Task, load_task, stratified_split
from splice.data.tasks._images import read_numpy_pickle
from splice.errors import SpliceError

# (examples, classes, largest class) as parsed for ASSETS.md §B/§C.
EXPECTED = {
    "rt_sentiment": (12808, 2, 7403),
    "subjectivity": (18575, 2, 12808),
    "tweet_sentiment": (38158, 3, 16186),
    "fortune_topic": (3581, 8, 1040),
    "wordnet_supersense": (80381, 25, 11562),
    "convention_party": (4063, 2, 2292),
    "fashion_mnist": (70000, 10, 7000),
    "mnist_5k": (5000, 10, 500),
    "animal_mnist": (10000, 10, 1000),
    "sk_digits": (1797, 10, 183),
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))


def test_registry_has_every_builtin_task():
    assert set(TASKS.names()) == set(EXPECTED)


@pytest.mark.parametrize("package", ["splice.data", "splice.train", "splice.bench"])
def test_no_lazy_name_is_a_submodule(package):
    """A lazy name equal to a submodule's would bind the module once that is imported."""
    pkg = importlib.import_module(package)
    submodules = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    assert not submodules & set(pkg.__all__)
    for name in submodules:
        importlib.import_module(f"{package}.{name}")
    assert not [n for n in pkg.__all__ if isinstance(getattr(pkg, n), type(pkg))]


def test_the_data_package_gives_the_registry():
    import splice.data
    import splice.data.tasks  # the subpackage of packaged tasks

    assert splice.data.TASKS is TASKS
    assert splice.data.load_task is load_task


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_packaged_task_counts_and_classes(name):
    task = TASKS.get(name)
    x, y, classes = task.read()
    n, k, largest = EXPECTED[name]
    assert len(x) == len(y) == n
    assert len(classes) == len(set(classes)) == k
    counts = np.bincount(y, minlength=k)
    assert len(counts) == k and counts.min() > 0 and counts.max() == largest
    if task.modality == "image":
        assert x.dtype == np.uint8 and x.ndim == 3 and x.max() > 200
    else:
        assert all(isinstance(t, str) and t.strip() for t in x[:100])


def test_text_parsing_rules():
    x, _, classes = TASKS.get("wordnet_supersense").read()
    assert "noun.Tops" not in classes
    assert not any('; "' in t for t in x)  # quoted examples are cut off
    assert min(len(t.split()) for t in x) >= 3
    fx, _, _ = TASKS.get("fortune_topic").read()
    assert not any("\n" in t or t == "%" for t in fx)


def test_splits_are_deterministic_disjoint_and_stratified():
    labels = np.repeat(np.arange(3), [500, 300, 200])
    caps = Caps(train=400, val=60, test=150)
    a = stratified_split(labels, caps, seed=7)
    b = stratified_split(labels, caps, seed=7)
    c = stratified_split(labels, caps, seed=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    train, val, test = a
    assert (len(train), len(val), len(test)) == (400, 60, 150)
    assert len(set(train) | set(val) | set(test)) == 610
    for idx in a:
        share = np.bincount(labels[idx], minlength=3) / len(idx)
        np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=1.5 / len(idx))


def test_small_dataset_caps_by_fraction():
    labels = np.arange(100) % 2
    train, val, test = stratified_split(labels, Caps(), seed=0)
    assert (len(train), len(val), len(test)) == (70, 10, 20)


def test_load_task_caches_splits(monkeypatch):
    task = TASKS.get("sk_digits")
    first = load_task(task, Caps(300, 50, 100), seed=0)
    assert np.bincount(first.test.y).min() >= 9  # every digit in the 100-image test split

    def boom():
        raise AssertionError("re-read the source although the splits are cached")

    cached = load_task(Task(task.name, task.modality, boom, task.key), Caps(300, 50, 100), 0)
    np.testing.assert_array_equal(first.train.x, cached.train.x)
    np.testing.assert_array_equal(first.test.y, cached.test.y)
    assert cached.classes == first.classes and cached.key == first.key
    other = load_task(task, Caps(300, 50, 100), seed=1)
    assert other.key != first.key and not np.array_equal(other.test.y, first.test.y)


@pytest.mark.parametrize("damage", ["truncated", "old_layout"])
def test_damaged_or_stale_split_cache_is_rebuilt(tmp_path, damage):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(40)))
    first = load_task(local_task(f), Caps(30, 4, 8))
    (path,) = (tmp_path / "cache" / "bench" / "data").glob("*.npz")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:  # an earlier release stored texts as one string array
        np.savez(path, classes=np.asarray(["0", "1"]), train_x=np.asarray(first.train.x))
    again = load_task(local_task(f), Caps(30, 4, 8))
    assert again.train.x == first.train.x and again.test.x == first.test.x
    assert load_task(local_task(f), Caps(30, 4, 8)).val.x == first.val.x  # rewritten whole


def test_hash_mismatch_is_a_one_line_error(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("text,label\n")
    with pytest.raises(SpliceError, match="sha256 mismatch") as e:
        Source("somepkg", str(f), "0" * 64).locate()
    assert "\n" not in str(e.value) and "apt-get install" in str(e.value)
    with pytest.raises(SpliceError, match=r"not installed.*pip install --no-deps nope==1\.0"):
        Source("nope", "x.csv", "0" * 64, module="no_such_module_xyz", version="1.0").locate()


def test_pickle_loader_refuses_non_numpy_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    f = tmp_path / "evil.gz"
    f.write_bytes(gzip.compress(pickle.dumps(Evil())))
    from splice.data.cache import file_sha256

    source = Source("evil", str(f), file_sha256(f))
    with pytest.raises(SpliceError, match=r"refusing pickle global builtins\.print"):
        read_numpy_pickle(source)
    ok = tmp_path / "ok.gz"
    ok.write_bytes(gzip.compress(pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3))))
    arr = read_numpy_pickle(Source("ok", str(ok), file_sha256(ok)))
    np.testing.assert_array_equal(arr, np.arange(6).reshape(2, 3))


def test_local_text_and_image_tasks(tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_text('text,label\n"good, fine",pos\nbad,neg\nok,pos\n')
    jsonl = tmp_path / "mine2.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    t = resolve_task(str(csv))
    assert (t.name, t.modality) == ("mine", "text")
    x, y, classes = t.read()
    assert x == ["good, fine", "bad", "ok"] and y.tolist() == [1, 0, 1]
    assert classes == ("neg", "pos")
    x, y, classes = local_task(jsonl).read()
    assert x == ["a", "b"] and y.tolist() == [1, 0] and classes == ("0", "1")
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhi,1\n")
    with pytest.raises(SpliceError, match="'text' and 'label'"):
        local_task(bad).read()

    from PIL import Image

    for cls, value in (("dark", 20), ("light", 230)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (10, 12), value + i).save(tmp_path / "imgs" / cls / f"{i}.png")
    task = resolve_task(str(tmp_path / "imgs"))
    x, y, classes = task.read()
    assert task.modality == "image" and classes == ("dark", "light")
    assert x.shape == (6, 64, 64, 3) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x[:3].max() < 30 and x[3:].min() > 220
    with pytest.raises(SpliceError, match="unknown bench task"):
        resolve_task("no_such_task")


def test_text_splits_round_trip_through_the_cache(tmp_path):
    texts = [f'naïve café {"😀" * (i % 3)} n°{i}, "quoted"' for i in range(40)] + [""] * 2
    f = tmp_path / "uni.jsonl"
    lines = [json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(texts)]
    f.write_text("\n".join(lines) + "\n")
    first = load_task(local_task(f), Caps(30, 4, 8))
    again = load_task(local_task(f), Caps(30, 4, 8))  # from the .npz
    for split in ("train", "val", "test"):
        assert getattr(again, split).x == getattr(first, split).x
        np.testing.assert_array_equal(getattr(again, split).y, getattr(first, split).y)
    seen = first.train.x + first.val.x + first.test.x
    assert sorted(seen) == sorted(texts)
