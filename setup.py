"""Package discovery, the one thing pyproject.toml cannot say: every package under gpuckpt/ is found
(so a new subpackage cannot be left out of the wheel), and kernels/ at the top of the repository,
where the CUDA sources live, installs as gpuckpt.kernels. ``[tool.setuptools.packages.find]`` can
only find packages under their own names, and ``packages`` and ``packages.find`` cannot be combined;
everything else is in pyproject.toml (tests/test_packaging.py builds the wheel and checks it)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["gpuckpt", "gpuckpt.*"]), "gpuckpt.kernels"],
    package_dir={"gpuckpt.kernels": "kernels"},
)
