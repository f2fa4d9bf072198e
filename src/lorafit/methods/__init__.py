"""Fine-tuning methods, one file each, found and registered by name at import.

Adding a method means adding one file here that calls `registry.register(...)`;
`tests/test_methods_registry.py` fails if a file forgets to.
"""

from . import registry

registry.discover()

__all__ = ["registry"]
