"""ResNet-34/50 in torchvision's layout and the import of torchvision weights.

The PyTorch reference outputs come from tests/fixtures/make_resnet_fixture.py (run once with
PyTorch); these tests need no PyTorch.
"""

import functools
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleaq_jax.models import pretrained as P
from cleaq_jax.models.layers import LayerForms
from cleaq_jax.models.resnet import (BasicBlock, Bottleneck, ResNet, Stage, Stem, channels,
                                     imagenet_normalize, resnet34, resnet50, stack_blocks, stem_pool,
                                     unstack_blocks)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "resnet_torch.npz")
ARCH = {"basic": "resnet34", "bottleneck": "resnet50"}
TINY = {"width": 0.125, "stage_sizes": (1, 1, 1, 1)}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _count(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def _abstract(model, size):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


@pytest.fixture(scope="module")
def torch_ref():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def _state_dict(ref, tag):
    return {k[len(tag) + 1:]: v for k, v in ref.items()
            if k.startswith(tag + "/") and k.split("/")[1] not in ("logits", "feat")}


def _run(model, variables, x, **kw):
    """model.apply under jit: one compile is far cheaper here than op-by-op dispatch."""
    return jax.jit(functools.partial(model.apply, **kw))(variables, x)


def _random_variables(model, x, seed=0):
    """Variables of ``model`` drawn with numpy (skips flax's per-shape init compiles; BN var > 0)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape) ** 2).astype(s.dtype) + 0.1, shapes)


def _nhwc(ref):
    return jnp.asarray(ref["input"].transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def imported(torch_ref):
    """{tag: (model, variables)} for both fixture networks, imported from the npz state dicts."""
    out = {}
    for tag, arch in ARCH.items():
        model = P.build(arch, 10, **TINY)
        out[tag] = (model, P.convert(_state_dict(torch_ref, tag), model, source=tag))
    return out


# --------------------------------------------------------------------------- architecture
def test_resnet34_has_torchvision_parameter_count():
    assert _count(_abstract(resnet34(), 224)) == 21_797_672


def test_resnet50_has_torchvision_parameter_count():
    assert _count(_abstract(resnet50(), 224)) == 25_557_032


def test_channels_rounds_and_never_reaches_zero():
    assert [channels(64, w) for w in (1.0, 0.5, 0.125, 0.3, 0.001)] == [64, 32, 8, 19, 1]


def test_imagenet_normalize_uses_torchvision_mean_and_std():
    x = jnp.broadcast_to(jnp.asarray([0.485, 0.456, 0.406]), (1, 2, 2, 3))
    np.testing.assert_allclose(imagenet_normalize(x), 0.0, atol=1e-7)
    np.testing.assert_allclose(imagenet_normalize(jnp.ones((1, 1, 1, 3))),
                               [[[[0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225]]]], rtol=1e-6)


def test_stem_pool_is_3x3_stride_2_pad_1_max():
    x = jnp.arange(25.0).reshape(1, 5, 5, 1)
    # Windows centred on rows/cols 0, 2, 4; the padded border never wins.
    np.testing.assert_array_equal(stem_pool(x)[0, :, :, 0], [[6, 8, 9], [16, 18, 19], [21, 23, 24]])


@pytest.mark.parametrize("factory,depth", [(resnet34, 512), (resnet50, 2048)])
def test_full_size_shapes_at_512px_by_eval_shape(factory, depth):
    model = factory()
    variables = _abstract(model, 32)
    logits, feats = jax.eval_shape(
        lambda v, x: model.apply(v, x, return_features=True), variables,
        jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32))
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert feats["stem"].shape == (2, 256, 256, 64)
    assert feats["layer4"].shape == (2, 16, 16, depth)


@pytest.mark.parametrize("tag,mult", [("basic", 1), ("bottleneck", 4)])
def test_features_have_documented_strides_and_widths(imported, tag, mult):
    model, variables = imported[tag]
    logits, feats = _run(model, variables, jnp.zeros((2, 64, 64, 3)), return_features=True)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    shapes = {k: v.shape for k, v in feats.items()}
    assert shapes == {"stem": (2, 32, 32, 8), "layer1": (2, 16, 16, 8 * mult),
                      "layer2": (2, 8, 8, 16 * mult), "layer3": (2, 4, 4, 32 * mult),
                      "layer4": (2, 2, 2, 64 * mult)}


def test_trunk_without_classes_has_no_fc_and_returns_no_logits(imported):
    _, variables = imported["basic"]
    trunk = {"params": {k: v for k, v in variables["params"].items() if k != "fc"},
             "batch_stats": variables["batch_stats"]}
    logits, feats = _run(resnet34(None, **TINY), trunk, jnp.zeros((1, 32, 32, 3)), return_features=True)
    assert logits is None and "fc" not in _abstract(resnet34(None, **TINY), 32)["params"]
    assert feats["layer4"].shape == (1, 1, 1, 64)


def test_train_mode_moves_running_stats_with_torchvision_momentum(imported):
    model, variables = imported["basic"]
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    _, updates = _run(model, variables, x, train=True, mutable=["batch_stats"])
    # The stem BN sees conv(x); its batch mean enters the running mean with weight 0.1.
    conv = nn.Conv(8, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)
    h = _run(conv, {"params": variables["params"]["stem"]["conv"]}, x)
    old = variables["batch_stats"]["stem"]["bn"]["mean"]
    expected = 0.9 * old + 0.1 * np.asarray(h.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(updates["batch_stats"]["stem"]["bn"]["mean"], expected, atol=1e-5)


def test_remat_gives_same_outputs_and_gradients():
    # Tolerance 1e-5: remat recomputes the same float32 ops, so only reassociation can differ.
    kw = dict(stage_sizes=(1, 1), block_cls=Bottleneck, width=0.125, num_classes=5)
    plain, remat = ResNet(**kw), ResNet(**kw, remat=True)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = _random_variables(plain, x)

    def loss(model, params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                             train=True, mutable=["batch_stats"])
        return jnp.sum(out ** 2)

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(functools.partial(loss, m)))(variables["params"])
                          for m in (plain, remat))
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5), g0, g1)


def test_remat_flag_wraps_every_block_in_a_checkpoint():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    for remat, expected in ((True, 5), (False, 0)):
        model = resnet34(10, remat=remat, width=0.125, stage_sizes=(1, 1, 2, 1))
        jaxpr = str(jax.make_jaxpr(model.apply)(_abstract(model, 32), x))
        # jax prints the checkpoint (remat) primitive as "remat2[...]" or "checkpoint[...]".
        assert len(re.findall(r"= (?:remat2|checkpoint)\[", jaxpr)) == expected


def test_bfloat16_compute_keeps_float32_params_and_close_logits(imported):
    # Tolerance: bf16 has an 8-bit mantissa (~0.4% per op); 5% of the logit scale after 10 layers.
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    f32, variables = imported["bottleneck"]
    bf16 = resnet50(10, dtype=jnp.bfloat16, **TINY)
    abstract = jax.eval_shape(lambda: bf16.init(jax.random.key(0), x))
    assert {a.dtype for a in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    ref = _run(f32, variables, x)
    logits, feats = _run(bf16, variables, x, return_features=True)
    assert logits.dtype == jnp.float32 and feats["layer2"].dtype == jnp.bfloat16
    assert logits.shape == ref.shape
    np.testing.assert_allclose(logits, ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_stage_downsamples_only_in_its_first_block():
    stage = Stage(BasicBlock, num_blocks=2, features=16, strides=2)
    variables = jax.eval_shape(lambda: stage.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8)), False))
    assert "downsample_conv" in variables["params"]["block0"]
    assert "downsample_conv" not in variables["params"]["block1"]


def _loss_and_grads(model, variables, x):
    """Loss, parameter gradients and new batch statistics of a train-mode forward (float64 inputs)."""
    def loss(params):
        out, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out)), upd["batch_stats"]

    (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return value, grads, stats


def _assert_trees_close(a, b):
    # Compute in float64 except the fc, which ResNet keeps in float32 by design: a float64 reduction
    # in another order can move its input by one float32 ulp (6e-8 relative); 1e-6 leaves room for
    # that and catches any real difference (a misrouted gradient is of the order of the values).
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6,
                                                         atol=1e-9), a, b)


def test_stem_pool_forms_give_a_resnet_the_same_values_and_gradients():
    # The two gradients add the same cotangents in another order (~1e-16 relative in float64).
    with jax.enable_x64(True):
        kw = dict(stage_sizes=(1, 1), block_cls=BasicBlock, width=0.125, num_classes=5, dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3), jnp.float64)
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), _random_variables(ResNet(**kw), x))
        results = [_loss_and_grads(ResNet(**kw, forms=LayerForms(stem_pool=f)), variables, x)
                   for f in ("reduce_window", "masked")]
        np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
        _assert_trees_close(results[0][1], results[1][1])
        _assert_trees_close(results[0][2], results[1][2])


def test_scan_blocks_stacks_the_repeated_blocks_of_every_stage():
    model = resnet34(5, width=0.125, stage_sizes=(3, 2, 4, 1), forms=LayerForms(scan_blocks=True))
    params = _abstract(model, 32)["params"]
    assert set(params["layer1"]) == {"block0", "blocks"} and params["layer1"]["blocks"]["block"]["conv1"][
        "kernel"].shape[0] == 2
    assert set(params["layer2"]) == {"block0", "block1"}  # two blocks: nothing to share
    assert params["layer3"]["blocks"]["block"]["bn1"]["scale"].shape[0] == 3
    assert set(params["layer4"]) == {"block0"}
    plain = _abstract(resnet34(5, width=0.125, stage_sizes=(3, 2, 4, 1)), 32)["params"]
    shapes = lambda t: jax.tree.map(lambda a: a.shape, t)
    assert shapes(jax.eval_shape(stack_blocks, plain)) == shapes(params)


def test_stack_and_unstack_blocks_are_inverse():
    model = resnet50(5, width=0.125, stage_sizes=(3, 1, 1, 1))
    variables = _random_variables(model, jnp.zeros((1, 32, 32, 3)))
    back = unstack_blocks(stack_blocks(variables["params"]))
    jax.tree.map(np.testing.assert_array_equal, back, variables["params"])
    assert "blocks" in stack_blocks(variables["params"])["layer1"]


def test_scan_blocks_gives_the_plain_stage_s_values_gradients_and_statistics():
    with jax.enable_x64(True):
        kw = dict(stage_sizes=(3, 1), block_cls=Bottleneck, width=0.125, num_classes=5, dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3), jnp.float64)
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), _random_variables(ResNet(**kw), x))
        stacked = jax.tree.map(stack_blocks, variables, is_leaf=lambda t: t is variables["params"]
                               or t is variables["batch_stats"])
        plain = _loss_and_grads(ResNet(**kw), variables, x)
        scan = _loss_and_grads(ResNet(**kw, forms=LayerForms(scan_blocks=True)), stacked, x)
        np.testing.assert_allclose(scan[0], plain[0], rtol=1e-6)
        _assert_trees_close(unstack_blocks(scan[1]), plain[1])
        _assert_trees_close(unstack_blocks(scan[2]), plain[2])


# --------------------------------------------------------------------------- torchvision import
@pytest.mark.parametrize("tag", ["basic", "bottleneck"])
def test_npz_import_reproduces_torch_logits(torch_ref, imported, tag):
    model, variables = imported[tag]
    logits = _run(model, variables, _nhwc(torch_ref))
    np.testing.assert_allclose(logits, torch_ref[f"{tag}/logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tag", ["basic", "bottleneck"])
def test_npz_import_reproduces_torch_feature_maps(torch_ref, imported, tag):
    model, variables = imported[tag]
    _, feats = _run(model, variables, _nhwc(torch_ref), return_features=True)
    for name, value in feats.items():
        ref = torch_ref[f"{tag}/feat/{name}"].transpose(0, 2, 3, 1)
        np.testing.assert_allclose(value, ref, atol=1e-4, rtol=0, err_msg=name)


def _write_safetensors(path, arrays, dtype="F32"):
    """Minimal safetensors writer (independent of the reader under test)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in arrays.items():
        if dtype == "BF16":
            raw = (np.asarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            raw = np.ascontiguousarray(a, "<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_safetensors_import_reproduces_torch_logits(torch_ref, tmp_path):
    sd = {k: v for k, v in _state_dict(torch_ref, "bottleneck").items()
          if not k.endswith("num_batches_tracked")}
    path = tmp_path / "r50.safetensors"
    _write_safetensors(path, sd)
    model = P.build("resnet50", 10, **TINY)
    variables = P.convert(P.read_state_dict(str(path)), model)
    np.testing.assert_allclose(_run(model, variables, _nhwc(torch_ref)),
                               torch_ref["bottleneck/logits"], atol=1e-4, rtol=0)


def test_safetensors_bfloat16_tensors_read_as_float32(tmp_path):
    values = np.array([[1.0, -2.5], [0.15625, 2.0 ** 100]], np.float32)  # all exact in bfloat16
    path = tmp_path / "w.safetensors"
    _write_safetensors(path, {"w": values}, dtype="BF16")
    out = P.read_safetensors(str(path))["w"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values)


def test_truncated_safetensors_error_names_file_and_tensor(tmp_path):
    path = tmp_path / "cut.safetensors"
    _write_safetensors(path, {"fc.weight": np.ones((4, 4), np.float32)})
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(P.PretrainedError, match=r"cut\.safetensors.*'fc\.weight'.*truncated"):
        P.read_safetensors(str(path))


def test_missing_key_error_names_the_key(torch_ref):
    sd = _state_dict(torch_ref, "basic")
    del sd["layer3.0.bn2.running_var"]
    with pytest.raises(P.PretrainedError, match=r"missing keys \(1\): layer3\.0\.bn2\.running_var"):
        P.convert(sd, P.build("resnet34", 10, **TINY), source="basic.npz")


def test_unexpected_key_error_names_the_key(torch_ref):
    sd = _state_dict(torch_ref, "basic") | {"layer1.1.conv1.weight": np.zeros((8, 8, 3, 3))}
    with pytest.raises(P.PretrainedError, match=r"unexpected keys \(1\): layer1\.1\.conv1\.weight"):
        P.convert(sd, P.build("resnet34", 10, **TINY), source="basic.npz")


def test_wrong_arch_reports_shape_mismatch_in_torch_layout(torch_ref):
    # A ResNet-34 file read as width 1/4: every conv is too narrow; the message shows OIHW shapes.
    with pytest.raises(P.PretrainedError, match=r"conv1\.weight: file \(8, 3, 7, 7\), model needs \(16, 3, 7, 7\)"):
        P.convert(_state_dict(torch_ref, "basic"), P.build("resnet34", 10, 0.25, (1, 1, 1, 1)))


def test_torch_name_maps_downsample_and_stem():
    assert P.torch_name(("params", "layer2", "block0", "downsample_conv", "kernel")) == \
        "layer2.0.downsample.0.weight"
    assert P.torch_name(("batch_stats", "layer4", "block1", "downsample_bn", "var")) == \
        "layer4.1.downsample.1.running_var"
    assert P.torch_name(("params", "stem", "bn", "scale")) == "bn1.weight"
    assert P.torch_name(("params", "fc", "kernel")) == "fc.weight"


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="PyTorch is importable here, so .pth files are read")
def test_pth_without_torch_asks_for_npz_or_safetensors(tmp_path):
    path = tmp_path / "r34.pth"
    path.write_bytes(b"not read")
    with pytest.raises(P.PretrainedError, match=r"r34\.pth: reading \.pth needs PyTorch.*\.npz or \.safetensors"):
        P.read_state_dict(str(path))


# --------------------------------------------------------------------------- CLI and directory
def _export_npz(torch_ref, tmp_path, tag="bottleneck"):
    path = tmp_path / f"{tag}.npz"
    np.savez(path, **_state_dict(torch_ref, tag))
    return path


def test_cli_writes_a_loadable_directory(torch_ref, tmp_path):
    src, out = _export_npz(torch_ref, tmp_path), tmp_path / "r50"
    cmd = [sys.executable, "-m", "cleaq_jax.programs.import_weights", "--torchvision-file", str(src),
           "--arch", "resnet50", "--out", str(out), "--width", "0.125", "--stage-sizes", "1,1,1,1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["bottleneck.npz", "r50"]  # no temporary left behind
    meta = P.load_meta(str(out))
    assert meta["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (meta["arch"], meta["source"], meta["num_classes"]) == ("resnet50", "bottleneck.npz", 10)
    model = P.build("resnet50", 10, **TINY)
    variables = P.load(str(out))
    assert meta["num_params"] == P.num_params(variables)
    np.testing.assert_allclose(_run(model, variables, _nhwc(torch_ref)),
                               torch_ref["bottleneck/logits"], atol=1e-4, rtol=0)


def test_export_refuses_an_existing_directory(torch_ref, tmp_path):
    src, out = _export_npz(torch_ref, tmp_path), tmp_path / "taken"
    out.mkdir()
    with pytest.raises(P.PretrainedError, match=r"taken: already exists"):
        P.export(str(src), str(out), "resnet50", 0.125, (1, 1, 1, 1))


def test_load_without_meta_names_the_command_to_run(tmp_path):
    with pytest.raises(P.PretrainedError, match=r"meta\.json: missing.*--torchvision-file"):
        P.load(str(tmp_path))


# --------------------------------------------------------------------------- graft
class _Inner(nn.Module):
    num_classes: int | None

    @nn.compact
    def __call__(self, x, train=False):
        _, feats = ResNet((1, 1, 1, 1), Bottleneck, 0.125, self.num_classes, name="backbone")(
            x, train, return_features=True)
        return feats["layer4"], nn.Dense(3, name="head")(feats["layer4"].mean((1, 2)))


class _Outer(nn.Module):
    num_classes: int | None = 5

    @nn.compact
    def __call__(self, x, train=False):
        return _Inner(self.num_classes, name="dr")(x, train)


def _outer_variables(num_classes, x):
    return _random_variables(_Outer(num_classes), x, seed=3)


def test_graft_puts_the_trunk_into_the_named_subtree(torch_ref, imported):
    x = _nhwc(torch_ref)
    model, pre = imported["bottleneck"]
    grafted = P.graft(_outer_variables(None, x), pre, into="dr/backbone")
    layer4, _ = _run(_Outer(None), grafted, x)
    _, ref = _run(model, pre, x, return_features=True)
    np.testing.assert_allclose(layer4, ref["layer4"], atol=1e-5)


def test_graft_keeps_the_models_own_fc_when_class_count_differs(torch_ref, imported):
    variables = _outer_variables(5, _nhwc(torch_ref))
    grafted = P.graft(variables, imported["bottleneck"][1], into=("dr", "backbone"))
    fc = grafted["params"]["dr"]["backbone"]["fc"]["kernel"]
    assert fc.shape == (256, 5)
    np.testing.assert_array_equal(fc, variables["params"]["dr"]["backbone"]["fc"]["kernel"])


def test_graft_copies_fc_when_class_count_matches(torch_ref, imported):
    grafted = P.graft(_outer_variables(10, _nhwc(torch_ref)), imported["bottleneck"][1], into="dr/backbone")
    np.testing.assert_array_equal(grafted["params"]["dr"]["backbone"]["fc"]["kernel"],
                                  imported["bottleneck"][1]["params"]["fc"]["kernel"])


def test_graft_leaves_the_input_variables_unchanged(torch_ref, imported):
    variables = _outer_variables(None, _nhwc(torch_ref))
    before = jax.tree.map(np.array, variables)
    P.graft(variables, imported["bottleneck"][1], into="dr/backbone")
    jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_graft_of_the_wrong_block_type_lists_mismatched_paths(torch_ref, imported):
    with pytest.raises(P.PretrainedError, match=r"params/dr/backbone/layer1/block0/conv3/kernel: not in the pretrained"):
        P.graft(_outer_variables(None, _nhwc(torch_ref)), imported["basic"][1], into="dr/backbone")


def test_graft_into_a_missing_path_names_it(torch_ref, imported):
    with pytest.raises(P.PretrainedError, match=r"params/dr/trunk does not exist.*\['backbone', 'head'\]"):
        P.graft(_outer_variables(None, _nhwc(torch_ref)), imported["bottleneck"][1], into="dr/trunk")


class _Fused(nn.Module):
    """A ResNet-50 built from resnet.py's pieces with an extra conv of its own (as C-IQA's fusion)."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Conv(8, (1, 1), name="fuse0")(stem_pool(Stem(8, name="stem")(x, train)))
        for i in range(4):
            h = Stage(Bottleneck, 1, 8 * 2 ** i, 1 if i == 0 else 2, name=f"layer{i + 1}")(h, train)
        return h


def test_graft_leaves_the_models_extra_modules_as_they_are(torch_ref, imported):
    variables = _random_variables(_Fused(), _nhwc(torch_ref))
    pre = imported["bottleneck"][1]
    grafted = P.graft(variables, pre, into=())
    np.testing.assert_array_equal(grafted["params"]["fuse0"]["kernel"], variables["params"]["fuse0"]["kernel"])
    np.testing.assert_array_equal(grafted["params"]["layer3"]["block0"]["conv2"]["kernel"],
                                  pre["params"]["layer3"]["block0"]["conv2"]["kernel"])
    np.testing.assert_array_equal(grafted["batch_stats"]["stem"]["bn"]["var"], pre["batch_stats"]["stem"]["bn"]["var"])
