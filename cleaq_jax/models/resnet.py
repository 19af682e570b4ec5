"""ResNet-34/50 in torchvision's layout (same blocks, strides, padding and parameter counts).

Inputs are NHWC. Parameter tree (names chosen so torchvision weights map one to one, see
``cleaq_jax.models.pretrained``)::

    stem/conv, stem/bn                       conv1, bn1
    layer{i}/block{j}/conv{k}, .../bn{k}     layer{i}.{j}.conv{k}, layer{i}.{j}.bn{k}
    layer{i}/block{j}/downsample_conv|_bn    layer{i}.{j}.downsample.0|.1
    fc                                       fc

BatchNorm follows torchvision: momentum 0.1 (flax's 0.9), epsilon 1e-5; its scale/bias and running
statistics stay float32 when the compute dtype is bfloat16. Logits are float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cleaq_jax.models.layers import LayerForms, batch_norm, max_pool_3x3_2x

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu") for convs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torchvision's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_fc_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def channels(c: int, width: float) -> int:
    """Channel count of a layer with nominal width ``c`` under the multiplier ``width``.

    Returns ``max(1, round(c * width))``; every model that scales a torchvision width uses this rule.
    """
    return max(1, int(round(c * width)))


def imagenet_normalize(x):
    """Normalise images with torchvision's ImageNet mean/std.

    Args:
      x: float array in [0, 1], NHWC (..., H, W, 3).
    Returns:
      (x - mean) / std, same shape and dtype as ``x``.
    """
    mean = jnp.asarray(IMAGENET_MEAN, dtype=x.dtype)
    std = jnp.asarray(IMAGENET_STD, dtype=x.dtype)
    return (x - mean) / std


def _conv(features: int, kernel: int, strides: int, dtype: Any, name: str) -> nn.Conv:
    pad = (kernel - 1) // 2
    # Explicit symmetric padding: flax "SAME" pads (0, 1) at stride 2, torchvision pads (1, 1).
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                   param_dtype=jnp.float32, kernel_init=_conv_init, name=name)


class _Block(nn.Module):
    """Fields shared by the residual blocks: output/inner width, stride of the first conv, compute dtype."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32


class BasicBlock(_Block):
    """torchvision BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    ``features`` is the block's output width; a 1x1 conv + BN shortcut is added when the stride
    or the channel count changes.
    """

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        """x: (N, H, W, C) -> (N, H/strides, W/strides, features)."""
        y = _conv(self.features, 3, self.strides, self.dtype, "conv1")(x)
        y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
        y = batch_norm(train, self.dtype, "bn2")(y)
        return nn.relu(y + _shortcut(x, self.features, self.strides, train, self.dtype))


class Bottleneck(_Block):
    """torchvision Bottleneck v1.5: 1x1, 3x3(stride), 1x1 (x4 channels), each with BN.

    ``features`` is the inner width; the output has ``4 * features`` channels.
    """

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        """x: (N, H, W, C) -> (N, H/strides, W/strides, 4 * features)."""
        out = self.features * self.expansion
        y = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
        # v1.5 puts the stride on the 3x3 conv, not the first 1x1.
        y = _conv(self.features, 3, self.strides, self.dtype, "conv2")(y)
        y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
        y = _conv(out, 1, 1, self.dtype, "conv3")(y)
        y = batch_norm(train, self.dtype, "bn3")(y)
        return nn.relu(y + _shortcut(x, out, self.strides, train, self.dtype))


def _shortcut(x, out: int, strides: int, train: bool, dtype: Any):
    """Identity, or torchvision's downsample (1x1 conv + BN); called inside a block's compact scope."""
    if strides == 1 and x.shape[-1] == out:
        return x
    y = _conv(out, 1, strides, dtype, "downsample_conv")(x)
    return batch_norm(train, dtype, "downsample_bn")(y)


