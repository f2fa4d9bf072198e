"""Fine-tuning methods, one file each, found and registered by name at import.

Adding a method means adding one file here that calls `registry.register(...)`;
`tests/test_methods_contract.py` fails if a file forgets to. `build(cfg.method)` makes the method a
config names.

The config tree imports every method module for its settings class, so a method module imports
peft inside the hooks that use it, never at module level: `lorafit.config` stays free of peft
(tests/test_imports.py). Dependencies run one way: config -> methods -> models.
"""

from . import registry
from .registry import build

registry.discover()

__all__ = ["registry", "build"]
