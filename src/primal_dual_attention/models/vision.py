"""Shapes of the vision transformers the project registers with timm (no timm import here, so
configurations can be checked before timm or any data is loaded)."""

from __future__ import annotations

#: DeiT (Touvron et al. 2021) encoder shapes, patch 16 on 224x224 images.
DEIT = {"tiny": dict(embed_dim=192, depth=12, num_heads=3),
        "small": dict(embed_dim=384, depth=12, num_heads=6)}
#: The CIFAR-10 ViT: patch 4 on 32x32 images (an 8x8 grid plus the class token).
CIFAR = dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, num_classes=10)
