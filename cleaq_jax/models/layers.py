"""Blocks shared by the CLEAQ-DR networks: gradient reversal, stride-2 transposed convolution in
sub-pixel (phase) form, U-IQE's residual block and small helpers.

All modules take NHWC inputs, keep parameters in float32 and compute in ``dtype``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


# ----------------------------------------------------------------------------- gradient reversal
@jax.custom_vjp
def grad_reverse(x: jax.Array, scale: jax.Array | float) -> jax.Array:
    """Gradient-reversal layer (Ganin & Lempitsky): identity forward, ``-scale * g`` backward.

    Args:
      x: any array (e.g. the enhanced image (B, H, W, 3) passed from IQE to IQA).
      scale: scalar (Python float or traced array, e.g. a schedule value inside jit). It sits in a
        differentiable position so that it may be traced; its own cotangent is zero.
    Returns:
      ``x`` unchanged. Under differentiation the cotangent of ``x`` is ``-scale * g`` in ``x``'s
      dtype, so the layers before it ascend the loss that the layers after it descend.
    """
    del scale
    return x


def _grad_reverse_fwd(x, scale):
    return x, scale


def _grad_reverse_bwd(scale, g):
    scale = jnp.asarray(scale)
    return (-scale * g).astype(g.dtype), jnp.zeros_like(scale)


grad_reverse.defvjp(_grad_reverse_fwd, _grad_reverse_bwd)


# ----------------------------------------------------------------------------- up-sampling
def depth_to_space(x: jax.Array, block: int = 2) -> jax.Array:
    """(B, H, W, b*b*C) -> (B, H*b, W*b, C); channel index (ry*b + rx)*C + c lands at (ry, rx)."""
    b, h, w, c = x.shape
    c_out = c // (block * block)
    x = x.reshape(b, h, w, block, block, c_out)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * block, w * block, c_out)


def phase_kernel(kernel: jax.Array) -> jax.Array:
    """Sub-pixel form of a stride-2 transposed-convolution kernel.

    Args:
      kernel: (K, K, Cin, Cout) with K in {3, 4}, in PyTorch ``ConvTranspose2d`` semantics with
        padding 1 (scatter form: input pixel i adds ``x[i] * kernel[k]`` to output 2*i - 1 + k).
    Returns:
      (2, 2, Cin, 4*Cout): a regular 2x2 correlation kernel whose output channel block
      ``ry*2 + rx`` is output phase (ry, rx). Phase r at output 2m + r reads inputs m - 1 + r + t
      (t = 0, 1) through kernel tap 3 - r - 2t; K = 3 zero-pads tap 3.
    """
    k, _, cin, cout = kernel.shape
    if k == 3:
        kernel = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
    # Reversed tap index 3 - k = 2t + r, so flipping then splitting 4 -> (t, r) gives the phases.
    flipped = kernel[::-1, ::-1].reshape(2, 2, 2, 2, cin, cout)  # (ty, ry, tx, rx, I, O)
    return flipped.transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, cin, 4 * cout)


def conv_transpose_2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-2 transposed convolution computed as one 2x2 convolution plus depth-to-space.

    Args:
      x: (B, H, W, Cin).
      kernel: (K, K, Cin, Cout), K in {3, 4}; PyTorch semantics of ``ConvTranspose2d(K, stride=2,
        padding=1, output_padding=K == 3)``, both of which double the spatial size.
    Returns:
      (B, 2H, 2W, Cout) in the promoted dtype of ``x`` and ``kernel``.
    """
    _, h, w, _ = x.shape
    # Pad outside the conv: XLA CPU's kernel gradient of a conv padded by its full kernel size
    # falls to a path ~40x slower than the same conv on a pre-padded VALID input.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    z = jax.lax.conv_general_dilated(
        x, phase_kernel(kernel), window_strides=(1, 1), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # (B, H+1, W+1, 4*Cout)
    b, _, _, c4 = z.shape
    z = z.reshape(b, h + 1, w + 1, 2, 2, c4 // 4)
    # Phase r of output row 2m + r sits at window row m + r of the padded grid.
    rows = [jnp.stack([z[:, ry:ry + h, rx:rx + w, ry, rx] for rx in (0, 1)], axis=3)
            for ry in (0, 1)]
    z = jnp.stack(rows, axis=3)  # (B, H, W, ry, rx, C)
    return depth_to_space(z.reshape(b, h, w, c4))


class ConvTranspose2x(nn.Module):
    """Stride-2 transposed convolution (doubles H and W) in sub-pixel form.

    Its parameter ``kernel`` (K, K, Cin, Cout) is the transposed-convolution kernel in PyTorch
    semantics (a ``ConvTranspose2d`` weight (Cin, Cout, K, K) transposed to (K, K, Cin, Cout)
    loads unchanged): K = 3 acts as ``ConvTranspose2d(3, 2, padding=1, output_padding=1)``,
    K = 4 as ``ConvTranspose2d(4, 2, padding=1)``. The backward of the plain strided form is
    slow on CPU; the phase form is the same maths as regular convolutions.
    """

    features: int
    kernel_size: int = 4
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, Cin) -> (B, 2H, 2W, features) in ``dtype``."""
        if self.kernel_size not in (3, 4):
            raise ValueError(f"ConvTranspose2x.kernel_size must be 3 or 4, got {self.kernel_size}")
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        y = conv_transpose_2x(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


# ----------------------------------------------------------------------------- blocks
class ResidualBlock(nn.Module):
    """U-IQE residual block: h = conv(x); relu(h + conv(relu(h))), bias-free, no normalisation.

    The first convolution changes the channel count, so no projection shortcut is needed.
    """

    features: int
    kernel_size: int = 5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, Cin) -> (B, H, W, features) in ``dtype``."""
        conv = lambda name: nn.Conv(self.features, (self.kernel_size,) * 2, use_bias=False,
                                    dtype=self.dtype, name=name)
        h = conv("conv1")(x)
        return nn.relu(h + conv("conv2")(nn.relu(h)))


