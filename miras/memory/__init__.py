"""MONETA's memory (MIRAS): the chunkwise training path, the one-token decoding path, the reference.

Pure tensor math: no nn.Module state, no transformers, no I/O.
"""

from .chunkwise import chunkwise_memory
from .recurrent import memory_step
from .rule import RuleConfig
from .state import MemoryState

__all__ = ["MemoryState", "RuleConfig", "chunkwise_memory", "memory_step"]
