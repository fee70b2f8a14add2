"""The 2019 sparse momentum library's API, on top of the sparselearn engine.

Code written for the 2019 library (``sparselearning``, Dettmers & Zettlemoyer) runs with its
imports changed: ``import sparselearn.compat as sparselearning`` and
``from sparselearn.compat.core import ...`` (the 2019 module names, ``sparselearning.core``
included, so that ``sparselearning.core.add_sparse_args(parser)`` keeps working)::

    from sparselearn.compat import Masking, CosineDecay

    decay = CosineDecay(0.5, len(train_loader) * epochs)
    mask = Masking(optimizer, prune_rate_decay=decay)
    mask.add_module(model, density=0.05)
    for epoch in range(epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            mask.step()                  # or optimizer.step(): both work here
        mask.at_end_of_epoch()

Same argument names, mode names and meaning, without the old defects: the budget is exact (the
old regrowth could pick active positions and drift below the target), ``SET`` prunes the weights
closest to zero on both sides (the old code removed the most negative ones), no hard-coded CUDA
device, the masks are part of ``state_dict()``, unknown mode names raise instead of printing,
and ``optimizer.step()`` keeps working (AMP grad scalers, clipping, closures).

Differences worth knowing: weights of every module except biases, 1-D tensors and normalisation
layers are sparsified (the old code also masked 1-D non-bias parameters such as PReLU weights);
``LinearDecay`` stops at 0 instead of going negative; ``sparse_init='resume'`` is replaced by
``state_dict()``/``load_state_dict()``; custom criteria are registered with
:func:`sparselearn.register_growth` and friends and selected by name, not passed as functions.
"""

from __future__ import annotations

from . import core
from .core import (
    GROWTH_MODES,
    PRUNE_MODES,
    REDISTRIBUTION_MODES,
    SPARSE_INITS,
    CosineDecay,
    LinearDecay,
    Masking,
    PruneRateDecay,
    add_sparse_args,
)

__all__ = [
    "GROWTH_MODES",
    "PRUNE_MODES",
    "REDISTRIBUTION_MODES",
    "SPARSE_INITS",
    "CosineDecay",
    "LinearDecay",
    "Masking",
    "PruneRateDecay",
    "add_sparse_args",
    "core",
]
