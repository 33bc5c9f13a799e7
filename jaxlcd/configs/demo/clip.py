"""The demo world's CLIP models, trained contrastively from scratch on the shapes dataset.

Run:
    python -m jaxlcd.main --config=configs/demo/clip.py --workdir=runs/demo_clip       # training RM + text encoder
    python -m jaxlcd.main --config=configs/demo/clip.py:scorer --workdir=runs/scorer   # held-out RM
    python -m jaxlcd.main --config=configs/demo/clip.py:tiny --workdir=/tmp/clip       # seconds (tests)
Writes WORKDIR/clip, a transformers CLIPModel folder with the CLIP BPE tokenizer. ``demo``'s text tower becomes the
teacher's text encoder and the whole model the demo's CLIPScore-style training reward; ``scorer`` (another seed,
another data seed, wider and shallower towers) is the held-out reward that detects over-optimisation of the first.
"""
import ml_collections

from jaxlcd.training.optimizer import optim_config
from jaxlcd.errors import InputError

TEXT = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
VISION = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": 64, "patch_size": 8, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
VARIANTS = ("demo", "scorer", "tiny")


def clip_config(text: dict, vision: dict, projection_dim: int) -> dict:
    return {"architectures": ("CLIPModel",), "model_type": "clip", "projection_dim": projection_dim,
            "logit_scale_init_value": 2.6592, "text_config": text, "vision_config": vision}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise InputError(f"unknown config variant {arg!r}; known: {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.job = "jaxlcd.demo.train_clip:train_clip"
    c.variant = arg
    c.clip = clip_config(TEXT, VISION, 64)
    c.resolution = 64
    c.num_examples = 20_000        # shapes scenes 0 .. num_examples - 1 of the stream data_seed
    c.data_seed = 0
    c.per_device_batch = 32
    c.total_steps = 2000
    # AdamW (b2 0.98, eps 1e-6, as CLIP), linear warmup then cosine decay
    c.optim = optim_config(learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=100, weight_decay=0.1,
                           b2=0.98, eps=1e-6)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.hard_negatives = 0           # K captions per image with one shape / position / size changed, as extra negatives
    c.hard_negative_kinds = "shape,place,size"  # what a hard negative may change (place: position or relation;
                                                # a kind listed twice is drawn twice as often)
    c.init_from = ""               # a CLIPModel folder to continue from (a second stage: fresh optimizer and schedule)
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.seed = 0
    if arg == "scorer":
        c.clip = clip_config(dict(TEXT, hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=6),
                             dict(VISION, hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                                  num_attention_heads=6), 96)
        c.seed, c.data_seed = 1, 1
    elif arg == "tiny":
        c.clip = clip_config(dict(TEXT, hidden_size=32, intermediate_size=37, num_hidden_layers=1),
                             dict(VISION, hidden_size=32, intermediate_size=37, num_hidden_layers=1, image_size=32), 16)
        c.resolution, c.num_examples, c.per_device_batch, c.total_steps = 32, 32, 4, 6
        c.optim.warmup_steps, c.log_every, c.checkpoint_every = 1, 3, 3
    return c
