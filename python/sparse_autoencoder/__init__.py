"""Sparse autoencoders (SAEs) trained fast on the CPU, from Python.

The work is done by the Rust crate ``sparse-autoencoder`` (the ``sae`` command); this package
is a thin layer over its native module, ``sparse_autoencoder._native``:

- :class:`SAE` loads an SAE that ``sae train`` (or :meth:`SAE.save`) wrote, encodes activations
  to sparse codes (a ``scipy.sparse.csr_matrix``, a dense array, or TopK's ``(indices,
  values)``), decodes codes, and exports to SAELens or sparsify;
- :class:`Trainer` trains one SAE step by step on batches you pass, with checkpoints that
  resume bit for bit;
- :func:`train` runs a whole run as ``sae train`` does (run directory, metrics, evaluation,
  plots), on an array of rows or on any iterator of batches.

Inputs may be float32, float16 or float64 numpy arrays, anything with ``__array__``, or CPU
torch tensors, of any leading shape: the last dimension is ``d_model`` and the others are
flattened to rows. A C-contiguous float32 array is read in place, never copied, and the heavy
work runs with the GIL released. Errors from the library are ``OSError`` (a file or directory
that cannot be used) or ``ValueError`` (everything else), with the library's message.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple, Union

import numpy as np
import scipy.sparse

from . import _native

__all__ = ["SAE", "Trainer", "TrainResult", "train", "__version__"]
__version__ = _native.__version__

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
PathLike = Union[str, "os.PathLike[str]"]


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _to_numpy(x: Any, what: str) -> np.ndarray:
    """``x`` as a numpy array of floats: float32 as is (no copy), float16 and float64 converted."""
    if _is_torch_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(
                f"{what} is a torch tensor on {x.device}; move it to the CPU first ({what}.cpu())"
            )
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    elif not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype == np.float32:
        return x
    if x.dtype.kind == "f" and x.dtype.itemsize in (2, 4, 8):
        return x.astype(np.float32)
    raise TypeError(
        f"{what} has dtype {x.dtype}; pass float32 (read in place), float16 or float64 activations"
    )


def _as_rows(x: Any, width: int, what: str, width_name: str = "d_model") -> Tuple[np.ndarray, Tuple[int, ...]]:
    """``x`` as a 2-D float32 array of rows ``width`` wide, and its leading shape."""
    arr = _to_numpy(x, what)
    if arr.ndim == 0 or arr.shape[-1] != width:
        raise ValueError(
            f"{what} has shape {tuple(arr.shape)}: its last dimension must be {width_name} = {width}"
        )
    lead = tuple(arr.shape[:-1])
    if arr.ndim != 2:
        # A view when `arr` is C-contiguous.
        arr = arr.reshape(-1, width)
    return arr, lead


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{value!r} ({type(value).__name__}) is not a number, string or list")


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid {what}: {err}") from None


class SAE:
    """A trained sparse autoencoder: pre = (x − b_dec)·W_encᵀ + b_enc (JumpReLU: x·W_encᵀ +
    b_enc), f = sparsify(ReLU(pre)), x̂ = f·W_dec + b_dec.

    Load one with :meth:`SAE.load`, or take :attr:`Trainer.sae`. Weights are numpy copies:
    ``w_enc`` and ``w_dec`` are ``(dict_size, d_model)``, ``b_enc`` ``(dict_size,)``, ``b_dec``
    ``(d_model,)``.
    """

    __slots__ = ("_native",)

    def __init__(self, native: "_native.Sae"):
        if not isinstance(native, _native.Sae):
            raise TypeError("use SAE.load(dir) or Trainer.sae to get an SAE")
        self._native = native

    @classmethod
    def load(cls, dir: PathLike) -> "SAE":
        """The SAE that ``sae train`` or :meth:`save` wrote into ``dir`` (a run directory, or one
        SAE's subdirectory of a sweep). A missing directory is ``FileNotFoundError``."""
        return cls(_native.Sae.load(os.fspath(dir)))

    def save(self, dir: PathLike) -> None:
        """Writes ``sae.safetensors`` and ``sae.json`` into ``dir`` (created if needed)."""
        self._native.save(os.fspath(dir))

    def export(
        self,
        dir: PathLike,
        format: str = "saelens",
        model_name: Optional[str] = None,
        hook_name: Optional[str] = None,
    ) -> None:
        """Writes the SAE as SAELens (``format="saelens"``, with optional ``model_name`` and
        ``hook_name`` metadata) or EleutherAI's sparsify (``"sparsify"``) loads it, as ``sae
        export`` does."""
        self._native.export(os.fspath(dir), format, model_name, hook_name)

    def encode(self, x: Any, format: Optional[str] = None, *, dense: Optional[bool] = None):
        """Sparse codes of the activations ``x`` (``[..., d_model]``; leading dimensions are rows).

        ``format="csr"`` (the default) gives a ``scipy.sparse.csr_matrix`` of shape
        ``(rows, dict_size)``, float32; ``"dense"`` (or ``dense=True``) a float32 array
        ``[..., dict_size]``; ``"topk"``, for TopK SAEs, ``(indices, values)``, int64 and float32
        arrays ``[..., k]`` as ``sae encode`` writes them (a row with fewer than k positive codes
        is padded with value 0). Codes are those of ``sae encode``: ReLU keeps every positive
        code, TopK the k largest, BatchTopK and Matryoshka those above θ, JumpReLU those above
        each latent's threshold. (A BatchTopK SAE whose θ training has not set yet keeps the
        k·rows largest codes of the whole call, as ``sae encode`` does per ``--batch-size``.)
        """
        if dense is not None:
            if format is not None and format != ("dense" if dense else "csr"):
                raise ValueError(f"format={format!r} contradicts dense={dense!r}; pass one of them")
            format = "dense" if dense else "csr"
        format = format or "csr"
        if format not in ("csr", "dense", "topk"):
            raise ValueError(f"format {format!r} is not one of 'csr', 'dense', 'topk'")
        rows, lead = _as_rows(x, self.d_model, "x")
        if format == "topk":
            indices, values = self._native.encode_topk(rows)
            k = indices.shape[1]
            return indices.reshape(lead + (k,)), values.reshape(lead + (k,))
        indptr, indices, values = self._native.encode_csr(rows)
        if indptr[-1] <= np.iinfo(np.int32).max:
            indptr = indptr.astype(np.int32)
        codes = scipy.sparse.csr_matrix(
            (values, indices, indptr), shape=(rows.shape[0], self.dict_size)
        )
        if format == "dense":
            return codes.toarray().reshape(lead + (self.dict_size,))
        return codes

    def decode(self, codes: Any) -> np.ndarray:
        """The reconstruction x̂ = codes·W_dec + b_dec, float32.

        ``codes`` is a scipy sparse matrix ``(rows, dict_size)`` (giving ``(rows, d_model)``), a
        ``(indices, values)`` pair of ``[..., k]`` arrays as ``encode(x, "topk")`` returns, or a
        dense array ``[..., dict_size]`` (both giving ``[..., d_model]``).
        """
        if scipy.sparse.issparse(codes):
            if codes.ndim != 2 or codes.shape[1] != self.dict_size:
                raise ValueError(
                    f"codes have shape {codes.shape}: they must be (rows, dict_size = {self.dict_size})"
                )
            csr = scipy.sparse.csr_matrix(codes)
            return self._native.decode_csr(
                csr.indptr.astype(np.int64, copy=False),
                csr.indices.astype(np.int64, copy=False),
                _to_numpy(csr.data, "codes").ravel(),
            )
        if isinstance(codes, tuple):
            if len(codes) != 2:
                raise ValueError(f"codes as a tuple must be (indices, values); got {len(codes)} items")
            indices = np.asarray(codes[0])
            values = _to_numpy(codes[1], "values")
            if indices.shape != values.shape or indices.ndim == 0:
                raise ValueError(
                    f"indices have shape {indices.shape} and values {values.shape}; they must be "
                    "the same [..., k] shape"
                )
            if indices.dtype.kind not in "iu":
                raise TypeError(f"indices have dtype {indices.dtype}; pass integers")
            k = indices.shape[-1]
            lead = indices.shape[:-1]
            n = int(np.prod(lead, dtype=np.int64))
            flat = indices.reshape(-1)
            if flat.dtype.kind == "u" and flat.size and flat.max() > np.iinfo(np.int64).max:
                raise ValueError("indices hold values above the int64 range")
            x_hat = self._native.decode_csr(
                np.arange(n + 1, dtype=np.int64) * k,
                flat.astype(np.int64, copy=False),
                values.reshape(-1),
            )
            return x_hat.reshape(lead + (self.d_model,))
        rows, lead = _as_rows(codes, self.dict_size, "codes", "dict_size")
        return self._native.decode_dense(rows).reshape(lead + (self.d_model,))

    @property
    def d_model(self) -> int:
        """D, the width of the activations."""
        return self._native.d_model

    @property
    def dict_size(self) -> int:
        """F, the number of latents."""
        return self._native.dict_size

    @property
    def arch(self) -> str:
        """``"relu"``, ``"topk"``, ``"batchtopk"``, ``"jumprelu"`` or ``"matryoshka"``."""
        return self._native.arch

    @property
    def k(self) -> Optional[int]:
        """k of TopK, BatchTopK and Matryoshka; None for ReLU and JumpReLU."""
        return self._native.k

    @property
    def relu_variant(self) -> Optional[str]:
        """A ReLU SAE's L1 formulation, ``"decoder_norm"`` or ``"unit_decoder"``; else None."""
        return self._native.relu_variant

    @property
    def w_enc(self) -> np.ndarray:
        """Encoder weights, ``(dict_size, d_model)`` float32 (a copy)."""
        return self._native.w_enc

    @property
    def b_enc(self) -> np.ndarray:
        """Encoder bias, ``(dict_size,)`` float32 (a copy)."""
        return self._native.b_enc

    @property
    def w_dec(self) -> np.ndarray:
        """Decoder weights, ``(dict_size, d_model)``: row j is latent j's direction (a copy)."""
        return self._native.w_dec

    @property
    def b_dec(self) -> np.ndarray:
        """Decoder bias, ``(d_model,)`` float32 (a copy)."""
        return self._native.b_dec

    @property
    def threshold(self):
        """BatchTopK's and Matryoshka's θ (a float, None before training sets it), JumpReLU's
        per-latent thresholds (``(dict_size,)`` float32), None for ReLU and TopK."""
        return self._native.threshold

    @property
    def config(self) -> dict:
        """The SAE's configuration as ``sae.json`` records it."""
        return json.loads(self._native.config_json)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SAE):
            return NotImplemented
        return self._native.same_as(other._native)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return f"SAE(arch={self.arch!r}, d_model={self.d_model}, dict_size={self.dict_size}{k})"


