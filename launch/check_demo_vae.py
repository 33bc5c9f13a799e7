"""Judge accuracy on a VAE's reconstructions of 256 held-out shapes scenes (the ceiling of any teacher built on it;
the VAE trainer logs the same check at every checkpoint).

    python launch/check_demo_vae.py jaxlcd/assets/demo/teacher/vae
"""
import sys

from jaxlcd.demo import demo_path
from jaxlcd.train.vae_train import reconstruction_check
from jaxlcd.weights import load_component

vae, params = load_component(sys.argv[1])
print(sys.argv[1], reconstruction_check(vae, params, demo_path("judge")))
