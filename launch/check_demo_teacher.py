"""The demo judge on a teacher's DDIM-50 samples of held-out prompts, at several CFG scales (the teacher trainer's
progress check, for any pipeline folder), and optionally on its one-step denoising of real latents:

    python launch/check_demo_teacher.py jaxlcd/assets/demo/teacher [--guidance 1,3,7.5] [--prompts 64]
        [--prompt-seed 1] [--denoise 21,101,301] [--sdedit 101,301] [--word-swap 301,601,901]
        [--override 401,801] [--train-prompts 64] [--scene-seed 777] [--vae OTHER_VAE_DIR]

Prints, per scale, scene accuracy (every attribute of the prompt right) with its 95 % Wilson interval (at 128 prompts
and accuracy 0.73 it is about +-0.08: compare teachers on 512 prompts), and the accuracy of each attribute.
``--denoise T,...``: training-distribution scenes (of ``--scene-seed``) are encoded, noised to each t and denoised in
one step (the UNet's x0 prediction, no CFG); prints the x0 RMS error (scaled-latent units) and the judge on the
decoded x0 (t = 0: the clean latents): where the teacher loses what its latents hold. ``--sdedit T,...``: the same
scenes noised to the last DDIM-50 timestep <= T and sampled from there with DDIM at the first ``--guidance`` scale
(SDEdit): whether the teacher keeps a scene it is shown half-way, as opposed to drawing it from noise.
``--word-swap T,...``: how much a one-word change of the caption (shape / colour / size) moves the text encoder's
states and the x0 error at each t: how much the teacher reads each word. ``--override T,...``: one-object scenes
SDEdited from t with the object's shape (or colour) word changed: does the result follow the caption or the scene?
``--train-prompts N``: the same sampling on the captions of N training-distribution scenes (of ``--scene-seed``;
seen (shape, colour) pairs only), with the shapes drawn instead of each true one: the compositional gap.
``--vae``: decode with another vae/ folder that has the same encoder (a decoder-only phase), instead of the pipeline's.
"""
import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlcd.demo import metrics as eval_metrics
from jaxlcd.demo import shapes
from jaxlcd.demo import demo_path
from jaxlcd.diffusion import samplers, schedule
from jaxlcd.demo import judge as judge_lib
from jaxlcd.models import vae as vae_lib
from jaxlcd.pipeline import encode_prompts, load_pipeline, sample_ddim
from jaxlcd.demo.train_teacher import judge_scores, sample_check
from jaxlcd.loaders import load_component