def _sae_config(d_model: Any, dict_size: Any, arch: Any, k: Any, relu_variant: Any, train_config: dict) -> dict:
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {', '.join(map(repr, ARCHS))}")
    config: dict = {"d_model": d_model, "dict_size": dict_size, "arch": arch}
    if arch in ("topk", "batchtopk", "matryoshka"):
        if k is None:
            raise ValueError(f"arch {arch!r} needs k, the number of active latents per row")
        config["k"] = k
    elif arch == "jumprelu":
        # As `sae train --k`: JumpReLU's k is the L0 its penalty aims at.
        if k is not None:
            if "target_l0" in train_config:
                raise ValueError("k and target_l0 both set JumpReLU's target L0; pass one of them")
            train_config["target_l0"] = k
    elif k is not None:
        raise ValueError("arch 'relu' takes no k (its sparsity comes from l1_coefficient)")
    if relu_variant is not None:
        if arch != "relu":
            raise ValueError(f"relu_variant applies to arch 'relu', not {arch!r}")
        config["relu_variant"] = relu_variant
    return config


class Trainer:
    """Trains one SAE on batches you pass, one :meth:`step` at a time.

    ``Trainer(d_model, dict_size, arch="topk", k=32, seed=0, threads=None, **train_config)``:
    ``train_config`` takes the fields of the library's ``TrainConfig`` (``total_steps``,
    ``lr``, ``warmup_steps``, ``decay_start``, ``auxk_alpha``, ``dead_tokens``,
    ``l1_coefficient``, ``threshold_start_step``, …; an unknown one is a ``ValueError`` naming
    it). ``relu_variant`` picks ReLU's L1 formulation; for JumpReLU, ``k`` is the L0 the penalty
    aims at (``target_l0``). ``threads`` runs the steps on a pool of that many workers of the
    trainer's own (None: every core; the pure-Rust GEMM's own threads are process-wide, set
    by the environment variable ``MATMUL_NUM_THREADS`` before the first GEMM, as ``sae train
    --threads`` sets it). The same seed, batches and threads give bit-identical SAEs.
    """

    __slots__ = ("_native",)

    def __init__(
        self,
        d_model: int,
        dict_size: int,
        arch: str = "topk",
        k: Optional[int] = None,
        seed: int = 0,
        threads: Optional[int] = None,
        relu_variant: Optional[str] = None,
        **train_config: Any,
    ):
        train_config = dict(train_config)
        sae_config = _sae_config(d_model, dict_size, arch, k, relu_variant, train_config)
        self._native = _native.Trainer(
            _to_json(sae_config, "SAE configuration"),
            _to_json(train_config, "training configuration"),
            seed,
            threads,
        )

    @classmethod
    def resume(
        cls, dir: PathLike, threads: Optional[int] = None, train_config: Optional[Mapping[str, Any]] = None
    ) -> "Trainer":
        """The trainer :meth:`checkpoint` saved into ``dir``: its next step is the one the
        original would have taken. ``train_config`` replaces the saved configuration."""
        self = cls.__new__(cls)
        given = None if train_config is None else _to_json(dict(train_config), "training configuration")
        self._native = _native.Trainer.resume(os.fspath(dir), threads, given)
        return self

    def step(self, batch: Any) -> dict:
        """One training step on ``batch`` (``[..., d_model]``, at least one row); returns the
        step's statistics: ``loss``, ``mse``, ``penalty``, ``aux``, ``fve``, ``l0``,
        ``dead_fraction``, ``lr``, ``threshold`` (BatchTopK's θ, else None) and ``resampled``."""
        rows, _ = _as_rows(batch, self._native.d_model, "batch")
        if rows.shape[0] == 0:
            raise ValueError(f"batch has shape {tuple(np.shape(batch))}: it holds no rows")
        return self._native.step(rows)

    @property
    def sae(self) -> SAE:
        """A copy of the SAE as trained so far."""
        return SAE(self._native.sae)

    @property
    def steps_done(self) -> int:
        """Training steps taken."""
        return self._native.steps_done

    @property
    def config(self) -> dict:
        """The training configuration, every default filled in."""
        return json.loads(self._native.config_json)

    def save(self, dir: PathLike) -> None:
        """Saves the SAE as trained so far into ``dir``, as :meth:`SAE.save`."""
        self._native.save(os.fspath(dir))

    def checkpoint(self, dir: PathLike) -> None:
        """Writes the whole training state (SAE, Adam's moments, counters) and the training
        configuration into the checkpoint directory ``dir``; :meth:`resume` continues from it."""
        self._native.checkpoint(os.fspath(dir))

    def __repr__(self) -> str:
        return f"Trainer({self.sae!r}, steps_done={self.steps_done})"


