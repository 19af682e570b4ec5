"""Orbax checkpoints of a training stage: train state, data-iterator position, config, metrics.

A stage writes to ``<workdir>/<stage>/checkpoints/<step>/`` with the items

    state    the train-state pytree (StandardSave), restored onto any mesh or device count
    data     the grain iterator position of every process (optional)
    config   the stage's ConfigDict as JSON, so a run can be resumed or evaluated as it was set up
    metrics  the evaluation metrics passed to `Checkpointer.save` (they rank the best checkpoint)

Retention keeps the latest ``max_to_keep`` checkpoints and, when ``best_metric`` is set, the best
one by that metric as well, however old it is. Every process calls save and restore; orbax
coordinates the writes. `PreemptionGuard` turns SIGTERM into a flag the loop polls to save and
exit cleanly.

This is the only module that talks to orbax. Besides a stage's own `Checkpointer` it reads trained
runs read-only: `restore_state` (a whole train state), `restore_variables` (only the parameters and
BatchNorm statistics of some subnetworks), `read_trained_config`, and on top of them
`load_checkpoint` (any stage, for evaluation and predict) and `restore_teacher` (the vessel teacher,
for the mask pass). Restore targets come from the state builder in `train_state`.
"""

from __future__ import annotations

import json
import logging as pylogging
import math
import os
from collections.abc import Iterable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cleaq_jax.runtime import parallel, storage

PyTree = Any
_policies = ocp.checkpoint_managers


def _as_path(directory: str | os.PathLike) -> epath.Path:
    path = epath.Path(directory)
    # Local paths are made absolute (orbax requires it); URIs such as gs:// are kept as they are.
    return path if "://" in os.fspath(directory) else path.absolute()


class _ExpectedWarningsFilter:
    """Drops orbax's warnings about what this module does on purpose: periodic saves between
    validations without metrics, and read-only managers (every evaluation and restore opens one)."""

    EXPECTED = ("did not provide metrics", "read_only=True, setting save_interval_steps=0",
                "Given directory is read only")

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


_EXPECTED_WARNINGS = _ExpectedWarningsFilter()


# The validation metrics a stage writes (programs/train.py); checkpoints saved between validations
# carry none of them, so a checkpoint without one ranks last rather than failing.
VALIDATION_METRICS = ("val_dr_kappa", "val_dr_accuracy", "val_iqa_kappa", "val_iqa_accuracy",
                      "val_psnr_enhanced", "val_ssim_enhanced")


def _metric_fn(best_metric: str | None, best_mode: str = "max"):
    worst = -math.inf if best_mode == "max" else math.inf

    def metric(metrics: dict[str, Any]) -> float:
        if best_metric is None:
            return 0.0
        if best_metric not in metrics:
            if best_metric in VALIDATION_METRICS:
                return worst
            raise KeyError(f"best_metric={best_metric!r} is not among the saved metrics {sorted(metrics)}")
        value = float(metrics[best_metric])
        return value if math.isfinite(value) else worst

    return metric


def best_metric(cfg: ml_collections.ConfigDict, nets: Iterable[str], validating: bool) -> tuple[str, str]:
    """(metric, mode) that ranks a stage's checkpoints: config.checkpoint_metric / checkpoint_mode, where
    "auto" means the validation DR kappa for a stage that trains DR, else IQA kappa, else IQE's PSNR
    ("max"), or the training loss ("min") when the stage is not validated."""
    metric, mode = str(cfg.checkpoint_metric), str(cfg.checkpoint_mode)
    if metric == "auto":
        nets = tuple(nets)
        metric = ("loss" if not validating else "val_dr_kappa" if "dr" in nets else
                  "val_iqa_kappa" if "iqa" in nets else "val_psnr_enhanced")
    if metric in VALIDATION_METRICS and not validating:
        raise ValueError(f"config.checkpoint_metric={metric!r} is a validation metric, but this stage is not "
                         "validated: set config.eval_every_epochs > 0 and give data.val_split a split of the data")
    if mode == "auto":
        mode = "max" if metric.startswith("val_") else "min"
    return metric, mode


