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

from .config import Config, load_config  # noqa: E402
from .errors import UserError  # noqa: E402
from .inference import Classifier, load  # noqa: E402
from .soup import soup  # noqa: E402
from .train import RunResult, train  # noqa: E402

__all__ = ["Config", "load_config", "UserError", "Classifier", "load", "train", "RunResult", "soup", "__version__"]
