"""Fuzzing targets for balloond, shared by the property tests and the atheris harness.

Each target is a function of a :class:`fuzz.source.Source`, the stream of choices it makes:
hypothesis draws them in ``tests/test_properties.py`` (in CI), atheris takes them from its
coverage-guided inputs in ``python -m fuzz`` (a long campaign, see ``fuzz/README.md``).
Every target checks its invariants on every input and raises ``AssertionError`` when one
breaks; any other exception out of a target is a crash as well.
"""
