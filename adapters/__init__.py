"""How mmeff methods attach to host models (HF LLaVA / Qwen2-VL, timm ViT, open_clip)."""

from mmeff.adapters.base import Adapter, cls_attention, find_adapter, list_adapters, register_adapter
from mmeff.adapters.llava import LlavaAdapter
from mmeff.adapters.open_clip import OpenCLIPAdapter
from mmeff.adapters.qwen2_vl import Qwen2VLAdapter
from mmeff.adapters.timm_vit import TimmViTAdapter

__all__ = [
    "Adapter",
    "LlavaAdapter",
    "OpenCLIPAdapter",
    "Qwen2VLAdapter",
    "TimmViTAdapter",
    "cls_attention",
    "find_adapter",
    "list_adapters",
    "register_adapter",
]
