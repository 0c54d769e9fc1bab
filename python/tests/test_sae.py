"""SAE: loading what `sae train` wrote, encoding as `sae encode` does, decoding, files."""

import json
import pathlib

import numpy as np
import pytest
import scipy.sparse

import sparse_autoencoder as sa
from sparse_autoencoder import _native

from conftest import ARCH_ARGS, run_sae

ARCHS = list(ARCH_ARGS)


def cli_codes(sae_bin, run_dir, data_npy, out, batch_size=4096):
    """`sae encode`'s codes of `data_npy` as read from its .npy files."""
    run_sae(sae_bin, "encode", run_dir, "--data", data_npy, "--out", out,
            "--batch-size", batch_size)
    manifest = json.loads((out / "codes.json").read_text())
    indices = np.load(out / "indices.npy")
    values = np.load(out / "values.npy")
    if manifest["layout"] == "topk":
        return manifest, (indices, values)
    indptr = np.load(out / "indptr.npy")
    shape = (manifest["n_rows"], manifest["n_latents"])
    return manifest, scipy.sparse.csr_matrix((values, indices, indptr), shape=shape)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_matches_sae_encode_exactly(arch, trained, sae_bin, acts, acts_npy, tmp_path):
    run_dir = trained(arch)
    sae = sa.SAE.load(run_dir)
    assert sae.arch == arch and sae.d_model == 16 and sae.dict_size == 64
    manifest, expected = cli_codes(sae_bin, run_dir, acts_npy, tmp_path / "codes")
    codes = sae.encode(acts)
    assert isinstance(codes, scipy.sparse.csr_matrix)
    assert codes.shape == (acts.shape[0], 64) and codes.dtype == np.float32
    if manifest["layout"] == "topk":
        indices, values = sae.encode(acts, "topk")
        assert indices.shape == values.shape == (acts.shape[0], sae.k)
        np.testing.assert_array_equal(indices, expected[0])
        np.testing.assert_array_equal(values, expected[1])
        dense = np.zeros(codes.shape, np.float32)
        np.put_along_axis(dense, indices.astype(np.int64), values, axis=1)
        np.testing.assert_array_equal(codes.toarray(), dense)
    else:
        np.testing.assert_array_equal(codes.indptr, expected.indptr)
        np.testing.assert_array_equal(codes.indices, expected.indices)
        np.testing.assert_array_equal(codes.data, expected.data)
    assert codes.nnz > 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_codes_follow_the_formula(arch, trained, acts):
    """Codes agree with numpy's pre-activations: the selected values are those pre-activations."""
    sae = sa.SAE.load(trained(arch))
    x = acts[:64]
    pre = (x if arch == "jumprelu" else x - sae.b_dec) @ sae.w_enc.T + sae.b_enc
    codes = sae.encode(x, dense=True)
    on = codes != 0
    np.testing.assert_allclose(codes[on], pre[on], rtol=1e-4, atol=1e-4)
    if arch == "topk":
        assert (on.sum(axis=1) <= sae.k).all()
        # Every kept code is at least as large as every dropped positive one.
        kept_min = np.where(on, pre, np.inf).min(axis=1)
        dropped_max = np.where(on, -np.inf, pre).max(axis=1)
        assert (kept_min >= dropped_max - 1e-4).all()
    elif arch == "batchtopk":
        assert (codes[on] > sae.threshold).all()
    else:
        theta = sae.threshold
        assert theta.shape == (64,)
        assert (codes > theta - 1e-6)[on].all()


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_decode_of_every_code_format_agrees(arch, trained, acts):
    sae = sa.SAE.load(trained(arch))
    x = acts[:100].reshape(4, 25, 16)
    csr = sae.encode(x)
    dense = sae.encode(x, "dense")
    assert dense.shape == (4, 25, 64)
    from_csr = sae.decode(csr)
    from_dense = sae.decode(dense)
    assert from_csr.shape == (100, 16) and from_dense.shape == (4, 25, 16)
    np.testing.assert_array_equal(from_csr, from_dense.reshape(100, 16))
    expected = dense.reshape(100, 64) @ sae.w_dec + sae.b_dec
    np.testing.assert_allclose(from_csr, expected, rtol=1e-4, atol=1e-4)
    if arch == "topk":
        indices, values = sae.encode(x, "topk")
        assert indices.shape == (4, 25, 4)
        np.testing.assert_array_equal(sae.decode((indices, values)), from_dense)
        # Trained for 40 steps, the SAE already reconstructs better than the mean.
        err = ((from_csr - x.reshape(100, 16)) ** 2).sum()
        base = ((x.reshape(100, 16) - x.reshape(100, 16).mean(0)) ** 2).sum()
        assert err < 0.9 * base


def test_save_load_round_trip_is_bit_exact(trained, tmp_path):
    run_dir = trained("batchtopk")
    sae = sa.SAE.load(run_dir)
    assert isinstance(sae.threshold, float)
    sae.save(tmp_path / "copy")
    assert (tmp_path / "copy" / "sae.safetensors").read_bytes() == (
        run_dir / "sae.safetensors"
    ).read_bytes()
    back = sa.SAE.load(tmp_path / "copy")
    assert back == sae
    for name in ("w_enc", "b_enc", "w_dec", "b_dec"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sae, name))
    assert back.config == json.loads((run_dir / "sae.json").read_text())["config"]


@pytest.mark.parametrize("fmt,arch", [("saelens", "topk"), ("saelens", "jumprelu"),
                                      ("sparsify", "topk")])
