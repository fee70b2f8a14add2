"""The experiment tooling around the library: the ``sparselearn`` command (``cli.py``), the
training run (``train.py``, with its configuration, optimizer, progress bar and run-directory
utilities), studies over grids of runs, reports, the class-specialisation analysis, the demo and
plots. ``import sparselearn`` does not import it; the library does not depend on it.
"""
