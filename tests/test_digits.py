"""Tests for the built-in digits dataset (`digits.py`) and its tfds builder."""

import os
import re
import sys

import numpy as np
import pytest

from mmjax.data import sources
from mmjax.data.builtin import digits, digits_builder

NUM_DIGITS = 1797  # scikit-learn's copy of the optdigits test set


@pytest.fixture(scope="module")
def own_data_dir(tmp_path_factory):
    """A folder of this module's own, not the session's: the tests below watch builds happen
    (or not), so no other test may have built digits there first."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def builder(own_data_dir):
    return digits_builder.ensure_built(own_data_dir)  # the default setting: 32 px, 0.2, seed 0


def _english_tokens(text: str) -> set[str]:
    return set(re.findall(r"\w+", text))


# --- digits.py -------------------------------------------------------------------------------


def test_load_digits_is_sklearn_data():
    images, labels = digits.load_digits()
    assert images.shape == (NUM_DIGITS, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (NUM_DIGITS,)
    assert images.min() == 0 and images.max() == 16
    assert set(np.unique(labels).tolist()) == set(range(10))
    assert labels[:10].tolist() == list(range(10))  # sklearn's array starts 0, 1, ..., 9
    with pytest.raises(ValueError):
        images[0, 0, 0] = 1  # the cached arrays are shared, so they must be read-only


def test_split_indices_partition_and_seeding():
    train, val = digits.split_indices(NUM_DIGITS, 0.2, seed=0)
    assert (len(train), len(val)) == (1438, 359)  # round(1797 * 0.2) = round(359.4)
    assert len(train) + len(val) == NUM_DIGITS
    assert not set(train.tolist()) & set(val.tolist())
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(NUM_DIGITS))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted
    again = digits.split_indices(NUM_DIGITS, 0.2, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    other = digits.split_indices(NUM_DIGITS, 0.2, seed=1)
    assert len(other[1]) == len(val) and not np.array_equal(other[1], val)
    # A random split, not a block: validation spans sklearn's whole array.
    assert val.min() < NUM_DIGITS // 10 and val.max() > NUM_DIGITS * 9 // 10
    for bad in (0.0, 1.0, 1e-4):
        with pytest.raises(ValueError):
            digits.split_indices(NUM_DIGITS, bad, seed=0)


def test_to_rgb_scales_and_replicates_grey():
    images, _ = digits.load_digits()
    image = images[7]
    # At 8 px nothing is resampled, so this checks the 0..16 -> 0..255 scaling alone.
    same = digits.to_rgb(image, 8)
    assert np.array_equal(same[:, :, 0], np.rint(image * (255 / 16)).astype(np.uint8))
    big = digits.to_rgb(image, 32)
    assert big.shape == (32, 32, 3) and big.dtype == np.uint8
    assert np.array_equal(big[:, :, 0], big[:, :, 1]) and np.array_equal(big[:, :, 0], big[:, :, 2])
    # Bilinear never leaves the input's range (bicubic would overshoot next to strokes).
    assert big.min() >= same.min() and big.max() <= same.max()
    assert np.all(digits.to_rgb(np.full((8, 8), 16), 20) == 255)
    assert np.all(digits.to_rgb(np.zeros((8, 8)), 20) == 0)  # black background
    # Smooth, not blocky: more distinct grey levels than the 8x8 source has.
    assert len(np.unique(big)) > len(np.unique(image))


@pytest.mark.parametrize("label", range(10))
def test_captions_name_the_right_digit_in_both_languages(label):
    caps = digits.captions(label)
    assert len(caps) == digits.NUM_EN_CAPTIONS + digits.NUM_ZH_CAPTIONS
    assert (
        caps[0]
        == digits.canonical_caption(label)
        == f"a handwritten digit {digits.DIGIT_WORDS[label]}"
    )
    assert len(set(caps)) == len(caps)
    en, zh = caps[: digits.NUM_EN_CAPTIONS], caps[digits.NUM_EN_CAPTIONS :]
    forms = {digits.DIGIT_WORDS[label], str(label)}
    others = set(digits.DIGIT_WORDS) | {str(d) for d in range(10)}
    for cap in en:
        assert _english_tokens(cap) & forms, cap
        assert not _english_tokens(cap) & (others - forms), cap  # no other digit named
    # Both the word and the numeral are used, in each language.
    assert any(digits.DIGIT_WORDS[label] in c for c in en) and any(str(label) in c for c in en)
    for cap in zh:
        assert re.search(r"[\u4e00-\u9fff]", cap), cap  # really Chinese
        assert digits.DIGIT_WORDS_ZH[label] in cap or str(label) in cap, cap
    assert any(digits.DIGIT_WORDS_ZH[label] in c for c in zh) and any(str(label) in c for c in zh)
    assert digits.captions(label) == caps  # deterministic


def test_zeroshot_prompts():
    # The evaluator's zero-shot prompts for digits: package data, class names from the labels.
    templates = sources.read_prompts("digits")["templates"]
    prompts = [t.format(digits.DIGIT_WORDS[3]) for t in templates]
    assert len(prompts) >= 3 and all("three" in p for p in prompts)
    # No "a eight": templates must read correctly for names starting with a vowel.
    for name in digits.DIGIT_WORDS:
        for text in [t.format(name) for t in templates]:
            assert not re.search(r"\ba [aeiou]", text), text
    for label in range(10):
        for text in digits.captions(label):
            assert not re.search(r"\ba [aeiou]", text), text


# --- builder ---------------------------------------------------------------------------------


def test_builder_splits_follow_split_indices(builder):
    train_idx, val_idx = digits.split_indices(NUM_DIGITS, 0.2, seed=0)
    _, labels = digits.load_digits()
    for split, expected in [("train", train_idx), ("validation", val_idx)]:
        source = builder.as_data_source(split)
        assert len(source) == len(expected)
        records = [source[i] for i in range(len(source))]
        assert [int(r["index"]) for r in records] == expected.tolist()  # order is kept
        assert [int(r["label"]) for r in records] == labels[expected].tolist()
    assert builder.info.features["label"].names == list(digits.DIGIT_WORDS)
    assert "tensorflow" not in sys.modules  # built and read without TensorFlow


def test_stored_images_and_captions_equal_generated_ones(builder):
    images, labels = digits.load_digits()
    for split in ("train", "validation"):
        source = builder.as_data_source(split)
        for position in (0, 1, len(source) - 1):
            ex = source[position]
            index = int(ex["index"])
            assert ex["image"].shape == (32, 32, 3)
            expected = digits.to_rgb(images[index], 32)
            assert ex["image"].tobytes() == expected.tobytes()  # PNG is lossless
            caps = [c.decode() for c in ex["captions"]]
            assert caps == digits.captions(int(labels[index]))
            assert caps[0] == digits.canonical_caption(int(ex["label"]))


def test_second_ensure_built_reuses_files(builder, own_data_dir, capsys):
    capsys.readouterr()
    stat = os.stat(builder.data_dir)
    files = sorted(os.listdir(builder.data_dir))
    again = digits_builder.ensure_built(own_data_dir)
    assert capsys.readouterr().out == ""  # no "mmjax: built" line
    assert again.data_dir == builder.data_dir
    after = os.stat(builder.data_dir)
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert sorted(os.listdir(builder.data_dir)) == files


def test_content_parameters_name_the_directory(builder, own_data_dir, capsys):
    assert builder.builder_config.name == "s32_v0.2_seed0"
    assert builder.data_dir.endswith(os.path.join("mmjax_digits", "s32_v0.2_seed0", "1.0.0"))
    capsys.readouterr()
    small = digits_builder.ensure_built(own_data_dir, image_size=16)
    assert "mmjax: built mmjax_digits/s16_v0.2_seed0 (1438 train + 359 validation)" in (
        capsys.readouterr().out
    )
    assert small.data_dir != builder.data_dir
    assert small.as_data_source("validation")[0]["image"].shape == (16, 16, 3)
    names = {
        digits_builder.make_config(image_size=32, val_fraction=0.2, seed=1).name,
        digits_builder.make_config(image_size=32, val_fraction=0.25, seed=0).name,
        digits_builder.make_config(image_size=32, val_fraction=0.2, seed=0).name,
    }
    assert len(names) == 3