def test_export_writes_what_sae_export_writes(fmt, arch, trained, sae_bin, tmp_path):
    run_dir = trained(arch)
    extra = ["--model-name", "gpt2", "--hook-name", "blocks.6.hook_resid_post"] if fmt == "saelens" else []
    run_sae(sae_bin, "export", run_dir, "--format", fmt, "--out", tmp_path / "cli", *extra)
    kwargs = {"model_name": "gpt2", "hook_name": "blocks.6.hook_resid_post"} if fmt == "saelens" else {}
    sa.SAE.load(run_dir).export(tmp_path / "py", format=fmt, **kwargs)
    cli_files = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert cli_files == sorted(p.name for p in (tmp_path / "py").iterdir())
    for name in cli_files:
        assert (tmp_path / "py" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def test_float32_input_is_read_in_place(trained, acts):
    sae = sa.SAE.load(trained("topk"))
    x = np.ascontiguousarray(acts[:60].reshape(3, 20, 16))
    sae.encode(x)
    assert _native._last_input_address() == x.ctypes.data
    sae.encode(acts)
    assert _native._last_input_address() == acts.ctypes.data
    # The hook does see copies: float16 must be converted, a strided view laid out anew.
    x16 = acts[:60].astype(np.float16)
    sae.encode(x16)
    assert _native._last_input_address() != x16.ctypes.data
    strided = acts[::2]
    sae.encode(strided)
    assert _native._last_input_address() != strided.ctypes.data


def test_float16_strided_and_fortran_inputs_give_the_same_codes(trained, acts):
    sae = sa.SAE.load(trained("topk"))
    x16 = acts[:200].astype(np.float16)
    a = sae.encode(x16).toarray()
    b = sae.encode(x16.astype(np.float32)).toarray()
    np.testing.assert_array_equal(a, b)
    strided = acts[::3]
    np.testing.assert_array_equal(
        sae.encode(strided).toarray(), sae.encode(np.ascontiguousarray(strided)).toarray()
    )
    fortran = np.asfortranarray(acts[:50])
    np.testing.assert_array_equal(sae.encode(fortran).toarray(), sae.encode(acts[:50]).toarray())
    np.testing.assert_array_equal(
        sae.encode(acts[:50].astype(np.float64)).toarray(), sae.encode(acts[:50]).toarray()
    )


def test_torch_tensors_are_accepted(trained, acts):
    torch = pytest.importorskip("torch")
    sae = sa.SAE.load(trained("topk"))
    t = torch.from_numpy(acts[:90].copy()).reshape(3, 30, 16)
    codes = sae.encode(t, "dense")
    assert _native._last_input_address() == t.data_ptr()
    np.testing.assert_array_equal(codes, sae.encode(acts[:90], "dense").reshape(3, 30, 64))
    half = sae.encode(t.half()).toarray()
    np.testing.assert_array_equal(half, sae.encode(acts[:90].astype(np.float16)).toarray())
    t.requires_grad_(True)
    np.testing.assert_array_equal(sae.decode(sae.encode(t)), sae.decode(sae.encode(acts[:90])))
    with pytest.raises(TypeError, match="int64"):
        sae.encode(torch.zeros(2, 16, dtype=torch.int64))


def test_empty_input_gives_empty_codes(trained):
    sae = sa.SAE.load(trained("topk"))
    x = np.zeros((0, 16), np.float32)
    assert sae.encode(x).shape == (0, 64)
    assert sae.encode(x, "topk")[0].shape == (0, 4)
    assert sae.decode(sae.encode(x)).shape == (0, 16)


def test_bad_inputs_raise_clear_errors(trained, tmp_path):
    sae = sa.SAE.load(trained("topk"))
    with pytest.raises(ValueError, match=r"\(4, 10, 5\).*d_model = 16"):
        sae.encode(np.zeros((4, 10, 5), np.float32))
    with pytest.raises(ValueError, match=r"shape \(\)"):
        sae.encode(np.float32(1.0))
    with pytest.raises(TypeError, match="int32"):
        sae.encode(np.zeros((2, 16), np.int32))
    x = np.ones((3, 16), np.float32)
    x[2, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite.*row 2"):
        sae.encode(x)
    with pytest.raises(ValueError, match="format 'coo'"):
        sae.encode(x, "coo")
    with pytest.raises(ValueError, match="contradicts"):
        sae.encode(x, "csr", dense=True)
    with pytest.raises(ValueError, match="needs a topk SAE.*batchtopk"):
        sa.SAE.load(trained("batchtopk")).encode(np.ones((2, 16), np.float32), "topk")
    with pytest.raises(ValueError, match="latent index 64"):
        sae.decode((np.array([[64, 0, 1, 2]]), np.ones((1, 4), np.float32)))
    with pytest.raises(ValueError, match="latent index -1"):
        sae.decode((np.array([[-1, 0, 1, 2]]), np.ones((1, 4), np.float32)))
    with pytest.raises(ValueError, match=r"\(1, 80\).*dict_size = 64"):
        sae.decode(scipy.sparse.csr_matrix((1, 80), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(2, 63\).*dict_size = 64"):
        sae.decode(np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 4\) and values \(2, 3\)"):
        sae.decode((np.zeros((2, 4), np.int64), np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match="not one of \"saelens\""):
        sae.export(tmp_path / "e", format="onnx")


def test_missing_and_damaged_directories_are_os_errors(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        sa.SAE.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="sae.json"):
        sa.SAE.load(tmp_path / "empty")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "sae.json").write_text((trained("topk") / "sae.json").read_text())
    (damaged / "sae.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(OSError, match="sae.safetensors"):
        sa.SAE.load(damaged)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        sa.SAE.load(trained("topk")).save(blocker / "sub")
