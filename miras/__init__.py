"""miras: MONETA (MIRAS, Behrouz et al. 2025) as a transformers model, and the stack that trains it.

`import miras` imports neither torch nor transformers, so that `miras --help`, `miras storage` and the
storage plugins start at once: the names below load on first use. The "moneta" model type is registered
with AutoConfig and AutoModelForCausalLM as soon as transformers' Auto classes are imported, or at once
if they already are (miras/_auto.py), so `import miras` is still all `from_pretrained` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import _auto

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "MODEL_SIZES": "configuration",
    "MonetaConfig": "configuration",
    "MonetaCache": "modeling",
    "MonetaForCausalLM": "modeling",
    "MonetaModel": "modeling",
    "MonetaPreTrainedModel": "modeling",
    "count_parameters": "parameters",
}
__all__ = [
    "MODEL_SIZES",
    "MonetaCache",
    "MonetaConfig",
    "MonetaForCausalLM",
    "MonetaModel",
    "MonetaPreTrainedModel",
    "count_parameters",
]

if TYPE_CHECKING:
    from .configuration import MODEL_SIZES, MonetaConfig
    from .modeling import MonetaCache, MonetaForCausalLM, MonetaModel, MonetaPreTrainedModel
    from .parameters import count_parameters


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'miras' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    _auto.register_loaded()
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


_auto.install()
