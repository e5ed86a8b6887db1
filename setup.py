"""Package setup; metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["rewrite", "rewrite.*"]), package_data={"rewrite": ["py.typed"]})
