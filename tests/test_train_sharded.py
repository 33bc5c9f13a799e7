"""The tiny train step on a 2x4 (data x fsdp) mesh of 8 simulated devices against one device (own file so that
pytest-xdist can run it beside test_train.py)."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxlcd import data as data_lib
from jaxlcd import parallel
from jaxlcd.distill import setup
from jaxlcd.distill.step import make_train_step
from tiny_run import make_inputs, tiny_config


def test_sharded_step_matches_single_device(tmp_path):
    inputs = make_inputs(tmp_path)
    assert jax.device_count() == 8
    cfg = tiny_config(inputs)
    teacher, prepared_dir = inputs[0], str(tmp_path / "prepared")
    losses_by_mesh, runs = {}, {}
    prepared = data_lib.prepare_folder_dataset(inputs[1], prepared_dir)
    for name, mesh in [("2x4", parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})),
                       ("1", parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))]:
        run = setup.build_run(cfg, teacher, mesh)
        it = data_lib.make_train_iterator(prepared_dir, tokenizer=run.pipe.tokenizer, resolution=64,
                                          batch_size_per_host=8, seed=0)
        batch = parallel.global_batch({k: v for k, v in next(it).items() if k != "caption"}, mesh)
        step = jax.jit(make_train_step(run.models, cfg.lcd, run.tx, run.abar),
                       in_shardings=(run.state_shardings, run.frozen_shardings, parallel.batch_sharding(mesh)),
                       out_shardings=(run.state_shardings, parallel.replicated(mesh)))
        new_state, metrics = step(run.state, run.frozen, batch)
        losses_by_mesh[name], runs[name] = float(metrics["loss"]), (run, new_state)
    assert prepared["count"] == 24
    assert losses_by_mesh["2x4"] == pytest.approx(losses_by_mesh["1"], rel=1e-5)
    run, state = runs["2x4"]
    kernel = ("up_blocks_0.resnets_0", "conv1", "kernel")  # [3, 3, 128, 64]
    get = lambda tree: tree[kernel[0]][kernel[1]][kernel[2]]
    assert get(state.params).sharding.spec == P(None, None, "fsdp")
    assert get(state.target_params).sharding.spec == P(None, None, "fsdp")
    assert get(state.opt_state[1].inner_state[0].mu).sharding.spec == P(None, None, "fsdp")
    assert state.params["conv_in"]["bias"].sharding.spec == P()
