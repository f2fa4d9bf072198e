"""data.augment: EDA edits over WordNet and paraphrases from a seq2seq model, of the training split only,
seeded, cached under the settings' key and recorded in splits.json.

The EDA tests need WordNet (Debian's wordnet-base or nltk's data): outside CI they skip without it, in CI
(`ci_required`) that skip is a failure. The paraphrase tests build a tiny random BART with the suite's
WordPiece vocabulary.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorafit import augment, data, eda, job
from lorafit.cli import main
from lorafit.config import AugmentConfig, DataConfig, load_config
from lorafit.errors import UserError
from lorafit.rundir import RunDir

from conftest import VOCAB, tiny_overrides, write_dataset, write_tokenizer

TEXT = "the traveller booked a cheap flight and a quiet hotel for the conference trip"


@pytest.fixture(scope="session")
def wordnet_folder(tmp_path_factory) -> Path:
    """A lorafit cache holding the WordNet copy, made once for the session (the reader takes seconds to load)."""
    cache = tmp_path_factory.mktemp("wordnet-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAFIT_CACHE_DIR", str(cache))
        try:
            eda.wordnet()
        except UserError as e:
            pytest.skip(f"WordNet not installed: {e}")
    return cache / "wordnet"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh lorafit cache for this test."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def wordnet(wordnet_folder, cache):
    """nltk's reader over WordNet, with this test's cache linked to the session's WordNet copy."""
    if wordnet_folder.exists():  # absent when nltk's own WordNet data is installed
        (cache / "wordnet").symlink_to(wordnet_folder, target_is_directory=True)
    return eda.wordnet()


def wordnet_synonyms(reader, word: str) -> set[str]:
    return {lemma.name().replace("_", " ").replace("-", " ").lower() for s in reader.synsets(word) for lemma in s.lemmas()}


def dataset(folder: Path, n_train: int = 60, **cfg):
    write_dataset(folder, n_train=n_train, n_test=15)
    found, _ = data.load(DataConfig(name=str(folder), **cfg), seed=0)
    return found


# -- the four EDA operations --------------------------------------------------------------------

def test_random_swap_keeps_the_words():
    words = TEXT.split()
    for seed in range(20):
        swapped = eda.random_swap(words, 3, random.Random(seed))
        assert Counter(swapped) == Counter(words)
    assert any(eda.random_swap(words, 1, random.Random(seed)) != words for seed in range(5))


def test_random_deletion_removes_words_in_order():
    words = TEXT.split()
    for seed in range(20):
        kept = eda.random_deletion(words, 0.3, random.Random(seed))
        it = iter(words)
        assert all(w in it for w in kept), "the kept words are a subsequence of the text"
        assert 1 <= len(kept) <= len(words)
    assert any(len(eda.random_deletion(words, 0.3, random.Random(s))) < len(words) for s in range(5))
    assert len(eda.random_deletion(words, 0.99, random.Random(0))) == 1  # one word survives
    assert eda.random_deletion(["hello"], 0.99, random.Random(0)) == ["hello"]


@pytest.mark.ci_required
def test_synonym_replacement_uses_wordnet_synonyms(wordnet):
    tool = eda.Eda(wordnet, 0.1, 0.1, 0.1, 0.1)
    words = TEXT.split()
    changed = 0
    for seed in range(10):
        out = " ".join(eda.synonym_replacement(words, 1, random.Random(seed), tool.synonyms))
        # One word, not a stop word, replaced (every occurrence) by one of its WordNet synonyms.
        found = [(word, synonym) for word in set(words) - eda.STOP_WORDS for synonym in wordnet_synonyms(wordnet, word)
                 if synonym != word and re.sub(rf"\b{word}\b", synonym, TEXT) == out]
        assert found, f"{out!r}: no word was replaced by one of its WordNet synonyms"
        changed += 1
    assert changed == 10
    # Stop words are never replaced, and the case of the replaced word is kept.
    for seed in range(5):
        out = eda.synonym_replacement("The Cheap is the".split(), 2, random.Random(seed), tool.synonyms)
        assert out[0] == "The" and out[-2:] == ["is", "the"] and out[1] != "Cheap" and out[1][0].isupper()
        assert out[1].lower() in wordnet_synonyms(wordnet, "cheap")