class Stem(nn.Module):
    """conv 7x7 / 2, pad 3 (no bias) - BN - ReLU. Returns the S/2 map before max-pool."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """x: (N, H, W, 3) -> (N, ceil(H/2), ceil(W/2), features)."""
        x = _conv(self.features, 7, 2, self.dtype, "conv")(x.astype(self.dtype))
        return nn.relu(batch_norm(train, self.dtype, "bn")(x))


def stem_pool(x, form: str = "masked"):
    """torchvision's stem max-pool: 3x3, stride 2, padding 1. (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C).

    ``form`` (LayerForms.stem_pool): "masked" computes the same gradient as nn.max_pool's
    ("reduce_window") without XLA's select-and-scatter, which is slow on CPU.
    """
    pools = {"masked": max_pool_3x3_2x,
             "reduce_window": lambda y: nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))}
    return pools[form](x)


class _ScanBody(nn.Module):
    """One repeated block as an nn.scan body: (carry x, nothing) -> (block(x), nothing)."""

    block_cls: Any
    features: int
    dtype: Any
    remat: bool
    train: bool

    @nn.compact
    def __call__(self, x, _):
        block = nn.remat(self.block_cls, static_argnums=(2,)) if self.remat else self.block_cls
        return block(self.features, strides=1, dtype=self.dtype, name="block")(x, self.train), None


class Stage(nn.Module):
    """``num_blocks`` blocks of ``block_cls``; the first has ``strides`` (and the downsample).

    Blocks are named ``block0``, ``block1``, ...; ``remat`` recomputes each block's activations in
    the backward pass (nn.remat) to trade compute for memory. With ``scan`` the identical blocks
    1..n-1 run under nn.scan (one compiled body), their variables stacked on a leading axis under
    ``blocks/block`` (``stack_blocks`` / ``unstack_blocks`` convert to and from the plain tree).
    """

    block_cls: Any
    num_blocks: int
    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        """x: (N, H, W, C) -> (N, H/strides, W/strides, features * block_cls.expansion)."""
        # `train` is a Python bool that picks the BN mode; argnum 2 counts the module as 0.
        block = nn.remat(self.block_cls, static_argnums=(2,)) if self.remat else self.block_cls
        scan = self.scan and self.num_blocks > 2  # two blocks: nothing to share
        for j in range(1 if scan else self.num_blocks):
            x = block(self.features, strides=self.strides if j == 0 else 1, dtype=self.dtype,
                      name=f"block{j}")(x, train)
        if scan:
            body = nn.scan(_ScanBody, variable_axes={"params": 0, "batch_stats": 0},
                           split_rngs={"params": True}, length=self.num_blocks - 1)
            x, _ = body(self.block_cls, self.features, self.dtype, self.remat, train, name="blocks")(x, None)
        return x


def _is_stage(name: str, node: Any) -> bool:
    return name.startswith("layer") and isinstance(node, dict)


def stack_blocks(tree: Any) -> Any:
    """A variables tree (params or batch_stats) of plain ResNet stages -> the ``scan_blocks`` layout:
    every ``layerN`` with more than two blocks keeps ``block0`` and stacks ``block1..`` under
    ``blocks/block`` (leading axis = block index - 1). Other subtrees pass unchanged."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for name, node in tree.items():
        blocks = sorted((k for k in node if k.startswith("block") and k[5:].isdigit()),
                        key=lambda k: int(k[5:])) if _is_stage(name, node) else []
        if len(blocks) > 2:
            rest = [node[k] for k in blocks[1:]]
            out[name] = {"block0": node["block0"],
                         "blocks": {"block": jax.tree.map(lambda *a: jnp.stack(a), *rest)}}
        else:
            out[name] = stack_blocks(node)
    return out


def unstack_blocks(tree: Any) -> Any:
    """Inverse of ``stack_blocks``: the ``scan_blocks`` layout -> plain ``block0``, ``block1``, ..."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for name, node in tree.items():
        if _is_stage(name, node) and "blocks" in node:
            stacked = node["blocks"]["block"]
            n = jax.tree.leaves(stacked)[0].shape[0]
            out[name] = {"block0": node["block0"],
                         **{f"block{j + 1}": jax.tree.map(lambda a: a[j], stacked) for j in range(n)}}
        else:
            out[name] = unstack_blocks(node)
    return out


class ResNet(nn.Module):
    """torchvision ResNet trunk with optional global-average-pool + fc head.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
      block_cls: BasicBlock or Bottleneck.
      width: multiplier on the 64/128/256/512 widths (``channels`` rounding rule).
      num_classes: fc outputs; None builds the trunk only (no pool, no fc).
      dtype: compute dtype; parameters and BN statistics stay float32.
      remat: rematerialise every block in the backward pass.
      forms: equivalent formulations (stem pool gradient, scanned stages); see layers.LayerForms.
    """

    stage_sizes: Sequence[int]
    block_cls: Any
    width: float = 1.0
    num_classes: int | None = 1000
    dtype: Any = jnp.float32
    remat: bool = False
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        """Run the network.

        Args:
          x: (N, H, W, 3) float images, already normalised (see ``imagenet_normalize``).
          train: BatchNorm uses batch statistics and updates ``batch_stats`` (mutable) when True.
          return_features: also return the feature taps.
        Returns:
          logits (N, num_classes) float32 when not ``return_features``; otherwise
          ``(logits or None, feats)`` with feats 'stem' (S/2, before max-pool), 'layer1' (S/4),
          'layer2' (S/8), 'layer3' (S/16), 'layer4' (S/32), each NHWC in the compute dtype.
        """
        feats = {"stem": Stem(channels(64, self.width), self.dtype, name="stem")(x, train)}
        y = stem_pool(feats["stem"], self.forms.stem_pool)
        for i, n in enumerate(self.stage_sizes):
            y = Stage(self.block_cls, n, channels(64 * 2 ** i, self.width), 1 if i == 0 else 2,
                      self.dtype, self.remat, self.forms.scan_blocks, name=f"layer{i + 1}")(y, train)
            feats[f"layer{i + 1}"] = y
        logits = None
        if self.num_classes is not None:
            # Pool and classify in float32: cheap, and keeps logits exact under bf16 compute.
            pooled = jnp.mean(y.astype(jnp.float32), axis=(1, 2))
            logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                              kernel_init=_fc_init, name="fc")(pooled)
        return (logits, feats) if return_features else logits


def resnet34(num_classes: int | None = 1000, **kw) -> ResNet:
    """ResNet-34 (BasicBlock, stages 3-4-6-3). kw: width, stage_sizes, dtype, remat, forms."""
    kw.setdefault("stage_sizes", (3, 4, 6, 3))
    return ResNet(block_cls=BasicBlock, num_classes=num_classes, **kw)


def resnet50(num_classes: int | None = 1000, **kw) -> ResNet:
    """ResNet-50 (Bottleneck v1.5, stages 3-4-6-3). kw: width, stage_sizes, dtype, remat, forms."""
    kw.setdefault("stage_sizes", (3, 4, 6, 3))
    return ResNet(block_cls=Bottleneck, num_classes=num_classes, **kw)
