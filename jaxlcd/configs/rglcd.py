"""(Reward-guided) latent consistency distillation configs.

Run:
    python -m jaxlcd.main --config=configs/rglcd.py --workdir=runs/demo                 # the demo world, CPU minutes
    python -m jaxlcd.main --config=configs/rglcd.py:tiny --workdir=/tmp/lcd_tiny        # seconds, anywhere
    python -m jaxlcd.main --config=configs/rglcd.py:sd21base --workdir=gs://bucket/run \\
        --config.teacher=/path/to/stable-diffusion-2-1-base --config.data_dir=/path/to/image_caption_folder

Variants: demo (the default: the shipped shapes-world teacher distilled with its CLIP as a direct reward, after an
LCD baseline in WORKDIR/baselines/lcd, then the evaluation table in WORKDIR/eval), demo_lcd (no reward), demo_lrm
(the shipped LRM with the CLIP as expert); tiny (random tiny teacher + a generated image-caption folder, built in the workdir),
sd15, sd21base, sd21 (the reference hyper-parameters of docs/algorithm.md section 2; teacher and data are folders,
gs:// folders or hub ids you pass). Override any key with --config.key=value.

LCM-LoRA: append ``,lora`` (before or after a guidance suffix): ``sd15,lora``, ``sd21base,lora,hps``, ``tiny,lora``
train LoRA adapters on the frozen teacher UNet instead of the full student (keys ``lora.*``; README "LoRA").

Reward guidance (docs/algorithm.md sections 3-4): append ``,GUIDANCE`` to the variant, e.g.
    python -m jaxlcd.main --config=configs/rglcd.py:sd21base,hps --workdir=DIR --config.teacher=... \
        --config.data_dir=... --config.reward.path=/path/to/hpsv2.1_open_clip_folder
GUIDANCE: hps (HPSv2.1, beta 1.0, the reference run), pickscore, clipscore, imagereward, hps_ir
(hpsv2.1+0.1*imagereward), lrm (latent proxy RM with HPSv2.1 as its expert; also pass --config.lrm.path).
With ``tiny`` the reward model and LRM are tiny random models built in the workdir (``tiny,rm``, ``tiny,lrm``).
Per-RM beta: the cosine rewards (HPSv2.1, PickScore, CLIPScore) vary by ~0.01-0.05 between images, ImageReward's
normalised score by ~1, so ImageReward gets beta 0.1 and enters sums with weight 0.1. Only HPSv2.1's beta = 1.0
is the reference's; the others are our starting points, not tuned values.
"""
import ml_collections
from jaxlcd.errors import InputError
from jaxlcd.models.lora import DIFFUSERS_TARGETS