@pytest.mark.ci_required
def test_random_insertion_adds_synonyms_of_the_text(wordnet):
    tool = eda.Eda(wordnet, 0.1, 0.1, 0.1, 0.1)
    words = TEXT.split()
    for seed in range(10):
        out = eda.random_insertion(words, 1, random.Random(seed), tool.synonyms)
        assert len(out) > len(words)
        # Removing the inserted words (one synonym, maybe of several words) gives the text back.
        for start in range(len(out)):
            for length in range(1, len(out) - len(words) + 1):
                if out[:start] + out[start + length:] == words:
                    inserted = " ".join(out[start:start + length])
                    if any(inserted in wordnet_synonyms(wordnet, w) for w in words if w not in eda.STOP_WORDS):
                        break
            else:
                continue
            break
        else:
            pytest.fail(f"{out}: no inserted WordNet synonym of a word of the text")


@pytest.mark.ci_required
def test_eda_is_seeded_per_text(wordnet):
    tool = eda.Eda(wordnet, 0.1, 0.1, 0.1, 0.1)
    first = [tool.augment(f"{TEXT} {i}", 4, seed=7) for i in range(5)]
    assert [tool.augment(f"{TEXT} {i}", 4, seed=7) for i in range(5)] == first
    assert [tool.augment(f"{TEXT} {i}", 4, seed=8) for i in range(5)] != first
    # An example's edits do not depend on the others around it.
    assert tool.augment(f"{TEXT} 3", 4, seed=7) == first[3]
    assert all(len(copies) == 4 for copies in first)


# -- apply: the training split only, recorded, cached -------------------------------------------

@pytest.mark.ci_required
def test_apply_augments_train_only_and_records_it(wordnet, tmp_path):
    plain = dataset(tmp_path / "data")
    cfg = AugmentConfig(kind="eda", n_per_example=3)
    out = augment.apply(plain, cfg, seed=0, progress=False)
    train, before = out.splits["train"], plain.splits["train"]
    n = len(before)
    record = out.augmentation
    assert train.texts[:n] == before.texts and train.labels[:n] == before.labels and train.rows[:n] == before.rows
    assert record["examples"] == len(train) - n > 0.8 * 3 * n
    assert record["examples"] + record["dropped"] == 3 * n
    assert train.rows[n:] == record["source_rows"]
    by_row = dict(zip(before.rows, zip(before.texts, before.labels)))
    per_source = Counter(record["source_rows"])
    assert max(per_source.values()) <= 3
    for text, label, row in zip(train.texts[n:], train.labels[n:], train.rows[n:]):
        assert label == by_row[row][1] and text != by_row[row][0]
    for name in ("validation", "test"):
        assert out.splits[name] is plain.splits[name]
    assert out.label_names == plain.label_names

    split_record = out.splits_record()
    assert split_record["train"] == before.rows  # train's own rows are the source file's
    assert split_record["augmented"]["source_rows"] == record["source_rows"]
    assert split_record["augmented"]["kind"] == "eda" and split_record["augmented"]["settings"]["n_per_example"] == 3
    assert {k: v for k, v in split_record.items() if k not in ("augmented", "provenance")} == \
        {k: v for k, v in plain.splits_record().items() if k != "provenance"}
    assert "3 per example" in split_record["provenance"]["train"]


@pytest.mark.ci_required
def test_apply_after_a_few_shot_draw(wordnet, tmp_path):
    plain = dataset(tmp_path / "data", n_train=90, shots_per_class=5)
    out = augment.apply(plain, AugmentConfig(kind="eda", alpha_ri=0, alpha_sr=0), seed=0, progress=False)
    assert len(plain.splits["train"]) == 15
    assert 1 <= len(out.splits["train"]) - 15 <= 15
    assert set(out.splits["train"].rows) == set(plain.splits["train"].rows)
    assert out.splits["validation"] is plain.splits["validation"]


@pytest.mark.ci_required
def test_same_seed_same_rows_other_seed_other_rows(wordnet, wordnet_folder, tmp_path, monkeypatch):
    plain = dataset(tmp_path / "data")
    cfg = AugmentConfig(kind="eda", n_per_example=2)
    first = augment.apply(plain, cfg, seed=0, progress=False).splits["train"]
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(tmp_path / "other-cache"))  # made again, not read back
    (tmp_path / "other-cache").mkdir()
    if wordnet_folder.exists():
        (tmp_path / "other-cache" / "wordnet").symlink_to(wordnet_folder, target_is_directory=True)
    again = augment.apply(plain, cfg, seed=0, progress=False).splits["train"]
    assert again == first
    assert augment.apply(plain, cfg, seed=1, progress=False).splits["train"] != first
    assert augment.apply(plain, cfg.model_copy(update={"seed": 1}), seed=0, progress=False).splits["train"] != first