def _manager_options(max_to_keep: int | None, best_metric: str | None, best_mode: str, async_save: bool):
    if best_mode not in ("max", "min"):
        raise ValueError(f"checkpoint best_mode={best_mode!r} must be 'max' or 'min'")
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"checkpoint max_to_keep={max_to_keep} must be at least 1 (or None to keep all)")
    keep: list[Any] = [_policies.LatestN(n=max_to_keep)]
    if best_metric is not None:
        # BestN keeps the top n by the metric; checkpoints saved without metrics fall to LatestN alone.
        keep.append(
            _policies.BestN(
                get_metric_fn=_metric_fn(best_metric, best_mode),
                reverse=best_mode == "min",
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    return ocp.CheckpointManagerOptions(
        # best_fn makes orbax write the "metrics" item; retention itself is the preservation policy.
        best_fn=_metric_fn(best_metric, best_mode),
        best_mode=best_mode,
        preservation_policy=_policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=async_save,
        create=True,
    )


def _handlers() -> dict[str, Any]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }


def _config_json(config: ml_collections.ConfigDict | dict) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=repr))


def _lists_to_tuples(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _lists_to_tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_lists_to_tuples(v) for v in tree)
    return tree


class CorruptCheckpointError(RuntimeError):
    """No checkpoint of a stage's directory reads back whole."""


class Checkpointer:
    """Saves and restores one stage's checkpoints (see the module docstring for the items).

    directory: the stage's checkpoint directory (``<workdir>/<stage>/checkpoints``), created on first use.
    max_to_keep: keep the latest N checkpoints (None: all).
    best_metric, best_mode: also keep the checkpoint with the max/min value of this metric.
    async_save: write in a background thread; call `wait_until_finished` before reading them.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        self.directory = _as_path(directory)
        self.best_metric, self.best_mode = best_metric, best_mode
        pylogging.getLogger("absl").addFilter(_EXPECTED_WARNINGS)  # adding it twice is a no-op
        self._options = _manager_options(max_to_keep, best_metric, best_mode, async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=self._options, item_handlers=_handlers())

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data_iter: Any = None,
        config: ml_collections.ConfigDict | dict | None = None,
        metrics: dict[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves a checkpoint at ``step``; returns False when that step is saved already.

        state: the train-state pytree (jax arrays, any sharding). data_iter: a grain iterator
        (or `parallel.DevicePrefetcher`) whose position to keep. config: the stage config.
        metrics: name -> scalar; needs ``best_metric`` among them when one was set.
        """
        step = int(step)
        if step in self._manager.all_steps():
            logging.info("checkpoint for step %d exists already in %s; not saving again", step, self.directory)
            return False
        if metrics:  # an empty dict ranks nothing: saved as "no metrics"
            metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
            _metric_fn(self.best_metric, self.best_mode)(metrics)  # fail now, not in orbax's background thread
        else:
            metrics = None
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(_config_json(config))
        return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest step when none is set)."""
        return self._manager.best_step() if self.best_metric else self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every step still on disk, ascending."""
        return sorted(self._manager.all_steps())

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with ``step`` (None if it was saved without)."""
        return self._manager.metrics(step)

    def _resolve(self, step: int | None) -> int:
        steps = self._manager.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f"no checkpoint in {self.directory}; train this stage first or check --workdir"
                )
            return self._manager.latest_step()
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; saved steps: {sorted(steps)}")
        return step

    def restore(self, target_abstract_state: PyTree, *, step: int | None = None, data_iter: Any = None) -> PyTree:
        """Restores the train state of ``step`` (default: latest) and, given one, the data position.

        target_abstract_state: pytree of jax.ShapeDtypeStruct WITH shardings (from
            `train_state.abstract_state`): the layout to restore onto, any mesh or device count.
        data_iter: a grain iterator (or `parallel.DevicePrefetcher`) moved in place to the saved
            position of this process.
        """
        step = self._resolve(step)
        _check_target(target_abstract_state)
        if data_iter is not None:
            if "data" not in self._item_names(step):
                raise ValueError(
                    f"checkpoint {self.directory}/{step} holds no data-iterator state; restore without data_iter"
                )
            _restore_position(storage.join(self.directory, str(step), "data"), data_iter)
        items = {"state": ocp.args.StandardRestore(target_abstract_state)}
        return self._manager.restore(step, args=ocp.args.Composite(**items)).state

    def restore_intact(self, target_abstract_state: PyTree, *, data_iter: Any = None) -> tuple[PyTree, int]:
        """Restores the newest checkpoint that reads back whole; returns (state, its step).

        A checkpoint that fails to read (a truncated file, a crash mid-write outside orbax's atomic
        rename) is named in a warning and moved aside to ``corrupt-<step>`` (nothing is deleted), so the
        run resumes from the previous one and later saves of that step are not refused. Raises
        `CorruptCheckpointError` naming the directory when no checkpoint is intact.
        """
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return self.restore(target_abstract_state, step=step, data_iter=data_iter), step
            except Exception as e:  # orbax and tensorstore raise many types for unreadable bytes
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                logging.warning("checkpoint %s/%d cannot be read (%s); moving it to corrupt-%d and trying the "
                                "previous one", self.directory, step, reason, step)
                failures.append(f"{step} ({reason})")
                self._set_aside(step)
        raise CorruptCheckpointError(
            f"no intact checkpoint in {self.directory}: {'; '.join(failures)}. Remove the directory to "
            f"train this stage from the start, or restore it from a backup")

    def _set_aside(self, step: int) -> None:
        """Renames ``<dir>/<step>`` to ``<dir>/corrupt-<step>`` (process 0) and reopens the manager."""
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(self.directory / f"corrupt-{step}")
        parallel.barrier(f"checkpoint-set-aside-{step}")
        self._manager.close()
        self._manager = ocp.CheckpointManager(self.directory, options=self._options, item_handlers=_handlers())

    def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
        """The config saved with ``step`` (default: latest) as a ConfigDict.

        JSON has no tuples: sequences come back as tuples, the way config files write them.
        """
        step = self._resolve(step)
        if "config" not in self._item_names(step):
            raise ValueError(f"checkpoint {self.directory}/{step} was saved without a config")
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return ml_collections.ConfigDict(_lists_to_tuples(restored.config))

    def _item_names(self, step: int) -> set[str]:
        return set(self._manager.item_metadata(step).keys())

    def wait_until_finished(self) -> None:
        """Blocks until every asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _restore_position(data_dir: str, data_iter: Any) -> None:
    """Move ``data_iter`` to the saved position. grain writes one file per process
    (``process_i-of-n.json``); the loaders' positions are the same on every process, so a run resumed
    with another process count reads process 0's file instead of failing."""
    own = storage.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if not storage.exists(own):
        saved = sorted(f for f in storage.listdir(data_dir) if f.startswith("process_") and f.endswith(".json"))
        if not saved:
            raise FileNotFoundError(f"{data_dir} holds no data-iterator position")
        logging.info("data position saved by another process layout (%s); using %s", saved, saved[0])
        own = storage.join(data_dir, saved[0])
    text = storage.read_text(own)
    data_iter.set_state(json.loads(text) if isinstance(data_iter, grain.DatasetIterator) else text.encode())
    if hasattr(data_iter, "start_prefetch"):
        data_iter.start_prefetch()


