"""Import torchvision ImageNet ResNet weights and graft them into bigger models.

A user brings a torchvision state_dict as a file, local or in a bucket (exported once with PyTorch, see
docs/pretrained.md):

  * ``.npz``          numpy archive, keys = torchvision names (``layer1.0.conv1.weight``, ...)
  * ``.safetensors``  parsed here with numpy (8-byte little-endian header length, JSON header,
                      raw little-endian buffers), no extra dependency
  * ``.pth`` / ``.pt`` only when PyTorch happens to be importable

and converts it once (`export`, the library side of ``python -m cleaq_jax.programs.import_weights``)::

    python -m cleaq_jax.programs.import_weights --torchvision-file resnet50.npz --arch resnet50 --out DIR

DIR holds ``variables.msgpack`` (flax.serialization, {'params', 'batch_stats'}) and ``meta.json``
(arch, width, stage sizes, classes, source file name, its sha256, parameter count). Training
configs name such directories per sub-network (``config.pretrained.dr = DIR``) and the trainer
calls ``graft(variables, load(DIR), into=...)`` to put the trunk into the model's variables. The file
and DIR may be ``gs://`` paths: every read and write goes through `runtime.storage`.

Mapping (torchvision -> this package's ResNet): conv weight OIHW -> kernel HWIO; BN weight,
bias, running_mean, running_var -> params scale, bias and batch_stats mean, var; fc weight
(out, in) -> kernel (in, out); ``num_batches_tracked`` is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import flax.serialization
import jax
from absl import logging
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from cleaq_jax import errors
from cleaq_jax.models.resnet import ResNet, resnet34, resnet50
from cleaq_jax.runtime import storage

ARCHS = {"resnet34": resnet34, "resnet50": resnet50}
VARIABLES_FILE = "variables.msgpack"
META_FILE = "meta.json"
_IGNORED_SUFFIX = ".num_batches_tracked"
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


class PretrainedError(errors.UserError, ValueError):
    """A weight file or pretrained directory that cannot be used as asked."""


# --------------------------------------------------------------------------- reading state dicts
def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Parse a .safetensors file with numpy.

    Args:
      path: file path, local or remote.
    Returns:
      {tensor name: array}; F64/F32/F16/integer/bool keep their dtype, BF16 becomes float32.
    Raises:
      PretrainedError naming the file when the header or a buffer is malformed.
    """
    return _parse_safetensors(storage.read_bytes(path), path)


