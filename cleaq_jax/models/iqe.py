"""IQE, the fundus image quality enhancement subnetwork (paper III-C, Fig. 6).

IQE = U-IQE (residual encoder-decoder that outputs the enhanced image) + Seg-IQE (a CE-Net on the
degraded image whose decoder features are concatenated onto the outputs of U-IQE's first three
decoder blocks, so the vessel structure guides the enhancement).

U-IQE at width 1, base_channels 32 (levels l = 0..3 at S, S/2, S/4, S/8 with 32, 64, 64, 128
channels, the authors' widths):
  encoder level l:   ResidualStack(c_l) -> e_l, then 2x2 max-pool (S/16 after level 3)
  decoder block k=1..4 (level l = 4 - k): ConvTranspose2x(c_l, 4x4) + e_l -> ResidualStack(c_l)
                     -> concat Seg-IQE's d3 / d2 / d1 after blocks 1 / 2 / 3 (S/8, S/4, S/2)
  head:              5x5 conv to 3 channels, sigmoid -> enhanced image in [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cleaq_jax.models import resnet
from cleaq_jax.models.cenet import CENet
from cleaq_jax.models.layers import (ConvTranspose2x, LayerForms, ResidualStack, check_divisible,
                                     max_pool_2x, resize_to)

# Channel multipliers of U-IQE's four levels relative to base_channels (the authors' 32-64-64-128).
UIQE_LEVELS = (1, 2, 2, 4)
RESIDUAL_EPS = 1e-3  # input clipped to [eps, 1 - eps] before its logit (black surround -> logit -6.9)


class UIQE(nn.Module):
    """U-IQE: residual encoder-decoder producing the enhanced image.

    Attributes:
      width: channel multiplier on ``base_channels * UIQE_LEVELS``.
      base_channels: channels of the full-resolution level at width 1.
      blocks_per_level: residual blocks per encoder level and per decoder block (paper: 1).
      kernel_size: convolution size of the residual blocks and head (authors: 5).
      residual: output sigmoid(head + logit(x)), so the untrained network is the identity and learns a
        correction (the paper and the authors' code draw the image anew: sigmoid(head)).
      dtype: compute dtype; remat: rematerialise residual blocks.
      forms: layer formulations; ``forms.upsample_init`` "icnr" starts the four phases of every
        up-sampling equal, so the untrained network draws no 2x2 checkerboard.
    """

    width: float = 1.0
    base_channels: int = 32
    blocks_per_level: int = 1
    kernel_size: int = 5
    residual: bool = False
    dtype: Any = jnp.float32
    remat: bool = False
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, x: jax.Array, structure: Sequence[jax.Array] | None = None) -> jax.Array:
        """Enhance ``x``.

        Args:
          x: (B, S, S', 3) degraded images in [0, 1]; S, S' multiples of 16.
          structure: None, or up to three feature maps concatenated onto the outputs of decoder
            blocks 1, 2, 3 (at S/8, S/4, S/2; resized bilinearly if their size differs).
        Returns:
          (B, S, S', 3) float32 enhanced image in [0, 1].
        """
        check_divisible(x, 16, "U-IQE")
        chans = [resnet.channels(self.base_channels * m, self.width) for m in UIQE_LEVELS]
        stack = lambda c, name: ResidualStack(c, self.blocks_per_level, self.kernel_size,
                                              self.dtype, self.remat, name=name)
        h = x.astype(self.dtype)
        skips = []
        for level, c in enumerate(chans):
            skips.append(stack(c, f"enc{level}")(h))
            h = max_pool_2x(skips[-1])
        structure = list(structure or [])
        for k, level in enumerate(reversed(range(len(chans)))):
            up = ConvTranspose2x(chans[level], 4, use_bias=False, dtype=self.dtype, forms=self.forms,
                                 name=f"up{level}")
            h = stack(chans[level], f"dec{level}")(up(h) + skips[level])
            if k < len(structure):
                s = resize_to(structure[k], h.shape[1], h.shape[2]).astype(self.dtype)
                h = jnp.concatenate([h, s], axis=-1)
        h = nn.Conv(3, (self.kernel_size,) * 2, use_bias=False, dtype=self.dtype, name="head")(h)
        h = h.astype(jnp.float32)
        if self.residual:  # the head corrects the input's logit: identity is where learning starts
            h = h + jax.scipy.special.logit(jnp.clip(x.astype(jnp.float32), RESIDUAL_EPS, 1 - RESIDUAL_EPS))
        return nn.sigmoid(h)


class IQE(nn.Module):
    """IQE subnetwork: U-IQE (``u_iqe``) guided by Seg-IQE (``seg_iqe``, a CENet), paper III-C.

    Attributes:
      width: channel multiplier of both parts (of Seg-IQE alone when ``uiqe_width`` is set).
      use_seg: build Seg-IQE and fuse its features (False: the "IQE w/o Seg-IQE" ablation).
      encoder_stages: ResNet-34 blocks per stage of Seg-IQE's encoder.
      blocks_per_level: U-IQE residual blocks per level (paper: 1; the authors' code: 3).
      base_channels: U-IQE full-resolution channels at width 1.
      uiqe_width: U-IQE's own channel multiplier (None: ``width``).
      residual: U-IQE's head corrects the logit of its input instead of drawing the image anew.
      dtype: compute dtype; remat: rematerialise blocks; forms: layer formulations (LayerForms).
    """

    width: float = 1.0
    use_seg: bool = True
    encoder_stages: Sequence[int] = (3, 4, 6, 3)
    blocks_per_level: int = 1
    base_channels: int = 32
    uiqe_width: float | None = None
    residual: bool = False
    dtype: Any = jnp.float32
    remat: bool = False
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, x_degraded: jax.Array, train: bool = False) -> dict:
        """Enhance degraded fundus images.

        Args:
          x_degraded: (B, S, S', 3) float images in [0, 1]; S, S' multiples of 32 (16 without
            Seg-IQE).
          train: BatchNorm mode of Seg-IQE (``batch_stats`` mutable when True).
        Returns:
          {'enhanced': (B, S, S', 3) float32 in [0, 1],
           'vessel_logits': (B, S, S', 1) float32 (only when use_seg)}.
        """
        out = {}
        structure = None
        if self.use_seg:
            check_divisible(x_degraded, 32, "IQE (with Seg-IQE)")
            seg = CENet(self.width, self.encoder_stages, self.dtype, self.remat, self.forms,
                        name="seg_iqe")(x_degraded, train)
            out["vessel_logits"] = seg["vessel_logits"]
            structure = seg["decoder_features"][1:]  # d3 (S/8), d2 (S/4), d1 (S/2)
        uiqe_width = self.width if self.uiqe_width is None else self.uiqe_width
        out["enhanced"] = UIQE(uiqe_width, self.base_channels, self.blocks_per_level, residual=self.residual,
                               dtype=self.dtype, remat=self.remat, forms=self.forms,
                               name="u_iqe")(x_degraded, structure)
        return out