@pytest.mark.ci_required
def test_a_second_run_reads_the_cache(wordnet, cache, tmp_path, monkeypatch):
    plain = dataset(tmp_path / "data")
    cfg = AugmentConfig(kind="eda", n_per_example=2)
    first = augment.apply(plain, cfg, seed=0, progress=False)
    [entry] = (cache / "augment").iterdir()
    assert entry.name == f"{first.augmentation['cache_key']}.json"

    def no_augmenting(*args, **kwargs):
        raise AssertionError("augmented again instead of reading the cache")

    monkeypatch.setattr(eda.Eda, "augment", no_augmenting)
    assert augment.apply(plain, cfg, seed=0, progress=False) == first
    with pytest.raises(AssertionError, match="instead of reading the cache"):
        augment.apply(plain, cfg.model_copy(update={"alpha_rs": 0.2}), seed=0, progress=False)


def test_the_cache_key_changes_with_every_setting():
    texts = ["a b c", "d e f"]
    for kind, changes in {
        "eda": {"n_per_example": 2, "alpha_sr": 0.2, "alpha_ri": 0.3, "alpha_rs": 0.0, "p_rd": 0.5},
        "paraphrase": {"n_per_example": 2, "model": "other/model", "prefix": "paraphrase: ", "temperature": 0.7,
                       "top_p": 0.5, "max_new_tokens": 9, "batch_size": 3},
    }.items():
        cfg = AugmentConfig(kind=kind, model="org/model" if kind == "paraphrase" else None)
        assert set(changes) == set(augment.settings_of(cfg))  # every setting the augmenter reads is tried
        identity = {"wordnet": "3.0"} if kind == "eda" else {"revision": "abc"}
        base = augment.cache_key(kind, augment.settings_of(cfg), 0, identity, texts)
        keys = {base}
        for name, value in changes.items():
            keys.add(augment.cache_key(kind, augment.settings_of(cfg.model_copy(update={name: value})), 0, identity, texts))
        keys.add(augment.cache_key(kind, augment.settings_of(cfg), 1, identity, texts))
        keys.add(augment.cache_key(kind, augment.settings_of(cfg), 0, {**identity, "x": 1}, texts))
        keys.add(augment.cache_key(kind, augment.settings_of(cfg), 0, identity, texts[::-1]))
        assert len(keys) == len(changes) + 4
    # A setting another augmenter reads does not change EDA's key.
    eda_cfg = AugmentConfig(kind="eda")
    assert augment.settings_of(eda_cfg.model_copy(update={"temperature": 0.3})) == augment.settings_of(eda_cfg)


# -- paraphrase ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory) -> Path:
    """A 1-layer, 16-wide random BART with the suite's WordPiece vocabulary, saved as safetensors."""
    from transformers import BartConfig, BartForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny-bart")
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(VOCAB), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2, forced_eos_token_id=None)
    BartForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return folder


def paraphrase(model: Path, **settings) -> AugmentConfig:
    return AugmentConfig(kind="paraphrase", model=str(model), max_new_tokens=8, batch_size=7, **settings)


def test_paraphrases_are_seeded_and_recorded(tiny_seq2seq, cache, tmp_path, monkeypatch):
    plain = dataset(tmp_path / "data", n_train=30)
    cfg = paraphrase(tiny_seq2seq, n_per_example=2)
    first = augment.apply(plain, cfg, seed=0, progress=False)
    n = len(plain.splits["train"])
    train = first.splits["train"]
    assert first.augmentation["examples"] + first.augmentation["dropped"] == 2 * n
    assert first.augmentation["examples"] > n
    assert first.augmentation["sha256"] and first.augmentation["settings"]["model"] == str(tiny_seq2seq)
    vocab = set(VOCAB)
    assert all(set(text.split()) <= vocab for text in train.texts[n:])  # the tiny model's words
    assert first.splits["test"] is plain.splits["test"] and first.splits["validation"] is plain.splits["validation"]

    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(tmp_path / "other-cache"))  # sampled again: the same texts
    assert augment.apply(plain, cfg, seed=0, progress=False).splits["train"] == train
    assert augment.apply(plain, cfg, seed=1, progress=False).splits["train"] != train

    # The training's random state is not disturbed.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    augment.apply(plain, cfg, seed=2, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_paraphrases_come_from_the_cache_without_loading_the_model(tiny_seq2seq, cache, tmp_path, monkeypatch):
    import transformers

    plain = dataset(tmp_path / "data", n_train=30)
    cfg = paraphrase(tiny_seq2seq)
    first = augment.apply(plain, cfg, seed=0, progress=False)

    def unloadable(*args, **kwargs):
        raise OSError("the model cannot be loaded")

    monkeypatch.setattr(transformers.AutoModelForSeq2SeqLM, "from_pretrained", unloadable)
    assert augment.apply(plain, cfg, seed=0, progress=False) == first
    with pytest.raises(UserError, match="cannot load data.augment.model"):
        augment.apply(plain, cfg.model_copy(update={"temperature": 0.5}), seed=0, progress=False)


