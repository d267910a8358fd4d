"""Only here because cffi's setuptools hook (`cffi_modules`) has no pyproject.toml key.

All other metadata lives in pyproject.toml.
"""

from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
