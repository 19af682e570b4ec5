"""The quality transform QT of CLEAQ-DR (paper III-B, eq. 4) on the cofe-Net degradation model.

QT_op2 applies all three degradations to a good image (X^H -> X~^{H->L}); QT_op1 applies one or two of
them to a usable image (X^U -> X~^{U->L}); reject images pass unchanged. The three degradations follow
the degradation model of cofe-Net (Shen, Fu, Shen & Shao, "Modeling and enhancing low-quality retinal
fundus images", IEEE TMI 40(3), 2021) and its public degradation code, applied in its order:

- uneven illumination: colour jitter (torchvision brightness / contrast / saturation semantics), then a
  coloured halo outside a large disc, then a dark "hole" (a blurred disc of negative offset);
- artefacts: 5-10 bright blurred spots;
- blur: a Gaussian of sigma U(5, 15) px truncated to a small kernel (1-7 px at 512 px).

Every random draw comes from the JAX key, so each function is pure, jittable and vmappable; `QTParams`
is a static (hashable) argument. Pixel-valued parameters are given at ``reference_size`` (512 px, where
cofe-Net works) and scale with the image; the rest are fractions of the image size or intensities.
The blurred discs of halo, hole and spots are analytic fields (a disc edge smoothed by an error
function whose width is the standard deviation of cofe-Net's truncated Gaussian kernel), so no shape
depends on a random value; the image blur is a real separable convolution with a fixed maximum kernel.

Images are float32 HxWx3 in [0, 1]; masks HxW (bool, 0/1, 0/255 or float; > 0.5 is inside). Every
output is 0 outside the mask (cofe-Net multiplies by the fundus mask at the end).

Measured on the real photograph `skimage.data.retina()` resized to 128 px with a circular mask (256
keys; docs/degradation.md has the table): op2 gives PSNR 12-20 dB (median 16.6) and SSIM 0.53-0.83
(mean 0.70) for every key; op1 gives a PSNR of the mean squared error of 19 dB and a mean SSIM of 0.84,
ranging per key from 12 dB (illumination drawn) to unchanged: cofe-Net's blur kernel (1-7 px at 512 px)
is under 2 px at 128 px, so a blur-only op1 there is nearly the identity.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# torchvision's rgb_to_grayscale weights, used by its contrast and saturation adjustments.
_GRAY = (0.2989, 0.587, 0.114)
# op1 picks one of these subsets of (illumination, artefacts, blur) uniformly: "one or two" of three.
_OP1_SUBSETS = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1))
_N_ILL = 14  # U(0, 1) draws of the illumination step: 3 colour jitter, 4 halo, 7 hole

Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class QTParams:
    """Parameters of QT; defaults are cofe-Net's degradation code at 512 px (source in each comment).

    Ranges are (low, high) of a uniform draw. Frozen and made of tuples, so it hashes and can be a
    static argument of `jax.jit`.
    """

    # Size (px) at which pixel-valued fields are given; they scale by min(H, W) / reference_size.
    reference_size: int = 512
    # Colour jitter factors (cofe DE_COLOR: brightness 0.3 -> U(0.7, 1.2), contrast and saturation 0.4).
    brightness: Range = (0.7, 1.2)
    contrast: Range = (0.6, 1.4)
    saturation: Range = (0.6, 1.4)
    # Halo (cofe DE_HALO): centre within +-jitter*size of the image centre (w/8).
    halo_center_jitter: float = 0.125
    # Diameter of the inner disc A as a fraction of min(H, W); the halo is the ring outside it.
    halo_diameter: Range = (0.75, 1.0)
    # Halo colours, RGB in [0, 1]; cofe's code only ever picks these two (its white one needs brightness < 0.2).
    halo_colors: tuple[tuple[float, float, float], ...] = ((141 / 255, 238 / 255, 238 / 255),
                                                          (177 / 255, 195 / 255, 147 / 255))
    # Halo strength times the image mean (cofe weight_hal0[1] = 1).
    halo_weight: float = 1.0
    # Dark hole (cofe DE_HOLE): diameter as a fraction of W, centre as fractions of W and H.
    hole_diameter: Range = (0.4, 0.7)
    hole_center_x: Range = (0.25, 0.75)
    hole_center_y: Range = (0.375, 0.625)
    # Hole offset = U(hole_offset) - U(hole_mean_gain) * mean colour in the mask (cofe: U(-0.262, -0.26), 0.05-0.06).
    hole_offset: Range = (-0.262, -0.26)
    hole_mean_gain: Range = (0.05, 0.06)
    # No hole when the mean colour inside the mask is at most this (cofe: 0.25).
    hole_min_mean: float = 0.25
    # Hole blur kernel width as a fraction of its diameter (cofe 0.55-0.75; sigma = 0.8 * kernel).
    hole_kernel: Range = (0.55, 0.75)
    # Artefact spots (cofe DE_SPOT): how many (inclusive range).
    spot_count: tuple[int, int] = (5, 10)
    # Spot size r as a fraction of H (cofe U(1%, 5%)); the bright disc has radius r / 2, as in cofe's code.
    spot_radius: Range = (0.01, 0.05)
    # Multiplier of cofe's spot amplitude k * (1 - exp(-beta * d)), about 0.07-0.2 (1 = cofe).
    spot_gain: float = 1.0
    # Spot blur kernel width as a fraction of its sigma = 2 * (5 + 20 r / 25) px at 512 px (cofe sigma/5-sigma/4).
    spot_kernel: Range = (0.2, 0.25)
    # Image blur (cofe DE_BLUR): sigma in px at reference_size.
    blur_sigma: Range = (5.0, 15.0)
    # Blur kernel width as a fraction of sigma (cofe sigma/3-sigma/2, i.e. 1-7 px at 512: mild).
    blur_kernel: Range = (1 / 3, 1 / 2)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, tuple) and f.name != "halo_colors":
                if not (isinstance(value, tuple) and len(value) == 2
                        and all(isinstance(v, (int, float)) for v in value)):
                    raise ValueError(f"QTParams.{f.name} = {value!r}: must be a (low, high) pair of numbers")
                if value[0] > value[1]:
                    raise ValueError(f"QTParams.{f.name} = {value}: a range must be (low, high) with low <= high")
        if self.reference_size < 1:
            raise ValueError(f"QTParams.reference_size = {self.reference_size}: must be a positive pixel count")
        if not self.halo_colors or any(len(c) != 3 for c in self.halo_colors):
            raise ValueError(f"QTParams.halo_colors = {self.halo_colors}: give one or more (r, g, b) triples")
        if self.spot_count[0] < 0 or any(int(c) != c for c in self.spot_count):
            raise ValueError(f"QTParams.spot_count = {self.spot_count}: must be non-negative integers")
        if self.blur_sigma[0] <= 0 or self.blur_kernel[0] < 0:
            raise ValueError(f"QTParams.blur_sigma = {self.blur_sigma}, blur_kernel = {self.blur_kernel}: "
                             "sigma must be > 0 and the kernel fraction >= 0")

    @classmethod
    def from_config(cls, cfg: Any, image_size: int | None = None) -> "QTParams":
        """QTParams from a mapping (an ml_collections ConfigDict) with the field names; missing keys keep
        their defaults. Lists become tuples.

        With ``image_size`` the blur kernel is also checked to fit an image of that size, so a bad
        config fails when it is read rather than inside a traced step.
        """
        items = dict(cfg.items()) if cfg is not None else {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(f"config.qt has unknown key(s) {unknown}: QTParams takes {sorted(names)} "
                             "(see cleaq_jax/data/degrade.py)")
        params = cls(**{k: _as_tuple(v) for k, v in items.items()})
        if image_size is not None and params.max_blur_radius(image_size) >= image_size // 2:
            raise ValueError(f"config.qt.blur_sigma / blur_kernel give a blur kernel of radius "
                             f"{params.max_blur_radius(image_size)} px, too large for {image_size} px images")
        return params

    def scale(self, size: int) -> float:
        """Pixel scale factor for an image whose shorter side is ``size``."""
        return size / self.reference_size

    def max_blur_radius(self, size: int) -> int:
        """Taps on each side of the (fixed-size) blur kernel for images of shorter side ``size``."""
        width = self.blur_sigma[1] * self.blur_kernel[1] * self.scale(size)
        return max(1, math.ceil(max(width - 1, 0) / 2))


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


# --------------------------------------------------------------------------- helpers
def _inside(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """HxW (or HxWx1) mask -> HxWx1 float32 of {0, 1}."""
    mask = jnp.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {shape}: pass an HxW retinal mask")
    return (mask.astype(jnp.float32) > 0.5).astype(jnp.float32)[..., None]


def _check_image(image: jax.Array) -> jax.Array:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"QT works per image on HxWx3 float images in [0, 1]; got shape {image.shape} "
                         "(use quality_transform_batch for batches)")
    return image.astype(jnp.float32)


def _lerp(u: jax.Array, r: Range) -> jax.Array:
    """Map U(0, 1) draws to U(r[0], r[1])."""
    return r[0] + u * (r[1] - r[0])


def _pick(u: jax.Array, n: int) -> jax.Array:
    """Map a U(0, 1) draw to a uniform integer in [0, n)."""
    return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _kernel_std(sigma: jax.Array, width: jax.Array) -> jax.Array:
    """Standard deviation of a Gaussian of ``sigma`` truncated to [-width/2, width/2] (continuous)."""
    sigma = jnp.maximum(sigma, 1e-3)
    a = jnp.maximum(width / 2, 1e-3) / sigma
    ratio = 2 * a * jnp.exp(-a * a / 2) / jnp.sqrt(2 * jnp.pi) / jax.scipy.special.erf(a / jnp.sqrt(2.0))
    # As a -> 0 the truncated Gaussian is uniform on the kernel; the series form avoids 0/0 rounding there.
    uniform = jnp.maximum(width, 0) / jnp.sqrt(12.0)
    return jnp.where(a < 0.2, uniform, sigma * jnp.sqrt(jnp.maximum(1 - ratio, 0.0)))


def _soft_disc(shape: tuple[int, int], cy, cx, radius, std) -> jax.Array:
    """HxW field of a disc of ``radius`` (px) at (cy, cx) blurred to an edge of ``std`` px, in [0, 1]."""
    yy = jnp.arange(shape[0], dtype=jnp.float32)[:, None]
    xx = jnp.arange(shape[1], dtype=jnp.float32)[None, :]
    dist = jnp.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    edge = jnp.maximum(std, 0.3) * jnp.sqrt(2.0)  # 0.3 px: a hard disc still gets an anti-aliased edge
    return 0.5 * jax.scipy.special.erfc((dist - radius) / edge)


# --------------------------------------------------------------------------- the three degradations
def _color_jitter(image: jax.Array, u: jax.Array, p: QTParams) -> jax.Array:
    """torchvision adjust_brightness, adjust_contrast, adjust_saturation in that order, clipping each.

    u: (3,) U(0, 1) draws.
    """
    gray = lambda x: x @ jnp.asarray(_GRAY, jnp.float32)  # noqa: E731
    x = jnp.clip(image * _lerp(u[0], p.brightness), 0, 1)
    f = _lerp(u[1], p.contrast)
    x = jnp.clip(f * x + (1 - f) * jnp.mean(gray(x)), 0, 1)  # torchvision: mean over the whole image
    f = _lerp(u[2], p.saturation)
    return jnp.clip(f * x + (1 - f) * gray(x)[..., None], 0, 1)


def _halo(image: jax.Array, u: jax.Array, p: QTParams) -> jax.Array:
    """Coloured ring outside a disc A, of strength = image mean (cofe DE_HALO). u: (4,) U(0, 1) draws."""
    h, w = image.shape[:2]
    cy = h / 2 + (2 * u[0] - 1) * p.halo_center_jitter * h
    cx = w / 2 + (2 * u[1] - 1) * p.halo_center_jitter * w
    dia_a = min(h, w) * _lerp(u[2], p.halo_diameter)
    # cofe blurs with a kernel as wide as the gap between disc A and the farthest image side, sigma 2/3 of it.
    width = jnp.abs(2 * jnp.max(jnp.stack([cx, w - cx, cy, h - cy])) - dia_a)
    std = _kernel_std(2 / 3 * width, width)
    # The outer disc B of cofe's ring has a diameter >= 1.5 * size: it covers the whole field of view.
    ring = 1 - _soft_disc((h, w), cy, cx, dia_a / 2, std)
    color = jnp.asarray(p.halo_colors, jnp.float32)[_pick(u[3], len(p.halo_colors))]
    return jnp.clip(image + p.halo_weight * jnp.mean(image) * ring[..., None] * color, 0, 1)


def _hole(image: jax.Array, inside: jax.Array, u: jax.Array, p: QTParams) -> jax.Array:
    """A dark, heavily blurred disc (cofe DE_HOLE); skipped on dark images, as in cofe. u: (7,) draws."""
    h, w = image.shape[:2]
    dia = w * _lerp(u[0], p.hole_diameter)
    cx, cy = w * _lerp(u[1], p.hole_center_x), h * _lerp(u[2], p.hole_center_y)
    mean = jnp.sum(image * inside) / jnp.maximum(3 * jnp.sum(inside), 1.0)
    offset = _lerp(u[3], p.hole_offset) - _lerp(u[4], p.hole_mean_gain) * mean
    offset = jnp.where(mean > p.hole_min_mean, offset, 0.0)
    widths = dia * _lerp(u[5:7], p.hole_kernel)  # cofe draws the kernel width per axis
    std = jnp.mean(_kernel_std(0.8 * jnp.max(widths), widths))
    return jnp.clip(image + offset * _soft_disc((h, w), cy, cx, dia / 2, std)[..., None], 0, 1)


def _illumination(image: jax.Array, inside: jax.Array, u: jax.Array, p: QTParams) -> jax.Array:
    x = _halo(_color_jitter(image, u[:3], p), u[3:7], p)
    return _hole(x, inside, u[7:_N_ILL], p) * inside


def _spot_fields(shape: tuple[int, int], u: jax.Array, p: QTParams) -> jax.Array:
    """Sum of the bright spot discs, HxW; a fixed maximum number of spots, the surplus switched off.

    u: (1 + 5 * max spots,) U(0, 1) draws.
    """
    h, w = shape
    lo, max_n = int(p.spot_count[0]), max(int(p.spot_count[1]), 1)
    n = lo + _pick(u[0], int(p.spot_count[1]) - lo + 1)
    v = u[1:].reshape(5, max_n)
    ur, ux, uy, uk = v[0], v[1], v[2], v[3:]
    r = h * _lerp(ur, p.spot_radius)
    r512 = r * 512 / h  # cofe's spot formulas take the radius in px of a 512 px image
    cx = r + 1 + ux * jnp.maximum(w - 2 * r - 2, 0)
    cy = r + 1 + uy * jnp.maximum(h - 2 * r - 2, 0)
    k = 14 / 25 + (1.0 - r512 / 25)
    beta = 0.5 + r512 / 25
    amp = p.spot_gain * k * (1 - jnp.exp(-beta * 0.3 * r512 / 25))
    sigma = 2 * (5 + 20 * r512 / 25) * h / 512
    widths = sigma[None] * _lerp(uk, p.spot_kernel)  # cofe draws the kernel width per axis
    std = jnp.mean(_kernel_std(sigma[None], widths), axis=0)
    active = (jnp.arange(max_n) < n).astype(jnp.float32)
    discs = jax.vmap(lambda y, x, rad, s: _soft_disc((h, w), y, x, rad, s))(cy, cx, r / 2, std)
    return jnp.einsum("n,nhw->hw", active * amp, discs)


def _artefacts(image: jax.Array, inside: jax.Array, u: jax.Array, p: QTParams) -> jax.Array:
    return jnp.clip(image + _spot_fields(image.shape[:2], u, p)[..., None], 0, 1) * inside


def _blur_kernel(sigma: jax.Array, width: jax.Array, radius: int) -> jax.Array:
    """1-D Gaussian of ``sigma`` on 2*radius+1 taps, truncated to a (fractional) kernel ``width``."""
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    half = jnp.maximum(width - 1, 0) / 2
    # A tap past the kernel's half-width counts by how far it lies inside, so width is continuous.
    cover = jnp.clip(half + 1 - jnp.abs(taps), 0, 1)
    weights = jnp.exp(-taps**2 / (2 * sigma**2)) * cover
    return weights / jnp.sum(weights)


def _blur(image: jax.Array, inside: jax.Array, u: jax.Array, p: QTParams) -> jax.Array:
    h, w = image.shape[:2]
    sigma = _lerp(u[0], p.blur_sigma) * p.scale(min(h, w))
    width = sigma * _lerp(u[1], p.blur_kernel)
    radius = min(p.max_blur_radius(min(h, w)), min(h, w) // 2 - 1)
    kernel = _blur_kernel(sigma, width, radius)
    # Separable: rows then columns, each a weighted sum of shifted slices that XLA fuses into one pass
    # (on CPU this is ~25x faster than a grouped lax.conv; on accelerators it is one fused loop).
    # Reflected borders as cv2.GaussianBlur's default BORDER_REFLECT_101 (= numpy "reflect").
    x = jnp.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    x = sum(kernel[i] * x[i:i + h] for i in range(2 * radius + 1))
    x = jnp.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    x = sum(kernel[i] * x[:, i:i + w] for i in range(2 * radius + 1))
    return jnp.clip(x, 0, 1) * inside


def _n_draws(p: QTParams) -> tuple[int, int, int]:
    """How many U(0, 1) draws illumination, artefacts and blur take."""
    # One draw per op: every separate PRNG call adds a threefry program and seconds of compile time.
    return _N_ILL, 1 + 5 * max(int(p.spot_count[1]), 1), 2


def _single(op, n: int, image: jax.Array, mask: jax.Array, key: jax.Array, p: QTParams) -> jax.Array:
    """One degradation on its own: check inputs, one PRNG draw of ``n`` uniforms, masked output."""
    image = _check_image(image)
    inside = _inside(mask, image.shape)
    return op(image * inside, inside, jax.random.uniform(key, (n,)), p)


@functools.partial(jax.jit, static_argnames=("p",))
def illumination(image: jax.Array, mask: jax.Array, key: jax.Array, p: QTParams = QTParams()) -> jax.Array:
    """Uneven illumination: colour jitter, halo, dark hole (cofe DE_ILLUMINATION).

    Args: image HxWx3 float32 in [0, 1]; mask HxW; key a JAX PRNG key; p static QTParams.
    Returns: HxWx3 float32 in [0, 1], 0 outside the mask.
    """
    return _single(_illumination, _n_draws(p)[0], image, mask, key, p)


@functools.partial(jax.jit, static_argnames=("p",))
def artefacts(image: jax.Array, mask: jax.Array, key: jax.Array, p: QTParams = QTParams()) -> jax.Array:
    """Artefact spots: bright blurred discs added to every channel (cofe DE_SPOT).

    Args: image HxWx3 float32 in [0, 1]; mask HxW; key a JAX PRNG key; p static QTParams.
    Returns: HxWx3 float32 in [0, 1], 0 outside the mask.
    """
    return _single(_artefacts, _n_draws(p)[1], image, mask, key, p)


@functools.partial(jax.jit, static_argnames=("p",))
def blur(image: jax.Array, mask: jax.Array, key: jax.Array, p: QTParams = QTParams()) -> jax.Array:
    """Gaussian blur (cofe DE_BLUR) as a separable depthwise convolution with reflected borders.

    sigma and kernel width are traced; the kernel has a fixed number of taps set by p and the image
    size, so one compiled program serves every draw.

    Args: image HxWx3 float32 in [0, 1]; mask HxW; key a JAX PRNG key; p static QTParams.
    Returns: HxWx3 float32 in [0, 1], 0 outside the mask.
    """
    return _single(_blur, _n_draws(p)[2], image, mask, key, p)


# --------------------------------------------------------------------------- op1 / op2 / QT
def _transform(image: jax.Array, mask: jax.Array, key: jax.Array, choose, p: QTParams) -> jax.Array:
    """Illumination, artefacts, blur (cofe's order), each where its flag is set; masked output.

    ``choose(u)`` maps a U(0, 1) draw to the three flags. One PRNG draw feeds everything, so op1, op2
    and quality_transform make the same degradations from the same key.
    """
    image = _check_image(image)
    inside = _inside(mask, image.shape)
    n_ill, n_art, n_blur = _n_draws(p)
    u = jax.random.uniform(key, (1 + n_ill + n_art + n_blur,))
    flags = choose(u[0])
    u_ill, u_art, u_blur = jnp.split(u[1:], [n_ill, n_ill + n_art])
    x = image * inside
    # lax.cond runs only the chosen branch under jit; under vmap it becomes a select of both.
    x = lax.cond(flags[0], lambda v: _illumination(v, inside, u_ill, p), lambda v: v, x)
    x = lax.cond(flags[1], lambda v: _artefacts(v, inside, u_art, p), lambda v: v, x)
    return lax.cond(flags[2], lambda v: _blur(v, inside, u_blur, p), lambda v: v, x)


def _op1_flags(u: jax.Array) -> jax.Array:
    return jnp.asarray(_OP1_SUBSETS, bool)[_pick(u, len(_OP1_SUBSETS))]


def _op2_flags(u: jax.Array) -> jax.Array:
    return jnp.ones((3,), bool)


@functools.partial(jax.jit, static_argnames=("p",))
def op1(image: jax.Array, mask: jax.Array, key: jax.Array, p: QTParams = QTParams()) -> jax.Array:
    """QT_op1 (eq. 4): one or two of {illumination, artefacts, blur}, the subset drawn uniformly from key.

    Args: image HxWx3 float32 in [0, 1]; mask HxW; key a JAX PRNG key; p static QTParams.
    Returns: HxWx3 float32 in [0, 1], 0 outside the mask.
    """
    return _transform(image, mask, key, _op1_flags, p)


@functools.partial(jax.jit, static_argnames=("p",))
def op2(image: jax.Array, mask: jax.Array, key: jax.Array, p: QTParams = QTParams()) -> jax.Array:
    """QT_op2 (eq. 4): illumination, then artefacts, then blur.

    Args: image HxWx3 float32 in [0, 1]; mask HxW; key a JAX PRNG key; p static QTParams.
    Returns: HxWx3 float32 in [0, 1], 0 outside the mask.
    """
    return _transform(image, mask, key, _op2_flags, p)


@functools.partial(jax.jit, static_argnames=("p",))
def quality_transform(image: jax.Array, mask: jax.Array, quality: jax.Array, key: jax.Array,
                      p: QTParams = QTParams()) -> jax.Array:
    """QT (eq. 4) chosen by the quality label: 0 good -> op2, 1 usable -> op1, 2 reject or -1 -> as is.

    ``quality`` may be traced (an int scalar); the result equals op2 / op1 with the same key, and the
    image itself (times the mask) for reject or unknown quality.

    Args: image HxWx3 float32 in [0, 1]; mask HxW; quality int scalar; key a JAX PRNG key; p static.
    Returns: HxWx3 float32 in [0, 1], 0 outside the mask.
    """
    quality = jnp.asarray(quality, jnp.int32)

    def choose(u):
        return jnp.select([quality == 0, quality == 1], [_op2_flags(u), _op1_flags(u)], jnp.zeros((3,), bool))

    return _transform(image, mask, key, choose, p)


@functools.partial(jax.jit, static_argnames=("p",))
def quality_transform_batch(images: jax.Array, masks: jax.Array, qualities: jax.Array, keys: jax.Array,
                            p: QTParams = QTParams()) -> jax.Array:
    """`quality_transform` over a batch (vmap; every branch is computed and selected per example).

    Args: images BxHxWx3 float32 in [0, 1]; masks BxHxW; qualities (B,) int; keys (B,) PRNG keys
    (typed keys, or raw uint32 keys of shape (B, 2)); p static QTParams.
    Returns: BxHxWx3 float32.
    """
    return jax.vmap(lambda x, m, q, k: quality_transform(x, m, q, k, p))(images, masks, qualities, keys)


def eval_keys(base_key: jax.Array, id_hashes: Any) -> jax.Array:
    """Fixed per-example keys: fold_in(base_key, id_hash(example id)) for each example.

    Args: base_key a JAX PRNG key; id_hashes (B,) ints from `cleaq_jax.data.records.id_hash` (31-bit).
    Returns: (B,) keys of base_key's kind; an example's key depends only on its id, never on its batch.
    """
    hashes = jnp.asarray(id_hashes, jnp.uint32)
    return jax.vmap(lambda h: jax.random.fold_in(base_key, h))(hashes)
