"""``sparselearning.core`` of the 2019 library, by its old name: ``import sparselearn.compat as
sparselearning`` then ``sparselearning.core.add_sparse_args(parser)`` works as it did."""

from __future__ import annotations

from . import CosineDecay, LinearDecay, Masking, add_sparse_args

__all__ = ["CosineDecay", "LinearDecay", "Masking", "add_sparse_args"]
