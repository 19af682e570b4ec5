r"""Export a trained checkpoint's inference, so that it runs without the training stack:

    python -m cleaq_jax.programs.export --checkpoint RUN/stage3 --out MODEL_DIR \
        [--checkpoint-step best|latest|STEP] [--platforms cpu,cuda,tpu]

What predict computes from a checkpoint, as one function serialized by `jax.export`: IQA's quality
probabilities of the processed photograph, IQE's enhancement of it, and DR's grade (of the enhancement
for a stage-3 model, of the photograph for a stage-1 one), with predict's --gate-quality as an input
(enhance, and grade enhanced, only the images IQA does not rate good). The batch size is symbolic, so
any batch runs. MODEL_DIR gets model.json, function.jaxexport and weights.npz
(`cleaq_jax.evaluation.exported` says what each holds); predict runs it with ``--model MODEL_DIR`` where
only jax, numpy and OpenCV are installed.

--platforms: those the function is lowered for (any of cpu, cuda, rocm, tpu; default cpu,cuda). The
lowering needs no such device here. Each file is written under a temporary name in a hidden directory
beside MODEL_DIR, which is then renamed to MODEL_DIR: the directory appears whole or not at all.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cleaq_jax import errors
from cleaq_jax.data import records
from cleaq_jax.evaluation import exported as exported_lib
from cleaq_jax.evaluation import html_report, inference, restore
from cleaq_jax.runtime import cli, console, storage

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda")
BATCH = "batch"  # the name of the symbolic batch dimension


def weight_name(path: tuple) -> str:
    """"params/dr/backbone/fc/kernel" for a leaf's key path in an `InferenceState`."""
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def inference_function(restored: restore.Restored) -> tuple[Any, dict[str, np.ndarray]]:
    """``(fn, weights)``: ``fn(weights, image, mask, gate)`` (the function `exported` describes) and the
    checkpoint's variables as {name: float32 numpy array}."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(restored.state)
    names = [weight_name(path) for path, _ in flat]
    if len(set(names)) != len(names):
        raise ValueError(f"{restored.directory}: two variables share a name; cannot export")
    weights = {name: np.asarray(jax.device_get(leaf)) for name, (_, leaf) in zip(names, flat)}
    odd = sorted({str(w.dtype) for w in weights.values()} - {"float32"})
    if odd:
        raise ValueError(f"{restored.directory}: variables of dtype {', '.join(odd)}; exported weights are float32")
    models, nets = restored.models, restored.nets
    enhance_first = inference.enhance_before_grading(restored.stage)
    can_gate = "iqa" in nets

    def fn(weights: dict[str, jax.Array], image: jax.Array, mask: jax.Array, gate: jax.Array):
        state = jax.tree.unflatten(treedef, [weights[name] for name in names])
        x, m = inference.inputs({"image": image, "mask": mask})
        # Without IQA there is nothing to gate on: the input is then ignored (predict refuses it).
        return inference.inference_outputs(models, state, x, m, nets=nets, enhance_first=enhance_first,
                                           gate_quality=gate if can_gate else False)

    return fn, weights


def export_function(fn, weights: dict[str, np.ndarray], image_size: int,
                    platforms: tuple[str, ...] = DEFAULT_PLATFORMS) -> jax.export.Exported:
    """`jax.export` of ``fn`` for ``platforms``, the batch dimension symbolic."""
    batch, = jax.export.symbolic_shape(BATCH)
    args = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()},
            jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8),
            jax.ShapeDtypeStruct((batch, image_size, image_size), jnp.uint8),
            jax.ShapeDtypeStruct((), jnp.bool_))
    return jax.export.export(jax.jit(fn), platforms=platforms)(*args)


def _shape(aval) -> list:
    return [d if isinstance(d, int) else BATCH for d in aval.shape]


OUTPUT_MEANINGS = {
    "quality_probs": "IQA's probabilities of quality_names for the processed photograph",
    "enhanced": "IQE's enhancement of the photograph, float in [0, 1], zero outside the mask",
    "enhance": "whether the image counts as enhanced (every image; with the gate, those IQA does not rate good)",
    "dr_probs": "DR's probabilities of the grades 0 .. num_grades - 1",
}


def describe(restored: restore.Restored, exported: jax.export.Exported, weights: dict[str, np.ndarray]
             ) -> dict[str, Any]:
    """model.json: what the exported model expects and answers (`cleaq_jax.evaluation.exported`)."""
    cfg = restored.config
    size, grades = int(cfg.data.image_size), int(cfg.data.num_grades)
    outputs = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    dr_input = None
    if "dr" in restored.nets:
        dr_input = ("enhanced" if "iqe" in restored.nets and inference.enhance_before_grading(restored.stage)
                    else "photograph")
    return {
        "format": exported_lib.FORMAT,
        "format_version": exported_lib.FORMAT_VERSION,
        "files": {"function": exported_lib.FUNCTION_FILE, "weights": exported_lib.WEIGHTS_FILE},
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "platforms": list(exported.platforms),
        "stage": restored.stage,
        "nets": list(restored.nets),
        "dr_input": dr_input,
        "quality_gate": "input" if "iqa" in restored.nets else "unavailable (no IQA network)",
        "image_size": size,
        "num_grades": grades,
        "grade_names": list(html_report.GRADE_NAMES_5) if grades == 5 else [str(g) for g in range(grades)],
        "quality_names": list(records.QUALITY_NAMES),
        "preprocessing": {
            "function": "cleaq_jax.data.fundus.preprocess(image_rgb_uint8, image_size)",
            "steps": "find the retinal disc; crop the square around it (black where it leaves the photograph); "
                     "resize it to image_size x image_size (area interpolation when shrinking, cubic when "
                     "enlarging); the mask is the disc intersected with the non-black pixels, and the image "
                     "is zero outside it",
        },
        "inputs": {
            "weights": {"file": exported_lib.WEIGHTS_FILE, "arrays": len(weights),
                        "values": int(sum(w.size for w in weights.values())), "dtype": "float32"},
            "image": {"shape": [BATCH, size, size, 3], "dtype": "uint8", "range": [0, 255],
                      "channels": "RGB", "note": "the preprocessed crop, zero outside the mask"},
            "mask": {"shape": [BATCH, size, size], "dtype": "uint8", "values": [0, 1]},
            "gate": {"shape": [], "dtype": "bool",
                     "meaning": "enhance, and grade enhanced, only the images IQA does not rate good"},
        },
        "outputs": {k: {"shape": _shape(v), "dtype": str(v.dtype), "meaning": OUTPUT_MEANINGS[k]}
                    for k, v in outputs.items()},
        "model": {"compute_dtype": str(cfg.model.dtype), "width": float(cfg.model.width)},
        "source": {"checkpoint": restored.directory, "step": restored.step, "chosen": restored.chosen},
    }


def check_out_dir(out_dir: str) -> str:
    """The absolute path of a new model directory; raises `errors.UserError` when it is remote or taken."""
    if storage.is_remote(out_dir):
        raise errors.StorageError(f"--out {out_dir}: export writes a local directory (renamed into place whole); "
                                  "copy it to the bucket afterwards (gcloud storage cp -r MODEL_DIR gs://...)")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise errors.ConfigError(f"--out {out_dir} exists and is not an empty directory: choose another --out or "
                                 "remove it first")
    return out_dir


def write_model(out_dir: str, files: dict[str, bytes | str]) -> None:
    """Put ``files`` ({name: content}) into the local directory ``out_dir`` at once.

    Each file is written under a temporary name (`storage.atomic_file`) into a hidden directory beside
    ``out_dir``, which is then renamed to it (`storage.move_into_place`): a reader finds no directory or
    the whole one. ``out_dir`` may exist only as an empty directory.
    """
    out_dir = check_out_dir(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(out_dir)}")
    os.makedirs(staging)
    try:
        for name, content in files.items():
            storage.atomic_file(os.path.join(staging, name), content)
        storage.move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _npz(weights: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **weights)  # uncompressed: trained weights hardly compress, and loading stays a copy
    return buffer.getvalue()


def export(restored: restore.Restored, out_dir: str, platforms: tuple[str, ...] = DEFAULT_PLATFORMS
           ) -> dict[str, Any]:
    """Write ``restored``'s inference as an exported model into ``out_dir`` (module doc); returns model.json."""
    fn, weights = inference_function(restored)
    exported = export_function(fn, weights, int(restored.config.data.image_size), platforms)
    meta = describe(restored, exported, weights)
    write_model(out_dir, {exported_lib.FUNCTION_FILE: bytes(exported.serialize()),
                          exported_lib.WEIGHTS_FILE: _npz(weights),
                          exported_lib.MODEL_JSON: json.dumps(meta, indent=2) + "\n"})
    return meta


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def parse_platforms(text: str) -> tuple[str, ...]:
    """"cpu,cuda" -> ("cpu", "cuda"); raises `errors.ConfigError` naming an unknown platform."""
    platforms = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise errors.ConfigError(f"--platforms {text!r}: each must be one of {', '.join(PLATFORMS)} (a comma-separated "
                                 "list, e.g. cpu,cuda,tpu)")
    return platforms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (argv without the program name; default sys.argv[1:])."""
    parser = cli.parser("python -m cleaq_jax.programs.export", __doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="stage directory written by training (e.g. RUN/stage3) or its checkpoints/ folder")
    parser.add_argument("--checkpoint-step", default="best", metavar="best|latest|STEP",
                        help="which of its checkpoints: the best by the run's validation metric (default), "
                             "the latest, or a step number")
    parser.add_argument("--out", required=True, help="the exported model's directory (must not exist, or be empty)")
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help=f"platforms to lower for, of {', '.join(PLATFORMS)} (default "
                             f"{','.join(DEFAULT_PLATFORMS)})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 for bad input: no checkpoint, unknown platform, --out taken)."""
    args = parse_args(argv)
    console.setup(args.verbose)
    return errors.reported(lambda: run(args), args.verbose)


def run(args: argparse.Namespace) -> None:
    """Export what the command line names; raises `errors.UserError` for what cannot be read or written."""
    platforms = parse_platforms(args.platforms)
    check_out_dir(args.out)
    restored = restore.load_checkpoint(args.checkpoint, step=args.checkpoint_step)
    print(f"export: {restored.directory} step {restored.step} ({restored.chosen})", file=sys.stderr)
    meta = export(restored, args.out, platforms)
    sizes = ", ".join(f"{name} {_size(os.path.getsize(os.path.join(args.out, name)))}" for name in exported_lib.FILES)
    print(f"export: {args.out} ({meta['stage']}: {'+'.join(meta['nets'])}, {meta['image_size']} px, "
          f"platforms {', '.join(meta['platforms'])}): {sizes}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
