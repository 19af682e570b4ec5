"""What a config builds: the subnetworks as linen modules, and the layout of their variables.

The only reader of config.model. `build_models` gives {"iqe", "iqa", "dr", "cenet"}; `InferenceState`,
`variables` and `abstract_variables` are what inference needs of a trained state (parameters and
BatchNorm statistics per subnetwork) and the restore target for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cleaq_jax.models import cenet as cenet_lib
from cleaq_jax.models import dr as dr_lib
from cleaq_jax.models import iqa as iqa_lib
from cleaq_jax.models import iqe as iqe_lib
from cleaq_jax.models import layers
from cleaq_jax.runtime import parallel

if TYPE_CHECKING:  # only named: the config is read by attribute, so any object shaped like one will do
    import ml_collections

Variables = dict[str, Any]


def compute_dtype(cfg: ml_collections.ConfigDict) -> Any:
    """jnp.float32 or jnp.bfloat16, from config.model.dtype."""
    return jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32


def build_models(cfg: ml_collections.ConfigDict) -> dict[str, nn.Module]:
    """The subnetworks {"iqe", "iqa", "dr", "cenet"} as linen modules, from config.model (the only
    place it is read)."""
    m = cfg.model
    forms = layers.LayerForms(upsample=m.upsample, upsample_init=m.upsample_init, stem_pool=m.stem_pool,
                              scan_blocks=bool(m.scan_blocks))
    common = dict(width=float(m.width), dtype=compute_dtype(cfg), remat=bool(m.remat), forms=forms)
    return {
        "iqe": iqe_lib.IQE(use_seg=bool(m.use_seg), encoder_stages=tuple(m.encoder_stages),
                           blocks_per_level=int(m.uiqe_blocks), uiqe_width=float(m.uiqe_width) or None,
                           residual=bool(m.uiqe_residual), **common),
        "iqa": iqa_lib.IQA(use_lqi=bool(m.use_lqi), num_classes=3, encoder_stages=tuple(m.encoder_stages),
                           classifier_stages=tuple(m.classifier_stages), **common),
        "dr": dr_lib.DRGrader(num_grades=int(cfg.data.num_grades), stage_sizes=tuple(m.classifier_stages),
                              **common),
        "cenet": cenet_lib.CENet(stage_sizes=tuple(m.encoder_stages), **common),
    }


class InferenceState(flax.struct.PyTreeNode):
    """What inference needs of a train state: {subnetwork: params} and {subnetwork: batch_stats}."""

    params: dict[str, Any]
    batch_stats: dict[str, Any]


def variables(state: Any, name: str) -> Variables:
    """The linen variables {"params", "batch_stats"} of one subnetwork of a TrainState or
    InferenceState, for ``module.apply``."""
    return {"params": state.params[name], "batch_stats": state.batch_stats[name]}


def abstract_variables(models: dict[str, nn.Module], nets: tuple[str, ...], image_size: int,
                       mesh: jax.sharding.Mesh) -> InferenceState:
    """Restore target of the inference part of a state: the parameters and BatchNorm statistics of
    ``nets`` at ``image_size`` px, as ShapeDtypeStructs laid out on ``mesh`` like a train state's."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = {n: jax.eval_shape(lambda k, x, m=models[n]: m.init(k, x, train=False), jax.random.key(0), x)
              for n in nets}
    abstract = InferenceState(params={n: v["params"] for n, v in shapes.items()},
                              batch_stats={n: v.get("batch_stats", {}) for n, v in shapes.items()})
    return parallel.abstract_with_shardings(abstract, parallel.state_shardings(abstract, mesh))