class TrainResult:
    """What :func:`train` returns: the run directory and each SAE's summary.

    ``saes`` holds one dict per SAE of the run, in its order: ``name``, ``dir`` (a directory
    :meth:`SAE.load` reads), ``eval`` (the held-out statistics ``sae train`` prints and writes to
    ``eval.json``: ``mse``, ``fve``, ``l0``, ``dead_fraction``, …; None when nothing was held
    out), ``steps`` (fewer than planned when a stream ran dry), ``seconds`` and
    ``skipped_rows``. ``notes`` are the run's notices (normalisation scale, skipped rows).
    """

    __slots__ = ("dir", "saes", "notes")

    def __init__(self, summary: dict):
        self.dir: str = summary["dir"]
        self.saes: list = summary["saes"]
        self.notes: list = summary["notes"]

    def load(self, name: Optional[str] = None) -> SAE:
        """The trained SAE called ``name`` (the only one when None)."""
        if name is None:
            if len(self.saes) != 1:
                names = ", ".join(s["name"] for s in self.saes)
                raise ValueError(f"the run trained {len(self.saes)} SAEs ({names}); pass a name")
            return SAE.load(self.saes[0]["dir"])
        for s in self.saes:
            if s["name"] == name:
                return SAE.load(s["dir"])
        raise ValueError(f"no SAE named {name!r}; the run has {', '.join(s['name'] for s in self.saes)}")

    def __repr__(self) -> str:
        return f"TrainResult(dir={self.dir!r}, saes={[s['name'] for s in self.saes]})"


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or _is_torch_tensor(x) or (
        hasattr(x, "__array__") and not hasattr(x, "__next__")
    )


