"""Shared fixtures: the `sae` binary the tests compare against, and small activation sets."""

import os
import pathlib
import subprocess

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _find_sae_bin():
    given = os.environ.get("SAE_BIN")
    if given:
        path = pathlib.Path(given)
        if not path.is_file():
            raise RuntimeError(f"SAE_BIN={given} is not a file; build it with `cargo build`")
        return path
    for profile in ("release", "debug"):
        path = REPO / "target" / profile / "sae"
        if path.is_file():
            return path
    return None


SAE_BIN = _find_sae_bin()


@pytest.fixture(scope="session")
def sae_bin():
    """The `sae` binary: $SAE_BIN (CI sets it), else the repository's target/{release,debug}/sae."""
    if SAE_BIN is None:
        pytest.skip("no sae binary: set SAE_BIN or run `cargo build` at the repository root")
    return SAE_BIN


def run_sae(sae_bin, *args, cwd=None):
    """Runs `sae ARGS...`, failing the test with its output when it fails."""
    proc = subprocess.run(
        [str(sae_bin), *map(str, args)], capture_output=True, text=True, cwd=cwd
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"sae {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc.stdout


def activations(n=768, d=16, seed=0):
    """Rows with an offset, correlated directions and heavy-tailed norms, float32."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((3 * d, d)).astype(np.float32)
    codes = rng.exponential(1.0, (n, 3 * d)) * (rng.random((n, 3 * d)) < 0.1)
    x = codes.astype(np.float32) @ basis + np.float32(0.5)
    return np.ascontiguousarray(x, dtype=np.float32)


@pytest.fixture(scope="session")
def acts():
    return activations()


@pytest.fixture(scope="session")
def acts_npy(tmp_path_factory, acts):
    path = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(path, acts)
    return path


ARCH_ARGS = {
    "topk": ["--arch", "topk", "--k", "4"],
    "batchtopk": ["--arch", "batchtopk", "--k", "4", "--threshold-start-step", "5"],
    "matryoshka": ["--arch", "matryoshka", "--k", "4", "--group-sizes", "16,48",
                   "--threshold-start-step", "5"],
    "relu": ["--arch", "relu", "--l1", "0.05"],
    "jumprelu": ["--arch", "jumprelu", "--k", "8"],
}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, sae_bin, acts_npy):
    """A run directory per architecture, trained by `sae train` (D=16, F=64, 40 steps)."""
    dirs = {}

    def get(arch):
        if arch not in dirs:
            out = tmp_path_factory.mktemp(f"run-{arch}") / "run"
            run_sae(
                sae_bin, "train", "--data", acts_npy, "--out", out, "--dict-size", 64,
                "--steps", 40, "--batch-size", 64, "--warmup-steps", 4, "--seed", 3,
                "--threads", 2, *ARCH_ARGS[arch],
            )
            dirs[arch] = out
        return dirs[arch]

    return get
