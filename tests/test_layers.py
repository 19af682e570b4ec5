"""Specifications of the shared blocks in cleaq_jax.models.layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleaq_jax.models.layers import (UPSAMPLE_FORMS, ConvTranspose2x, LayerForms, ResidualBlock,
                                     check_divisible, conv_transpose_2x, depth_to_space, grad_reverse,
                                     icnr_init, max_pool_2x, max_pool_3x3_2x)


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


@pytest.mark.parametrize("kernel_size", [3, 4])
@pytest.mark.parametrize("form", ["subpixel", "subpixel4"])
def test_conv_transpose_2x_forms_equal_the_plain_transpose_in_values_and_gradients(form, kernel_size):
    # float64: the forms sum the same products in another order, so they agree to ~1e-15.
    with jax.enable_x64(True):
        rng = np.random.default_rng(20)
        x = jnp.asarray(rng.normal(size=(2, 5, 6, 3)))
        w = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 3, 4)))
        t = jnp.asarray(rng.normal(size=(2, 10, 12, 4)))
        f = lambda form: lambda x, w: jnp.sum(jnp.sin(conv_transpose_2x(x, w, form)) * t)
        np.testing.assert_allclose(conv_transpose_2x(x, w, form), conv_transpose_2x(x, w, "transpose"),
                                   rtol=0, atol=1e-12)
        ours, plain = (jax.grad(f(name), argnums=(0, 1))(x, w) for name in (form, "transpose"))
        for a, r in zip(ours, plain):
            np.testing.assert_allclose(a, r, rtol=0, atol=1e-12)


def test_conv_transpose_2x_module_takes_the_same_kernel_in_every_form():
    x = jnp.asarray(_rand((1, 4, 4, 3), 21))
    variables = ConvTranspose2x(5, 4).init(jax.random.key(0), x)
    outs = [ConvTranspose2x(5, 4, forms=LayerForms(upsample=f)).apply(variables, x) for f in UPSAMPLE_FORMS]
    for y in outs[1:]:  # float32, a few dozen products per output: 1e-5 of values of order 1
        np.testing.assert_allclose(np.asarray(y), np.asarray(outs[0]), atol=1e-5)


def test_icnr_kernel_gives_every_output_phase_the_same_taps():
    # Output row 2m + r reads inputs m - 1 + r + t through tap 3 - r - 2t: equal phases mean
    # output rows 2m - 1 and 2m (and columns) are the same function of the same inputs.
    with jax.enable_x64(True):
        kernel = icnr_init()(jax.random.key(1), (4, 4, 3, 2), jnp.float64)
        y = conv_transpose_2x(jnp.asarray(np.random.default_rng(22).normal(size=(2, 6, 5, 3))), kernel)
        np.testing.assert_allclose(y[:, 1:-1:2], y[:, 2::2], rtol=0, atol=1e-12)
        np.testing.assert_allclose(y[:, :, 1:-1:2], y[:, :, 2::2], rtol=0, atol=1e-12)


def test_icnr_3x3_kernel_maps_a_constant_to_a_constant():
    # K = 3 phases have 1 and 2 taps per axis; icnr makes their sums equal. The last output row and
    # column read the zero padding (output_padding 1), so only they differ.
    with jax.enable_x64(True):
        kernel = icnr_init()(jax.random.key(2), (3, 3, 4, 3), jnp.float64)
        y = conv_transpose_2x(jnp.full((1, 5, 5, 4), 0.7), kernel)[:, :-1, :-1]
        np.testing.assert_allclose(y, jnp.broadcast_to(y[:, :1, :1], y.shape), rtol=0, atol=1e-12)


def test_lecun_kernel_makes_a_checkerboard_of_a_constant_and_icnr_does_not():
    x = jnp.ones((1, 6, 6, 8))
    spread = {}
    for init in ("lecun", "icnr"):
        module = ConvTranspose2x(4, 4, use_bias=False, forms=LayerForms(upsample_init=init))
        y = np.asarray(module.apply(module.init(jax.random.key(3), x), x))[0, 2:-2, 2:-2]  # interior
        spread[init] = float(np.abs(y - y[:1, :1]).max())
    # Independent taps: each phase sums 32 other weights of std 1/sqrt(128), so phases differ by
    # about 0.7 per channel; equal phases: float32 round-off only.
    assert spread["icnr"] < 1e-5 < 1e-2 < spread["lecun"]


def test_icnr_kernel_keeps_the_output_variance_of_lecun():
    # Each output sees 4 taps x Cin inputs; icnr draws those with fan-in 4*Cin, so a unit-variance
    # input gives a unit-variance output (lecun over 16*Cin gives 1/4 of it).
    kernel = icnr_init()(jax.random.key(4), (4, 4, 64, 64))
    x = jax.random.normal(jax.random.key(5), (4, 16, 16, 64))
    var = float(jnp.var(conv_transpose_2x(x, kernel)[:, 1:-1, 1:-1]))
    assert 0.8 < var < 1.25  # 64 output channels x ~900 pixels: sampling error of the mean ~2%


def test_max_pool_3x3_2x_equals_nn_max_pool_in_values_and_gradients():
    ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    with jax.enable_x64(True):
        rng = np.random.default_rng(23)
        for shape in ((2, 8, 8, 3), (1, 7, 9, 2)):  # even and odd sides
            x = jnp.asarray(rng.normal(size=shape))
            g = jnp.asarray(rng.normal(size=ref(x).shape))
            np.testing.assert_array_equal(max_pool_3x3_2x(x), ref(x))
            # Overlapping windows add two cotangents into one pixel in another order: ~1e-16.
            np.testing.assert_allclose(jax.vjp(max_pool_3x3_2x, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0],
                                       rtol=0, atol=1e-12)


def test_max_pool_3x3_2x_gives_a_tied_window_s_gradient_to_its_first_maximum():
    # As select-and-scatter does; ties are common after ReLU (zeros) and in integer-valued images.
    ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = jnp.asarray(np.clip(np.round(np.random.default_rng(24).normal(size=(2, 8, 10, 3))), 0, None),
                    jnp.float32)
    g = jnp.asarray(_rand(ref(x).shape, 25))
    ours, theirs = jax.vjp(max_pool_3x3_2x, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-6)
    zero = jax.vjp(max_pool_3x3_2x, jnp.zeros((1, 4, 4, 1)))[1](jnp.ones((1, 2, 2, 1)))[0]
    np.testing.assert_array_equal(np.asarray(zero)[0, :, :, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0],
                                                                  [0, 0, 0, 0]])


def test_max_pool_3x3_2x_keeps_bfloat16():
    x = jnp.asarray(_rand((1, 6, 6, 2), 26), jnp.bfloat16)
    y, pullback = jax.vjp(max_pool_3x3_2x, x)
    assert y.dtype == jnp.bfloat16 and pullback(jnp.ones_like(y))[0].dtype == jnp.bfloat16


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
