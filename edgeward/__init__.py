"""edgeward: the command line and the one-command demo that tie the planes together.

The planes themselves are the packages :mod:`pki`, :mod:`gateway` and :mod:`device_sdk`.
"""

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"
__all__ = ["__version__"]
