"""The package's shape: what imports what, one error base, configs found from anywhere, the optimizer factory,
evaluators from the config."""
import importlib
import inspect
import pkgutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import jaxlcd
from jaxlcd import cli
from jaxlcd.errors import ConfigKeyError, InputError, JaxlcdError
from jaxlcd.training import evaluators
from jaxlcd.training.optimizer import make_optimizer

PRODUCT_ENTRY_POINTS = ("jaxlcd.main", "jaxlcd.distill.job", "jaxlcd.rewards.lrm_pretrain", "jaxlcd.export",
                        "jaxlcd.sample", "jaxlcd.eval", "jaxlcd.pipeline", "jaxlcd.weights", "jaxlcd.rewards",
                        "jaxlcd.data", "jaxlcd.loaders", "jaxlcd.training.loop")


def _modules():
    return [m.name for m in pkgutil.walk_packages(jaxlcd.__path__, "jaxlcd.") if not m.name.startswith("jaxlcd.configs")]


@pytest.mark.parametrize("module", PRODUCT_ENTRY_POINTS)
def test_product_code_loads_no_demo_module(module):
    code = (f"import sys, {module}; demo = sorted(m for m in sys.modules if m.startswith('jaxlcd.demo')); "
            "print(demo); sys.exit(1 if demo else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_weights_knows_no_model_family():
    code = ("import sys, jaxlcd.weights; from jaxlcd.weights import io, tables, spec; "
            "bad = sorted(m for m in sys.modules if m.startswith(('jaxlcd.models', 'jaxlcd.loaders'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    from jaxlcd import loaders, weights
    assert weights.load_component is loaders.load_component   # the public name still works


def test_every_exception_class_jaxlcd_defines_derives_from_jaxlcd_error():
    defined = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("jaxlcd"):
                defined.append(obj)
    assert len({c.__name__ for c in defined}) >= 9   # JaxlcdError, InputError, ..., WeightsError, PipelineError, ...
    assert [c for c in defined if not issubclass(c, JaxlcdError)] == []


def test_config_files_are_found_from_any_directory_and_bad_keys_are_one_sentence(tmp_path):
    def main(*args):
        return subprocess.run([sys.executable, "-m", "jaxlcd.main", *args], cwd=tmp_path, capture_output=True,
                              text=True)

    typo = main("--config=configs/rglcd.py:tiny", f"--workdir={tmp_path}/w", "--config.totl_steps=3")
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
        f"jaxlcd.main: error: --config.totl_steps: the config '{cli.PACKAGE_CONFIGS}/rglcd.py:tiny' has no key "
        "'totl_steps'; did you mean 'total_steps'?"]
    moved = main("--config=configs/demo_vae.py", f"--workdir={tmp_path}/w")
    assert moved.returncode == 2 and "moved to configs/demo/vae.py" in moved.stderr
    variant = main("--config=configs/rglcd.py:nope", f"--workdir={tmp_path}/w")
    assert variant.returncode == 2 and len(variant.stderr.strip().splitlines()) == 1
    assert "unknown config variant 'nope'" in variant.stderr
    assert cli.resolve_config_path("rglcd.py") == f"{cli.PACKAGE_CONFIGS}/rglcd.py"


def test_renamed_keys_name_their_new_key():
    with pytest.raises(ConfigKeyError, match="'learning_rate' was renamed to 'optim.learning_rate'"):
        cli.check_override_keys(["--config=configs/demo/vae.py:tiny", "--config.learning_rate=1e-3"])
    with pytest.raises(ConfigKeyError, match="'judge' was renamed to 'evals.samples.judge'"):
        cli.check_override_keys(["--config=configs/demo/teacher.py:tiny", "--config.judge=x"])
    with pytest.raises(ConfigKeyError, match="'debug_kill_at_step' was removed"):
        cli.check_override_keys(["--config=configs/rglcd.py:tiny", "--config.debug_kill_at_step=3"])
    cli.check_override_keys(["--config=configs/rglcd.py:tiny", "--config.evals.grids.every=3"])   # a real key


def _one_step(tx, params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


def test_optimizer_factory_schedules_frozen_params_and_rate_multiples():
    cfg = ml_collections.ConfigDict({"learning_rate": 1e-2, "schedule": "warmup_cosine", "warmup_steps": 10,
                                     "grad_clip": 1.0, "frozen": ("^text/",), "lr_mults": (("^unet/b", 3.0),)})
    params = {"unet": {"a": jnp.ones(3), "b": jnp.ones(3)}, "text": {"w": jnp.ones(3)}}
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 1e-3), params)
    tx = make_optimizer(cfg, total_steps=100)
    state = tx.init(params)
    for _ in range(10):   # through the warmup: Adam's step is ~ -lr(t) per element
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["text"]["w"], np.ones(3))          # frozen: bit-identical
    moved_a, moved_b = 1 - float(params["unet"]["a"][0]), 1 - float(params["unet"]["b"][0])
    assert moved_b == pytest.approx(3 * moved_a, rel=1e-4)
    assert moved_a == pytest.approx(sum(1e-2 * t / 10 for t in range(10)), rel=1e-3)   # linear warmup from 0
    constant = make_optimizer({"learning_rate": 1e-2, "grad_clip": 1.0}, total_steps=100)
    # the distillation optimizer keeps the structure older checkpoints have: clip, then AdamW with its hyper-parameters
    adamw_state = constant.init(params)[1]
    assert type(adamw_state).__name__.startswith("Inject") and "learning_rate" in adamw_state.hyperparams
    with pytest.raises(InputError, match="optim.schedule='cosine' is unknown"):
        make_optimizer({"learning_rate": 1.0, "schedule": "cosine"}, 10)


def test_evaluators_from_config():
    assert evaluators.from_config(None, {}) == []
    cfg = ml_collections.ConfigDict({"grids": {"type": "lcm_grids", "every": 5, "steps": ()}})
    assert evaluators.from_config(cfg, {"run": None, "workdir": "/tmp", "resolution": 64}) == []   # no step counts
    with pytest.raises(InputError, match="evaluator type 'fid' is unknown"):
        evaluators.from_config(ml_collections.ConfigDict({"x": {"type": "fid"}}), {})
    ev = evaluators.Evaluator("x", 5, lambda state, step, final: {})
    assert [s for s in range(1, 13) if ev.due(s, s == 12)] == [5, 10, 12]
