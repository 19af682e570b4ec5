"""DR grading subnetwork (paper III-E): a ResNet-50 on the (enhanced) fundus image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cleaq_jax.models import resnet
from cleaq_jax.models.layers import LayerForms


class DRGrader(nn.Module):
    """ResNet-50 DR grader.

    The network lives under the submodule ``backbone`` with resnet.py's (torchvision's) names, its
    ``fc`` sized to ``num_grades``, so ImageNet ResNet-50 weights graft onto everything but ``fc``.

    Attributes:
      num_grades: DR levels (5 EyeQ, 4 Messidor).
      width: channel multiplier; stage_sizes: Bottleneck blocks per stage.
      dtype: compute dtype; remat: rematerialise blocks; forms: layer formulations (LayerForms).
    """

    num_grades: int = 5
    width: float = 1.0
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    dtype: Any = jnp.float32
    remat: bool = False
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: (B, H, W, 3) float images in [0, 1] -> (B, num_grades) float32 logits.

        ``train``: BatchNorm uses batch statistics (``batch_stats`` mutable) when True.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"DRGrader expects NHWC RGB images (B, H, W, 3), got shape {x.shape}")
        backbone = resnet.resnet50(num_classes=self.num_grades, width=self.width,
                                   stage_sizes=tuple(self.stage_sizes), dtype=self.dtype,
                                   remat=self.remat, forms=self.forms, name="backbone")
        return backbone(resnet.imagenet_normalize(x.astype(jnp.float32)), train)
