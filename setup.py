"""Maps the top-level folders passes/ and kernels/ into the `rewrite` namespace."""

from setuptools import find_packages, setup

FOLDERS = {"rewrite": "rewrite", "rewrite.passes": "passes", "rewrite.kernels": "kernels"}


def mapped_packages() -> list[str]:
    packages = []
    for name, folder in FOLDERS.items():
        packages.append(name)
        packages.extend(f"{name}.{sub}" for sub in find_packages(where=folder))
    return packages


setup(packages=mapped_packages(), package_dir=FOLDERS, package_data={"rewrite": ["py.typed"]})
