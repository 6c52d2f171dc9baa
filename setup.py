"""Package discovery for setuptools; every other setting lives in pyproject.toml.

The package list is discovered, not typed out, so a new subpackage (as ``edgeprune/structured`` once was) can never
be left out of a wheel while the editable install used in development still finds it. It lives here because
``[tool.setuptools.packages.find]`` cannot express this layout: ``export/`` and ``benchmarks/`` sit at the top of the
tree but install as ``edgeprune.export`` and ``edgeprune.benchmarks``, and ``find`` ignores ``package-dir``, so it
either drops them (``include = ["edgeprune*"]``) or ships them as top-level ``export``/``benchmarks`` packages.
"""

from setuptools import find_packages, setup

# installed name -> folder in the source tree; the design card's layout
MAPPED = {"edgeprune.export": "export", "edgeprune.benchmarks": "benchmarks"}

packages = find_packages(include=["edgeprune", "edgeprune.*"])
for name, folder in MAPPED.items():
    packages += [name + sub.removeprefix(folder) for sub in find_packages(include=[folder, f"{folder}.*"])]

setup(packages=packages, package_dir=MAPPED)
