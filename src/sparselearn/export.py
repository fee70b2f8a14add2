"""Sparse models that export small: ``sl.export`` writes a safetensors file whose size follows
the active weights, ``sl.load_exported`` reads it back as the dense architecture's
``state_dict``, and ``sl.sparse_state_dict`` gives torch sparse CSR tensors.

The file: every sparsified tensor ``name`` is stored as CSR of its 2-D view (rows = output
units; a convolution's kernel flattened into the columns; a Hugging Face ``Conv1D`` as its
(in, out) weight): ``name.values``, ``name.col_indices`` (int32), ``name.crow_indices`` (int32,
int64 past 2**31 entries); the other tensors as they are. The metadata (``__metadata__``,
strings) says how to rebuild it: ``format`` = ``sparselearn-csr/1`` and ``sparse``, a JSON map
from each CSR tensor's name to its shape, plus ``aliases`` for tied tensors (stored once) and
``sha256``, a digest of the tensors that :func:`load_exported` checks. A model without
sparselearn loads it in a few lines of torch and safetensors (docs/guide.md, "Save, load and
export").
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from torch import Tensor, nn

from ._io import atomic_file
from .checkpoint import DamagedFileError, digest
from .engine.sharding import refuse_sharded

__all__ = ["FORMAT", "export", "load_exported", "sparse_state_dict"]

FORMAT = "sparselearn-csr/1"
_SUFFIXES = (".values", ".col_indices", ".crow_indices")


def _unwrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """The model inside ``torch.compile``'s and data parallelism's wrappers, and the prefix
    the wrappers put before its tensors' names (``_orig_mod.``, ``module.``)."""
    prefix = ""
    while True:
        compiled = getattr(model, "_orig_mod", None)
        if type(model).__name__ == "OptimizedModule" and isinstance(compiled, nn.Module):
            model, prefix = compiled, prefix + "_orig_mod."
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model, prefix = model.module, prefix + "module."
        else:
            return model, prefix


def _plain_name(name: str) -> str:
    """A tensor's name in the plain model: without the ``_orig_mod.`` of a compiled
    submodule."""
    return name.replace("._orig_mod.", ".")


class _Sparse(NamedTuple):
    """An accelerated layer's weight, as CSR of its 2-D view (rows: output units), taken from
    the layer without building the dense weight."""

    values: Tensor
    col: Tensor  # int32 or int64: as the layer holds it (no copy)
    crow: Tensor  # int64
    shape: tuple[int, ...]

    def kept(self, keep: Tensor) -> _Sparse:
        """The same with only the entries ``keep`` (bool, per value)."""
        rows = torch.repeat_interleave(
            torch.arange(self.crow.numel() - 1), self.crow.diff(), output_size=self.values.numel()
        )
        crow = torch.zeros_like(self.crow)
        crow[1:] = torch.bincount(rows[keep], minlength=self.crow.numel() - 1).cumsum(0)
        return _Sparse(self.values[keep], self.col[keep], crow, self.shape)


def _state(model: nn.Module) -> dict[str, Tensor | _Sparse]:
    """The state_dict of the plain model (outside compile's and data parallelism's wrappers,
    under its own names), with accelerated layers as the dense layers they replace: their
    weights as :class:`_Sparse` (a ``Conv1D``'s, which the file holds as its (in, out) weight,
    materialised one layer at a time)."""
    from .accel import SparseConv1D, SparseConv2d, SparseLinear

    plain = _unwrapped(model)[0]
    state: dict[str, Tensor | _Sparse] = {
        _plain_name(k): v.detach() for k, v in plain.state_dict().items()
    }
    for name, module in plain.named_modules():
        if not isinstance(module, (SparseLinear, SparseConv2d)):
            continue
        prefix = _plain_name(f"{name}.") if name else ""
        for key in [k for k in state if k.startswith(f"{prefix}weight_sparse.")]:
            del state[key]
        if isinstance(module, SparseConv1D):
            weight = module.to_dense_module().weight
            assert isinstance(weight, Tensor)
            state[f"{prefix}weight"] = weight.detach()
            continue
        w = module.weight_sparse
        state[f"{prefix}weight"] = _Sparse(
            w.values.detach().cpu(), w.col.cpu(), w.crow.cpu(), tuple(w.shape)
        )
    return state