def test_a_changed_model_folder_is_augmented_anew(tiny_seq2seq, cache, tmp_path):
    import shutil

    plain = dataset(tmp_path / "data", n_train=20)
    copy = tmp_path / "model"
    shutil.copytree(tiny_seq2seq, copy)
    first = augment.apply(plain, paraphrase(copy), seed=0, progress=False)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "temperature_note": 1}))
    assert augment.apply(plain, paraphrase(copy), seed=0, progress=False).augmentation["cache_key"] != \
        first.augmentation["cache_key"]


def test_paraphrases_made_on_another_kind_of_device_are_not_read_from_the_cache(tiny_seq2seq, cache, tmp_path):
    """CPU and CUDA sample other random numbers, so a cache entry made on one is not the other's output; the
    identity (known without loading the local model) tells them apart, cuda:1 and cuda alike."""
    cfg = paraphrase(tiny_seq2seq)
    identities = {device: augment._Paraphraser(cfg, device).identity for device in ("cpu", "cuda", "cuda:1")}
    assert identities["cuda"] == identities["cuda:1"] != identities["cpu"]
    assert identities["cpu"]["sha256"] == identities["cuda"]["sha256"]
    texts = ["a b c"]
    assert augment.cache_key("paraphrase", augment.settings_of(cfg), 0, identities["cpu"], texts) != \
        augment.cache_key("paraphrase", augment.settings_of(cfg), 0, identities["cuda"], texts)


# -- bad input: one line, exit 2, nothing written -----------------------------------------------

def fails_cleanly(capsys, out: Path, cache: Path, *items: str) -> str:
    capsys.readouterr()
    status = main(["train", *items, "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: "), captured.err
    assert not out.exists(), f"run folder {out} was created"
    assert not (cache / "augment").exists(), "augmented texts were cached"
    return lines[0]


def test_missing_wordnet_is_one_line_naming_the_fix(tiny_bert, tiny_data, cache, tmp_path, capsys, monkeypatch):
    import nltk

    def nowhere(name, *args, **kwargs):
        raise LookupError(name)

    monkeypatch.setattr(nltk.data, "find", nowhere)
    monkeypatch.setattr(eda, "DEBIAN_WORDNET", tmp_path / "no-wordnet")
    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    line = fails_cleanly(capsys, tmp_path / "run", cache, *tiny_overrides(tiny_bert, tiny_data, **{"data.augment.kind": "eda"}))
    assert "WordNet" in line and "apt-get install wordnet-base" in line and "nltk.downloader wordnet" in line
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path / "no-wordnet"))  # a WNSEARCHDIR without the database: the same
    assert fails_cleanly(capsys, tmp_path / "run", cache,
                         *tiny_overrides(tiny_bert, tiny_data, **{"data.augment.kind": "eda"})) == line


@pytest.mark.parametrize("model,message", [
    ("{missing}", "not an existing folder and not a hub id"),
    ("no-such-org/no-such-paraphraser", "cannot load data.augment.model 'no-such-org/no-such-paraphraser'"),
    ("{encoder}", "as a sequence-to-sequence model"),
    ("{empty}", "has no config.json"),
])
def test_an_unloadable_paraphrase_model(tiny_bert, tiny_data, cache, tmp_path, capsys, model, message):
    (tmp_path / "empty").mkdir()
    model = model.format(missing=tmp_path / "nowhere" / "..." / "model", encoder=tiny_bert, empty=tmp_path / "empty")
    overrides = tiny_overrides(tiny_bert, tiny_data, **{"data.augment.kind": "paraphrase", "data.augment.model": model})
    line = fails_cleanly(capsys, tmp_path / "run", cache, *overrides)
    assert message in line


