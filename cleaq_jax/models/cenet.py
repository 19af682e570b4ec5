"""CE-Net (Gu et al., TMI 2019): the vessel network of Seg-IQE and of the pseudo-mask teacher, and the
decoder that LQI-IQA reuses.

CENet = ResNet-34 trunk (no max-pool after layer4, no fc) -> DAC -> RMP -> four decoder blocks
(1x1 conv, 3x3 stride-2 transposed conv, 1x1 conv, each with BN + ReLU) with additive skips from
the encoder -> 4x4 stride-2 transposed conv -> 3x3 conv -> 3x3 conv to the output channels.

Channels at width 1 (input S x S, S a multiple of 32):
  encoder e1..e4: 64 (S/4), 128 (S/8), 256 (S/16), 512 (S/32); DAC keeps 512; RMP adds 4 (516).
  decoder_features, in this order: d4 256 (S/16), d3 128 (S/8), d2 64 (S/4), d1 64 (S/2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cleaq_jax.models import resnet
from cleaq_jax.models.layers import ConvTranspose2x, LayerForms, batch_norm, check_divisible, resize_to

RMP_KERNELS = (2, 3, 5, 6)


class DAC(nn.Module):
    """Dense atrous convolution: cascaded 3x3 convs with dilation 1, 3, 5 and a shared 1x1 conv.

    out = x + relu(a) + relu(p(b)) + relu(p(ab)) + relu(p(abc)) with a = c1(x), b = c3(x),
    ab = c3(a), abc = c5(ab) and p the 1x1 conv (receptive fields 3, 7, 9, 19).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, h, w, C) -> (B, h, w, C) in ``dtype``."""
        c = x.shape[-1]
        dil = lambda d, name: nn.Conv(c, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d),
                                      dtype=self.dtype, name=name)
        d1, d3, d5 = dil(1, "dilate1"), dil(3, "dilate3"), dil(5, "dilate5")
        proj = nn.Conv(c, (1, 1), dtype=self.dtype, name="conv1x1")
        a = d1(x)
        ab = d3(a)
        abc = d5(ab)
        return (x + nn.relu(a) + nn.relu(proj(d3(x))) + nn.relu(proj(ab))
                + nn.relu(proj(abc)))


class RMP(nn.Module):
    """Residual multi-kernel pooling: max-pools 2, 3, 5, 6 (stride = kernel), a shared 1x1 conv to
    one channel, bilinear up-sampling, concatenated before the input: C -> C + 4 channels.

    Pool kernels are clamped to the map size so inputs below 192 px still run (no effect above).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, h, w, C) -> (B, h, w, C + 4) in ``dtype``."""
        h, w = x.shape[1:3]
        conv = nn.Conv(1, (1, 1), dtype=self.dtype, name="conv")
        outs = []
        for k in RMP_KERNELS:
            k = min(k, h, w)
            pooled = nn.max_pool(x, (k, k), strides=(k, k))
            outs.append(resize_to(conv(pooled), h, w).astype(x.dtype))
        return jnp.concatenate(outs + [x], axis=-1)


class DecoderBlock(nn.Module):
    """1x1 conv (C -> C/4) - BN - ReLU, 3x3 stride-2 transposed conv - BN - ReLU, 1x1 conv - BN - ReLU."""

    features: int
    dtype: Any = jnp.float32
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: (B, h, w, C) -> (B, 2h, 2w, features) in ``dtype``."""
        mid = max(1, x.shape[-1] // 4)
        x = nn.Conv(mid, (1, 1), dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
        x = ConvTranspose2x(mid, kernel_size=3, dtype=self.dtype, forms=self.forms, name="deconv2")(x)
        x = nn.relu(batch_norm(train, self.dtype, "bn2")(x))
        x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="conv3")(x)
        return nn.relu(batch_norm(train, self.dtype, "bn3")(x))


class CEDecoder(nn.Module):
    """CE-Net context extractor (DAC + RMP) and decoder over ResNet-34 features e1..e4.

    Attributes:
      width: channel multiplier (resnet.channels rule).
      out_channels: channels of the full-resolution head output.
      dtype: compute dtype; parameters and BN statistics stay float32.
      remat: rematerialise each decoder block in the backward pass.
      forms: layer formulations (layers.LayerForms).
    """

    width: float = 1.0
    out_channels: int = 1
    dtype: Any = jnp.float32
    remat: bool = False
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool):
        """Decode encoder features.

        Args:
          feats: (e1, e2, e3, e4) at S/4, S/8, S/16, S/32 (NHWC).
          train: BatchNorm mode.
        Returns:
          (head, [d4, d3, d2, d1]): head (B, S, S, out_channels) in ``dtype`` (no activation);
          decoder features d4 (S/16, channels(256)), d3 (S/8, channels(128)), d2 (S/4,
          channels(64)), d1 (S/2, channels(64)).
        """
        e1, e2, e3, e4 = feats
        ch = lambda c: resnet.channels(c, self.width)
        block = nn.remat(DecoderBlock, static_argnums=(2,)) if self.remat else DecoderBlock
        x = RMP(self.dtype, name="rmp")(DAC(self.dtype, name="dac")(e4))
        d4 = block(ch(256), self.dtype, self.forms, name="decoder4")(x, train) + e3
        d3 = block(ch(128), self.dtype, self.forms, name="decoder3")(d4, train) + e2
        d2 = block(ch(64), self.dtype, self.forms, name="decoder2")(d3, train) + e1
        d1 = block(ch(64), self.dtype, self.forms, name="decoder1")(d2, train)
        y = nn.relu(ConvTranspose2x(ch(32), kernel_size=4, dtype=self.dtype, forms=self.forms,
                                    name="finaldeconv1")(d1))
        y = nn.relu(nn.Conv(ch(32), (3, 3), dtype=self.dtype, name="finalconv2")(y))
        y = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="finalconv3")(y)
        return y, [d4, d3, d2, d1]


