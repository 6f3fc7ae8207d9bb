"""Package discovery for metactl; all metadata lives in ``pyproject.toml``.

``adapters/`` ships as ``metactl.adapters`` (never as a top-level ``adapters`` module).
setuptools' declarative ``packages.find`` cannot install a folder under another package's name,
so both trees are walked here: a new subpackage (a folder with an ``__init__.py``) is picked up
without editing a list, and ``tests/test_packaging.py`` checks the built wheel against the tree.
"""

from setuptools import find_packages, setup

core = find_packages(include=["metactl", "metactl.*"])
adapters = ["metactl.adapters"] + [f"metactl.adapters.{name}" for name in find_packages("adapters")]

setup(packages=core + adapters, package_dir={"metactl.adapters": "adapters"})