def test_a_bad_base_model_fails_before_any_augmentation(tiny_bert, tiny_data, tiny_seq2seq, cache, tmp_path, capsys):
    """A paraphrase model can take minutes over the training texts: a model.name that cannot be loaded is
    found first (one line, no run folder, nothing cached)."""
    overrides = tiny_overrides(tiny_bert, tiny_data, **{"data.augment.kind": "paraphrase", "data.augment.model": str(tiny_seq2seq),
                                                         "model.name": str(tmp_path / "no-such-encoder")})
    line = fails_cleanly(capsys, tmp_path / "run", cache, *overrides)
    assert "no-such-encoder" in line


def test_paraphrase_without_a_model_is_a_config_error(tiny_bert, tiny_data, cache, tmp_path, capsys):
    overrides = tiny_overrides(tiny_bert, tiny_data, **{"data.augment.kind": "paraphrase"})
    line = fails_cleanly(capsys, tmp_path / "run", cache, *overrides)
    assert "data.augment" in line and "needs data.augment.model" in line
    line = fails_cleanly(capsys, tmp_path / "run", cache, *tiny_overrides(tiny_bert, tiny_data, **{
        "data.augment.kind": "eda", "data.augment.alpha_sr": 0, "data.augment.alpha_ri": 0, "data.augment.alpha_rs": 0,
        "data.augment.p_rd": 0}))
    assert "changes nothing" in line


def test_pickle_only_model_needs_trust(tiny_seq2seq, cache, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_seq2seq, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="data.augment.trust_pickle=true"):
        augment.apply(dataset(tmp_path / "data", n_train=9), paraphrase(folder), seed=0, progress=False)


# -- end to end ---------------------------------------------------------------------------------

@pytest.mark.ci_required
def test_train_with_eda_end_to_end(wordnet, tiny_bert, cache, tmp_path, capsys):
    data_folder = write_dataset(tmp_path / "data")
    base = tiny_overrides(tiny_bert, data_folder, **{"train.epochs": 1})
    settings = {"data.augment.kind": "eda", "data.augment.n_per_example": 2}
    assert main(["train", *base, "--out", str(tmp_path / "plain")]) == 0
    assert main(["train", *base, *[f"{k}={v}" for k, v in settings.items()], "--out", str(tmp_path / "run")]) == 0
    run, plain = RunDir(tmp_path / "run"), RunDir(tmp_path / "plain")
    splits, before = run.read_json("splits.json"), plain.read_json("splits.json")
    for name in ("train", "validation", "test"):
        assert splits[name] == before[name]  # the source rows of every split, train's own included
    for name in ("validation", "test"):
        assert splits["content_sha256"][name] == before["content_sha256"][name]
    assert splits["content_sha256"]["train"] != before["content_sha256"]["train"]  # it holds the new texts
    record = splits["augmented"]
    assert record["kind"] == "eda" and record["seed"] == 0 and record["settings"]["n_per_example"] == 2
    assert set(record["source_rows"]) <= set(splits["train"])
    assert "eda augmentations" in splits["provenance"]["train"]
    counts = run.read_json("summary.json")["train_label_counts"]
    assert sum(counts.values()) == len(splits["train"]) + record["examples"]
    assert run.read_json("eval.json")["examples"] == plain.read_json("eval.json")["examples"]
    assert run.config().data.augment.kind == "eda"
    assert main(["eval", str(tmp_path / "run"), "--split", "test"]) == 0  # readers need no augmentation

    # A resume checks it augments the same way: the same settings pass, others are refused.
    def prepared(*overrides: str):
        cfg = load_config(None, [*base, *overrides])
        found, _ = data.load(cfg.data, cfg.seed)
        return SimpleNamespace(dataset=augment.apply(found, cfg.data.augment, cfg.seed, progress=False), cfg=cfg)

    job.check_same_data(prepared(*[f"{k}={v}" for k, v in settings.items()]), run)
    with pytest.raises(UserError, match="augmented"):
        job.check_same_data(prepared(*[f"{k}={v}" for k, v in settings.items()], "data.augment.alpha_rs=0.3"), run)
    with pytest.raises(UserError, match="augmented"):
        job.check_same_data(prepared(), run)


def test_no_augmentation_changes_nothing(tmp_path):
    plain = dataset(tmp_path / "data")
    assert augment.apply(plain, AugmentConfig(), seed=0) is plain
    assert "augmented" not in plain.splits_record()
