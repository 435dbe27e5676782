"""python -m mmjax.visualize: the PNG it writes, the numbers behind the maps, and its one-line
errors. Workdirs are one-step runs of tiny models: the maps' properties hold at any training."""

import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import matching, mm_classification
from mmjax import config as base_config
from mmjax import parallel, visualize
from mmjax.data import pipeline, preprocess, tokenizers
from mmjax.data.builtin import labelled
from mmjax.main import train as run
from mmjax.models.two_tower import TwoTower
from mmjax.tasks import get_task
from mmjax.train.trainer import build_trainer
from tests.conftest import tiny


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir):
    """A one-step run of a cross-attention fusion classifier: the CLI's loading of a workdir
    and its checkpoint, which is the same for every task."""
    path = tmp_path_factory.mktemp("run")
    config = tiny(mm_classification.get_config(), data_dir)  # (data: in memory)
    config.optim.text_frozen_steps = 0
    config.model.fusion.kind = "cross_attention"  # gmu, the recipe's, has no maps
    run(config, str(path))
    return str(path)


def initialised(config):
    """The model of `config` at initialisation as a LoadedRun. Another training run per model
    kind would double this module's time, and the maps' properties hold for any parameters."""
    one_device = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    mesh = parallel.make_mesh(one_device, jax.devices()[:1])
    tokenizer = pipeline.tokenizer_for(config.data)
    trainer = build_trainer(get_task(config.task), config, mesh, tokenizer.vocab_size)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        params = trainer.init(jax.random.key(0)).params
    model, rules = trainer.model, trainer.rules
    return visualize.LoadedRun(config, model, params, mesh, rules, tokenizer, source="init")


@pytest.fixture(scope="module")
def matching_run():
    return initialised(tiny(matching.on_base_towers()))


