"""The base configuration: every field the library reads, with its default and what it means.

The defaults train a tiny CLIP (a ViT image tower) on the built-in `shapes` dataset, offline, on 2
CPU cores. Recipes (the repository's `configs/*.py`, or a file of your own anywhere) build on
`get_config()` and override fields; they are what `python train.py --config FILE` and `python -m
mmjax.main` load. Without `--config` those train `mmjax/default_recipe.py`, which builds on this
one too (other towers and four settings that make the run learn shape).
Living in the package, the defaults work from an installed wheel: the library never imports the
repository's `configs/`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # What is trained (mmjax/tasks): "contrastive" two-tower pretraining, or one of the tasks
    # whose configs are in configs/ (classification, VQA, matching, captioning, video, text).
    c.task = "contrastive"
    c.seed = 0
    c.total_steps = 600
    c.batch_size = 64  # global, across all devices and processes
    c.log_every = 10
    c.eval_every = 200  # 0 = evaluate only at the end
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params/optimizer stay float32)
    # Peak dense TFLOP/s of one device in the compute dtype: the denominator of `perf/mfu`.
    # 0 = known per device kind (H100/H200/A100, TPU v4/v5e/v5p/v6e) or, on CPU, a GEMM
    # measured at startup (for the whole host); set it for other accelerators.
    c.peak_tflops = 0.0
    c.loss = "softmax"  # softmax (CLIP InfoNCE) | sigmoid (SigLIP)
    # How the loss is distributed (all give the same loss and gradients): "naive" lets XLA
    # shard the global B×B logits; "gathered" all-gathers the other tower's embeddings (b×B
    # logits per device); "chunked" passes embedding chunks around a ring (b×b per device,
    # independent of the device count: for very large global batches).
    c.loss_impl = "naive"
    # GradCache: split the global batch into this many microbatches for the towers (activation
    # memory ∝ batch_size / microbatches) while every example still sees the whole global batch
    # as negatives. Costs one extra forward pass.
    c.microbatches = 1
    # A parameters-only checkpoint to start from (e.g. written by `python -m
    # mmjax.interop.open_clip`); used only when the workdir has no checkpoint of its own.
    c.init_from = ""
    # Towers (submodules named in init_towers) to take from another run (its directory: the
    # newest checkpoint) or a parameters checkpoint, e.g. fine-tuning a fusion task on
    # contrastively pretrained towers. The tower configs must match.
    c.init_towers_from = ""
    c.init_towers = ("image", "text")

    c.data = ml_collections.ConfigDict()
    # Built-in "shapes" | "digits", a folder built with `python -m mmjax.data.build --name N`,
    # or a tfds catalog image–text dataset such as "coco_captions" (see mmjax/data/sources.py).
    c.data.name = "shapes"
    c.data.split = "train"
    c.data.data_dir = ""  # "" = $MMJAX_DATA_DIR or ~/.cache/mmjax/tensorflow_datasets
    c.data.image_size = 64
    # Training view: "none" (shorter side resized to image_size, center crop) or
    # "random_resized_crop" (area fraction in crop_scale, aspect 3/4..4/3); flip = random
    # horizontal flips (off: they change "left"/"right" captions and digits).
    c.data.augment = "none"
    c.data.crop_scale = (0.9, 1.0)
    c.data.flip = False
    c.data.num_train = 20000
    c.data.num_val = 1000
    c.data.dataset_seed = 0
    c.data.text_length = 48  # byte tokens incl. BOS/EOT; Chinese characters take 3 bytes
    # bytes | clip_bpe | wordpiece | sentencepiece; the path of its vocabulary/merges/model file
    # ("" = none, or for clip_bpe the file inside the installed open_clip).
    c.data.tokenizer = "bytes"
    c.data.tokenizer_path = ""
    # Each step draws one caption per image: the full English description with this
    # probability, else one of the 8 others (partial descriptions, Chinese) uniformly. Full
    # descriptions teach position and size fast; the others make prompts of other phrasings work.
    c.data.first_caption_prob = 0.5
    # Which captions count as "the full description" for that draw (indices into an example's
    # captions; uniformly among them). shapes: 0 is the English one, 6 the Chinese one, e.g.
    # (0, 6) for a model that should follow full prompts in both languages as well.
    c.data.canonical_captions = (0,)
    # With this probability, an image whose drawn caption names no colour ("a circle", "a
    # small star") is shown with its RGB channels permuted: shape features that do not depend
    # on colour, so shapes are recognised in colours they never had in training (see
    # mmjax/data/colour_permutation.py and the README's default-run table). 0 = off.
    c.data.colourless_permute_prob = 0.0
    # Processes that prepare training batches (grain `mp_prefetch`): decoding and augmenting off
    # the training process, past Python's GIL. 0 = a background thread of the training process.
    # The sample stream and its checkpoint are the same for every value.
    c.data.workers = 0

    c.model = ml_collections.ConfigDict()
    c.model.embed_dim = 128
    c.model.image = ml_collections.ConfigDict(
        dict(
            patch_size=8,
            width=128,
            depth=4,
            num_heads=4,
            mlp_dim=512,
            pool="gap",
            posemb="sincos2d",  # fixed: position is usable from step 0 (learned: "learn")
            stem_channels=(),  # e.g. (32, 64): 3x3 stride-2 convs before patchifying
            patch_bias=True,
            pre_norm=False,  # LayerNorm before the first block (open_clip's ln_pre)
        )
    )
    # kind: "vit" (the tower above) or "resnet" (open_clip's modified ResNet, the RN50/RN101
    # image towers; mmjax/models/resnet.py): `layers` bottleneck blocks per stage (RN50:
    # (3, 4, 6, 3)), `resnet_width` stem channels (open_clip's width; the final feature map has
    # 32x that), an attention-pooling head of `num_heads` heads projecting to `width`; norm:
    # "batch" (running statistics in the train state, frozen at eval) or "group" (no state).
    # patch_size, depth, mlp_dim, pool, posemb, stem_channels and pre_norm are the ViT's only.
    c.model.image.kind = "vit"
    c.model.image.layers = (3, 4, 6, 3)
    c.model.image.resnet_width = 64
    c.model.image.norm = "batch"
    c.model.text = ml_collections.ConfigDict(
        # eot_id / pad_id: the tokenizer's (byte tokenizer: EOT 2, PAD 0); causal towers pool
        # at the first EOT.
        dict(width=128, depth=4, num_heads=4, mlp_dim=512, causal=True, eot_id=2, pad_id=0)
    )
    # kind: "transformer" (the tower above, trained from scratch) or "hf_bert" (a pretrained
    # Hugging Face BERT from the folder hf_dir, "" = the packaged all-MiniLM-L6-v2, mean-pooled;
    # width/depth/heads then come from its config.json). frozen: no gradient through the tower.
    # "lstm" | "gru": a recurrent tower (mmjax/models/recurrent.py) of `depth` layers of `width`
    # units, pooled at the last real token; bidirectional: width // 2 units each way; embed_dim:
    # its token embedding width (0 = width). Recurrent-only settings are errors on other kinds.
    c.model.text.kind = "transformer"
    c.model.text.hf_dir = ""
    c.model.text.frozen = False
    c.model.text.bidirectional = False
    c.model.text.embed_dim = 0
    c.model.activation = "gelu_tanh"  # MLP activation: gelu_tanh | gelu (exact) | quick_gelu
    # Memory knobs (outputs are identical with every setting): what each block keeps for the
    # backward pass, "none" | "dots" (GEMM outputs) | "full" (recompute the block); and whether
    # the blocks run as one scan over stacked parameters (compile time independent of depth).
    c.model.remat = "none"
    c.model.scan_layers = False

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.optim.end_lr_fraction = 0.01  # cosine decays to this fraction of the peak
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = 1.0
    # Keep the text tower (and its projection) at its random initialisation for this many
    # steps, 0 = off. A byte-level text tower learns in a few dozen steps and then chases an
    # image tower that knows only colour; fixed random text targets first make the image tower
    # learn position and size (default run: text→image R@5 0.65 → 0.82, see README).
    c.optim.text_frozen_steps = 300
    # Parameters under these path prefixes (e.g. "text/") are never updated and have no
    # optimizer state (LiT's locked tower).
    c.optim.frozen_prefixes = ()

    # Device mesh. -1 = all remaining devices. Logical axis names used by the model are mapped to
    # mesh axes by `rules`: data parallel, FSDP and tensor parallel are the same code with other
    # mesh sizes.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_heads", "tensor"),
    )

    # Bad steps (see mmjax/train/guard.py): an update with a non-finite loss, gradient or
    # parameters is never applied. policy "skip" counts it and goes on (stopping after more
    # than max_consecutive_skips in a row); "stop" ends the run at the next log/checkpoint
    # without saving past it. spike_zscore > 0 also skips losses that many robust standard
    # deviations above the median of the last spike_window steps (one host sync per step).
    c.guard = ml_collections.ConfigDict(
        dict(policy="skip", max_consecutive_skips=20, spike_zscore=0.0, spike_window=100)
    )

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    # Evaluation tasks, each "KIND:DATASET[:SPLIT]" with KIND zeroshot | retrieval |
    # linear_probe | shapes, e.g. ("zeroshot:cifar10", "retrieval:coco_captions:val"); SPLIT
    # defaults to validation (built-ins) or the first of test/validation/val. () = shapes:shapes
    # for shapes, else zero-shot and retrieval on data.name where possible
    # (mmjax/eval/evaluators.py).
    c.eval.tasks = ()
    c.eval.probe_shots = 10  # linear_probe: labelled train examples per class

    # Two-tower objective of every task with a contrastive term (contrastive, video_contrastive,
    # captioning, matching; see mmjax/tasks/contrastive_objective.py): the weighted sum of these
    # terms and the task's own; weight 0 = the term is not built nor computed. contrastive:
    # `loss` above (captioning and matching weigh it with their own captioning.contrastive_weight
    # and matching.itc). Tasks without a contrastive term refuse changes to these, `loss`,
    # `loss_impl` and `distill`.
    # triplet: VSE++ hinge with the hardest in-batch negative, both directions, on cosine
    # similarity. adversarial: a modality discriminator (an MLP on the embeddings, trained with
    # the model) behind a gradient reversal layer whose λ ramps 0 → 1 as 2/(1+exp(-gamma·p))-1
    # over training progress p. distill_logits: T²-scaled KL from the teacher's in-batch
    # retrieval softmax (logits / distill_temperature) to the student's; distill_embed: student
    # vs teacher embeddings, "cosine" (1 - cos) or "mse" (needs equal embed_dim).
    c.objective = ml_collections.ConfigDict(
        dict(
            contrastive=1.0,
            triplet=0.0,
            triplet_margin=0.2,
            adversarial=0.0,
            adversarial_gamma=10.0,
            distill_logits=0.0,
            distill_embed=0.0,
            distill_temperature=2.0,
            distill_embed_kind="cosine",
        )
    )
    # The teacher of the distill_* terms: teacher = its run directory (the newest checkpoint's
    # parameters) or a parameters-only checkpoint, loaded when a run starts and never updated;
    # teacher_model = its architecture, fields as in `model` (empty = the same as `model`).
    c.distill = ml_collections.ConfigDict(
        dict(teacher="", teacher_model=ml_collections.ConfigDict())
    )
    return c
