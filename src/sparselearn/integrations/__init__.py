"""Sparse training inside the trainers people already use.

Each integration is its own module and imports its framework only when it is imported itself
(``import sparselearn`` imports none of them):

- :mod:`sparselearn.integrations.huggingface`: ``SparseTrainingCallback`` for the
  ``transformers`` Trainer (extra ``sparselearn[huggingface]``);
- :mod:`sparselearn.integrations.lightning`: ``SparseTraining``, a Lightning callback
  (extra ``sparselearn[lightning]``);
- :mod:`sparselearn.integrations.tensorboard`: ``TensorBoardLogger``, event files of mask
  updates and metrics for any loop (extra ``sparselearn[tensorboard]``).
"""
