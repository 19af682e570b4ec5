"""Blocks shared by the CLEAQ-DR networks: gradient reversal, stride-2 transposed convolution in
sub-pixel (phase) form, max-pools with cheap gradients, U-IQE's residual block and small helpers.

All modules take NHWC inputs, keep parameters in float32 and compute in ``dtype``. ``LayerForms``
picks between mathematically equivalent formulations of some layers (faster ones on XLA CPU, plain
ones to check them against) and the initialisation of the up-sampling kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LayerForms:
    """How some layers are computed and initialised; every network passes one down to its layers.

    Attributes:
      upsample: stride-2 transposed convolutions as four 2x2 convolutions, one per output phase
        ("subpixel4"), as one 2x2 convolution to 4x the channels ("subpixel"), or as XLA's
        transposed convolution ("transpose"). Same maths; the backward of "transpose" is slow on CPU.
      upsample_init: "icnr" initialises a transposed-convolution kernel so that its four output
        phases start equal (no 2x2 checkerboard in an untrained network); "lecun" draws every tap
        independently (LeCun normal over K*K*Cin). Same parameter shapes either way.
      stem_pool: ResNet's 3x3 stride-2 max-pool with a mask-based gradient ("masked", jax.custom_vjp)
        or nn.max_pool's select-and-scatter gradient ("reduce_window"). Same values and gradients.
      scan_blocks: ResNet stages run their repeated blocks (all but the first) under nn.scan, so
        XLA compiles one block body per stage instead of one per block. Same maths, but the stacked
        parameter tree differs (``resnet.stack_blocks`` / ``resnet.unstack_blocks`` convert).
    """

    upsample: str = "subpixel4"
    upsample_init: str = "icnr"
    stem_pool: str = "masked"
    scan_blocks: bool = False


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


def _subpixel_fused(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """One 2x2 convolution to 4*Cout channels over the 1-padded input, each phase sliced out."""
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


def _subpixel_phases(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Four 2x2 convolutions, one per output phase, each exactly H x W, then depth-to-space."""
    pk = phase_kernel(kernel)
    cout = pk.shape[-1] // 4
    phases = []
    for ry in (0, 1):
        for rx in (0, 1):
            # Phase (ry, rx) at output (2m + ry, 2n + rx) reads inputs (m - 1 + ry + t, n - 1 + rx + u).
            k = pk[..., (2 * ry + rx) * cout:(2 * ry + rx + 1) * cout]
            phases.append(jax.lax.conv_general_dilated(
                x, k, window_strides=(1, 1), padding=((1 - ry, ry), (1 - rx, rx)),
                dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return depth_to_space(jnp.concatenate(phases, axis=-1))


def _transpose_plain(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's transposed convolution: torch padding 1 is lax padding (K-1-1, K-1-1+output_padding)."""
    pad = ((2, 2),) * 2 if kernel.shape[0] == 4 else ((1, 2),) * 2
    return jax.lax.conv_transpose(x, kernel[::-1, ::-1], (2, 2), pad,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


# The forms of LayerForms.upsample, by name; config_checks admits no other.
_UPSAMPLE = {"subpixel4": _subpixel_phases, "subpixel": _subpixel_fused, "transpose": _transpose_plain}
UPSAMPLE_FORMS = tuple(_UPSAMPLE)


def conv_transpose_2x(x: jax.Array, kernel: jax.Array, form: str = "subpixel4") -> jax.Array:
    """Stride-2 transposed convolution (doubles H and W), in one of three equivalent forms.

    Args:
      x: (B, H, W, Cin).
      kernel: (K, K, Cin, Cout), K in {3, 4}; PyTorch semantics of ``ConvTranspose2d(K, stride=2,
        padding=1, output_padding=K == 3)``, both of which double the spatial size.
      form: one of UPSAMPLE_FORMS (see LayerForms.upsample).
    Returns:
      (B, 2H, 2W, Cout) in the promoted dtype of ``x`` and ``kernel``.
    """
    return _UPSAMPLE[form](x, kernel)


def icnr_init(base_init: Any = nn.initializers.lecun_normal()):
    """Initialiser of (K, K, Cin, Cout) transposed kernels whose four output phases start equal.

    K = 4 (ICNR, Aitken et al. 2017): a 2x2 kernel drawn by ``base_init`` (fan-in 4*Cin, the taps one
    output pixel sees) repeated per tap pair, so every phase applies the same 2x2 kernel and the
    output is that convolution up-sampled by nearest neighbour. K = 3 (output_padding 1): its phases
    have 1 and 2 taps per axis, so they cannot be equal; a 1x1 kernel drawn by ``base_init`` times the
    bilinear taps (1/2, 1, 1/2) per axis makes each phase's taps sum to the same kernel (a constant
    input gives a constant output).
    """

    def init(key, shape, dtype=jnp.float32):
        k, _, cin, cout = shape
        if k == 4:
            small = base_init(key, (2, 2, cin, cout), dtype)
            return jnp.repeat(jnp.repeat(small, 2, axis=0), 2, axis=1)
        if k == 3:
            taps = jnp.asarray([0.5, 1.0, 0.5], dtype)
            return taps[:, None, None, None] * taps[None, :, None, None] * base_init(key, (1, 1, cin, cout), dtype)
        raise ValueError(f"icnr_init: kernel size must be 3 or 4, got shape {shape}")

    return init


class ConvTranspose2x(nn.Module):
    """Stride-2 transposed convolution (doubles H and W), computed in ``forms.upsample``.

    Its parameter ``kernel`` (K, K, Cin, Cout) is the transposed-convolution kernel in PyTorch
    semantics (a ``ConvTranspose2d`` weight (Cin, Cout, K, K) transposed to (K, K, Cin, Cout)
    loads unchanged) whatever the form: K = 3 acts as ``ConvTranspose2d(3, 2, padding=1,
    output_padding=1)``, K = 4 as ``ConvTranspose2d(4, 2, padding=1)``. ``forms.upsample_init``
    picks its initialisation: ``icnr_init(kernel_init)`` or ``kernel_init`` itself.
    """

    features: int
    kernel_size: int = 4
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    forms: LayerForms = LayerForms()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, Cin) -> (B, 2H, 2W, features) in ``dtype``."""
        if self.kernel_size not in (3, 4):
            raise ValueError(f"ConvTranspose2x.kernel_size must be 3 or 4, got {self.kernel_size}")
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        init = icnr_init(self.kernel_init) if self.forms.upsample_init == "icnr" else self.kernel_init
        kernel = self.param("kernel", init, shape, jnp.float32)
        y = conv_transpose_2x(x.astype(self.dtype), kernel.astype(self.dtype), self.forms.upsample)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


# ----------------------------------------------------------------------------- max-pools
def _pool_windows(x: jax.Array) -> list[jax.Array]:
    """The nine stride-2 views of a 3x3, stride-2, padding-1 pool over x padded with -inf, in the
    window's row-major order; each (B, ceil(H/2), ceil(W/2), C)."""
    _, h, w, _ = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return [xp[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2] for i in range(3) for j in range(3)]


@jax.custom_vjp
def max_pool_3x3_2x(x: jax.Array) -> jax.Array:
    """3x3 stride-2 max-pool with padding 1 (torchvision's stem pool), with a cheap gradient.

    Args:
      x: (B, H, W, C) float.
    Returns:
      (B, ceil(H/2), ceil(W/2), C), equal to ``nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))``.
      Its gradient equals nn.max_pool's too (each window's cotangent goes to its first maximum in
      row-major order, as XLA's select-and-scatter does), but is computed with nine masks and a
      parity interleave: elementwise work, where select-and-scatter is ~25x the forward on XLA CPU.
    """
    return _max_of(_pool_windows(x))


def _max_of(views: list[jax.Array]) -> jax.Array:
    out = views[0]
    for v in views[1:]:
        out = jnp.maximum(out, v)
    return out


def _max_pool_fwd(x):
    y = _max_of(_pool_windows(x))
    return y, (x, y)


def _max_pool_bwd(residual, g):
    x, y = residual
    _, h, w, _ = x.shape
    ho, wo = y.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    parts = {}
    for n, view in enumerate(_pool_windows(x)):  # the first maximum of a window takes its cotangent
        hit = (view == y) & ~taken
        taken = taken | hit
        parts[divmod(n, 3)] = jnp.where(hit, g, jnp.zeros_like(g))
    # Window tap (i, j) of output (m, n) is padded pixel (2m + i, 2n + j): taps 0 and 2 share a parity,
    # tap 2 one block later. Sum each parity class on a (ho + 1, wo + 1) grid, then interleave.
    phase = {}
    for pi in (0, 1):
        for pj in (0, 1):
            acc = jnp.zeros((g.shape[0], ho + 1, wo + 1, g.shape[3]), g.dtype)
            for i in (pi, pi + 2) if pi == 0 else (1,):
                for j in (pj, pj + 2) if pj == 0 else (1,):
                    si, sj = i // 2, j // 2
                    acc = acc + jnp.pad(parts[(i, j)], ((0, 0), (si, 1 - si), (sj, 1 - sj), (0, 0)))
            phase[(pi, pj)] = acc
    grid = jnp.stack([jnp.stack([phase[(pi, 0)], phase[(pi, 1)]], axis=3) for pi in (0, 1)], axis=2)
    grid = grid.reshape(g.shape[0], 2 * ho + 2, 2 * wo + 2, g.shape[3])  # (B, ho+1, pi, wo+1, pj, C)
    return (grid[:, 1:h + 1, 1:w + 1],)


max_pool_3x3_2x.defvjp(_max_pool_fwd, _max_pool_bwd)


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
    """BatchNorm as torchvision's: momentum 0.1 (flax's 0.9), epsilon 1e-5; scale, bias and running
    statistics in float32 whatever the compute ``dtype``. Every network's BatchNorm is this one."""
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
