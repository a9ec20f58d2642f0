"""The one part of the build pyproject.toml cannot say: the Bitcoin family's optional C
scanner (plugins/bitcoin/_rawscan.c). ``optional=True``: where it cannot be compiled (no C
compiler or Python headers), the install goes on and watcher_bitcoin.rawblock runs the same
loops in Python (a catch-up takes more CPU; the daemon logs a warning
for each Bitcoin-family chain then)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("watcher_bitcoin._rawscan", ["plugins/bitcoin/_rawscan.c"], optional=True,
                             extra_compile_args=["-O2"])])
