"""Judge accuracy on a VAE's reconstructions of 256 held-out shapes scenes (the ceiling of any teacher built on it).

    python launch/check_demo_vae.py jaxlcd/assets/demo/teacher/vae
"""
import sys, numpy as np, jax
from jaxlcd.weights import load_component
from jaxlcd.models import vae as vae_lib, judge as J
from jaxlcd.data import shapes
from jaxlcd import eval_metrics as E
from jaxlcd.demo import demo_path
vae, p = load_component(sys.argv[1])
jm, jp = J.load_judge(demo_path("judge"))
scenes = shapes.eval_scenes(256, 0)
prompts = [shapes.caption(s, template=0) for s in scenes]
x = np.stack([shapes.render(s) for s in scenes]).astype(np.float32) / 127.5 - 1
enc = jax.jit(lambda p, x: vae_lib.latent_dist_mode(vae.apply({"params": p}, x, method=vae.encode)))
dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
rec = np.clip((np.asarray(dec(p, enc(p, x))) + 1) / 2, 0, 1)
pred, _ = J.predict(jm, jp, rec)
print("VAE", sys.argv[1], "mse[-1,1]", float(((rec * 2 - 1 - x) ** 2).mean()), "judge acc on reconstructions", E.scene_accuracy(pred, prompts), E.attribute_accuracy(pred, prompts))