VARIANTS = ("demo", "demo_lcd", "demo_lrm", "tiny", "sd15", "sd21base", "sd21")
DEMO_GUIDANCE = {"demo": "clipscore", "demo_lcd": "", "demo_lrm": "clipscore_lrm"}  # the demo variants' built-in guidance
GUIDANCE = {  # name -> (reward expression, beta, uses the LRM)
    "": ("", 1.0, False), "hps": ("hpsv2.1", 1.0, False), "pickscore": ("pickscore", 1.0, False),
    "clipscore": ("clipscore", 1.0, False), "imagereward": ("imagereward", 0.1, False),
    "hps_ir": ("hpsv2.1+0.1*imagereward", 1.0, False), "lrm": ("hpsv2.1", 1.0, True),
    "rm": ("clipscore", 1.0, False),   # tiny only: the tiny random CLIP
    "clipscore_lrm": ("clipscore", 1.0, True),  # demo_lrm: the demo LRM with the demo CLIP as its expert
}
VALIDATION_PROMPTS = ("a red circle on a blue background", "a photo of an astronaut riding a horse",
                      "a watercolor painting of a lighthouse at dawn", "a green square next to a yellow triangle")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    """The config of variant ``arg`` ("VARIANT[,GUIDANCE]"). One long function on purpose: every key is set once,
    with its meaning, then each variant changes what it needs."""
    arg, *suffixes = arg.split(",")
    use_lora = "lora" in suffixes
    suffixes = [s for s in suffixes if s != "lora"]
    if arg not in VARIANTS:
        raise InputError(f"unknown config variant {arg!r}; known: {', '.join(VARIANTS)}")
    if len(suffixes) > 1:
        raise InputError(f"one guidance suffix at most (and optionally lora), got {','.join(suffixes)}")
    guidance = suffixes[0] if suffixes else ""
    if arg in DEMO_GUIDANCE:
        if use_lora:
            raise InputError(f"the demo variants distil the full student; use tiny,lora or sd15,lora, not {arg},lora")
        if guidance:
            raise InputError(f"the demo variants set their own guidance; use demo, demo_lcd or demo_lrm, not {arg},"
                             f"{guidance}")
        guidance = DEMO_GUIDANCE[arg]
    if guidance not in GUIDANCE:
        raise InputError(f"unknown guidance {guidance!r}; known: {', '.join(g for g in GUIDANCE if g)}")
    c = ml_collections.ConfigDict()
    # the job main runs: distillation, or for the demo variants the demo job (baselines, distillation, evaluation)
    c.job = "jaxlcd.demo.job:run" if arg.startswith("demo") else "distill"
    c.variant = arg
    c.guidance = guidance
    c.teacher = ""                 # diffusers pipeline folder of the teacher ("" with tiny: built in workdir)
    c.teacher_variant = ""         # e.g. "fp16": use (and from the hub fetch only) the *.fp16.safetensors weights
    c.data_dir = ""                # image-caption folder (sidecar .txt or captions.jsonl), prepared on first use, or
    #                                webdataset shards read in place: a folder of .tar, "/d/{00000..00099}.tar", a
    #                                list file; local or gs://
    c.resolution = 512             # training image size (pixels); latents are resolution / 8
    c.per_device_batch = 16        # images per device per step; global batch = per_device_batch * devices
    c.total_steps = 10_000
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    # evaluators run by the loop (jaxlcd.training.evaluators): every N steps (0: only at the end) and at the end
    c.evals = ml_collections.ConfigDict()
    c.evals.grids = ml_collections.ConfigDict()
    c.evals.grids.type = "lcm_grids"   # PNG grids in WORKDIR/samples, one per LCM step count
    c.evals.grids.every = 1000
    c.evals.grids.steps = (1, 2, 4)    # LCM step counts (() = no grids)
    c.evals.grids.prompts = VALIDATION_PROMPTS
    c.evals.grids.guidance = 8.5       # g (w = g - 1)
    # sample metrics of the student (jaxlcd.distill.quality), off until a metric model is given, e.g.
    # --config.evals.quality.rewards=hpsv2.1=/models/hps,clipscore=/models/clip and/or fid_ref + inception
    c.evals.quality = ml_collections.ConfigDict()
    c.evals.quality.type = "lcm_metrics"
    c.evals.quality.every = 1000
    c.evals.quality.steps = (2, 4)     # LCM step counts sampled
    c.evals.quality.prompts = ""       # a prompt file as jaxlcd.eval reads ("": the grid prompts)
    c.evals.quality.num_prompts = 64
    c.evals.quality.guidance = 8.5
    c.evals.quality.batch = 8
    c.evals.quality.rewards = ""       # "NAME=PATH,...": clipscore, hpsv2.1, pickscore, imagereward, aesthetic
    c.evals.quality.fid_ref = ""       # FID reference folder or .npz (with inception)
    c.evals.quality.inception = ""     # FID Inception safetensors (jaxlcd.metrics.fid)
    # the reward-hacking monitor, off until a held-out reward model is given (--config.evals.hacking.heldout=NAME=PATH)
    c.evals.hacking = ml_collections.ConfigDict()
    c.evals.hacking.type = "reward_hacking"
    c.evals.hacking.every = 500
    c.evals.hacking.steps = 2
    c.evals.hacking.prompts = ""
    c.evals.hacking.num_prompts = 64
    c.evals.hacking.guidance = 8.5
    c.evals.hacking.batch = 8
    c.evals.hacking.heldout = ""       # NAME=PATH of a reward model the run does not optimise (e.g. imagereward=...)
    c.evals.hacking.train_reward = ""  # NAME=PATH; "": the run's reward model (reward.name, reward.path)
    c.evals.hacking.stop_if = ml_collections.ConfigDict()
    c.evals.hacking.stop_if.patience = 0   # K > 0: stop after K evaluations of rising train / falling held-out
    c.seed = 0
    c.compute_dtype = "bfloat16"   # UNet/VAE/text compute dtype; student master weights stay float32
    c.xla_flags = ""               # extra XLA_FLAGS for this run (appended to the environment's)
    c.remat = "none"               # student UNet blocks in the backward: none | full | dots | dots_no_batch (README)
    c.attention = "auto"           # auto (cuDNN flash on GPU, Pallas splash on TPU, XLA on CPU) | xla | cudnn | pallas
    c.peak_tflops = 0.0            # one device's peak for the logged MFU; 0: by device kind (H100/H200, TPU v5e/v5p/v6e)
    c.random_crop = False
    c.random_flip = False
    # skip samples: an image side under min_size pixels (0: keep all); with LAION-style json metadata in webdataset
    # shards, pwatermark above max_watermark or aesthetic below min_aesthetic (1.0 / 0.0: keep all)
    c.data_filter = ml_collections.ConfigDict({"min_size": 0, "max_watermark": 1.0, "min_aesthetic": 0.0})
    c.export_dtype = "float32"     # dtype of the exported diffusers folders: float32 | float16

    c.lcd = ml_collections.ConfigDict()
    c.lcd.num_ddim_timesteps = 50  # N: the skip-step DDIM grid (k = 1000 / N)
    c.lcd.w_min = 5.0              # guidance w ~ U[w_min, w_max] (LCM convention, g = w + 1)
    c.lcd.w_max = 15.0
    c.lcd.w_embedding_dim = 256      # guidance-scale embedding of the student (0: none, as LCM-LoRA)
    c.lcd.loss = "huber"           # huber (pseudo-Huber) | l2
    c.lcd.huber_c = 1e-3
    c.lcd.ema_decay = 0.95         # target network EMA per step
    c.lcd.zero_init_cond_proj = False

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "constant"  # constant | warmup_constant | warmup_cosine (jaxlcd.training.optimizer)
    c.optim.warmup_steps = 0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0        # global-norm clipping of the summed gradient
    c.optim.frozen = ()            # regexes of student param paths kept fixed, e.g. ("down_blocks_0/",)

    # LCM-LoRA (the ",lora" suffix): the student is the teacher UNet + LoRA adapters; only the adapters train
    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = use_lora
    c.lora.rank = 64                # diffusers' train_lcm_distill_lora_sd_wds.py: rank 64, alpha 64
    c.lora.alpha = 64.0             # the update is (alpha / rank) * B A x
    c.lora.targets = DIFFUSERS_TARGETS   # module names as in diffusers, matched like PEFT's target_modules

    expr, beta, use_lrm = GUIDANCE[guidance]
    c.reward = ml_collections.ConfigDict()
    c.reward.name = expr           # "" = plain LCD; a registry name or sum ("hpsv2.1+0.1*imagereward"); with an
    #                                LRM this is its expert (a CLIP-cosine model)
    c.reward.path = ""             # model folder, or "name=/path,name2=/path2" for a sum ("" with tiny: built)
    c.reward.beta = beta           # loss = L_CD - beta * mean(reward)
    c.reward.antialias = True      # False = the reference's non-antialiased bicubic resize to 224
    c.reward.decode_microbatch = 0  # > 0: VAE-decode that many latents at a time (bounds activation memory)
    c.reward.remat = "auto"        # decoder + RM tower recomputed in the backward: auto (= when micro-batched) | always | never
    c.reward.allow_pickle = False  # read pickle checkpoints (only if you trust them)

    c.lrm = ml_collections.ConfigDict()
    c.lrm.enabled = use_lrm        # guide the student with the latent proxy RM instead of the decoded-image RM
    c.lrm.path = ""                # LatentRewardModel folder (configs/lrm_pretrain.py); "" with tiny: built
    c.lrm.beta = 1.0               # loss = L_CD - beta * mean(cosine_LRM(pred / sf, c))
    c.lrm.update = True            # fit the LRM online to the expert's preferences (docs/algorithm.md section 4)
    c.lrm.learning_rate = 3.3e-6   # AdamW, no clipping
    c.lrm.weight_decay = 0.0
    c.lrm.rows = 0                 # examples per step used for the update (0 = the whole batch)
    c.lrm.freeze = ()              # regexes of LRM param paths kept fixed, e.g. ("text_model", "text_projection")

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1               # -1 fills the remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.shard_frozen = "replicate"   # teacher / VAE / text encoder params: replicate | fsdp

    c.shapes_examples = 10_000     # demo variants: scenes of the built-in shapes dataset (data_dir "" or "shapes")
    c.demo = ml_collections.ConfigDict()
    c.demo.baselines = ()          # demo: variants trained first in WORKDIR/baselines/NAME (lcd, lrm) for the table
    c.demo.eval_prompts = 0        # > 0: evaluate on that many held-out prompts at the end (python -m jaxlcd.eval)
    c.demo.ddim_guidance = 7.5     # the evaluation's CFG scale for the teacher's DDIM row ...
    c.demo.lcm_guidance = 8.5      # ... and guidance scale g (w = g - 1) for the students

    if arg.startswith("demo"):     # the shipped shapes world: distil its teacher on CPU in minutes
        c.resolution = 64
        c.per_device_batch = 8
        c.total_steps = 100
        c.log_every = 10
        c.checkpoint_every = 50
        c.evals.grids.steps = ()   # none: the evaluation draws the 1/2/4-step grids (each grid costs compile time)
        c.shapes_examples = 2_000  # 100 steps x batch 8 per run need 800; preparing 10k scenes took ~20 s
        c.compute_dtype = "float32"
        c.xla_flags = "--xla_backend_optimization_level=1"  # XLA:CPU compiles ~25 % faster, steps no slower
        c.optim.learning_rate = 2e-4
        c.reward.beta = 0.1        # the demo CLIP's cosine gradient is ~40x the CD gradient at beta 1
        # the small demo teacher is best at CFG 2-4 (judge accuracy peaks at 3; 7.5 oversaturates), so distil and
        # evaluate there: w in [1, 3] is g in [2, 4]
        c.lcd.w_min, c.lcd.w_max = 1.0, 3.0
        c.demo.ddim_guidance, c.demo.lcm_guidance = 3.0, 3.0
        c.evals.grids.guidance = 3.0
        c.evals.grids.prompts = ("a small red circle on the left, blue background",
                                "a large green square at the top, white background",
                                "a small yellow triangle left of a large purple star, black background",
                                "a large blue diamond above a small orange cross, green background")
        c.demo.eval_prompts = 128
        if arg == "demo":
            c.demo.baselines = ("lcd",)
    elif arg == "tiny":
        c.resolution = 64
        c.per_device_batch = 2
        c.total_steps = 20
        c.log_every = 5
        c.checkpoint_every = 10
        c.evals.grids.every = 0
        c.compute_dtype = "float32"
        c.optim.learning_rate = 1e-4
        c.evals.grids.prompts = VALIDATION_PROMPTS[:2]
    elif arg == "sd15":
        c.resolution = 512
    elif arg == "sd21base":
        c.resolution = 512
    elif arg == "sd21":
        c.resolution = 768        # v-prediction teacher; the prediction type is read from its scheduler
    if use_lora:
        # as LCM-LoRA: no guidance embedding (the UNet keeps the teacher's layout, so the adapter fits any fine-tune of
        # it); no EMA (the target is the student itself, without gradient); diffusers' LoRA learning rate
        c.lcd.w_embedding_dim = 0
        c.lcd.ema_decay = 0.0
        if arg != "tiny":
            c.optim.learning_rate = 1e-4
        else:
            c.lora.rank, c.lora.alpha = 4, 4.0
        # without a guidance embedding, g > 1 is classifier-free guidance on top of the distilled one; diffusers'
        # script validates at g = 1 (one UNet pass per step)
        c.evals.grids.guidance = c.evals.quality.guidance = c.evals.hacking.guidance = 1.0
    return c
