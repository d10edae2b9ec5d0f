"""annofs benchmarks: the SPEC.md §8 figures, each measured beside its baseline.

Run ``python -m benchmarks --list`` for the figures and ``python -m benchmarks`` to
measure them into ``benchmarks/RESULTS.md``. Figure modules register with
``benchmarks.registry.figure``; add new modules to ``registry.FIGURE_MODULES``.
"""
