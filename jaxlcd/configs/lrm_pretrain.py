"""Contrastive pretraining of the latent proxy reward model (LRM) on (latent, caption) pairs.

Run:
    python -m jaxlcd.main --config=configs/lrm_pretrain.py:demo --workdir=runs/demo_lrm \\
        --config.teacher=runs/demo_teacher/teacher                                        # the demo world's LRM
    python -m jaxlcd.main --config=configs/lrm_pretrain.py:tiny --workdir=/tmp/lrm_tiny          # minutes on a CPU
    python -m jaxlcd.main --config=configs/lrm_pretrain.py:sd21base --workdir=DIR \\
        --config.teacher=/path/to/stable-diffusion-2-1-base --config.data_dir=/path/to/image_caption_folder

The result, DIR/lrm, is what `configs/rglcd.py:...,lrm` takes as --config.lrm.path. Latents are the teacher VAE's
posterior samples of the training images (unscaled, 4 x resolution/8 x resolution/8), so the LRM must be pretrained
with the same VAE and resolution as the distillation. Reference run (docs/algorithm.md section 4): latent_rn50, lr 5e-4,
batch 480, 32 epochs; set total_steps = 32 * images / 480 for your dataset.
"""
import ml_collections

from jaxlcd.training.optimizer import optim_config
from jaxlcd.errors import InputError

VARIANTS = ("demo", "tiny", "sd15", "sd21base", "sd21")
DEMO_TEXT = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
             "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
             "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
DEMO_LRM = {"arch": "latent_vit", "projection_dim": 64, "text_config": DEMO_TEXT,
            "vision_config": {"num_channels": 4, "image_size": 8, "patch_size": 1, "hidden_size": 64,
                              "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                              "hidden_act": "gelu"}}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise InputError(f"unknown config variant {arg!r}; known: {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.job = "jaxlcd.demo.job:pretrain_lrm" if arg == "demo" else "lrm_pretrain"  # demo: the shapes data + teacher
    c.variant = arg
    c.teacher = ""               # diffusers pipeline folder (its VAE makes the latents; "" with tiny: built)
    c.teacher_variant = ""       # e.g. "fp16": the teacher's *.fp16.safetensors (see configs/rglcd.py)
    c.data_dir = ""              # image-caption folder or prepared dataset ("" with tiny: generated; demo: shapes)
    c.arch = "latent_rn50"       # latent_rn50 | latent_vit | tiny (a tiny latent_vit)
    c.model = {}                 # a full LatentRewardModel config instead of arch (the demo's small latent_vit)
    c.shapes_examples = 10_000   # scenes of the built-in shapes dataset (data_dir "shapes")
    c.init = ""                  # start from this LRM folder instead of a random init
    c.resolution = 512           # image size; the LRM's latent size is resolution / 8
    c.per_device_batch = 60      # 480 on 8 devices, the reference batch
    c.total_steps = 10_000
    # jaxlcd.training.optimizer: AdamW as CLIP (b2 0.98, eps 1e-6), linear warmup then cosine decay
    c.optim = optim_config(learning_rate=5e-4, schedule="warmup_cosine", warmup_steps=500, weight_decay=0.2, b2=0.98,
                           eps=1e-6)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.random_crop = False
    c.random_flip = False
    c.log_every = 10
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.seed = 0
    if arg == "demo":  # the demo world: its teacher's VAE latents (8 x 8 x 4) of shapes scenes; minutes on a CPU
        c.data_dir, c.model, c.resolution, c.per_device_batch, c.total_steps = "shapes", DEMO_LRM, 64, 32, 1500
        c.optim.warmup_steps, c.optim.learning_rate, c.optim.weight_decay = 100, 1e-3, 0.1
        c.log_every, c.checkpoint_every = 50, 500
    elif arg == "tiny":
        c.arch, c.resolution, c.per_device_batch, c.total_steps = "tiny", 64, 8, 20
        c.optim.warmup_steps, c.log_every, c.checkpoint_every, c.optim.learning_rate = 5, 5, 10, 1e-3
    elif arg == "sd21":
        c.resolution = 768
    return c
