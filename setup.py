"""``python3 setup.py install``, as the original README has it; everything is declared in pyproject.toml
(``pip install .`` is the usual way)."""

from setuptools import setup

setup()
