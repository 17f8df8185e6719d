"""mm_convert: Qwen-VL checkpoints between Hugging Face safetensors and the MindSpeed-MM TP x PP x EP layout.

One converter class per model family (``CONVERTERS``; the families are mm_convert/models/*.py)."""
__version__ = "0.1.0"

from .converter import CONVERTERS, Converter  # noqa: E402
from .errors import MMConvertError  # noqa: E402
from .layout import LayoutOptions, ParallelLayout  # noqa: E402

globals().update(CONVERTERS)  # Qwen2VLConverter, Qwen2_5_VLConverter, Qwen3VLMegatronConverter, ...

__all__ = [*CONVERTERS, "Converter", "CONVERTERS", "ParallelLayout", "LayoutOptions", "MMConvertError", "__version__"]