def _check_target(target: PyTree) -> None:
    leaves = jax.tree.leaves(target)
    bad = [type(x).__name__ for x in leaves if getattr(x, "sharding", None) is None]
    if bad:
        raise ValueError(
            f"restore target has {len(bad)} leaves without a sharding (e.g. {bad[0]}); build it with "
            "train_state.abstract_state(init_fn, mesh, ...) or parallel.abstract_with_shardings"
        )


# --------------------------------------------------------------------------- trained runs, read-only
def _read_only(directory: str | os.PathLike, partial: bool = False) -> ocp.CheckpointManager:
    """A read-only manager of a checkpoint directory; ``partial`` reads the state with a PyTree handler
    (not Standard), so only some of its leaves need a target."""
    handlers = _handlers()
    if partial:
        handlers["state"] = ocp.PyTreeCheckpointHandler()
    pylogging.getLogger("absl").addFilter(_EXPECTED_WARNINGS)  # adding it twice is a no-op
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(_as_path(directory), options=options, item_handlers=handlers)


def _saved_step(manager: ocp.CheckpointManager, directory: Any, step: int | None) -> int:
    steps = manager.all_steps()
    if step is None:
        step = manager.latest_step()
    if step is None or step not in steps:
        raise FileNotFoundError(
            f"no checkpoint {'' if step is None else f'for step {step} '}in {directory} "
            f"(saved steps: {sorted(steps)}); check the checkpoint path in the config"
        )
    return int(step)