def _parse_safetensors(blob: bytes, path: str) -> dict[str, np.ndarray]:
    """`read_safetensors` of a file's content ``blob`` (errors name ``path``)."""
    if len(blob) < 8:
        raise PretrainedError(f"{path}: too short to be a .safetensors file")
    n = int(np.frombuffer(blob[:8], "<u8")[0])
    if 8 + n > len(blob):
        raise PretrainedError(f"{path}: header length {n} runs past the end of the file "
                              f"({len(blob)} bytes); the file is truncated or not .safetensors")
    try:
        header = json.loads(blob[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{path}: unreadable .safetensors JSON header ({e})") from None
    data = memoryview(blob)[8 + n:]
    return {name: _safetensors_array(path, name, info, data)
            for name, info in header.items() if name != "__metadata__"}


def _safetensors_array(path: str, name: str, info: Mapping, data: memoryview) -> np.ndarray:
    dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if not 0 <= begin <= end <= len(data):
        raise PretrainedError(f"{path}: tensor {name!r} spans bytes [{begin}, {end}) of a "
                              f"{len(data)}-byte data section; the file is truncated")
    raw = data[begin:end]
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: widen the bits, then reinterpret.
        arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype in _SAFETENSORS_DTYPES:
        arr = np.frombuffer(raw, _SAFETENSORS_DTYPES[dtype])
    else:
        raise PretrainedError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    if arr.size != int(np.prod(shape)):
        raise PretrainedError(f"{path}: tensor {name!r} has {arr.size} elements, header says {shape}")
    return arr.reshape(shape)


def _read_pth(path: str, local: str) -> dict[str, np.ndarray]:
    try:
        import torch  # optional: only for users who have it
    except ImportError:
        raise PretrainedError(
            f"{path}: reading .pth needs PyTorch, which is not importable here; export the "
            "state_dict to .npz or .safetensors on a machine with PyTorch (docs/pretrained.md)"
        ) from None
    obj = torch.load(local, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise PretrainedError(f"{path}: expected a state_dict (a mapping of tensors), got {type(obj)}")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in obj.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a torchvision state_dict from .npz, .safetensors or (with PyTorch) .pth/.pt.

    Returns {torchvision key: numpy array}. A ``module.`` prefix on every key (saved from
    DataParallel) is stripped. ``path`` may be remote (``gs://...``).
    """
    with storage.local_file(_weight_file(path)) as local:
        return _read_state_dict(path, local)


def _weight_file(path: str) -> str:
    """``path``, checked to be a file."""
    if not storage.exists(path) or storage.isdir(path):
        raise PretrainedError(f"{path}: no such file (pass the exported torchvision weights)")
    return path


def _read_state_dict(path: str, local: str) -> dict[str, np.ndarray]:
    """`read_state_dict` of ``path`` from ``local``, a local file with its content (errors name ``path``)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with np.load(local, allow_pickle=False) as z:
            sd = {k: z[k] for k in z.files}
    elif ext == ".safetensors":
        with open(local, "rb") as f:
            sd = _parse_safetensors(f.read(), path)
    elif ext in (".pth", ".pt"):
        sd = _read_pth(path, local)
    else:
        raise PretrainedError(f"{path}: unknown weight format {ext!r}; use .npz, .safetensors or .pth")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------- torch -> flax mapping
def torch_name(path: Sequence[str]) -> str:
    """torchvision key of a flax ResNet variable.

    Args:
      path: (collection, module..., leaf), e.g. ('params', 'layer1', 'block0', 'conv1', 'kernel').
    Returns:
      e.g. 'layer1.0.conv1.weight'; ('batch_stats', 'stem', 'bn', 'mean') -> 'bn1.running_mean'.
    """
    *modules, leaf = path[1:]
    if modules[:1] == ["stem"]:
        modules = [modules[1] + "1"]  # Stem's conv/bn are torchvision's top-level conv1/bn1
    rename = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
    parts = [m[len("block"):] if m.startswith("block") else rename.get(m, m) for m in modules]
    return ".".join(parts + [_LEAF_TO_TORCH[leaf]])


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and value.ndim == 2:
        return value.T  # Linear (out, in) -> Dense (in, out)
    return value


def _torch_shape(shape: Sequence[int], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def convert(state_dict: Mapping[str, np.ndarray], model: ResNet, source: str = "state_dict") -> dict:
    """Map a torchvision state_dict onto ``model``'s variables.

    Args:
      state_dict: {torchvision key: array}, as from ``read_state_dict``.
      model: the ResNet the weights are for (its block type, widths, stages and classes must match).
      source: name used in error messages (the file).
    Returns:
      {'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays.
    Raises:
      PretrainedError listing every missing key, unexpected key and shape mismatch.
    """
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    flat, missing, wrong = {}, [], []
    used = set()
    for path, spec in flatten_dict(template).items():
        key, leaf = torch_name(path), path[-1]
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = _to_flax(state_dict[key], leaf)
        if value.shape != spec.shape:
            wrong.append(f"{key}: file {tuple(state_dict[key].shape)}, model needs "
                         f"{_torch_shape(spec.shape, leaf)}")
            continue
        flat[path] = value
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIX))
    if missing or unexpected or wrong:
        raise PretrainedError(_mismatch_message(source, missing, unexpected, wrong))
    return unflatten_dict(flat)


def _mismatch_message(source: str, missing: list, unexpected: list, wrong: list) -> str:
    lines = [f"{source}: the weights do not fit the model (is --arch / width / stage sizes right?)"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", wrong)):
        if keys:
            lines.append(f"  {title} ({len(keys)}): " + ", ".join(sorted(keys)[:20])
                         + (" ..." if len(keys) > 20 else ""))
    return "\n".join(lines)


def num_params(variables: Mapping) -> int:
    """Number of trainable parameters (the 'params' collection only)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(variables["params"])))


# --------------------------------------------------------------------------- directory format
def build(arch: str, num_classes: int | None, width: float = 1.0,
          stage_sizes: Sequence[int] | None = None) -> ResNet:
    """The ResNet named ``arch`` ('resnet34' or 'resnet50'), optionally narrowed/shortened."""
    if arch not in ARCHS:
        raise PretrainedError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    kw = {"width": width} | ({"stage_sizes": tuple(stage_sizes)} if stage_sizes else {})
    return ARCHS[arch](num_classes, **kw)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(weights_file: str, out_dir: str, arch: str, width: float = 1.0,
           stage_sizes: Sequence[int] | None = None) -> dict:
    """Convert a torchvision weight file into a pretrained directory.

    The class count comes from the file's ``fc.weight`` (no fc: a trunk without head). The directory is
    written under a hidden name beside ``out_dir`` and moved into place whole (`storage.move_into_place`),
    so an interrupted export leaves no directory that looks complete and blocks no rerun. A bucket has
    no directory rename: a ``gs://`` ``out_dir`` gets ``variables.msgpack`` first and ``meta.json``, which
    `load` looks for first, last, each file whole; one without ``meta.json`` is incomplete and rewritten.
    Returns the meta dict also written to ``out_dir/meta.json``.
    """
    remote = storage.is_remote(out_dir)
    if storage.exists(storage.join(out_dir, META_FILE) if remote else out_dir):
        raise PretrainedError(f"{out_dir}: already exists; remove it or choose another --out")
    with storage.local_file(_weight_file(weights_file)) as local:
        sd = _read_state_dict(weights_file, local)
        digest = _sha256(local)
    num_classes = int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else None
    model = build(arch, num_classes, width, stage_sizes)
    variables = convert(sd, model, source=weights_file)
    meta = {"arch": arch, "width": width, "stage_sizes": list(model.stage_sizes),
            "num_classes": num_classes, "source": storage.basename(weights_file),
            "sha256": digest, "num_params": num_params(variables)}
    if remote:
        storage.atomic_file(storage.join(out_dir, VARIABLES_FILE), flax.serialization.msgpack_serialize(variables))
        storage.atomic_file(storage.join(out_dir, META_FILE), json.dumps(meta, indent=2).encode())
        return meta
    parent, name = os.path.split(os.path.abspath(out_dir))
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
    os.makedirs(tmp)  # the usual umask permissions, as the directory will have
    try:
        _write(os.path.join(tmp, VARIABLES_FILE), flax.serialization.msgpack_serialize(variables))
        _write(os.path.join(tmp, META_FILE), json.dumps(meta, indent=2).encode())
        storage.move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def load_meta(directory: str) -> dict:
    """The meta.json of a pretrained directory written by ``export``."""
    path = storage.join(directory, META_FILE)
    if not storage.exists(path) or storage.isdir(path):
        raise PretrainedError(f"{path}: missing; create the directory with `python -m "
                              "cleaq_jax.programs.import_weights --torchvision-file F --arch A --out DIR`")
    return json.loads(storage.read_text(path))


def load(directory: str) -> dict:
    """Load a pretrained directory: {'params': ..., 'batch_stats': ...} of float32 numpy arrays."""
    load_meta(directory)
    path = storage.join(directory, VARIABLES_FILE)
    try:
        variables = flax.serialization.msgpack_restore(storage.read_bytes(path))
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path}: unreadable ({e}); re-run the export") from None
    if set(variables) != {"params", "batch_stats"}:
        raise PretrainedError(f"{path}: expected collections params and batch_stats, got {sorted(variables)}")
    return variables


# --------------------------------------------------------------------------- grafting
def _subtree(tree: Mapping, into: Sequence[str], where: str) -> Mapping:
    for i, name in enumerate(into):
        if not isinstance(tree, Mapping) or name not in tree:
            have = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise PretrainedError(f"graft: {where}/{'/'.join(into[:i + 1])} does not exist in the "
                                  f"model's variables (found {have}); check the module path `into`")
        tree = tree[name]
    return tree


def _place(value: np.ndarray, target: Any):
    """``value`` in the target leaf's dtype, on the target's devices/sharding when it has one."""
    value = np.asarray(value, dtype=target.dtype)
    sharding = getattr(target, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)


def graft(variables: Mapping, pretrained: Mapping, into: str | Sequence[str],
          head: str = "fc") -> dict:
    """Put a pretrained ResNet into a sub-tree of a bigger model's variables.

    Args:
      variables: the model's variables, {'params': ..., 'batch_stats': ..., ...}.
      pretrained: {'params', 'batch_stats'} of a ResNet, e.g. ``load(DIR)``.
      into: module path of the ResNet inside the model, 'dr/backbone' or ('dr', 'backbone')
        ('' or (): the whole collection); the same path is used in every collection of
        ``pretrained``. The target may hold modules of its own beside the ResNet's (C-IQA's
        fusion convs): they keep their values.
      head: name of the classifier sub-tree; it is copied only when the target has one of the
        same shapes (same class count) and otherwise keeps the target's initialisation.
    Returns:
      a new variables dict (the inputs are not modified), leaves cast to the target dtype and
      placed with the target's sharding.
    Raises:
      PretrainedError listing every pretrained leaf the target lacks, every target leaf the
      pretrained weights lack, and every shape mismatch (with '/'-joined paths).
    """
    into = tuple(into.split("/")) if isinstance(into, str) and into else tuple(into)
    out, problems = dict(variables), []
    for coll in sorted(pretrained, key=lambda c: c != "params"):  # report params paths first
        where = "/".join((coll,) + into)
        target = flatten_dict(_subtree(variables.get(coll, {}), into, coll))
        new, found, kept = _graft_leaves(target, flatten_dict(pretrained[coll]), where, head)
        problems += found
        if kept and coll == "params":
            logging.info("graft into %s: kept the model's own %s", where, ", ".join(kept))
        out[coll] = _replace(variables[coll], into, unflatten_dict(new))
    if problems:
        raise PretrainedError("graft: the pretrained ResNet does not fit the model at "
                              f"{'/'.join(into) or 'the top level'}:\n  " + "\n  ".join(problems))
    return out


def _graft_leaves(target: dict, source: dict, where: str, head: str):
    """Flat target leaves with the source's copied in: (new leaves, problems, kept module names)."""
    new, problems = dict(target), []
    heads_fit = all(p in target and target[p].shape == np.shape(v) for p, v in source.items() if p[0] == head)
    for path, value in source.items():
        name = f"{where}/{'/'.join(path)}"
        if path[0] == head and not heads_fit:
            continue  # class count differs or the target has no head: keep its own
        if path not in target:
            problems.append(f"{name}: not in the model")
        elif target[path].shape != np.shape(value):
            problems.append(f"{name}: pretrained {np.shape(value)}, model {target[path].shape}")
        else:
            new[path] = _place(value, target[path])
    # Modules the ResNet has must be complete; the model's own extras (fusion convs) keep their values.
    shared = {p[0] for p in source}
    problems += [f"{where}/{'/'.join(p)}: not in the pretrained weights"
                 for p in target if p not in source and p[0] in shared and p[0] != head]
    kept = sorted({p[0] for p in target if p[0] not in shared or (p[0] == head and not heads_fit)})
    return new, problems, kept


def _replace(tree: Mapping, into: Sequence[str], value: Any) -> dict:
    """Copy of ``tree`` with the sub-tree at ``into`` replaced by ``value``."""
    if not into:
        return value
    return {**tree, into[0]: _replace(tree[into[0]], into[1:], value)}
