"""qwen2vl: a small, exact and fast implementation of Qwen2-VL.

    from qwen2vl import LLM, SamplingParams
    llm = LLM("path/to/Qwen2-VL-2B-Instruct")
    out = llm.chat([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                 {"type": "text", "text": "Describe this image."}]}],
                   SamplingParams(temperature=0, max_tokens=128))
    print(out[0].outputs[0].text)
"""

from .errors import InvalidInputError
from .sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "EngineConfig", "SamplingParams", "StructuredOutputsParams", "InvalidInputError", "process_vision_info", "RequestOutput",
           "CompletionOutput", "LoRARequest", "train", "__version__"]


def __getattr__(name):  # heavy modules load on first use
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "EngineConfig":
        from .engine.config import EngineConfig
        return EngineConfig
    if name == "process_vision_info":
        from .media.vision_info import process_vision_info
        return process_vision_info
    if name == "LoRARequest":
        from .engine.lora_manager import LoRARequest
        return LoRARequest
    if name in ("RequestOutput", "CompletionOutput"):
        from .engine import sequence
        return getattr(sequence, name)
    if name == "train":  # the package, callable as train(config, **overrides) (see qwen2vl.train)
        import importlib
        return importlib.import_module(".train", __name__)
    raise AttributeError(f"module 'qwen2vl' has no attribute {name!r}")