def _stream(batches: Iterable[Any]):
    """Each array of ``batches`` as 2-D float32 rows (its leading dimensions flattened)."""
    for i, item in enumerate(batches):
        arr = _to_numpy(item, f"array {i} of the stream")
        if arr.ndim == 0:
            raise ValueError(f"array {i} of the stream is a single number; yield [..., d_model] arrays")
        yield arr.reshape(-1, arr.shape[-1]) if arr.ndim != 2 else arr


def train(
    batches: Any,
    config: Union[Mapping[str, Any], PathLike, None] = None,
    dir: Optional[PathLike] = None,
    force: bool = False,
    threads: Optional[int] = None,
    resume: bool = False,
    progress: Optional[Callable[[dict], Any]] = None,
    progress_every: int = 1,
) -> TrainResult:
    """Runs a whole training run as ``sae train`` does, writing the same run directory into
    ``dir``: ``config.toml``, each SAE's weights, ``metrics.jsonl``, ``eval.json``,
    ``feature_density.npy`` and plots (and ``checkpoint/`` when stopped early).

    ``batches`` is either an array of rows (``[..., d_model]``: numpy, torch or anything with
    ``__array__``), trained exactly as ``sae train --data x.npy`` trains on the same rows (the
    same seed and threads give the same bits; a C-contiguous float32 array is read in place,
    so do not write to it meanwhile), or any iterable of such arrays (a generator, a forward
    hook's outputs), read once through a shuffle buffer while the SAEs train; the first
    ``data.eval_rows`` rows are held out, and when the stream runs dry the run ends there.

    ``config`` is a dict shaped like the run's ``config.toml`` (``{"train": {"steps": 1000,
    "batch_size": 4096, "seed": 0}, "sae": [{"arch": "topk", "k": 32, "expansion": 8}],
    "data": {"eval_fraction": 0.01}}``) or the path of such a TOML file; unknown keys are a
    ``ValueError`` naming them. ``force`` replaces another run in ``dir``; ``threads`` runs on a
    pool of that many workers (None: every core); ``resume=True`` continues the interrupted
    run in ``dir`` (no ``config``) on ``batches`` handed in again.

    ``progress``, if given, is called every ``progress_every`` steps (and after the last) with
    a dict: ``step``, ``total_steps``, ``tokens``, ``seconds`` and ``stats``, each SAE's step
    statistics (as :meth:`Trainer.step` returns them); an exception it raises stops the run
    and is re-raised.

    Training runs with the GIL released. Ctrl-C stops it at the next step with a checkpoint
    and raises ``KeyboardInterrupt``; an exception raised by the iterator is re-raised as it
    was.
    """
    if dir is None:
        raise ValueError("pass dir, the run directory to write")
    spec_json = spec_toml = None
    if isinstance(config, (str, os.PathLike)):
        spec_toml = os.fspath(config)
    elif isinstance(config, Mapping):
        spec_json = _to_json(dict(config), "run configuration")
    elif config is not None:
        raise TypeError(f"config is a {type(config).__name__}; pass a dict or a TOML file's path")
    if _is_array(batches):
        arr = _to_numpy(batches, "batches")
        if arr.ndim < 2:
            raise ValueError(
                f"batches has shape {tuple(arr.shape)}: pass rows shaped [..., d_model], or an "
                "iterator of such arrays"
            )
        rows = np.ascontiguousarray(arr.reshape(-1, arr.shape[-1]))
        summary = _native.train(os.fspath(dir), rows=rows, spec_json=spec_json,
                                spec_toml=spec_toml, force=force, threads=threads, resume=resume,
                                progress=progress, progress_every=progress_every)
    else:
        try:
            iterator = iter(batches)
        except TypeError:
            raise TypeError(
                f"batches is a {type(batches).__name__}: pass an array of rows or an iterable of arrays"
            ) from None
        summary = _native.train(os.fspath(dir), stream=_stream(iterator), spec_json=spec_json,
                                spec_toml=spec_toml, force=force, threads=threads, resume=resume,
                                progress=progress, progress_every=progress_every)
    return TrainResult(json.loads(summary))
