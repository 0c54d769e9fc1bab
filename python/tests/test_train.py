"""sparse_autoencoder.train: whole runs, bit-identical to `sae train` on the same rows."""

import json
import os
import signal
import time

import numpy as np
import pytest

import sparse_autoencoder as sa

from conftest import activations, run_sae

CONFIG = {
    "train": {"steps": 30, "batch_size": 64, "seed": 7},
    "sae": [{"arch": "batchtopk", "k": 4, "dict_size": 64, "threshold_start_step": 5}],
    "data": {"eval_fraction": 0.05},
}

TOML = """
[train]
steps = 30
batch_size = 64
seed = 7

[[sae]]
arch = "batchtopk"
k = 4
dict_size = 64
threshold_start_step = 5

[data]
eval_fraction = 0.05
"""


def files_of(run_dir):
    return sorted(p.name for p in run_dir.iterdir())


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_train_bit_identical_to_sae_train(threads, sae_bin, acts, acts_npy, tmp_path):
    (tmp_path / "run.toml").write_text(TOML)
    run_sae(sae_bin, "train", "--data", acts_npy, "--config", tmp_path / "run.toml",
            "--out", tmp_path / "cli", "--threads", threads)
    result = sa.train(acts, CONFIG, tmp_path / "py", threads=threads)
    cli, py = tmp_path / "cli", tmp_path / "py"
    assert result.dir == str(py)
    assert (py / "sae.safetensors").read_bytes() == (cli / "sae.safetensors").read_bytes()
    assert (py / "sae.json").read_bytes() == (cli / "sae.json").read_bytes()
    without_time = lambda path: {k: v for k, v in json.loads(path.read_text()).items()
                                 if k != "seconds"}
    cli_eval = without_time(cli / "eval.json")
    assert without_time(py / "eval.json") == cli_eval
    assert result.saes[0]["eval"] == cli_eval["eval"]
    # The same files: weights, metrics, evaluation, feature density, plots, config.
    assert set(files_of(cli)) - {"run.lock"} <= set(files_of(py))
    assert {"curves.png", "density.png", "metrics.jsonl", "config.toml"} <= set(files_of(py))
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}
    assert [strip(l) for l in (py / "metrics.jsonl").read_text().splitlines()] == [
        strip(l) for l in (cli / "metrics.jsonl").read_text().splitlines()
    ]
    # A TOML file is the same configuration.
    again = sa.train(acts.reshape(48, 16, 16), tmp_path / "run.toml", tmp_path / "py2",
                     threads=threads)
    assert (tmp_path / "py2" / "sae.safetensors").read_bytes() == (py / "sae.safetensors").read_bytes()
    assert again.load() == result.load()


def test_stream_from_a_generator(tmp_path):
    x = activations(3000, 16, seed=2)
    seen = []

    def arrays():
        for i in range(0, 3000, 100):
            seen.append(i)
            yield x[i:i + 100].reshape(5, 20, 16).astype(np.float16)

    config = {"train": {"steps": 20, "batch_size": 64, "seed": 1},
              "sae": [{"arch": "topk", "k": 4, "dict_size": 64}],
              "data": {"eval_rows": 200, "buffer_rows": 256}}
    result = sa.train(arrays(), config, tmp_path / "run")
    assert result.saes[0]["steps"] == 20
    assert result.saes[0]["eval"]["n_rows"] == 200
    assert 0 < result.saes[0]["eval"]["fve"] < 1
    sae = result.load()
    assert sae.arch == "topk" and sae.dict_size == 64
    assert (tmp_path / "run" / "curves.png").is_file()
    # Read lazily: not the whole stream for 20 × 64 rows + 200 held out.
    assert len(seen) < 30
    # A stream that runs dry ends the run there.
    short = sa.train((x[i:i + 64] for i in range(0, 640, 64)),
                     {**config, "data": {"eval_rows": 64, "buffer_rows": 64}}, tmp_path / "short")
    assert short.saes[0]["steps"] < 20


def test_iterator_exceptions_surface_as_they_were(tmp_path):
    class Boom(Exception):
        pass

    def arrays():
        x = activations(640, 16)
        for i in range(0, 640, 64):
            if i == 384:
                raise Boom("generator broke at row 384")
            yield x[i:i + 64]

    config = {"train": {"steps": 50, "batch_size": 32, "seed": 1},
              "sae": [{"arch": "topk", "k": 4, "dict_size": 64}],
              "data": {"eval_rows": 32, "buffer_rows": 64}}
    with pytest.raises(Boom, match="row 384"):
        sa.train(arrays(), config, tmp_path / "run")
    with pytest.raises(TypeError, match="array 1 of the stream has dtype <U"):
        sa.train(iter([np.ones((8, 16), np.float32), np.array([["a"] * 16])]), config,
                 tmp_path / "run2")


