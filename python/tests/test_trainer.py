"""Trainer: determinism, checkpoints that resume bit for bit, threads, the GIL, errors."""

import threading
import time

import numpy as np
import pytest

import sparse_autoencoder as sa
from sparse_autoencoder import _native

from conftest import activations

STATS = {"loss", "mse", "penalty", "aux", "fve", "l0", "dead_fraction", "lr", "threshold",
         "resampled"}


def batches(n_batches, b=64, d=16, seed=0):
    x = activations(n_batches * b, d, seed)
    return [x[i * b:(i + 1) * b] for i in range(n_batches)]


def weights(sae):
    return [getattr(sae, name).tobytes() for name in ("w_enc", "b_enc", "w_dec", "b_dec")]


def trainer(arch="batchtopk", seed=0, threads=None, **kw):
    config = dict(total_steps=20, warmup_steps=2, threshold_start_step=3, dead_tokens=640,
                  sparsity_warmup_steps=2)
    config.update(kw)
    k = None if arch == "relu" else 4
    return sa.Trainer(16, 64, arch, k=k, seed=seed, threads=threads, **config)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka"])
def test_same_seed_same_batches_same_bits(arch):
    data = batches(8)
    runs = []
    for _ in range(2):
        t = trainer(arch, seed=5, threads=2)
        stats = [t.step(x) for x in data]
        runs.append((weights(t.sae), stats))
    assert runs[0] == runs[1]
    assert set(runs[0][1][-1]) == STATS
    assert all(np.isfinite(s["loss"]) for s in runs[0][1])
    other = trainer(arch, seed=6, threads=2)
    for x in data:
        other.step(x)
    assert weights(other.sae) != runs[0][0]


def test_training_reduces_the_loss_and_sets_theta():
    t = trainer("batchtopk", total_steps=60, warmup_steps=5)
    first = t.step(batches(1)[0])
    for x in batches(60, seed=1)[1:]:
        last = t.step(x)
    assert last["mse"] < 0.5 * first["mse"]
    assert t.steps_done == 60
    assert isinstance(last["threshold"], float) and last["threshold"] > 0
    assert t.sae.threshold == pytest.approx(last["threshold"])
    assert abs(last["l0"] - 4) < 1e-6


def test_threads_option_gives_the_binary_s_determinism():
    data = batches(6)
    out = []
    for threads in (1, 1, 2):
        t = trainer("topk", threads=threads)
        for x in data:
            t.step(x)
        out.append(weights(t.sae))
    assert out[0] == out[1]
    with pytest.raises(ValueError, match="threads is 0"):
        trainer(threads=0)


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_checkpoint_resume_continues_bit_for_bit(arch, tmp_path):
    data = batches(10)
    whole = trainer(arch, threads=2)
    whole_stats = [whole.step(x) for x in data]

    first = trainer(arch, threads=2)
    for x in data[:4]:
        first.step(x)
    first.checkpoint(tmp_path / "ckpt")
    del first
    resumed = sa.Trainer.resume(tmp_path / "ckpt", threads=2)
    assert resumed.steps_done == 4
    assert resumed.config == whole.config
    rest = [resumed.step(x) for x in data[4:]]
    assert rest == whole_stats[4:]
    assert weights(resumed.sae) == weights(whole.sae)
    assert resumed.sae == whole.sae


def test_save_writes_a_loadable_sae(tmp_path):
    t = trainer("topk")
    for x in batches(3):
        t.step(x)
    t.save(tmp_path / "sae")
    assert sa.SAE.load(tmp_path / "sae") == t.sae


def test_step_reads_float32_batches_in_place():
    t = trainer("topk")
    x = np.ascontiguousarray(batches(1)[0].reshape(4, 16, 16))
    t.step(x)
    assert _native._last_input_address() == x.ctypes.data


def test_float16_batches_train_as_their_float32_values():
    data = batches(4)
    a, b = trainer("topk"), trainer("topk")
    for x in data:
        x16 = x.astype(np.float16)
        assert a.step(x16) == b.step(x16.astype(np.float32))
    assert a.sae == b.sae


def test_steps_release_the_gil():
    """Another Python thread keeps running while a step computes."""
    t = sa.Trainer(256, 8192, "topk", k=32, total_steps=10, warmup_steps=1)
    x = activations(2048, 256)
    t.step(x)  # warm-up: allocations
    durations = []
    done = threading.Event()

    def work():
        for _ in range(3):
            t0 = time.perf_counter()
            t.step(x)
            durations.append(time.perf_counter() - t0)
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    longest_gap, last = 0.0, time.perf_counter()
    while not done.is_set():
        now = time.perf_counter()
        longest_gap, last = max(longest_gap, now - last), now
    worker.join()
    # Held for a step, the GIL would stall this loop for the step's whole duration.
    assert min(durations) > 0.05, durations
    assert longest_gap < 0.5 * min(durations), (longest_gap, durations)


def test_bad_configurations_are_value_errors():
    with pytest.raises(ValueError, match="unknown field `foo`"):
        sa.Trainer(16, 64, "topk", k=4, foo=1)
    with pytest.raises(ValueError, match="arch 'topq'"):
        sa.Trainer(16, 64, "topq", k=4)
    with pytest.raises(ValueError, match="needs k"):
        sa.Trainer(16, 64, "topk")
    with pytest.raises(ValueError, match="takes no k"):
        sa.Trainer(16, 64, "relu", k=4)
    with pytest.raises(ValueError, match="k"):
        sa.Trainer(16, 64, "topk", k=65)
    with pytest.raises(ValueError, match="d_model"):
        sa.Trainer(0, 64, "topk", k=4)
    with pytest.raises(ValueError, match="total_steps"):
        sa.Trainer(16, 64, "topk", k=4, total_steps=0)
    with pytest.raises(ValueError, match="invalid type"):
        sa.Trainer(16, 64, "topk", k=4, lr="fast")
    with pytest.raises(ValueError, match="unknown variant `sideways`"):
        sa.Trainer(16, 64, "relu", relu_variant="sideways")
    # numpy scalars are numbers.
    t = sa.Trainer(np.int64(16), 64, "topk", k=np.int32(4), lr=np.float32(1e-3))
    assert t.config["lr"] == pytest.approx(1e-3)


def test_bad_batches_are_value_errors(tmp_path):
    t = trainer("topk")
    with pytest.raises(ValueError, match=r"\(64, 15\).*d_model = 16"):
        t.step(np.zeros((64, 15), np.float32))
    with pytest.raises(ValueError, match="no rows"):
        t.step(np.zeros((0, 16), np.float32))
    bad = batches(1)[0].copy()
    bad[7, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite.*row 7"):
        t.step(bad)
    assert t.steps_done == 0
    with pytest.raises(OSError, match="checkpoint"):
        sa.Trainer.resume(tmp_path / "nothing")
    t.save(tmp_path / "sae")
    with pytest.raises(OSError):
        sa.Trainer.resume(tmp_path / "sae")


def test_resume_with_a_given_config(tmp_path):
    data = batches(4)
    t = trainer("topk")
    for x in data[:2]:
        t.step(x)
    t.checkpoint(tmp_path / "ckpt")
    config = t.config
    # The configuration passed replaces the saved one (here: the same), steps continue.
    resumed = sa.Trainer.resume(tmp_path / "ckpt", train_config=config)
    assert resumed.steps_done == 2
    for x in data[2:]:
        assert resumed.step(x) == t.step(x)
    assert resumed.sae == t.sae
    with pytest.raises(ValueError, match="unknown field `nope`"):
        sa.Trainer.resume(tmp_path / "ckpt", train_config={"nope": 1})
