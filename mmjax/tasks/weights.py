"""Pretrained weights of the towers that `models.two_tower.build_towers` builds, for the tasks
that use those towers (contrastive, captioning, matching, classification, VQA): the Hugging Face
BERT of `model.text.kind="hf_bert"`. (Whole-model and other-run weights, `init_from` and
`init_towers_from`, are the trainer's: `mmjax.train.pretrained.from_settings`.)"""

from __future__ import annotations

import ml_collections

from mmjax.train.pretrained import Pretrained


def hf_text_tower(config: ml_collections.ConfigDict) -> list[Pretrained]:
    """The pretrained BERT of an `hf_bert` text tower (packaged all-MiniLM-L6-v2, or
    `model.text.hf_dir`), unless `init_from` holds every parameter anyway. Read on the host;
    call outside any mesh context."""
    text = config.model.text
    if text.kind != "hf_bert" or config.init_from:
        return []
    from mmjax.interop import hf

    model_dir = text.hf_dir or hf.minilm_dir()
    _, variables = hf.load_bert_model(model_dir)
    return [
        Pretrained(
            path=("text", "bert"),
            params=variables["params"],
            misfit=f"model.text.hf_dir={str(model_dir)!r}: the pretrained weights do not fit "
            "model.text",
            loaded=f"Text tower initialised from {model_dir}",
        )
    ]