def test_ctrl_c_checkpoints_and_resume_finishes(tmp_path):
    x = activations(4000, 16, seed=3)
    config = {"train": {"steps": 40, "batch_size": 32, "seed": 1},
              "sae": [{"arch": "topk", "k": 4, "dict_size": 64}],
              "data": {"eval_rows": 64, "buffer_rows": 64}}

    def arrays(interrupt_at=None):
        for j, i in enumerate(range(0, 4000, 32)):
            if j == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
                # The calling thread looks for signals every 50 ms.
                time.sleep(0.3)
            yield x[i:i + 32]

    with pytest.raises(KeyboardInterrupt, match="interrupted at step .*resume=True"):
        sa.train(arrays(interrupt_at=12), config, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint").is_dir()
    assert not (tmp_path / "run" / "eval.json").exists()
    result = sa.train(arrays(), None, tmp_path / "run", resume=True)
    assert result.saes[0]["steps"] == 40
    assert (tmp_path / "run" / "eval.json").is_file()


def test_bad_runs_raise_clear_errors(acts, tmp_path):
    with pytest.raises(ValueError, match="unknown field `stepz`"):
        sa.train(acts, {"train": {"stepz": 3}}, tmp_path / "a")
    with pytest.raises(ValueError, match="unknown field `bogus`"):
        sa.train(acts, {"sae": [{"arch": "topk", "bogus": 1}]}, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        sa.train(acts, tmp_path / "missing.toml", tmp_path / "c")
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        sa.train(acts[0], {}, tmp_path / "d")
    with pytest.raises(TypeError, match="int"):
        sa.train(5, {}, tmp_path / "e")
    with pytest.raises(ValueError, match="pass dir"):
        sa.train(acts, {})
    small = {"train": {"steps": 5, "batch_size": 32, "seed": 0},
             "sae": [{"arch": "topk", "k": 4, "dict_size": 32}]}
    sa.train(acts, small, tmp_path / "f")
    with pytest.raises(OSError, match="force"):
        sa.train(acts, small, tmp_path / "f")
    sa.train(acts, small, tmp_path / "f", force=True)
    with pytest.raises(ValueError, match="drop the configuration"):
        sa.train(acts, small, tmp_path / "f", resume=True)


def test_a_sweep_returns_every_sae(acts, tmp_path):
    config = {"train": {"steps": 10, "batch_size": 64, "seed": 0},
              "sae": [{"arch": "topk", "k": 4, "dict_size": 32},
                      {"arch": "relu", "dict_size": 48, "l1": 0.1}]}
    result = sa.train(acts, config, tmp_path / "sweep", threads=1)
    names = [s["name"] for s in result.saes]
    assert len(names) == 2 and names[0] != names[1]
    assert result.load(names[0]).arch == "topk"
    assert result.load(names[1]).dict_size == 48
    for s in result.saes:
        assert sa.SAE.load(s["dir"]) == result.load(s["name"])
    with pytest.raises(ValueError, match="trained 2 SAEs"):
        result.load()
    with pytest.raises(ValueError, match="no SAE named 'x'"):
        result.load("x")


def test_progress_callback_sees_every_nth_step_and_can_stop_the_run(acts, tmp_path):
    config = {"train": {"steps": 25, "batch_size": 32, "seed": 0},
              "sae": [{"arch": "topk", "k": 4, "dict_size": 32}]}
    seen = []
    sa.train(acts, config, tmp_path / "a", progress=seen.append, progress_every=10)
    assert [p["step"] for p in seen] == [10, 20, 25]
    assert all(p["total_steps"] == 25 for p in seen)
    assert seen[-1]["tokens"] == 25 * 32
    assert set(seen[-1]["stats"][0]) >= {"loss", "mse", "fve", "l0", "lr"}

    class Enough(Exception):
        pass

    def stop_at_5(p):
        if p["step"] == 5:
            raise Enough("seen enough")

    with pytest.raises(Enough, match="seen enough"):
        sa.train(acts, config, tmp_path / "b", progress=stop_at_5)
    assert (tmp_path / "b" / "checkpoint").is_dir()
    with pytest.raises(ValueError, match="progress_every is 0"):
        sa.train(acts, config, tmp_path / "c", progress=print, progress_every=0)