@pytest.fixture(scope="module")
def two_tower_run():
    return initialised(tiny(base_config.get_config()))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A non-square JPEG of a validation image: the CLI must make the eval view of any file."""
    image = labelled.load("shapes_mmc", "validation", 1, 64, 0).images[0]
    path = tmp_path_factory.mktemp("images") / "shape.jpg"
    Image.fromarray(image).resize((96, 80)).save(path)
    return str(path)


def eval_view(path, run_):
    return preprocess.resize_center_crop(visualize.read_image(path), run_.config.data.image_size)


def cli(workdir, image, text, *extra):
    return visualize.main(["--workdir", workdir, "--image", image, "--text", text, *extra])


@pytest.mark.slow
def test_fusion_cli_writes_attention_figure_and_top3(workdir, image_path, capsys):
    assert cli(workdir, image_path, "a red cross") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("top-3: ") and lines[0].count(",") == 2
    assert lines[-1] == "wrote " + os.path.join(workdir, "visualize", "shape_a-red-cross.png")
    path = lines[-1].removeprefix("wrote ")
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:  # image | mean attention | word maps
        assert png.format == "PNG" and png.size == visualize.figure_pixels(3)


def check_attention(run_, image, text):
    tokens_L = visualize.tokenize(run_, text)
    attn_Lgg, probs_C = visualize.attention_map(run_, image, tokens_L)
    g = run_.config.data.image_size // run_.config.model.image.patch_size
    assert attn_Lgg.shape == (len(tokens_L), g, g)
    assert np.all(attn_Lgg >= 0)
    # A softmax over the patches for every real text token.
    valid_L = tokens_L != run_.pad_id
    np.testing.assert_allclose(attn_Lgg[valid_L].sum(axis=(1, 2)), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs_C.sum(), 1.0, atol=1e-5)
    return probs_C


@pytest.mark.slow
def test_classification_attention_map_is_a_softmax_over_the_patch_grid(workdir, image_path):
    run_ = visualize.load_run(workdir)
    probs_C = check_attention(run_, eval_view(image_path, run_), "a small red cross")
    assert probs_C.shape == (len(labelled.MMC_CLASSES),)


@pytest.mark.slow
def test_matching_attention_map_and_figure(matching_run, image_path, tmp_path):
    image = eval_view(image_path, matching_run)
    assert check_attention(matching_run, image, "a small red cross").shape == (2,)
    out = str(tmp_path / "m.png")
    lines = visualize.visualize(matching_run, image, "a small red cross", out)
    assert len(lines) == 1 and lines[0].startswith("ITM match probability: ")
    with Image.open(out) as png:
        assert png.size == visualize.figure_pixels(3)


@pytest.mark.slow
def test_two_tower_similarity_equals_direct_recomputation(two_tower_run, image_path, tmp_path):
    run_ = two_tower_run
    image = eval_view(image_path, run_)
    tokens_L = visualize.tokenize(run_, "a red cross")
    sim_gg, cosine = visualize.similarity_map(run_, image, tokens_L)
    g = sim_gg.shape[0]
    assert sim_gg.shape == (g, g) and g * run_.config.model.image.patch_size == image.shape[0]

    def direct(params, images, tokens_BL):
        variables = {"params": params}
        _, img_BND = run_.model.apply(variables, images, method=lambda m, x: m.image(x))
        txt_BE = run_.model.apply(variables, tokens_BL, method=TwoTower.encode_text)
        img_emb_BE, txt_emb_BE, _ = run_.model.apply(variables, images, tokens_BL)
        return img_BND, txt_BE, img_emb_BE, txt_emb_BE

    with run_.context():
        img_BND, txt_BE, img_emb_BE, txt_emb_BE = jax.jit(direct)(
            run_.params, preprocess.normalize(image)[None], tokens_L[None]
        )
    row, col = 2, 5  # patch tokens are row-major over the grid
    patch_E = np.asarray(img_BND[0, row * g + col]) @ np.asarray(run_.params["image_projection"])
    txt_E = np.asarray(txt_BE[0])
    expected = patch_E @ txt_E / (np.linalg.norm(patch_E) * np.linalg.norm(txt_E))
    np.testing.assert_allclose(sim_gg[row, col], expected, atol=1e-5)
    np.testing.assert_allclose(cosine, np.asarray(img_emb_BE[0] @ txt_emb_BE[0]), atol=1e-5)

    out = str(tmp_path / "tt.png")
    lines = visualize.visualize(run_, image, "a red cross", out)
    assert lines == [f"image-text cosine similarity: {cosine:.4f}"]
    with Image.open(out) as png:  # image | similarity: no word maps
        assert png.size == visualize.figure_pixels(2)


def test_word_spans_map_byte_offsets_to_tokens():
    tokenizer = tokenizers.ByteTokenizer(19)  # room for 17 bytes: "ends" is cut to "e"
    text = "a 红色  cross ends here"  # a multi-byte word and two spaces
    tokens_L = tokenizer.encode([text])[0]
    spans = visualize.word_token_spans(text, tokenizer, tokens_L, pad_id=0)
    assert [w for w, _, _ in spans] == ["a", "红色", "cross", "ends"]
    decoded = [tokenizer.decode(tokens_L[lo:hi]) for _, lo, hi in spans]
    assert decoded == ["a", "红色", "cross", "e"]
    assert visualize.word_token_spans(text, object(), tokens_L, pad_id=0) is None


def write_config(workdir, task="classification", fusion="cross_attention"):
    config = mm_classification.get_config()
    config.task, config.model.fusion.kind = task, fusion
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty_text", "--text is empty"),
        ("no_workdir", "does not exist"),
        ("bad_image", "not an image file PIL can read"),
        ("missing_image", "cannot read it ([Errno 2]"),
        ("no_checkpoint", "has no checkpoint"),
        ("pooled_fusion", "model.fusion.kind='gmu' has no text-to-image attention maps"),
        ("unsupported_task", "task='captioning' is not supported by visualize; it supports "),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(case, expected, tmp_path, image_path, capsys):
    workdir, image, text = str(tmp_path / "run"), image_path, "a red cross"
    if case == "empty_text":
        text = "  "
    elif case == "bad_image":
        image = str(tmp_path / "not_an_image.png")
        with open(image, "w") as f:
            f.write("plain text")
        write_config(workdir)
    elif case == "missing_image":
        image = str(tmp_path / "missing.png")
        write_config(workdir)
    elif case == "no_checkpoint":
        write_config(workdir)
    elif case == "pooled_fusion":
        write_config(workdir, fusion="gmu")
        os.makedirs(os.path.join(workdir, "checkpoints", "1"))  # rejected before it is read
    elif case == "unsupported_task":
        write_config(workdir, task="captioning")
    assert cli(workdir, image, text) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    if case == "unsupported_task":
        assert all(t in lines[0] for t in visualize.supported_tasks())
    assert not os.path.exists(os.path.join(workdir, "visualize"))