def _check_engine(model: nn.Module, engine: Any) -> None:
    refuse_sharded(
        model,
        "export",
        "load the full state dict (torch.distributed.checkpoint.state_dict."
        "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))) into an "
        "unsharded copy of the model and export that with engine=None (inactive weights are "
        "exact zeros, so its non-zeros are the masks)",
    )
    if engine is not None and _unwrapped(engine.model)[0] is not _unwrapped(model)[0]:
        raise ValueError("engine sparsifies another model than the one given")


def _masks(engine: Any, state: dict[str, Tensor | _Sparse]) -> dict[str, Tensor]:
    """The active weights of each tensor stored as CSR: the engine's masks where given, else
    the non-zeros of every tensor of two or more dimensions whose CSR is the smaller. (An
    accelerated layer's weight is its CSR already: it needs none.)"""
    if engine is not None:
        prefix = _unwrapped(engine.model)[1]
        masks = {}
        for layer in engine.layers:
            name = _plain_name(layer.name.removeprefix(prefix))
            # (an accelerated layer held as CSR in the state is its own structure)
            if not isinstance(state.get(name), _Sparse):
                masks[name] = layer.public_mask().detach().to(torch.bool).cpu()
        unknown = [k for k in masks if k not in state]
        if unknown:
            raise ValueError(
                f"the engine's tensors {', '.join(unknown[:5])} are not in the model: pass the "
                "engine that sparsifies this model (or engine=None to store its non-zeros)"
            )
        return masks
    out = {}
    for name, t in state.items():
        if isinstance(t, _Sparse):
            continue
        if t.dim() >= 2 and t.is_floating_point():
            nnz = int(torch.count_nonzero(t))
            if _csr_smaller(nnz, t):
                out[name] = t != 0
    return out


def _csr_smaller(nnz: int, t: Tensor | _Sparse) -> bool:
    shape = t.shape if isinstance(t, _Sparse) else tuple(t.shape)
    size = (t.values if isinstance(t, _Sparse) else t).element_size()
    return nnz * (size + 4) + (shape[0] + 1) * 4 < math.prod(shape) * size


def _sparse_entries(state: dict[str, Tensor | _Sparse], engine: Any) -> dict[str, Tensor | _Sparse]:
    """Each tensor as it is stored: CSR (a :class:`_Sparse`) where the engine's masks (or,
    without an engine, the non-zeros) say so, dense otherwise."""
    masks = _masks(engine, state)
    out: dict[str, Tensor | _Sparse] = {}
    for name, t in state.items():
        if isinstance(t, _Sparse):
            if engine is None:  # its non-zeros, stored as CSR where that is smaller
                keep = t.values != 0
                nnz = int(torch.count_nonzero(keep))
                if not _csr_smaller(nnz, t):
                    out[name] = _densified(t)
                    continue
                if nnz != t.values.numel():
                    t = t.kept(keep)
            out[name] = t
        elif name in masks:
            values, col, crow = _csr(t, masks[name])
            out[name] = _Sparse(values, col, crow.long(), tuple(t.shape))
        else:
            out[name] = t
    return out


def _densified(t: _Sparse) -> Tensor:
    rows, columns = t.shape[0], math.prod(t.shape[1:])
    dense = torch.sparse_csr_tensor(t.crow, t.col.long(), t.values, (rows, columns)).to_dense()
    return dense.reshape(t.shape)


