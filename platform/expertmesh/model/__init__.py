"""DeepSeek-V3-architecture model core: single device, no Ray or gRPC.

Public entry points::

    from expertmesh.model import load_pretrained
    model = load_pretrained("path/to/checkpoint", dtype=torch.float32, device="cpu")
    logits = model(input_ids)  # [batch, seq] -> [batch, seq, vocab]
"""

from expertmesh.model.checkpoint import load_pretrained, read_config, save_pretrained
from expertmesh.model.config import FP8Format, ModelConfig, RopeScaling
from expertmesh.model.mla import MLA, LatentKV
from expertmesh.model.moe import Gate, GateOutput, MoE
from expertmesh.model.transformer import DeepseekV3, build_model

__all__ = [
    "DeepseekV3", "FP8Format", "Gate", "GateOutput", "LatentKV", "MLA", "ModelConfig", "MoE", "RopeScaling",
    "build_model", "load_pretrained", "read_config", "save_pretrained",
]
