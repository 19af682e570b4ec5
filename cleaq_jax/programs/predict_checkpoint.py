"""predict's checkpoint backend: a trained checkpoint restored onto the devices as predict's model.

`predict` imports this module only for ``--checkpoint``, so that predicting from an exported model needs
neither flax nor orbax nor the model code. `CheckpointModel` answers what `predict` asks of a model (the
forward pass of `inference.compiled_inference` on a batch split over the device mesh) and draws what
only the model code can: Grad-CAM heatmaps and the report (`explain`).
"""

from __future__ import annotations

import jax
import numpy as np

from cleaq_jax.data import records
from cleaq_jax.evaluation import inference, restore
from cleaq_jax.programs import explain as explain_lib
from cleaq_jax.runtime import parallel


class CheckpointModel:
    """A restored checkpoint as predict's model: directory, stage, nets, image_size, num_grades,
    quality_names, description; called as model(image, mask, gate) on uint8 batches."""

    def __init__(self, restored: restore.Restored, mesh: jax.sharding.Mesh | None = None):
        self.restored = restored
        self.mesh = parallel.make_mesh(-1, 1) if mesh is None else mesh
        self.directory, self.stage, self.nets = restored.directory, restored.stage, restored.nets
        self.image_size = int(restored.config.data.image_size)
        self.num_grades = int(restored.config.data.num_grades)
        self.quality_names = records.QUALITY_NAMES
        self.description = f"{restored.directory} step {restored.step} ({restored.chosen})"

    def check_batch(self, batch_size: int) -> None:
        """Raises ValueError unless batch_size splits evenly over the devices."""
        parallel.check_batch_divisible(batch_size, self.mesh, "--batch-size")

    def __call__(self, image: np.ndarray, mask: np.ndarray, gate: bool) -> dict[str, np.ndarray]:
        """`inference.inference_outputs` for image (B, S, S, 3) uint8 and mask (B, S, S) uint8, as numpy."""
        fn = inference.compiled_inference(self.restored.models, self.nets, gate_quality=gate,
                                          enhance_first=inference.enhance_before_grading(self.stage))
        m = mask.astype(np.float32)
        x = image.astype(np.float32) / 255.0 * m[..., None]
        batch = parallel.global_batch({"x": x, "mask": m}, self.mesh)
        out = jax.device_get(fn(self.restored.state, batch["x"], batch["mask"]))
        return {k: np.asarray(v) for k, v in out.items()}

    def outputs(self, out_dir: str, *, explain: bool, report_html: bool) -> explain_lib.Outputs:
        """Where the heatmaps, crops and report.html of a run go."""
        r = self.restored
        return explain_lib.Outputs(out_dir, explain=explain, report_html=report_html,
                                   subtitle=f"{r.directory} ({r.stage}, step {r.step})")

    def heatmaps(self, images: list[np.ndarray], masks: list[np.ndarray], out: dict[str, np.ndarray],
                 batch_size: int) -> list[dict[str, np.ndarray]]:
        """`explain.padded_heatmaps` of the grades predict reports for these photographs."""
        return explain_lib.padded_heatmaps(self.restored, images, masks, out, batch_size)


def open_checkpoint(path: str, step: int | str = "best", mesh: jax.sharding.Mesh | None = None
                    ) -> CheckpointModel:
    """`restore.load_checkpoint` of a stage directory onto ``mesh`` (default every device), as predict's model."""
    mesh = parallel.make_mesh(-1, 1) if mesh is None else mesh
    return CheckpointModel(restore.load_checkpoint(path, mesh, step=step), mesh)