def real_latents(pipe, scenes):
    """(captions, scaled latents [N,h,w,c] of the rendered scenes, noise [N,h,w,c] of PRNGKey(0))."""
    x = np.stack([shapes.render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    moments = pipe.vae.apply({"params": pipe.vae_params}, x, method=pipe.vae.encode)
    z0 = vae_lib.scale_latents(vae_lib.latent_dist_mode(moments), pipe.vae.config)
    return [shapes.caption(s, template=0) for s in scenes], z0, jax.random.normal(jax.random.PRNGKey(0), z0.shape)


def stream(scene_seed: int, n: int, single: bool = False):
    """The first n scenes of the shapes stream ``scene_seed`` (with one object only, if ``single``)."""
    scenes = (shapes.sample_scene(scene_seed, i) for i in itertools.count())
    return list(itertools.islice((s for s in scenes if not single or len(s.objects) == 1), n))


def sdedit_from(pipe, prompts, z0, eps, t: int, guidance: float):
    """(DDIM-50 timestep k-th, images [N,H,W,3]): z0 noised to the last DDIM-50 timestep <= t, sampled from there."""
    ddim_ts = schedule.ddim_timesteps(pipe.scheduler_config, 50)
    k = int(np.argmax(ddim_ts <= t))
    a = float(pipe.abar[ddim_ts[k]])
    return int(ddim_ts[k]), sample_ddim(pipe, prompts, 50, guidance, latents=np.sqrt(a) * z0 + np.sqrt(1 - a) * eps,
                                        start_step=k)[1]


def sdedit_check(pipe, ts, guidance: float, scene_seed: int, num_scenes: int = 128):
    judge = judge_lib.load_judge(demo_path("judge"))
    prompts, z0, eps = real_latents(pipe, stream(scene_seed, num_scenes))
    for t in ts:
        t_k, images = sdedit_from(pipe, prompts, z0, eps, t, guidance)
        scores = judge_scores(judge, images, prompts)
        print(f"sdedit from t {t_k} (CFG {guidance:g}): scene {scores['judge_acc']:.3f}, shape "
              f"{scores['judge_shape']:.3f}, colour {scores['judge_colour']:.3f}, size {scores['judge_size']:.3f}",
              flush=True)


def train_prompt_check(pipe, n: int, guidance: float, scene_seed: int):
    """DDIM-50 at ``guidance`` on the captions of n training-distribution scenes: prints the judge's scene and shape
    accuracy and, per true shape, the shapes it read in the samples."""
    prompts = [shapes.caption(s, template=0) for s in stream(scene_seed, n)]
    z = jax.random.normal(jax.random.PRNGKey(0), (n,) + pipe.latent_shape)
    images = sample_ddim(pipe, prompts, 50, guidance, latents=z)[1]
    predicted, _ = judge_lib.predict(*judge_lib.load_judge(demo_path("judge")), np.asarray(images, np.float32))
    print(f"training-distribution prompts (CFG {guidance:g}): scene {eval_metrics.scene_accuracy(predicted, prompts):.3f}"
          f", shape {eval_metrics.attribute_accuracy(predicted, prompts)['shape']:.3f}", flush=True)
    drawn = {}
    for prompt, got in zip(prompts, predicted):
        objects = got.normalized().objects
        for i, obj in enumerate(shapes.parse_caption(prompt).normalized().objects):
            drawn.setdefault(obj.shape, []).append(objects[i].shape if i < len(objects) else "none")
    for shape, got in sorted(drawn.items()):
        print(f"  {shape}: " + ", ".join(f"{g} {got.count(g)}" for g in sorted(set(got), key=got.count, reverse=True)))


def override_check(pipe, ts, guidance: float, scene_seed: int, num_scenes: int = 96):
    """SDEdit of one-object scenes with the object's shape (or colour) word changed in the caption: the share of
    results judged with the caption's word (the text wins) and with the scene's (the noisy latent wins)."""
    judge = judge_lib.load_judge(demo_path("judge"))
    scenes = stream(scene_seed, num_scenes, single=True)
    _, z0, eps = real_latents(pipe, scenes)
    rng = np.random.default_rng(0)
    for kind in ("shape", "colour"):
        changed = [one_word_changed(s, kind, rng) for s in scenes]
        for t in ts:
            t_k, images = sdedit_from(pipe, [shapes.caption(s, template=0) for s in changed], z0, eps, t, guidance)
            got = [getattr(p.objects[0], kind) if len(p.objects) == 1 else None
                   for p in judge_lib.predict(*judge, np.asarray(images, np.float32))[0]]
            share = lambda ref: np.mean([g == getattr(r.objects[0], kind) for g, r in zip(got, ref)])
            print(f"{kind} word changed, sdedit from t {t_k} (CFG {guidance:g}): judged as the caption's "
                  f"{share(changed):.2f}, as the scene's {share(scenes):.2f}", flush=True)


def x0_prediction(pipe, z0, eps, t: int, ctx):
    """The UNet's x0 [N,h,w,c] (no CFG) from z0 [N,h,w,c] noised with eps to timestep t, text states ctx [N,L,D]."""
    alpha, sigma = jnp.sqrt(pipe.abar[t]), jnp.sqrt(1.0 - pipe.abar[t])
    zt = alpha * z0 + sigma * eps
    out = pipe.unet.apply({"params": pipe.unet_params}, zt, jnp.full((z0.shape[0],), t), ctx)
    return schedule.to_x0_eps(out, zt, alpha, sigma, pipe.prediction_type)[0]


def one_word_changed(scene, kind: str, rng: np.random.Generator):
    """``scene`` with the first object's shape, size or colour (one not in the scene) changed."""
    obj = scene.objects[0]
    if kind == "colour":
        free = [c for c in shapes.COLOURS if c != scene.background and all(c != o.colour for o in scene.objects)]
        obj = dataclasses.replace(obj, colour=free[int(rng.integers(len(free)))])
    else:
        vocab = shapes.SHAPES if kind == "shape" else shapes.SIZES
        obj = dataclasses.replace(obj, **{kind: vocab[(vocab.index(getattr(obj, kind)) + 1) % len(vocab)]})
    return dataclasses.replace(scene, objects=(obj,) + scene.objects[1:])


def word_swap_check(pipe, ts, scene_seed: int, num_scenes: int = 128):
    """How much the teacher reads each word: for captions with one shape / colour / size word changed, the RMS change
    of the text encoder's states and the x0 RMS error (vs the clean latents) at each t, next to the true caption's."""
    scenes = stream(scene_seed, num_scenes)
    _, z0, eps = real_latents(pipe, scenes)
    rng = np.random.default_rng(0)
    ctx = {"true": encode_prompts(pipe, [shapes.caption(s, template=0) for s in scenes])}
    for kind in ("shape", "colour", "size"):
        ctx[kind] = encode_prompts(pipe, [shapes.caption(one_word_changed(s, kind, rng), template=0) for s in scenes])
    rms = lambda a, b: float(jnp.sqrt(jnp.mean((a - b) ** 2)))
    print("text states, RMS change for one word changed: " + ", ".join(
        f"{k} {rms(c, ctx['true']):.3f}" for k, c in ctx.items() if k != "true"), flush=True)
    for t in ts:
        err = {k: rms(x0_prediction(pipe, z0, eps, t, c), z0) for k, c in ctx.items()}
        print(f"x0 RMS error at t {t}, caption true / one word changed: {err['true']:.3f} / " + ", ".join(
            f"{k} {v:.3f}" for k, v in err.items() if k != "true"), flush=True)


def denoise_check(pipe, ts, scene_seed: int, num_scenes: int = 128):
    judge = judge_lib.load_judge(demo_path("judge"))
    prompts, z0, eps = real_latents(pipe, stream(scene_seed, num_scenes))
    ctx = encode_prompts(pipe, prompts)
    decode = jax.jit(lambda z: samplers.decode_to_images(
        lambda u: pipe.vae.apply({"params": pipe.vae_params}, u, method=pipe.vae.decode), z,
        pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor or 0.0))
    for t in ts:
        x0 = x0_prediction(pipe, z0, eps, t, ctx) if t > 0 else z0
        scores = judge_scores(judge, decode(x0), prompts)
        print(f"denoise t {t}: x0 rms error {float(jnp.sqrt(jnp.mean((x0 - z0) ** 2))):.3f}, scene "
              f"{scores['judge_acc']:.3f}, shape {scores['judge_shape']:.3f}, colour {scores['judge_colour']:.3f}, "
              f"size {scores['judge_size']:.3f}", flush=True)


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % (z = 1.96) Wilson score interval of a proportion p observed on n trials."""
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("teacher", help="a StableDiffusionPipeline folder")
parser.add_argument("--guidance", default="1,3,7.5", help="comma-separated CFG scales ('' for none)")
parser.add_argument("--prompts", type=int, default=64, help="held-out prompts (the first N of shapes.eval_prompts)")
parser.add_argument("--prompt-seed", type=int, default=0,
                    help="seed of the held-out prompt set (0: the one the trainer checks and teachers were chosen on)")
parser.add_argument("--denoise", default="", help="comma-separated timesteps for the one-step denoising check")
parser.add_argument("--sdedit", default="", help="comma-separated timesteps to start DDIM from (SDEdit check)")
parser.add_argument("--override", default="", help="comma-separated timesteps for the SDEdit one-word-changed check")
parser.add_argument("--word-swap", default="", help="comma-separated timesteps for the one-word-changed check")
parser.add_argument("--train-prompts", type=int, default=0, help="also sample N training-distribution captions")
parser.add_argument("--scene-seed", type=int, default=777,
                    help="shapes stream seed of the checked scenes (the shipped teacher trained on seeds 0, 1, 3-5, 7)")
parser.add_argument("--vae", default="", help="decode with this vae/ folder (same encoder) instead")
args = parser.parse_args()
pipe = load_pipeline(args.teacher)
if args.vae:
    vae, vae_params = load_component(args.vae)
    if vae.config.scaling_factor != pipe.vae.config.scaling_factor:
        raise SystemExit(f"--vae {args.vae!r} has another scaling_factor than the teacher's VAE: not the same encoder")
    pipe = dataclasses.replace(pipe, vae=vae, vae_params=vae_params)
scales = [float(x) for x in args.guidance.split(",") if x]
for g in scales:
    scores = sample_check(pipe, pipe.unet_params, demo_path("judge"), args.prompts, guidance=g,
                          prompt_seed=args.prompt_seed)
    low, high = wilson_interval(scores["ddim_judge_acc"], args.prompts)
    print(f"CFG {g:g}: " + ", ".join(f"{k.removeprefix('ddim_judge_')} {v:.3f}" for k, v in scores.items())
          + f" (scene acc 95 % interval {low:.3f}-{high:.3f})", flush=True)
if args.train_prompts:
    train_prompt_check(pipe, args.train_prompts, scales[0] if scales else 3.0, args.scene_seed)
if args.denoise:
    denoise_check(pipe, [int(t) for t in args.denoise.split(",")], args.scene_seed)
if args.word_swap:
    word_swap_check(pipe, [int(t) for t in args.word_swap.split(",")], args.scene_seed)
if args.override:
    override_check(pipe, [int(t) for t in args.override.split(",")], scales[0] if scales else 1.0, args.scene_seed)
if args.sdedit:
    sdedit_check(pipe, [int(t) for t in args.sdedit.split(",")], scales[0] if scales else 1.0, args.scene_seed)
