"""The llama.cpp adapter: the only package that uses ``llama_cpp`` (imported by
:mod:`~eft_local.backend.library` alone). Its modules call each other's functions through
the module that defines them: patch them there in tests.

- :mod:`~eft_local.backend.library`: llama.cpp itself, its log, its build;
- :mod:`~eft_local.backend.model`: loading GGUF files, a model's context and its KV cache;
- :mod:`~eft_local.backend.sequences`: the sequences a context holds: evaluating them alone
  or several in one decode, rolling them back, sharing their cells;
- :mod:`~eft_local.backend.tools`: grammars, the quantizer, the llama.cpp-alone baseline.
"""

from eft_local.backend.library import (
    DEFAULT_N_CTX,
    QUANT_TYPES,
    SPIN_COUNT,
    L,
    build_info,
    fully_offloaded,
    supports_gpu_offload,
)
from eft_local.backend.model import FLASH_ATTN, LlamaModel, read_vocab
from eft_local.backend.sequences import Part
from eft_local.backend.tools import (
    Grammar,
    check_grammar,
    json_schema_grammar,
    quantize_gguf,
    raw_decode_seconds,
    raw_speed,
)

__all__ = ["DEFAULT_N_CTX", "FLASH_ATTN", "QUANT_TYPES", "SPIN_COUNT", "Grammar", "L",
           "LlamaModel", "Part",
           "build_info", "check_grammar", "fully_offloaded", "json_schema_grammar",
           "quantize_gguf", "raw_decode_seconds", "raw_speed", "read_vocab",
           "supports_gpu_offload"]
