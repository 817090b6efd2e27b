"""Every hook mmeff puts on a host model lives here.

Host adapters run token reducers at the host's own seams (HF LLaVA, LLaVA-NeXT / NeXT-Video / OneVision,
Qwen2-VL / Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3 / SmolVLM, InternVL; timm ViT, open_clip); method
adapters attach the methods that are not reducers: ToMe and ToCom inside ViT blocks, VisToG's semantic
tokens, KV-cache presses on the decoder. All register in the one registry (kind "adapter");
``mmeff.apply`` picks them.
"""

from mmeff.adapters.base import (
    REFUSED_HOSTS,
    Adapter,
    cls_attention,
    find_adapter,
    host_table,
    list_adapters,
    register_adapter,
)
from mmeff.adapters.gemma3 import Gemma3Adapter
from mmeff.adapters.idefics3 import Idefics3Adapter
from mmeff.adapters.internvl import InternVLAdapter
from mmeff.adapters.kv_cache import KVCacheAdapter
from mmeff.adapters.llava import LlavaAdapter
from mmeff.adapters.llava_next import LlavaNextAdapter
from mmeff.adapters.open_clip import OpenCLIPAdapter
from mmeff.adapters.qwen2_vl import Qwen2VLAdapter
from mmeff.adapters.qwen3_vl import Qwen3VLAdapter
from mmeff.adapters.timm_vit import TimmViTAdapter
from mmeff.adapters.tocom import ToComAdapter
from mmeff.adapters.tome import ToMeAdapter
from mmeff.adapters.vistog import VisToGAdapter

__all__ = [
    "Adapter",
    "REFUSED_HOSTS",
    "Gemma3Adapter",
    "Idefics3Adapter",
    "InternVLAdapter",
    "KVCacheAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "OpenCLIPAdapter",
    "Qwen2VLAdapter",
    "Qwen3VLAdapter",
    "TimmViTAdapter",
    "ToComAdapter",
    "ToMeAdapter",
    "VisToGAdapter",
    "cls_attention",
    "find_adapter",
    "host_table",
    "list_adapters",
    "register_adapter",
]
