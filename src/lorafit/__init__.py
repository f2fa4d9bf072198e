"""lorafit: fine-tune transformer encoders for text classification with LoRA-family adapters.

    import lorafit
    result = lorafit.train("configs/banking77-lora.yaml", out="runs/b77-lora")
    clf = lorafit.load("runs/b77-lora")
    clf.predict(["I am still waiting on my card?"], top_k=3)
"""

__version__ = "0.1.0"

# Run as a program (`lorafit ...`, `python -m lorafit ...`), lorafit starts again on jemalloc where the
# machine has it, before torch loads (allocator.py says why); importing lorafit never does.
from . import allocator as _allocator  # noqa: E402

_allocator.relaunch()

from .errors import UserError  # noqa: E402

#: The API's names and the modules that define them.
_API = {"Config": "config", "load_config": "config", "Classifier": "inference", "load": "inference", "soup": "soup",
        "train": "train", "RunResult": "train"}

__all__ = [*_API, "UserError", "__version__"]

if not _allocator.is_program():
    # Imported: the whole API at once (torch, transformers, peft: seconds). Eager, not lazy, because `train`
    # and `soup` are also submodules' names: importing lorafit.train later would set lorafit.train to the
    # module, and the function must win, as it does when it is bound after its module has loaded.
    from .config import Config, load_config  # noqa: E402
    from .inference import Classifier, load  # noqa: E402
    from .soup import soup  # noqa: E402
    from .train import RunResult, train  # noqa: E402
else:
    # Run as a program (`lorafit ...`): the CLI imports what its verb needs, so `lorafit --help` and a
    # mistyped flag answer at once instead of after ~8 s of imports. The API's names still resolve here.
    def __getattr__(name: str):
        if name not in _API:
            raise AttributeError(f"module 'lorafit' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
