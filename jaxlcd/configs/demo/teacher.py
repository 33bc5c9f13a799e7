"""The demo world's teacher: a text-conditioned latent diffusion UNet on the shapes dataset.

Run (after configs/demo/vae.py and configs/demo/clip.py):
    python -m jaxlcd.main --config=configs/demo/teacher.py --workdir=runs/demo_teacher \\
        --config.vae=runs/demo_vae/vae --config.clip=runs/demo_clip/clip
    python -m jaxlcd.main --config=configs/demo/teacher.py:tiny --workdir=/tmp/teacher \\
        --config.vae=... --config.clip=...                                               # seconds (tests)
Writes WORKDIR/teacher, a diffusers StableDiffusionPipeline folder (the CLIP's text tower is its text encoder).
"""
import ml_collections

from jaxlcd.training.optimizer import optim_config
from jaxlcd.errors import InputError

UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": (32, 64), "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 64,
        "attention_head_dim": 8, "norm_num_groups": 16}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in ("demo", "tiny"):
        raise InputError(f"unknown config variant {arg!r}; known: demo, tiny")
    c = ml_collections.ConfigDict()
    c.job = "jaxlcd.demo.train_teacher:train_teacher"
    c.variant = arg
    c.vae = ""                     # diffusers vae/ folder (configs/demo/vae.py)
    c.clip = ""                    # transformers CLIPModel folder (configs/demo/clip.py); its text tower is used
    c.unet = dict(UNET)            # diffusers UNet2DConditionModel config (cross_attention_dim = CLIP text width)
    c.prediction_type = "v_prediction"  # epsilon | v_prediction
    c.resolution = 64
    c.num_examples = 20_000        # shapes scenes encoded once and cached as VAE moments
    c.data_seed = 0
    c.per_device_batch = 32        # ~0.5 s/step on the 2-core CPU machine
    c.total_steps = 10_000         # ~65 min on one core of the 2-core CPU machine
    # AdamW after global-norm clipping at 1, linear warmup then cosine decay
    c.optim = optim_config(learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=100, grad_clip=1.0)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.snr_gamma = 0.0              # min-SNR-gamma loss weighting (0: plain MSE; 5 is the paper's choice)
    c.p_uncond = 0.1               # caption dropout (classifier-free guidance)
    c.t_focus_fraction = 0.0       # share of each batch with t ~ U{t_focus_min..999} instead of U{0..999}
    c.t_focus_min = 500
    c.train_text_encoder = False   # True: the text encoder (from the CLIP) learns from the denoising loss too
    c.text_lr_scale = 1.0          # ... at this multiple of learning_rate
    c.ema_decay = 0.998            # the exported UNet is the EMA (decay warmed up as in diffusers EMAModel)
    c.init_from = ""               # a unet/ (or pipeline) folder to continue from: fresh optimizer and schedule
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.seed = 0
    c.evals = ml_collections.ConfigDict()
    c.evals.samples = ml_collections.ConfigDict()  # the progress check, at every checkpoint and the end
    c.evals.samples.type = "jaxlcd.demo.train_teacher:sample_evaluator"
    c.evals.samples.every = c.get_ref("checkpoint_every")  # follows it when overridden
    c.evals.samples.judge = "demo"     # judge folder ("demo": the shipped judge; "": no check)
    c.evals.samples.prompts = 64       # held-out prompts sampled with DDIM-50 (0: no check) ...
    c.evals.samples.guidance = (3.0,)  # ... at each of these CFG scales (the demo teacher is best near 3)
    if arg == "tiny":
        c.unet = dict(UNET, block_out_channels=(16, 32), attention_head_dim=4, cross_attention_dim=32)
        c.resolution, c.num_examples, c.per_device_batch, c.total_steps = 32, 32, 4, 6
        c.optim.warmup_steps, c.log_every, c.checkpoint_every, c.evals.samples.judge = 1, 3, 3, ""
    return c
