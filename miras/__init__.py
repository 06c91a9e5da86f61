"""miras: MONETA (MIRAS, Behrouz et al. 2025) as a transformers model, and the stack that trains it.

Importing miras registers the "moneta" model type with AutoConfig and AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import MODEL_SIZES, MonetaConfig
from .modeling import MonetaCache, MonetaForCausalLM, MonetaModel, MonetaPreTrainedModel
from .parameters import count_parameters

__version__ = "0.1.0"

AutoConfig.register(MonetaConfig.model_type, MonetaConfig, exist_ok=True)
AutoModelForCausalLM.register(MonetaConfig, MonetaForCausalLM, exist_ok=True)

__all__ = [
    "MODEL_SIZES",
    "MonetaCache",
    "MonetaConfig",
    "MonetaForCausalLM",
    "MonetaModel",
    "MonetaPreTrainedModel",
    "count_parameters",
]
