"""mm_convert: Qwen2.5-VL checkpoints between Hugging Face safetensors and the MindSpeed-MM TP x PP layout."""
__version__ = "0.1.0"

from .converter import CONVERTERS, Converter, Qwen2_5_VLConverter  # noqa: E402
from .errors import MMConvertError  # noqa: E402
from .layout import ParallelLayout  # noqa: E402

__all__ = ["Qwen2_5_VLConverter", "Converter", "CONVERTERS", "ParallelLayout", "MMConvertError", "__version__"]
