"""CE-Net's training augmentation (Gu et al. 2019, their data loader) as jittable, vmapped JAX.

Used inside the vessel teacher's train step (`cleaq_jax.training.steps`), so the loader only decodes, flips and
rotates. Each image gets, with probability 1/2 each, a shift of hue (up to 60 degrees), saturation
(5/255) and value (15/255), and a random scale (0.9-1.1), aspect ratio (0.9-1.1) and shift (10% of the
side), applied to image, field of view and vessels alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Hue in degrees (their +-30 is on OpenCV's 0-180 hue scale), saturation and value on a 0-1 scale.
AUGMENT_PROB = 0.5
HUE_SHIFT_DEG = 60.0
SAT_SHIFT = 5.0 / 255.0
VAL_SHIFT = 15.0 / 255.0
SCALE_LIMIT = 0.1
ASPECT_LIMIT = 0.1
SHIFT_LIMIT = 0.1


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """(..., 3) RGB in [0, 1] -> (..., 3) HSV, each in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    chroma = value - jnp.min(rgb, axis=-1)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    hue = jnp.where(value == r, jnp.mod((g - b) / safe, 6.0),
                    jnp.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    return jnp.stack([jnp.where(chroma > 0, hue, 0.0), saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """(..., 3) HSV in [0, 1] -> (..., 3) RGB in [0, 1]; the inverse of `rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = jnp.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = jnp.mod(sector, 6).astype(jnp.int32)
    pick = lambda *c: jnp.choose(sector, c, mode="clip")  # noqa: E731
    return jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], axis=-1)


def colour_jitter(image: jax.Array, inside: jax.Array, key: jax.Array) -> jax.Array:
    """CE-Net's random HSV shift of one image, applied with probability 1/2.

    image: (H, W, 3) float32 in [0, 1]; inside: (H, W) float32 {0, 1} field of view (zero outside
    stays zero). Returns (H, W, 3) float32.
    """
    k_apply, k_shift = jax.random.split(key)
    u = jax.random.uniform(k_shift, (3,), minval=-1.0, maxval=1.0)
    hsv = rgb_to_hsv(jnp.clip(image, 0.0, 1.0))
    shifted = jnp.stack([jnp.mod(hsv[..., 0] + u[0] * HUE_SHIFT_DEG / 360.0, 1.0),
                         jnp.clip(hsv[..., 1] + u[1] * SAT_SHIFT, 0.0, 1.0),
                         jnp.clip(hsv[..., 2] + u[2] * VAL_SHIFT, 0.0, 1.0)], axis=-1)
    jittered = hsv_to_rgb(shifted) * inside[..., None]
    return jnp.where(jax.random.bernoulli(k_apply, AUGMENT_PROB), jittered, image)


def shift_scale(planes: jax.Array, key: jax.Array) -> jax.Array:
    """CE-Net's random scale, aspect ratio and shift (no rotation) of stacked planes, probability 1/2.

    planes: (H, W, C) float32 (image channels and masks, warped alike, bilinear, zero outside).
    Returns (H, W, C) float32; output pixel p samples the input at centre + (p - centre - shift) / scale.
    """
    k_apply, k_draw = jax.random.split(key)
    u = jax.random.uniform(k_draw, (4,), minval=-1.0, maxval=1.0)
    h, w = planes.shape[:2]
    scale, aspect = 1.0 + SCALE_LIMIT * u[0], 1.0 + ASPECT_LIMIT * u[1]
    sy, sx = scale / jnp.sqrt(aspect), scale * jnp.sqrt(aspect)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    src_y = cy + (yy - cy - SHIFT_LIMIT * h * u[2]) / sy
    src_x = cx + (xx - cx - SHIFT_LIMIT * w * u[3]) / sx
    sample = lambda plane: jax.scipy.ndimage.map_coordinates(plane, [src_y, src_x], order=1,  # noqa: E731
                                                             mode="constant", cval=0.0)
    warped = jax.vmap(sample, in_axes=-1, out_axes=-1)(planes)
    return jnp.where(jax.random.bernoulli(k_apply, AUGMENT_PROB), warped, planes)


def augment_batch(x: jax.Array, mask: jax.Array, vessel: jax.Array, key: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CE-Net's colour and scale augmentation of a batch (one independent draw per image).

    x: (B, H, W, 3) float32 in [0, 1], zero outside the mask; mask, vessel: (B, H, W) float32 {0, 1}.
    Returns (x, mask, vessel) of the same shapes; masks stay {0, 1} and vessels inside the mask.
    """
    def one(image, fov, vessels, k):
        k_geo, k_col = jax.random.split(k)
        planes = shift_scale(jnp.concatenate([image, fov[..., None], vessels[..., None]], -1), k_geo)
        fov = (planes[..., 3] > 0.5).astype(jnp.float32)
        image = colour_jitter(planes[..., :3] * fov[..., None], fov, k_col)
        return image, fov, (planes[..., 4] > 0.5).astype(jnp.float32) * fov

    return jax.vmap(one)(x, mask, vessel, jax.random.split(key, x.shape[0]))
