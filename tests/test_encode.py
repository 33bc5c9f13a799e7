"""Pre-encoded data (`python -m jaxlcd.encode`): encode a tiny folder, the step's loss on encoded input equals its loss
on pixels, training on the encoded folder, a rerun after the end adds nothing, and a teacher or resolution mismatch
is one sentence."""
import json
import os

import jax
import numpy as np
import pytest

from jaxlcd import data as data_lib
from jaxlcd import parallel, tiny
from jaxlcd.data import encoded
from jaxlcd.distill import job, setup
from jaxlcd.distill.step import make_train_step
from jaxlcd.encode import _encoder, encode, main as encode_main
from jaxlcd.errors import InputError
from tiny_run import losses, make_inputs, tiny_config


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def encoded_dir(inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("enc") / "encoded")
    encode(inputs[0], inputs[1], out, resolution=64, dtype="float32", batch_per_device=2, records_per_file=10)
    return out


def test_encode_writes_every_example_in_files(encoded_dir):
    meta = encoded.read_metadata(encoded_dir)
    assert meta["count"] == 24 and meta["moments_shape"] == [8, 8, 8] and meta["ctx_shape"][0] == 77
    parts = sorted(n for n in os.listdir(encoded_dir) if n.startswith("part-"))
    assert len(parts) == 2               # a file is closed after the batch that reaches 10 records: 16, then 8
    source = encoded.EncodedSource(encoded_dir)
    assert len(source) == 24 and len({source[i]["caption"] for i in range(24)}) > 1


def test_a_rerun_of_a_finished_encode_adds_nothing(inputs, encoded_dir):
    before = sorted(os.listdir(encoded_dir))
    assert encode(inputs[0], inputs[1], encoded_dir, resolution=64, dtype="float32", batch_per_device=2,
                  records_per_file=10)["count"] == 24
    assert sorted(os.listdir(encoded_dir)) == before


def test_step_loss_on_encoded_input_equals_loss_on_pixels(inputs, tmp_path):
    cfg = tiny_config(inputs)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    run = setup.build_run(cfg, inputs[0], mesh)
    prepared = str(tmp_path / "prepared")
    data_lib.prepare_folder_dataset(inputs[1], prepared)
    host = next(data_lib.make_train_iterator(prepared, tokenizer=run.pipe.tokenizer, resolution=64,
                                             batch_size_per_host=8, seed=0, shard_index=0, shard_count=1))
    fn, _ = _encoder(run.pipe, np.float32)
    moments, ctx = (np.asarray(x) for x in fn(run.pipe.vae_params, run.pipe.text_params, host["pixels"],
                                              host["input_ids"]))
    # through the stored record format and back
    records = [encoded.pack(moments[i], ctx[i], str(host["caption"][i])) for i in range(8)]
    source = encoded.EncodedSource.__new__(encoded.EncodedSource)
    source.dtype, source.moments_shape, source.ctx_shape = np.dtype(np.float32), moments.shape[1:], ctx.shape[1:]
    source.moments_bytes, source.ctx_bytes = moments[0].nbytes, ctx[0].nbytes
    source.source = records
    back = [source[i] for i in range(8)]
    step = jax.jit(make_train_step(run.models, cfg.lcd, run.tx, run.abar))
    pixel_batch = {"pixels": host["pixels"], "input_ids": host["input_ids"]}
    encoded_batch = {"moments": np.stack([b["moments"] for b in back]), "ctx": np.stack([b["ctx"] for b in back])}
    loss_pixels = float(step(run.state, run.frozen, pixel_batch)[1]["loss"])
    loss_encoded = float(step(run.state, run.frozen, encoded_batch)[1]["loss"])
    assert loss_encoded == pytest.approx(loss_pixels, rel=1e-5, abs=1e-7)


def test_training_on_encoded_data(inputs, encoded_dir, tmp_path):
    workdir = str(tmp_path / "run")
    job.train(tiny_config((inputs[0], encoded_dir), total_steps=2), workdir)
    assert sorted(losses(workdir)) == [1, 2] and all(np.isfinite(v) for v in losses(workdir).values())


def test_another_teacher_or_resolution_is_one_sentence(inputs, encoded_dir, tmp_path):
    other = tiny.write_teacher_folder(str(tmp_path / "other_teacher"), seed=7)
    with pytest.raises(InputError, match="encoded with the VAE and text encoder of"):
        encoded.check_matches(encoded_dir, other, 64)
    with pytest.raises(InputError, match="encoded at resolution 64, this run trains at 128"):
        encoded.check_matches(encoded_dir, inputs[0], 128)


def test_encode_cli_bad_dtype_is_one_sentence(inputs, tmp_path, capsys):
    assert encode_main(["--teacher", inputs[0], "--data_dir", inputs[1], "--out", str(tmp_path / "o"),
                        "--dtype", "int8"]) == 2
    assert "jaxlcd.encode: error: --dtype 'int8' is unknown" in capsys.readouterr().err


def test_metadata_names_the_teacher(encoded_dir, inputs):
    meta = json.load(open(os.path.join(encoded_dir, encoded.METADATA)))
    assert meta["teacher"] == inputs[0] and meta["teacher_fingerprint"] == encoded.teacher_fingerprint(inputs[0])


class _Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in encode handles it."""


def test_an_interrupted_encode_resumes_to_the_same_records(inputs, encoded_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "interrupted")
    real = data_lib.make_train_iterator

    def dies_at_the_second_batch(*args, **kwargs):
        it, calls = real(*args, **kwargs), []

        class Dying:
            get_state, set_state = it.get_state, it.set_state

            def __next__(self):
                calls.append(1)
                if len(calls) == 2:
                    raise _Killed
                return next(it)
        return Dying()

    monkeypatch.setattr(data_lib, "make_train_iterator", dies_at_the_second_batch)
    with pytest.raises(_Killed):   # batch 1 (16 records) reached 10 and was written as the first file
        encode(inputs[0], inputs[1], out, resolution=64, dtype="float32", batch_per_device=2, records_per_file=10)
    assert json.load(open(os.path.join(out, "progress-00000.json")))["count"] == 16
    assert not os.path.exists(os.path.join(out, encoded.METADATA))
    with open(os.path.join(out, "part-00000-00001.array_record"), "wb") as f:
        f.write(b"half a file")    # what a kill during the second file's write leaves
    monkeypatch.setattr(data_lib, "make_train_iterator", real)
    assert encode(inputs[0], inputs[1], out, resolution=64, dtype="float32", batch_per_device=2,
                  records_per_file=10)["count"] == 24
    resumed, whole = encoded.EncodedSource(out), encoded.EncodedSource(encoded_dir)
    assert len(resumed) == len(whole) == 24
    for i in range(24):   # the same examples in the same order: nothing repeated, nothing left out
        assert resumed[i]["caption"] == whole[i]["caption"]
        np.testing.assert_array_equal(resumed[i]["moments"], whole[i]["moments"])
