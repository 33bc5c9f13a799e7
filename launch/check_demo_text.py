"""Does a demo model read the shape and position words of a caption?

    python launch/check_demo_text.py clip jaxlcd/assets/demo/clip        # a CLIP folder (the teacher's text encoder)
    python launch/check_demo_text.py teacher jaxlcd/assets/demo/teacher  # a teacher pipeline folder

clip: for captions that differ in one word (shape / colour / position / size), the distance between their last hidden
states (what the teacher's cross-attention reads), largest over token positions, relative to the states' norm; then,
on 256 held-out scenes, how often the image is closer to its caption than to all of 3 one-word-changed captions
(chance 0.25), 128-way image->text retrieval, and true caption vs one with only the shape / position or relation /
size changed (chance 0.5); last, how well a linear probe reads each attribute from the image features of 150
one-object scenes (fit on 350 others).
teacher: its denoising loss (epsilon or v, what it predicts) on 256 rendered training scenes with the true captions and
with every shape, position or colour word replaced by another (same noise and timesteps). A word the teacher ignores
leaves the loss unchanged.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlcd.demo import shapes
from jaxlcd.models import vae as vae_lib
from jaxlcd.tokenizer import tokenize

VARIANTS = {
    "shape": [f"a large red {s} on the left, white background" for s in ("circle", "square", "triangle", "star")],
    "colour": [f"a large {c} circle on the left, white background" for c in ("red", "green", "blue", "yellow")],
    "position": [f"a large red circle {p}, white background" for p in ("on the left", "on the right", "at the top",
                                                                          "at the bottom")],
    "size": [f"a {z} red circle on the left, white background" for z in ("large", "small")]}
SWAPS = {"shape": shapes.SHAPES, "position": ("left", "right", "top", "bottom"), "colour": tuple(shapes.COLOURS)}


def check_clip(path: str) -> None:
    from jaxlcd.rewards.preprocess import reward_pixels
    from jaxlcd.tokenizer import load_tokenizer
    from jaxlcd.loaders import load_component

    module, params = load_component(path)
    tok = load_tokenizer(path)
    ids = lambda texts: jnp.asarray(tokenize(tok, texts))
    hidden = jax.jit(lambda i: module.apply({"params": params}, i, method=lambda m, i: m.text_model(i)[0]))
    text = jax.jit(lambda i: module.apply({"params": params}, i, method=module.get_text_features))
    image = jax.jit(lambda x: module.apply({"params": params}, x, method=module.get_image_features))
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    size = module.config.vision_config.image_size
    image_features = lambda scenes: unit(np.asarray(image(reward_pixels(
        jnp.asarray(np.stack([shapes.render(s) for s in scenes]).astype(np.float32) / 255.0), size, True))))
    for word, captions in VARIANTS.items():
        h = np.asarray(hidden(ids(captions)))
        d = np.sqrt(((h[:, None] - h[None]) ** 2).sum(-1)).sum((0, 1)) / (len(h) * (len(h) - 1))
        print(f"{word:8s} per-token distance {d.max() / np.sqrt((h ** 2).sum(-1)).mean():.2f}")
    scenes, rng = shapes.eval_scenes(256), np.random.default_rng(0)
    img = image_features(scenes)
    txt = unit(np.asarray(text(ids([shapes.caption(s, template=0) for s in scenes]))))
    # one-word changes of held-out scenes keep their held-out pair (hard_negative refuses those)
    negatives = [shapes.caption(shapes._one_attribute_changed(s, rng, str(rng.choice(shapes.HARD_NEGATIVE_KINDS))),
                                template=0) for s in scenes for _ in range(3)]
    neg = unit(np.asarray(text(ids(negatives)))).reshape(256, 3, -1)
    closer = np.mean((img * txt).sum(-1) > np.einsum("bp,bkp->bk", img, neg).max(1))
    retrieval = np.mean(np.argmax(img[:128] @ txt[:128].T, 1) == np.arange(128))
    print(f"true caption vs 3 one-word-changed captions {closer:.3f}; 128-way retrieval {retrieval:.3f}")
    for kind in ("shape", "place", "size"):  # two-way: the true caption vs one with only this changed
        changed = [shapes.caption(shapes._one_attribute_changed(s, rng, kind), template=0) for s in scenes]
        other = unit(np.asarray(text(ids(changed))))
        print(f"true caption vs {kind} changed: {np.mean((img * txt).sum(-1) > (img * other).sum(-1)):.3f}")
    # what the vision tower keeps: a least-squares linear probe on image features of one-object training scenes
    single = [s for s in (shapes.sample_scene(3, i) for i in range(1200)) if s.relation is None][:500]
    feats = np.concatenate([image_features(single), np.ones((len(single), 1))], 1)
    for attr in ("position", "shape", "size", "colour"):
        y = np.array([getattr(s.objects[0], attr) for s in single])
        onehot = (y[:, None] == np.array(sorted(set(y)))[None]).astype(np.float32)
        w = np.linalg.lstsq(feats[:350], onehot[:350], rcond=None)[0]
        acc = np.mean(np.argmax(feats[350:] @ w, 1) == np.argmax(onehot[350:], 1))
        print(f"image features -> {attr}: linear probe accuracy {acc:.3f} (chance {1 / onehot.shape[1]:.2f})")


def check_teacher(path: str) -> None:
    from jaxlcd.pipeline import load_pipeline

    pipe = load_pipeline(path)
    scenes = [shapes.sample_scene(0, i) for i in range(256)]
    x = np.stack([shapes.render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    moments = pipe.vae.apply({"params": pipe.vae_params}, x, method=pipe.vae.encode)
    z0 = vae_lib.scale_latents(vae_lib.latent_dist_mode(moments), pipe.vae.config)
    true_ids = np.asarray(tokenize(pipe.tokenizer, [shapes.caption(s, 0, i) for i, s in enumerate(scenes)]))

    @jax.jit
    def loss(ids, t, key):
        ctx = pipe.text_encoder.apply({"params": pipe.text_params}, ids)
        eps = jax.random.normal(key, z0.shape)
        alpha, sigma = jnp.sqrt(pipe.abar[t]), jnp.sqrt(1 - pipe.abar[t])
        out = pipe.unet.apply({"params": pipe.unet_params}, alpha * z0 + sigma * eps, jnp.full((z0.shape[0],), t), ctx)
        return jnp.mean((out - (eps if pipe.prediction_type == "epsilon" else alpha * eps - sigma * z0)) ** 2)

    swapped = {}
    for word, vocab in SWAPS.items():
        token = [int(tokenize(pipe.tokenizer, [w])[0][1]) for w in vocab]
        swapped[word] = true_ids.copy()
        for k, v in enumerate(token):
            swapped[word][true_ids == v] = token[(k + 1) % len(token)]
    print("t     true   " + "  ".join(f"{w}-swapped" for w in swapped))
    for t in (100, 300, 500, 700, 900, 990):
        key = jax.random.PRNGKey(t)
        print(f"{t:<5d} {loss(true_ids, t, key):.4f} " + "  ".join(
            f"{loss(ids, t, key):>{len(w) + 8}.4f}" for w, ids in swapped.items()))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("clip", "teacher"):
        sys.exit(__doc__)
    (check_clip if sys.argv[1] == "clip" else check_teacher)(sys.argv[2])
