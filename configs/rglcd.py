"""(Reward-guided) latent consistency distillation configs.

Run:
    python -m jaxlcd.main --config=configs/rglcd.py:tiny --workdir=/tmp/lcd_tiny        # seconds, anywhere
    python -m jaxlcd.main --config=configs/rglcd.py:sd21base --workdir=gs://bucket/run \\
        --config.teacher=/path/to/stable-diffusion-2-1-base --config.data_dir=/path/to/image_caption_folder

Variants: tiny (random tiny teacher + a generated image-caption folder, built in the workdir),
sd15, sd21base, sd21 (the reference hyper-parameters of rglcd.md section 2; teacher and data are
local folders you pass). Override any key with --config.key=value.
"""
import ml_collections

VARIANTS = ("tiny", "sd15", "sd21base", "sd21")
VALIDATION_PROMPTS = ("a red circle on a blue background", "a photo of an astronaut riding a horse",
                      "a watercolor painting of a lighthouse at dawn", "a green square next to a yellow triangle")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown config variant {arg!r}; known: {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.variant = arg
    c.teacher = ""                 # diffusers pipeline folder of the teacher ("" with tiny: built in workdir)
    c.data_dir = ""                # image-caption folder (sidecar .txt or captions.jsonl), prepared on first use
    c.resolution = 512             # training image size (pixels); latents are resolution / 8
    c.per_device_batch = 16        # images per device per step; global batch = per_device_batch * devices
    c.total_steps = 10_000
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.sample_every = 1000          # sample grids (LCM 1/2/4 steps on validation_prompts); 0 = only at the end
    c.validation_prompts = VALIDATION_PROMPTS
    c.sample_lcm_steps = (1, 2, 4)  # LCM step counts of the sample grids
    c.seed = 0
    c.compute_dtype = "bfloat16"   # UNet/VAE/text compute dtype; student master weights stay float32
    c.remat = False                # rematerialise each UNet block in the backward pass
    c.random_crop = False
    c.random_flip = False
    c.export_dtype = "float32"     # dtype of the exported diffusers folders: float32 | float16
    c.debug_kill_at_step = 0       # testing only: SIGKILL the process after this step (crash/resume tests)

    c.lcd = ml_collections.ConfigDict()
    c.lcd.num_ddim_timesteps = 50  # N: the skip-step DDIM grid (k = 1000 / N)
    c.lcd.w_min = 5.0              # guidance w ~ U[w_min, w_max] (LCM convention, g = w + 1)
    c.lcd.w_max = 15.0
    c.lcd.w_embedding_dim = 256
    c.lcd.loss = "huber"           # huber (pseudo-Huber) | l2
    c.lcd.huber_c = 1e-3
    c.lcd.ema_decay = 0.95         # target network EMA per step
    c.lcd.zero_init_cond_proj = False

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6   # constant
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0        # global-norm clipping of the summed gradient

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1               # -1 fills the remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.shard_frozen = "replicate"   # teacher / VAE / text encoder params: replicate | fsdp

    if arg == "tiny":
        c.resolution = 64
        c.per_device_batch = 2
        c.total_steps = 20
        c.log_every = 5
        c.checkpoint_every = 10
        c.sample_every = 0
        c.compute_dtype = "float32"
        c.optim.learning_rate = 1e-4
        c.validation_prompts = VALIDATION_PROMPTS[:2]
    elif arg == "sd15":
        c.resolution = 512
    elif arg == "sd21base":
        c.resolution = 512
    elif arg == "sd21":
        c.resolution = 768        # v-prediction teacher; the prediction type is read from its scheduler
    return c
