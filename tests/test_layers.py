"""Specifications of the shared blocks in cleaq_jax.models.layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleaq_jax.models.layers import (ConvTranspose2x, ResidualBlock, check_divisible,
                                     conv_transpose_2x, depth_to_space, grad_reverse, max_pool_2x)


def _rand(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------- gradient reversal
def test_grad_reverse_forward_is_identity_with_traced_scale():
    x = _rand((2, 4, 4, 3), 0)
    y = jax.jit(grad_reverse)(x, jnp.float32(0.7))
    np.testing.assert_array_equal(np.asarray(y), x)


def test_grad_reverse_backward_is_minus_scale_times_incoming_gradient_under_jit():
    x = _rand((2, 4, 4, 3), 1)
    g = _rand((2, 4, 4, 3), 2)

    @jax.jit
    def vjp(x, scale, g):
        _, pullback = jax.vjp(grad_reverse, x, scale)
        return pullback(g)

    for scale in (0.25, 1.0, 3.0):
        gx, gscale = vjp(x, jnp.float32(scale), g)
        np.testing.assert_array_equal(np.asarray(gx), -np.float32(scale) * g)
        assert float(gscale) == 0.0


def test_grad_reverse_flips_the_sign_of_a_downstream_loss_gradient():
    x = jnp.asarray(_rand((3,), 3))
    loss = lambda x, s: jnp.sum(grad_reverse(x, s) ** 2)
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(x, 0.5)), -0.5 * 2 * np.asarray(x),
                               rtol=1e-6)


def test_grad_reverse_keeps_the_cotangent_dtype():
    x = jnp.ones((4,), jnp.bfloat16)
    gx = jax.grad(lambda x: jnp.sum(grad_reverse(x, jnp.float32(2.0)).astype(jnp.float32)))(x)
    assert gx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(gx, np.float32), -2.0)


# ----------------------------------------------------------------------------- ConvTranspose2x
def _torch_conv_transpose(x, w, output_padding):
    """PyTorch ConvTranspose2d(stride=2, padding=1) by its definition: each input pixel scatters."""
    b, h, wd, _ = x.shape
    k = w.shape[0]
    out_h, out_w = 2 * (h - 1) - 2 + k + output_padding, 2 * (wd - 1) - 2 + k + output_padding
    y = np.zeros((b, out_h + 2, out_w + 2, w.shape[3]))  # +1 border each side absorbs padding 1
    for i in range(h):
        for j in range(wd):
            y[:, 2 * i:2 * i + k, 2 * j:2 * j + k] += np.einsum("bc,yxco->byxo", x[:, i, j], w)
    return y[:, 1:1 + out_h, 1:1 + out_w]


@pytest.mark.parametrize("kernel_size,output_padding", [(3, 1), (4, 0)])
def test_conv_transpose_2x_follows_pytorch_conv_transpose_definition(kernel_size, output_padding):
    x = _rand((2, 5, 6, 3), 4)
    w = _rand((kernel_size, kernel_size, 3, 4), 5)
    y = np.asarray(conv_transpose_2x(jnp.asarray(x), jnp.asarray(w)))
    assert y.shape == (2, 10, 12, 4)
    np.testing.assert_allclose(y, _torch_conv_transpose(x, w, output_padding), atol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 4])
def test_conv_transpose_2x_equals_lax_and_flax_conv_transpose(kernel_size):
    x = _rand((2, 6, 4, 5), 6)
    w = _rand((kernel_size, kernel_size, 5, 7), 7)
    b = _rand((7,), 8)
    ours = ConvTranspose2x(7, kernel_size).apply({"params": {"kernel": w, "bias": b}}, x)
    # Torch padding p=1 is lax padding (K-1-p, K-1-p+output_padding) on the flipped kernel.
    pad = ((1, 2),) * 2 if kernel_size == 3 else ((2, 2),) * 2
    flipped = w[::-1, ::-1]
    lax_y = jax.lax.conv_transpose(x, flipped, (2, 2), pad,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    flax_y = nn.ConvTranspose(7, (kernel_size,) * 2, strides=(2, 2), padding=pad).apply(
        {"params": {"kernel": flipped, "bias": b}}, x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(lax_y), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(flax_y), atol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 4])
def test_conv_transpose_2x_gradients_equal_plain_transposed_conv(kernel_size):
    x = jnp.asarray(_rand((1, 4, 5, 3), 9))
    w = jnp.asarray(_rand((kernel_size, kernel_size, 3, 2), 10))
    t = jnp.asarray(_rand((1, 8, 10, 2), 11))
    pad = ((1, 2),) * 2 if kernel_size == 3 else ((2, 2),) * 2
    plain = lambda x, w: jax.lax.conv_transpose(x, w[::-1, ::-1], (2, 2), pad,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    loss = lambda f: lambda x, w: jnp.sum((f(x, w) - t) ** 2)
    ours = jax.grad(loss(conv_transpose_2x), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(plain), argnums=(0, 1))(x, w)
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-4, rtol=1e-5)


def test_conv_transpose_2x_computes_in_bf16_with_float32_parameters():
    module = ConvTranspose2x(4, 4, dtype=jnp.bfloat16)
    x = jnp.ones((1, 3, 3, 2), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert module.apply(variables, x).dtype == jnp.bfloat16


def test_conv_transpose_2x_rejects_other_kernel_sizes():
    with pytest.raises(ValueError, match="kernel_size must be 3 or 4"):
        ConvTranspose2x(2, 5).init(jax.random.key(0), jnp.ones((1, 2, 2, 1)))


def test_depth_to_space_places_channel_blocks_as_sub_pixels():
    # Channel block (ry * 2 + rx) holds the sub-pixel at row offset ry, column offset rx.
    x = jnp.arange(4.0).reshape(1, 1, 1, 4)
    np.testing.assert_array_equal(np.asarray(depth_to_space(x))[0, :, :, 0], [[0, 1], [2, 3]])


def test_max_pool_2x_equals_flax_max_pool():
    x = jnp.asarray(_rand((2, 6, 8, 3), 13))
    np.testing.assert_array_equal(np.asarray(max_pool_2x(x)),
                                  np.asarray(nn.max_pool(x, (2, 2), strides=(2, 2))))


def test_max_pool_2x_sends_the_gradient_to_each_window_maximum():
    x = jnp.asarray([[1.0, 4.0], [3.0, 2.0]]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda x: jnp.sum(max_pool_2x(x)))(x)
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])


# ----------------------------------------------------------------------------- residual block
def test_residual_block_is_relu_of_first_conv_plus_second_conv_of_its_relu():
    block = ResidualBlock(4, kernel_size=3)
    x = jnp.asarray(_rand((1, 6, 6, 2), 12))
    params = block.init(jax.random.key(0), x)["params"]
    conv = lambda name, v: nn.Conv(4, (3, 3), use_bias=False).apply({"params": params[name]}, v)
    h = conv("conv1", x)
    expected = jax.nn.relu(h + conv("conv2", jax.nn.relu(h)))
    np.testing.assert_allclose(np.asarray(block.apply({"params": params}, x)),
                               np.asarray(expected), atol=1e-6)


def test_check_divisible_names_the_module_and_the_size_to_use():
    with pytest.raises(ValueError, match=r"IQE needs .* multiples of 32, got 48x64.*32x64"):
        check_divisible(jnp.zeros((1, 48, 64, 3)), 32, "IQE")
