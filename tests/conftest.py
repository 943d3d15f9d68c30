import pytest
import torch

from rein.backbones.vit import ReinViT, create_timm_vit
from rein.reins import LoRAReins


def tiny_vit(embed_dim: int = 32, depth: int = 4, heads: int = 2, img_size: int = 64, patch: int = 16,
             name: str = "vit_small_patch14_dinov2", **kw):
    torch.manual_seed(0)
    return create_timm_vit(name, embed_dim=embed_dim, depth=depth, num_heads=heads,
                           img_size=img_size, patch_size=patch, **kw)


def tiny_rein_vit(embed_dim: int = 32, depth: int = 4, token_length: int = 6, **kw) -> ReinViT:
    vit = tiny_vit(embed_dim=embed_dim, depth=depth, **kw)
    reins = LoRAReins(num_layers=depth, embed_dims=embed_dim, patch_size=16,
                      token_length=token_length, lora_dim=4, query_dims=16)
    return ReinViT(vit, reins, mask_token=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
