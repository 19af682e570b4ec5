"""IQA, the fundus image quality assessment subnetwork (paper III-D, Fig. 7, eq. 8).

IQA = C-IQA (a ResNet-50 quality classifier) + LQI-IQA (an encoder-decoder that reconstructs the
low-quality image). LQI-IQA's multi-scale decoder features are fused into C-IQA at four depths,
eq. (8): Y = T_IQA(Concat[F_C(x), F_LQI(x)]), with T_IQA a 3x3 conv - BN - ReLU back to C-IQA's
channels:

  fuse0: stem (S/2, before max-pool, 64 ch)  + d1 (S/2, 64 ch)
  fuse1: layer1 (S/4, 256 ch)                + d2 (S/4, 64 ch)
  fuse2: layer2 (S/8, 512 ch)                + d3 (S/8, 128 ch)
  fuse3: layer3 (S/16, 1024 ch)              + d4 (S/16, 256 ch)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cleaq_jax.models import resnet
from cleaq_jax.models.cenet import CEDecoder, encode34
from cleaq_jax.models.layers import ConvBNReLU, LayerForms, check_divisible, resize_to

# torchvision's nn.Linear default init, as resnet.py's fc.
_fc_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LQIIQA(nn.Module):
    """LQI-IQA: ResNet-34 encoder (``encoder``) + CE-Net decoder (``decoder``) to 3 channels; the
    head output is added to the input, then a 3x3 conv (``refine``) and a sigmoid give the
    reconstructed low-quality image.
    """

    width: float = 1.0
    encoder_stages: Sequence[int] = (3, 4, 6, 3)
    dtype: Any = jnp.float32
    remat: bool = False
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        """x: (B, S, S', 3) in [0, 1], S, S' multiples of 32.

        Returns (lqi (B, S, S', 3) float32 in [0, 1], [d4 (S/16), d3 (S/8), d2 (S/4), d1 (S/2)]).
        """
        feats = encode34(x, train, self.width, self.encoder_stages, self.dtype, self.remat,
                         "encoder", self.forms)
        head, dec = CEDecoder(self.width, 3, self.dtype, self.remat, self.forms, name="decoder")(feats, train)
        y = nn.Conv(3, (3, 3), dtype=self.dtype, name="refine")(head + x.astype(self.dtype))
        return nn.sigmoid(y.astype(jnp.float32)), dec


class CIQA(nn.Module):
    """C-IQA: ResNet-50 (resnet.py pieces and names: ``stem``, ``layer1``..``layer4``, ``fc``)
    with optional eq. (8) fusion convs ``fuse0``..``fuse3``.
    """

    width: float = 1.0
    num_classes: int = 3
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    dtype: Any = jnp.float32
    remat: bool = False
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, x: jax.Array, lqi_features: Sequence[jax.Array] | None = None,
                 train: bool = False) -> jax.Array:
        """Classify image quality.

        Args:
          x: (B, S, S', 3) float images in [0, 1].
          lqi_features: None (plain ResNet-50) or [d4, d3, d2, d1] from LQI-IQA, fused after the
            stem (d1), layer1 (d2), layer2 (d3) and layer3 (d4).
          train: BatchNorm mode.
        Returns:
          (B, num_classes) float32 logits.
        """
        taps = list(reversed(lqi_features)) if lqi_features is not None else None

        def fuse(h, i):
            if taps is None:
                return h
            t = resize_to(taps[i], h.shape[1], h.shape[2]).astype(self.dtype)
            return ConvBNReLU(h.shape[-1], 3, dtype=self.dtype,
                              name=f"fuse{i}")(jnp.concatenate([h, t], axis=-1), train)

        x = resnet.imagenet_normalize(x.astype(jnp.float32))
        h = fuse(resnet.Stem(resnet.channels(64, self.width), self.dtype, name="stem")(x, train), 0)
        h = resnet.stem_pool(h, self.forms.stem_pool)
        for i, n in enumerate(self.stage_sizes):
            h = resnet.Stage(resnet.Bottleneck, n, resnet.channels(64 * 2 ** i, self.width),
                             1 if i == 0 else 2, self.dtype, self.remat, self.forms.scan_blocks,
                             name=f"layer{i + 1}")(h, train)
            if i < 3:
                h = fuse(h, i + 1)
        # Pool and classify in float32, as resnet.ResNet does.
        pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=_fc_init,
                        name="fc")(pooled)


class IQA(nn.Module):
    """IQA subnetwork: C-IQA (``c_iqa``) fused with LQI-IQA (``lqi_iqa``), paper III-D.

    Attributes:
      width: channel multiplier; use_lqi: build LQI-IQA and the fusion convs (False: the
      "IQA w/o LQI-IQA" ablation); num_classes: quality levels (good, usable, reject);
      encoder_stages: LQI-IQA's ResNet-34 stages; classifier_stages: C-IQA's ResNet-50 stages;
      dtype: compute dtype; remat: rematerialise blocks; forms: layer formulations (LayerForms).
    """

    width: float = 1.0
    use_lqi: bool = True
    num_classes: int = 3
    encoder_stages: Sequence[int] = (3, 4, 6, 3)
    classifier_stages: Sequence[int] = (3, 4, 6, 3)
    dtype: Any = jnp.float32
    remat: bool = False
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict:
        """Assess image quality.

        Args:
          x: (B, S, S', 3) float images in [0, 1] (original, degraded or enhanced); S, S'
            multiples of 32 when use_lqi.
          train: BatchNorm mode (``batch_stats`` mutable when True).
        Returns:
          {'quality_logits': (B, num_classes) float32,
           'lqi': (B, S, S', 3) float32 in [0, 1] (only when use_lqi)}.
        """
        out = {}
        feats = None
        if self.use_lqi:
            check_divisible(x, 32, "IQA (with LQI-IQA)")
            out["lqi"], feats = LQIIQA(self.width, self.encoder_stages, self.dtype, self.remat,
                                       self.forms, name="lqi_iqa")(x, train)
        out["quality_logits"] = CIQA(self.width, self.num_classes, self.classifier_stages,
                                     self.dtype, self.remat, self.forms, name="c_iqa")(x, feats, train)
        return out
