"""The ``asyncgen`` command line (generate, bench, eval) and its local launcher."""
