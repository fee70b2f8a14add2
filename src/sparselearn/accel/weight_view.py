"""``.weight`` of an accelerated layer: what model code asks of the dense weight it replaced.

Model code reads ``.weight`` of its layers for more than the product: T5 casts its activations
to ``self.wo.weight.dtype``, the Hugging Face ViT to ``projection.weight.dtype``, and
``nn.TransformerEncoderLayer`` hands ``linear1.weight`` to a fused kernel. An accelerated layer
keeps no dense weight; :class:`SparseWeightView` answers for it: a tensor subclass with the dense
weight's shape, dtype, device and ``requires_grad`` and no storage of its own, so that asking
costs nothing. An operation that computes with it gets the dense weight, built then (with its
gradient flowing to the layer's values where autograd records); PyTorch's fused fast paths see a
tensor with ``__torch_function__`` and take their ordinary path, which calls the layer. Writes
(in-place operations, ``.data =``, ``out=``) are refused: they would edit a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils._pytree import tree_map


class DenseSource(Protocol):
    """What a view uses of the sparse weight it stands for (``layers.SparseWeight``)."""

    shape: tuple[int, ...]

    @property
    def values(self) -> Tensor: ...

    def dense_from(self, values: Tensor) -> Tensor: ...


# attributes and methods answered from the view's own metadata (shape, dtype, device, autograd
# flags): nothing is built for them
_METADATA_ATTRIBUTES = frozenset(
    {"shape", "dtype", "device", "requires_grad", "is_leaf", "ndim", "layout", "grad_fn",
     "is_cuda", "is_cpu", "is_meta", "is_mps", "is_xpu", "is_sparse", "is_sparse_csr",
     "is_quantized", "is_mkldnn", "is_nested", "names", "itemsize", "nbytes", "output_nr",
     "_version", "_base"}
)  # fmt: skip
_METADATA_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "element_size", "is_floating_point",
     "is_complex", "is_signed", "get_device", "stride", "is_contiguous", "__len__", "__hash__",
     "__format__"}
)  # fmt: skip
_IN_PLACE_DUNDERS = frozenset(
    {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
     "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
     "__imatmul__"}
)  # fmt: skip


def _name(func: Callable[..., Any]) -> tuple[str, str]:
    """(the function's name, the attribute's name for a descriptor's ``__get__``/``__set__``)."""
    name = getattr(func, "__name__", "")
    owner = getattr(func, "__self__", None)
    return name, getattr(owner, "__name__", "") if name in ("__get__", "__set__") else ""


def _writes(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether ``func`` writes into a view: an in-place method or setter called on it, or an
    ``out=`` argument (reading one, as in ``x.add_(view)``, is no write)."""
    name, _ = _name(func)
    # the tensor written: the first argument (torch.nn.init passes it by keyword)
    first = args[0] if args else kwargs.get("tensor", kwargs.get("input", kwargs.get("self")))
    on_view = isinstance(first, SparseWeightView)
    if on_view and (name in ("__set__", "__delete__") or name in _IN_PLACE_DUNDERS):
        return True
    if on_view and name.endswith("_") and not name.startswith("__"):  # add_, uniform_, ...
        return True
    out = kwargs.get("out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, SparseWeightView) for o in outs)


class SparseWeightView(Tensor):
    """The dense weight of an accelerated layer, built only when something computes with it.

    ``shape``, ``dtype``, ``device``, ``requires_grad`` and the other metadata are the dense
    weight's (a ``Conv1D``'s: its (in, out) shape); ``grad`` is the values' gradient, zero at
    the inactive positions. Any operation on it sees the dense weight with exact zeros at the
    inactive positions; where autograd records, its gradient reaches the layer's values.
    In-place edits and assignment are refused.
    """

    _storage_of: DenseSource
    _transposed: bool
    _layer: str

    @staticmethod
    def __new__(cls, storage: DenseSource, transposed: bool, layer: str) -> SparseWeightView:
        values = storage.values
        shape = tuple(storage.shape)
        view: SparseWeightView = Tensor._make_wrapper_subclass(
            cls,
            shape[::-1] if transposed else shape,
            dtype=values.dtype,
            device=values.device,
            requires_grad=values.requires_grad,
        )
        view._storage_of, view._transposed, view._layer = storage, transposed, layer
        return view

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"SparseWeightView({self._layer}, {self._dense(False)!r})"

    def _dense(self, differentiable: bool) -> Tensor:
        """The dense weight (a fresh tensor: nothing the layer keeps), differentiable with
        respect to the values where asked and autograd records."""
        storage = self._storage_of
        values: Tensor = storage.values
        if not (differentiable and torch.is_grad_enabled() and values.requires_grad):
            values = values.detach()
        dense = storage.dense_from(values)
        return dense.t() if self._transposed else dense

    def _dense_grad(self) -> Tensor | None:
        """The values' gradient as a dense gradient of the weight (None before a backward)."""
        grad = self._storage_of.values.grad
        if grad is None:
            return None
        dense = self._storage_of.dense_from(grad)
        return dense.t() if self._transposed else dense

    def _refuse(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"{self._layer}.weight is computed from the layer's sparse values and cannot be "
            f"{what}: it would change a copy. Change the active weights through "
            f"{self._layer}.weight_sparse.values (in CSR order) or load a state_dict; for a "
            "dense model, export it (sl.export) or take sl.compact(...).model"
        )

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        name, attribute = _name(func)
        if (name == "__get__" and attribute in _METADATA_ATTRIBUTES) or name in _METADATA_METHODS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if name == "__get__" and attribute == "grad":
            return args[0]._dense_grad()
        if _writes(func, args, kwargs):
            view = next(a for a in (*args, *kwargs.values()) if isinstance(a, cls))
            what = f"set ({attribute})" if attribute else f"edited in place ({name})"
            raise view._refuse(what)

        def dense(a: Any) -> Any:
            return a._dense(True) if isinstance(a, cls) else a

        args, kwargs = tree_map(dense, (tuple(args), kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        # reached only where __torch_function__ is bypassed (another subclass's handler, a
        # compiler's tracing): below autograd a gradient could not reach the values
        raise RuntimeError(
            f"{func} reached an accelerated layer's .weight below autograd, where it cannot "
            "compute with the sparse values; read the layer's output instead, or take the "
            "dense weight with layer.weight_sparse.dense()"
        )