def restore_state(directory: str | os.PathLike, target: PyTree, step: int | None = None) -> PyTree:
    """Restores only the train state from a checkpoint directory with a fresh, read-only manager.

    For evaluation and prediction. target: as in `Checkpointer.restore`; step: default latest.
    """
    directory = _as_path(directory)
    with _read_only(directory) as manager:
        step = _saved_step(manager, directory, step)
        _check_target(target)
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state


def restore_variables(directory: str | os.PathLike, target: PyTree, step: int | None = None) -> PyTree:
    """Restores the parameters and BatchNorm statistics of the subnetworks in ``target`` (from
    `factory.abstract_variables`) out of a saved train state, leaving the rest unread (optimizer
    state, other subnetworks). step: default the latest."""
    directory = _as_path(directory)
    with _read_only(directory, partial=True) as manager:
        step = _saved_step(manager, directory, step)
        _check_target(target)
        item = {"params": target.params, "batch_stats": target.batch_stats}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        restored = manager.restore(step, args=ocp.args.Composite(state=args)).state
    return target.replace(params=restored["params"], batch_stats=restored["batch_stats"])


def saved_nets(directory: str | os.PathLike, step: int) -> tuple[str, ...]:
    """The subnetworks ("iqe", "iqa", "dr", "cenet") whose parameters the state saved at ``step`` holds."""
    with _read_only(directory, partial=True) as manager:
        saved = manager.item_metadata(step)["state"]
    return tuple(n for n in ("iqe", "iqa", "dr", "cenet") if n in saved["params"])


def checkpoint_directory(path: str) -> str:
    """The orbax directory of a stage: ``path`` itself or its ``checkpoints/`` folder.

    Raises FileNotFoundError naming ``path`` when neither holds a checkpoint.
    """
    path = os.fspath(path).rstrip("/") if storage.is_remote(path) else os.path.abspath(os.fspath(path))
    for candidate in (storage.join(path, "checkpoints"), path):
        if storage.isdir(candidate) and any(n.isdigit() for n in storage.listdir(candidate)):
            return candidate
    raise FileNotFoundError(
        f"no checkpoint in {path}: pass a stage directory written by training (e.g. <workdir>/stage3) "
        "or its checkpoints/ folder")


def read_trained_config(directory: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a checkpoint was saved with (read-only; JSON lists back to tuples).

    directory: a checkpoints/ folder (see `checkpoint_directory`); step: default the latest.
    """
    with _read_only(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or not storage.isdir(storage.join(directory, str(step), "config")):
            raise FileNotFoundError(f"checkpoint {directory} (step {step}) holds no config item; it was not "
                                    "written by cleaq_jax training")
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(_lists_to_tuples(restored.config))


def select_step(directory: str, which: int | str = "best") -> tuple[int, str]:
    """The step of a checkpoints/ folder to restore, and why, in words.

    which: "best" (the best by the metric the run ranked its checkpoints with, its config's
    checkpoint_metric, e.g. validation DR kappa; the latest when no checkpoint carries that metric),
    "latest", or a step number (an int or its digits).
    """
    with _read_only(directory) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}; check the checkpoint path in the config")
        if isinstance(which, int) or str(which).isdigit():
            return _saved_step(manager, directory, int(which)), f"step {int(which)}, as asked"
        if which == "latest":
            return steps[-1], "latest"
        if which != "best":
            raise ValueError(f"checkpoint step {which!r}: use 'best', 'latest' or a step number")
        cfg = read_trained_config(directory, steps[-1])
        metric, mode = str(cfg.get("checkpoint_metric", "loss")), str(cfg.get("checkpoint_mode", "min"))
        ranked = []
        for step in steps:
            value = (manager.metrics(step) or {}).get(metric)
            if value is not None and math.isfinite(float(value)):
                ranked.append((float(value) if mode == "max" else -float(value), step))
    if not ranked:
        return steps[-1], f"latest: no checkpoint carries {metric}"
    value, step = max(ranked)
    return step, f"best by {metric} = {value if mode == 'max' else -value:.4g}"
