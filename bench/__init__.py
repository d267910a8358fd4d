"""balloond's benchmark suite: ``python -m bench`` (``make bench``) writes docs/PERFORMANCE.md.

Benchmarks are not tests: nothing here asserts a time. Every comparison alternates its two
sides within one run and reports ratios from that run, with min/median/max over repeats.
``--smoke`` runs every benchmark at tiny sizes in seconds (tests/test_bench.py does), so the
suite cannot rot.
"""