class ResidualStack(nn.Module):
    """``num_blocks`` ResidualBlocks named block0, block1, ...; ``remat`` recomputes each in backward."""

    features: int
    num_blocks: int = 1
    kernel_size: int = 5
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, Cin) -> (B, H, W, features) in ``dtype``."""
        block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
        for j in range(self.num_blocks):
            x = block(self.features, self.kernel_size, self.dtype, name=f"block{j}")(x)
        return x


def batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
    """BatchNorm with resnet.py's (torchvision's) settings: momentum 0.1, epsilon 1e-5, float32 stats."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


class ConvBNReLU(nn.Module):
    """k x k convolution (stride 1, same padding) - BatchNorm - ReLU."""

    features: int
    kernel_size: int = 3
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: (B, H, W, Cin) -> (B, H, W, features) in ``dtype``."""
        x = nn.Conv(self.features, (self.kernel_size,) * 2, use_bias=self.use_bias,
                    dtype=self.dtype, name="conv")(x)
        return nn.relu(batch_norm(train, self.dtype, "bn")(x))


def max_pool_2x(x: jax.Array) -> jax.Array:
    """2x2 stride-2 max-pool: (B, H, W, C) -> (B, H//2, W//2, C), H and W even.

    Written as a reshape and a max: the backward of nn.max_pool (select-and-scatter) is ~20x
    slower on XLA CPU. Ties share the gradient equally instead of going to one element.
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def resize_to(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of (B, h, w, C) to (B, height, width, C); identity when sizes match."""
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear",
                            antialias=False)


def check_divisible(x: jax.Array, multiple: int, module: str) -> None:
    """Raise a ValueError naming ``module`` unless H and W of NHWC ``x`` are multiples of ``multiple``."""
    if x.ndim != 4:
        raise ValueError(f"{module} expects NHWC images (B, H, W, C), got shape {x.shape}")
    h, w = x.shape[1:3]
    if h % multiple or w % multiple:
        raise ValueError(
            f"{module} needs image height and width that are multiples of {multiple}, got "
            f"{h}x{w}: resize the images (the data image size setting) to e.g. "
            f"{max(multiple, h // multiple * multiple)}x{max(multiple, w // multiple * multiple)}")