def _csr(t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    rows = t.shape[0]
    m2 = mask.reshape(rows, -1).cpu()
    v2 = t.reshape(rows, -1).cpu()
    counts = m2.sum(dim=1)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(counts, 0)
    index = torch.int32 if int(crow[-1]) < 2**31 and m2.shape[1] < 2**31 else torch.int64
    col = m2.nonzero()[:, 1].to(index)  # row-major: rows in order, columns ascending
    values = v2[m2].contiguous()
    return values, col.contiguous(), crow.to(index)


def _stored(model: nn.Module, engine: Any) -> tuple[dict[str, Tensor], dict[str, str]]:
    _check_engine(model, engine)
    entries = _sparse_entries(_state(model), engine)
    tensors: dict[str, Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    sparse: dict[str, list[int]] = {}
    for name, t in entries.items():
        if isinstance(t, _Sparse):
            index = torch.int32 if t.values.numel() < 2**31 and t.shape[0] < 2**31 else torch.int64
            tensors[name + ".values"] = t.values.contiguous()
            tensors[name + ".col_indices"] = t.col.to(index).contiguous()
            tensors[name + ".crow_indices"] = t.crow.to(index)
            sparse[name] = list(t.shape)
            continue
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape))
        if t.numel() and key in seen:
            aliases[name] = seen[key]  # tied: stored once
            continue
        seen[key] = name
        tensors[name] = t.contiguous().cpu()
    metadata = {
        "format": FORMAT,
        "sparse": json.dumps(sparse),
        "aliases": json.dumps(aliases),
        "sha256": digest(tensors),
    }
    return tensors, metadata


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors(f: BinaryIO, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format, written tensor by tensor: an 8-byte header length, a JSON
    header (each tensor's dtype, shape and byte range; the metadata), the tensors' bytes. The
    file is never whole in memory (``safetensors.torch.save`` builds it as one bytes object)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: safetensors cannot hold {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for t in tensors.values():
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


FORMATS = ("sparselearn-csr", "compressed-tensors")


def export(
    model: nn.Module,
    engine: Any,
    path: str | os.PathLike[str],
    *,
    format: str = "sparselearn-csr",
) -> Path:
    """Write ``model`` for inference to ``path``.

    ``format="sparselearn-csr"`` (the default): one safetensors file, each sparsified tensor
    as CSR. ``engine`` (or None: the non-zeros of each tensor whose CSR is smaller) decides
    what is active. Accelerated layers are written as the dense layers they replace; a model
    from ``sl.compact`` (``result.model``) exports with ``engine=None``. A structured engine's
    structure is recorded in the metadata (``structure``).

    ``format="compressed-tensors"``: a folder that vLLM and the ``compressed-tensors`` library
    load, for a model trained with ``structure="2:4"``: ``model.safetensors`` with each 2:4
    Linear weight in the ``sparse-24-bitmask`` layout (``<layer>.compressed``: the kept values,
    (rows, in/2); ``<layer>.bitmask``: their positions, a bit per weight, packed along the row,
    least significant bit first; ``<layer>.shape``), every other tensor dense; and
    ``config.json`` with its ``quantization_config`` (the model's own Hugging Face config
    merged in, where it has one).

    Needs ``safetensors`` (``pip install "sparselearn[safetensors]"``). Returns the path.
    """
    try:
        import safetensors  # noqa: F401  (what reads the file back)
    except ImportError as err:
        raise RuntimeError(
            f"export needs safetensors ({err}): pip install 'sparselearn[safetensors]'"
        ) from None
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    path = Path(path)
    if format == "compressed-tensors":
        return _export_compressed_tensors(model, engine, path)
    tensors, metadata = _stored(model, engine)
    structure = getattr(getattr(engine, "config", None), "structure", "unstructured")
    if structure != "unstructured":
        metadata["structure"] = structure
    with atomic_file(path) as f:
        _write_safetensors(f, tensors, metadata)
    return path


COMPRESSED_TENSORS_FORMAT = "sparse-24-bitmask"
# the compressed-tensors release whose layout the folder follows (the last with the 2:4
# compressor; the test environment pins it and decompresses with it)
COMPRESSED_TENSORS_VERSION = "0.13.0"


def _export_compressed_tensors(model: nn.Module, engine: Any, path: Path) -> Path:
    """:func:`export`'s ``compressed-tensors`` folder (see there)."""
    if engine is None or getattr(engine.config, "structure", None) != "2:4":
        got = "no engine" if engine is None else f"structure {engine.config.structure!r}"
        raise ValueError(
            f"format='compressed-tensors' writes 2:4 weights ({COMPRESSED_TENSORS_FORMAT}): "
            f"pass the engine of a model trained with structure='2:4' (got {got}), or export "
            "with the default format"
        )
    _check_engine(model, engine)
    plain, prefix = _unwrapped(model)
    modules = dict(plain.named_modules())
    state = _state(model)
    tensors: dict[str, Tensor] = {}
    targets = []
    sparse_names = set()
    for layer in engine.layers:
        name = _plain_name(layer.name.removeprefix(prefix))
        owner = name.rpartition(".")[0]
        module = modules.get(owner)
        if not name.endswith("weight") or not _is_linear(module):
            raise ValueError(
                f"{name} is not the weight of a Linear layer; {COMPRESSED_TENSORS_FORMAT} holds "
                "Linear weights only: keep it dense when sparsifying (exclude=[...]) or export "
                "with the default format"
            )
        stored = state[name]
        weight = _densified(stored) if isinstance(stored, _Sparse) else stored
        mask = layer.public_mask().detach().to(torch.bool).cpu()
        compressed, bitmask = _sparse_24(weight.cpu(), mask, name)
        tensors[f"{owner}.compressed"] = compressed
        tensors[f"{owner}.bitmask"] = bitmask
        tensors[f"{owner}.shape"] = torch.tensor(list(weight.shape)).reshape(-1, 1)
        targets.append(owner)
        sparse_names.add(name)

    def numel(t: Tensor | _Sparse) -> int:
        return math.prod(t.shape)

    total = sum(numel(t) for k, t in state.items() if k in sparse_names)
    for name, t in state.items():
        if name not in sparse_names:
            tensors[name] = (_densified(t) if isinstance(t, _Sparse) else t).contiguous().cpu()
    config: dict[str, Any] = {}
    hf_config = getattr(plain, "config", None)
    if hf_config is not None and callable(getattr(hf_config, "to_dict", None)):
        config.update(hf_config.to_dict())
    sparsity = {
        "format": COMPRESSED_TENSORS_FORMAT,
        "global_sparsity": 0.5 * total / max(sum(numel(t) for t in state.values()), 1),
        "sparsity_structure": "2:4",
        "targets": targets,
        "ignore": [],
        "registry_requires_subclass": False,
    }
    # what compressed-tensors' ModelCompressor.update_config writes for a sparsity config
    # without quantization (no other key: any would be read as a quantization config)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": COMPRESSED_TENSORS_VERSION,
        "sparsity_config": sparsity,
    }
    with atomic_file(path / "model.safetensors") as f:
        _write_safetensors(f, tensors, {"format": "pt"})
    with atomic_file(path / "config.json") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True, default=str).encode())
    return path


