"""Specifications of the CLEAQ-DR networks (CE-Net, IQE, IQA, DR) at tiny widths and sizes.

Parameters come from ``fixed_variables`` (NumPy draws with LeCun scale shaped by ``jax.eval_shape``
of each module's init) so that no test pays for compiling the initialisers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from cleaq_jax.models import resnet
from cleaq_jax.models.cenet import CENet
from cleaq_jax.models.dr import DRGrader
from cleaq_jax.models.iqa import IQA
from cleaq_jax.models.iqe import IQE, RESIDUAL_EPS, UIQE
from cleaq_jax.models.layers import grad_reverse

TINY = dict(width=1 / 16)
STAGES = (1, 1, 1, 1)
KEY = jax.random.key(0)


def shapes(module, x, **kw):
    """Flattened {path: shape} of a module's params (eval_shape of init, nothing computed)."""
    tree = jax.eval_shape(lambda: module.init(KEY, x, **kw))["params"]
    return {"/".join(k): v.shape for k, v in flatten_dict(tree).items()}


def outputs(module, x):
    """Abstract outputs (shapes and dtypes) of ``module`` on ``x``, nothing computed."""
    return jax.eval_shape(lambda x: module.init_with_output(KEY, x)[0], x)


def fixed_variables(module, x, seed):
    """Variables shaped like ``module.init(key, x)``: kernels ~ N(0, 1/fan_in), BN identity."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(module.init, KEY, x))


def tiny_models(dtype):
    return (IQE(encoder_stages=STAGES, dtype=dtype, **TINY),
            IQA(encoder_stages=STAGES, classifier_stages=STAGES, dtype=dtype, **TINY),
            DRGrader(5, stage_sizes=STAGES, dtype=dtype, **TINY))


def joint_forward(variables, x, dtype):
    """IQE on x, then IQA (behind gradient reversal) and DR on the enhanced image; BN running stats."""
    iqe, iqa, dr = tiny_models(dtype)
    out = dict(iqe.apply(variables["iqe"], x))
    out.update(iqa.apply(variables["iqa"], grad_reverse(out["enhanced"], 1.0)))
    out["dr_logits"] = dr.apply(variables["dr"], out["enhanced"])
    return out


@pytest.fixture(scope="module")
def joint():
    """Inputs, variables, the jitted joint forward and its float32 outputs at 32 px, batch 2."""
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
    iqe, iqa, dr = tiny_models(jnp.float32)
    variables = {"iqe": fixed_variables(iqe, x, 1), "iqa": fixed_variables(iqa, x, 2),
                 "dr": fixed_variables(dr, x, 3)}
    run = jax.jit(joint_forward, static_argnums=2)
    return x, variables, run, run(variables, x, jnp.float32)


def perturbed(variables, net, branch):
    """A copy of ``variables`` with every parameter of params[branch] in ``net`` shifted."""
    params = dict(variables[net]["params"])
    params[branch] = jax.tree.map(lambda p: np.asarray(p) + np.float32(0.05), params[branch])
    return {**variables, net: {**variables[net], "params": params}}


# ----------------------------------------------------------------------------- outputs
def test_joint_outputs_have_the_documented_shapes_and_dtypes(joint):
    _, _, _, out = joint
    expected = {"enhanced": (2, 32, 32, 3), "vessel_logits": (2, 32, 32, 1),
                "lqi": (2, 32, 32, 3), "quality_logits": (2, 3), "dr_logits": (2, 5)}
    assert {k: v.shape for k, v in out.items()} == expected
    assert {v.dtype for v in out.values()} == {jnp.dtype(jnp.float32)}


def test_enhanced_and_lqi_images_lie_in_the_unit_interval(joint):
    _, _, _, out = joint
    for name in ("enhanced", "lqi"):
        assert 0.0 <= float(out[name].min()) and float(out[name].max()) <= 1.0, name
        assert float(out[name].std()) > 0.0, name


def test_vessel_logits_are_finite_at_32px_where_rmp_pools_exceed_the_map(joint):
    # At 32 px the CE-Net's deepest map is 1x1, smaller than every RMP pool (2, 3, 5, 6).
    _, _, _, out = joint
    assert np.isfinite(np.asarray(out["vessel_logits"])).all()
    assert float(out["vessel_logits"].std()) > 0.0


def test_cenet_decoder_features_are_d4_d3_d2_d1_with_ce_net_channels():
    out = outputs(CENet(stage_sizes=STAGES, **TINY), jnp.zeros((2, 64, 64, 3)))
    assert out["vessel_logits"].shape == (2, 64, 64, 1)
    assert out["vessel_logits"].dtype == jnp.float32
    # channels(256/128/64/64, 1/16) at S/16, S/8, S/4, S/2.
    assert [f.shape for f in out["decoder_features"]] == [
        (2, 4, 4, 16), (2, 8, 8, 8), (2, 16, 16, 4), (2, 32, 32, 4)]


def test_full_width_networks_at_512px_give_the_documented_shapes():
    x = jnp.zeros((1, 512, 512, 3))
    outs = {name: outputs(m, x) for name, m in [("iqe", IQE()), ("iqa", IQA()), ("dr", DRGrader())]}
    got = jax.tree.map(lambda a: (a.shape, str(a.dtype)), outs)
    assert got == {
        "iqe": {"enhanced": ((1, 512, 512, 3), "float32"),
                "vessel_logits": ((1, 512, 512, 1), "float32")},
        "iqa": {"quality_logits": ((1, 3), "float32"), "lqi": ((1, 512, 512, 3), "float32")},
        "dr": ((1, 5), "float32")}


def test_sizes_that_are_not_multiples_of_32_are_rejected_with_the_size_to_use():
    with pytest.raises(ValueError, match=r"IQE \(with Seg-IQE\) needs .* multiples of 32, got 48x48"):
        shapes(IQE(encoder_stages=STAGES, **TINY), jnp.zeros((1, 48, 48, 3)))


# ----------------------------------------------------------------------------- fusion
def test_seg_iqe_parameters_change_the_enhanced_image(joint):
    x, variables, run, out = joint
    changed = run(perturbed(variables, "iqe", "seg_iqe"), x, jnp.float32)
    assert float(jnp.abs(changed["enhanced"] - out["enhanced"]).max()) > 1e-4


def test_lqi_iqa_parameters_change_c_iqa_logits_and_nothing_upstream(joint):
    x, variables, run, out = joint
    changed = run(perturbed(variables, "iqa", "lqi_iqa"), x, jnp.float32)
    assert float(jnp.abs(changed["quality_logits"] - out["quality_logits"]).max()) > 1e-4
    np.testing.assert_array_equal(np.asarray(changed["enhanced"]), np.asarray(out["enhanced"]))
    np.testing.assert_array_equal(np.asarray(changed["dr_logits"]), np.asarray(out["dr_logits"]))


def test_iqe_without_seg_has_no_seg_iqe_subtree_and_narrower_up_convs():
    x = jnp.zeros((1, 32, 32, 3))
    with_seg = shapes(IQE(encoder_stages=STAGES, **TINY), x)
    without = shapes(IQE(use_seg=False, encoder_stages=STAGES, **TINY), x)
    assert not any(k.startswith("seg_iqe/") for k in without)
    assert set(without) == {k for k in with_seg if k.startswith("u_iqe/")}
    # Seg-IQE's d3, d2, d1 (8, 4, 4 channels at width 1/16) widen the inputs of up2, up1, up0.
    widened = {k: (with_seg[k][2] - without[k][2]) for k in without if with_seg[k] != without[k]}
    assert widened == {"u_iqe/up2/kernel": 8, "u_iqe/up1/kernel": 4, "u_iqe/up0/kernel": 4}
    assert set(outputs(IQE(use_seg=False, **TINY), x)) == {"enhanced"}


def test_uiqe_width_widens_u_iqe_alone():
    x = jnp.zeros((1, 32, 32, 3))
    base = shapes(IQE(encoder_stages=STAGES, **TINY), x)
    wide = shapes(IQE(encoder_stages=STAGES, uiqe_width=0.25, **TINY), x)
    assert {k: v for k, v in wide.items() if k.startswith("seg_iqe/")} == \
        {k: v for k, v in base.items() if k.startswith("seg_iqe/")}
    # U-IQE's full-resolution level: 32 * 1/16 = 2 channels at the shared width, 32 * 1/4 = 8 at its own.
    assert base["u_iqe/head/kernel"][2] == 2 and wide["u_iqe/head/kernel"][2] == 8


def test_residual_u_iqe_with_a_zero_head_returns_its_input():
    x = jax.random.uniform(KEY, (2, 32, 32, 3))
    module = UIQE(width=1 / 16, residual=True)
    params = module.init(KEY, x)["params"]
    params = {**params, "head": {"kernel": jnp.zeros_like(params["head"]["kernel"])}}
    out = module.apply({"params": params}, x)
    np.testing.assert_allclose(out, jnp.clip(x, RESIDUAL_EPS, 1 - RESIDUAL_EPS), atol=1e-5)
    plain = UIQE(width=1 / 16)
    assert not np.allclose(plain.apply({"params": params}, x), x, atol=0.1)  # the paper's form draws anew


def test_iqa_without_lqi_is_a_plain_resnet50_classifier():
    x = jnp.zeros((1, 32, 32, 3))
    without = shapes(IQA(use_lqi=False, classifier_stages=STAGES, **TINY), x)
    plain = shapes(resnet.resnet50(3, stage_sizes=STAGES, **TINY), x)
    assert without == {"c_iqa/" + k: v for k, v in plain.items()}
    assert set(outputs(IQA(use_lqi=False, **TINY), x)) == {"quality_logits"}


def test_iqa_with_lqi_adds_four_fusion_convs_to_the_resnet50():
    x = jnp.zeros((1, 32, 32, 3))
    full = shapes(IQA(encoder_stages=STAGES, classifier_stages=STAGES, **TINY), x)
    plain = shapes(resnet.resnet50(3, stage_sizes=STAGES, **TINY), x)
    c_iqa = {k[len("c_iqa/"):]: v for k, v in full.items() if k.startswith("c_iqa/")}
    extra = {k: v for k, v in c_iqa.items() if k not in plain}
    assert {k: v for k, v in c_iqa.items() if k in plain} == plain
    # eq. (8): concat(C-IQA map, LQI feature) -> 3x3 conv back to C-IQA's channels.
    assert {k: v for k, v in extra.items() if k.endswith("conv/kernel")} == {
        "fuse0/conv/kernel": (3, 3, 4 + 4, 4), "fuse1/conv/kernel": (3, 3, 16 + 4, 16),
        "fuse2/conv/kernel": (3, 3, 32 + 8, 32), "fuse3/conv/kernel": (3, 3, 64 + 16, 64)}
    assert any(k.startswith("lqi_iqa/") for k in full)


# ----------------------------------------------------------------------------- DR
def test_dr_grader_keeps_resnet50_names_under_backbone():
    x = jnp.zeros((1, 32, 32, 3))
    dr = shapes(DRGrader(4, stage_sizes=STAGES, **TINY), x)
    plain = shapes(resnet.resnet50(4, stage_sizes=STAGES, **TINY), x)
    assert dr == {"backbone/" + k: v for k, v in plain.items()}


def test_full_width_dr_grader_has_torchvision_resnet50_parameter_count():
    # torchvision resnet50: 25,557,032 with a 1000-way fc; a 5-way fc leaves 23,518,277.
    counts = shapes(DRGrader(5), jnp.zeros((1, 64, 64, 3)))
    assert sum(int(np.prod(s)) for s in counts.values()) == 23_518_277


# ----------------------------------------------------------------------------- precision, remat
def test_bf16_joint_forward_agrees_with_float32(joint):
    # Stated tolerance (docs/models.md): images within 0.02 absolute, logits within 5% relative L2.
    x, variables, run, out = joint
    low = run(variables, x, jnp.bfloat16)
    for name in ("enhanced", "lqi"):
        assert float(jnp.abs(low[name] - out[name]).max()) <= 0.02, name
    for name in ("vessel_logits", "quality_logits", "dr_logits"):
        assert low[name].dtype == jnp.float32
        rel = jnp.linalg.norm(low[name] - out[name]) / jnp.linalg.norm(out[name])
        assert float(rel) <= 0.05, (name, float(rel))


def test_remat_keeps_the_parameter_tree_in_training_mode():
    x = jnp.zeros((2, 32, 32, 3))
    for make in (lambda **kw: IQE(encoder_stages=STAGES, **TINY, **kw),
                 lambda **kw: IQA(encoder_stages=STAGES, classifier_stages=STAGES, **TINY, **kw)):
        assert shapes(make(remat=True), x, train=True) == shapes(make(), x, train=True)


def test_remat_gives_the_same_u_iqe_gradients():
    x = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 16, 16, 3)), jnp.float32)
    plain = UIQE(**TINY)
    params = fixed_variables(plain, x, 5)["params"]

    def grads(module):
        loss = lambda p: jnp.mean((module.apply({"params": p}, x) - x) ** 2)
        return jax.jit(jax.grad(loss))(params), str(jax.make_jaxpr(loss)(params))

    (g_plain, jaxpr_plain), (g_remat, jaxpr_remat) = grads(plain), grads(plain.clone(remat=True))
    assert "remat" not in jaxpr_plain and "remat" in jaxpr_remat
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