def encode34(x: jax.Array, train: bool, width: float, stage_sizes: Sequence[int], dtype: Any,
             remat: bool, name: str, forms: LayerForms = LayerForms()) -> list[jax.Array]:
    """ResNet-34 trunk (submodule ``name``) on ImageNet-normalised ``x`` (B, S, S, 3) in [0, 1].

    Must be called inside a compact method. Returns [e1, e2, e3, e4] at S/4 ... S/32.
    """
    trunk = resnet.resnet34(num_classes=None, width=width, stage_sizes=tuple(stage_sizes),
                            dtype=dtype, remat=remat, forms=forms, name=name)
    _, f = trunk(resnet.imagenet_normalize(x.astype(jnp.float32)), train, return_features=True)
    return [f["layer1"], f["layer2"], f["layer3"], f["layer4"]]


class CENet(nn.Module):
    """CE-Net vessel segmenter: ResNet-34 encoder ``encoder``, DAC/RMP/decoder ``decoder``.

    Attributes:
      width: channel multiplier; stage_sizes: ResNet-34 blocks per stage (tests: (1, 1, 1, 1)).
      dtype: compute dtype; remat: rematerialise encoder and decoder blocks.
      forms: layer formulations (layers.LayerForms).
    """

    width: float = 1.0
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    dtype: Any = jnp.float32
    remat: bool = False
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict:
        """Segment vessels.

        Args:
          x: (B, S, S', 3) float images in [0, 1]; S, S' multiples of 32.
          train: BatchNorm uses batch statistics (``batch_stats`` mutable) when True.
        Returns:
          {'vessel_logits': (B, S, S', 1) float32,
           'decoder_features': [d4 (S/16), d3 (S/8), d2 (S/4), d1 (S/2)] in ``dtype``,
           channels(256/128/64/64, width)}.
        """
        check_divisible(x, 32, "CENet")
        feats = encode34(x, train, self.width, self.stage_sizes, self.dtype, self.remat, "encoder",
                         self.forms)
        head, dec = CEDecoder(self.width, 1, self.dtype, self.remat, self.forms, name="decoder")(feats, train)
        return {"vessel_logits": head.astype(jnp.float32), "decoder_features": dec}