def _is_linear(module: nn.Module | None) -> bool:
    from .accel import SparseConv1D, SparseLinear

    return isinstance(module, (nn.Linear, SparseLinear)) and not isinstance(module, SparseConv1D)


def _sparse_24(weight: Tensor, mask: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """The kept values (rows, in/2) and the packed bitmask (rows, ceil(in/8)) of a 2:4 weight,
    in the layout of compressed-tensors' ``sparse-24-bitmask``."""
    import numpy as np

    rows, cols = weight.shape
    groups = mask.reshape(rows, -1, 4).sum(dim=2)
    if cols % 4 or not bool((groups == 2).all()):
        raise ValueError(f"{name}: its mask is not 2:4 (every 4 inputs holding 2)")
    compressed = weight[mask].reshape(rows, cols // 2).contiguous()
    packed = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    return compressed, torch.from_numpy(packed)


def load_exported(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """The dense ``state_dict`` of a file written by :func:`export`: load it into the model's
    architecture with ``model.load_state_dict``; nothing of sparselearn is needed there."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as err:
        raise RuntimeError(
            f"load_exported needs safetensors ({err}): pip install 'sparselearn[safetensors]'"
        ) from None
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} was not written by sparselearn.export (format {metadata.get('format')!r})"
        )
    recorded = metadata.get("sha256")
    if recorded is not None and recorded != digest(tensors):
        raise DamagedFileError(
            f"{path} is damaged: its tensors do not match the checksum they were written with"
        )
    sparse = json.loads(metadata["sparse"])
    aliases = json.loads(metadata.get("aliases", "{}"))
    state: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if not name.endswith(_SUFFIXES) or name.rsplit(".", 1)[0] not in sparse:
            state[name] = t
    for name, shape in sparse.items():
        try:
            values = tensors[name + ".values"]
            col = tensors[name + ".col_indices"].long()
            crow = tensors[name + ".crow_indices"].long()
        except KeyError as err:
            raise ValueError(f"{path} is incomplete: it lacks {err.args[0]}") from None
        rows, columns = shape[0], math.prod(shape[1:])
        dense = torch.sparse_csr_tensor(crow, col, values, (rows, columns)).to_dense()
        state[name] = dense.reshape(shape)
    for name, source in aliases.items():
        state[name] = state[source]
    return state


def sparse_state_dict(model: nn.Module, engine: Any = None) -> dict[str, Tensor]:
    """The model's state_dict with each sparsified tensor as a ``torch.sparse_csr_tensor`` of
    its 2-D view (rows: output units), the other tensors as they are. A Linear weight is its own
    view; a convolution's is rebuilt with ``t.to_dense().reshape(weight.shape)``.
    ``torch.save`` writes it, and ``torch.load(..., weights_only=True)`` reads it back."""
    _check_engine(model, engine)
    out: dict[str, Tensor] = {}
    for name, t in _sparse_entries(_state(model), engine).items():
        if isinstance(t, _Sparse):
            out[name] = torch.sparse_csr_tensor(
                t.crow, t.col.long(), t.values, (t.shape[0], math.prod(t.shape[1:]))
            )
        else:
            out[name] = t
    return out
