"""Orbax checkpoints, and the only module that talks to orbax: a training stage's `Checkpointer`, and
read-only reads of the checkpoints a trained run left.

A stage writes to ``<workdir>/<stage>/checkpoints/<step>/`` with the items

    state    the train-state pytree (StandardSave), restored onto any mesh or device count
    data     the grain iterator position of every process (optional)
    config   the stage's ConfigDict as JSON, so a run can be resumed or evaluated as it was set up
    metrics  the evaluation metrics passed to `Checkpointer.save` (they rank the best checkpoint)

Retention keeps the latest ``max_to_keep`` checkpoints and, when ``best_metric`` is set, the best
one by that metric as well, however old it is. Every process calls save and restore; orbax
coordinates the writes.

The read-only side, for evaluation, predict and a stage that starts from an earlier one:
`checkpoint_directory` and `select_step` find what to read, `read_trained_config` and `saved_nets`
say what a checkpoint holds, and `restore_state` (a whole train state) and `restore_variables` (only
the parameters and BatchNorm statistics of some subnetworks) read it onto a mesh.
"""

from __future__ import annotations

import contextlib
import itertools
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

from cleaq_jax import errors
from cleaq_jax.runtime import parallel, storage

PyTree = Any
_policies = ocp.checkpoint_managers

# The validation metrics a stage writes (programs/train.py); checkpoints saved between validations
# carry none of them, so a checkpoint without one ranks last rather than failing.
VALIDATION_METRICS = ("val_dr_kappa", "val_dr_accuracy", "val_iqa_kappa", "val_iqa_accuracy",
                      "val_psnr_enhanced", "val_ssim_enhanced")


class _ExpectedWarningsFilter:
    """Drops orbax's warnings about what this module does on purpose: periodic saves between
    validations without metrics, and read-only managers (every evaluation and restore opens one)."""

    EXPECTED = ("did not provide metrics", "read_only=True, setting save_interval_steps=0",
                "Given directory is read only")

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


_EXPECTED_WARNINGS = _ExpectedWarningsFilter()


def _manager(directory: str | os.PathLike, options: ocp.CheckpointManagerOptions,
             partial: bool = False) -> ocp.CheckpointManager:
    """A manager of a checkpoint directory with this module's items; ``partial`` reads the state with
    a PyTree handler (not Standard), so only some of its leaves need a target."""
    pylogging.getLogger("absl").addFilter(_EXPECTED_WARNINGS)  # adding it twice is a no-op
    path = epath.Path(directory)
    # Local paths are made absolute (orbax requires it); URIs such as gs:// are kept as they are.
    path = path if storage.is_remote(directory) else path.absolute()
    handlers = {
        "state": ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(path, options=options, item_handlers=handlers)


def _metric_fn(metric: str | None, mode: str):
    """orbax's ``best_fn``: the value of ``metric`` in a checkpoint's metrics; one without it, or with a
    non-finite value, ranks last. With no metric every checkpoint ranks the same."""
    worst = -math.inf if mode == "max" else math.inf

    def value(metrics: dict[str, Any]) -> float:
        if metric is None:
            return 0.0
        number = float(metrics.get(metric, worst))
        return number if math.isfinite(number) else worst

    return value


def best_metric(metric: str, mode: str, nets: Iterable[str], validating: bool) -> tuple[str, str]:
    """(metric, mode) that ranks a stage's checkpoints, from config.checkpoint_metric / checkpoint_mode:
    "auto" means the validation DR kappa for a stage that trains DR, else IQA kappa, else IQE's PSNR
    ("max"), or the training loss ("min") when the stage is not validated."""
    if metric == "auto":
        nets = tuple(nets)
        metric = ("loss" if not validating else "val_dr_kappa" if "dr" in nets else
                  "val_iqa_kappa" if "iqa" in nets else "val_psnr_enhanced")
    if metric in VALIDATION_METRICS and not validating:
        raise errors.ConfigError(
            f"config.checkpoint_metric={metric!r} is a validation metric, but this stage is not "
            "validated: set config.eval_every_epochs > 0 and give data.val_split a split of the data")
    if mode == "auto":
        mode = "max" if metric.startswith("val_") else "min"
    return metric, mode


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


def _has_item(directory: str | os.PathLike, step: int, item: str) -> bool:
    return storage.isdir(storage.join(directory, str(step), item))


class CheckpointError(errors.CheckpointError, RuntimeError):
    """A checkpoint that cannot be used or written; the message names it and what to do."""


class CorruptCheckpointError(CheckpointError):
    """No checkpoint of a stage's directory reads back whole."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint holds parameters of other shapes than the model it is restored into."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a lost mount); the earlier ones are intact."""


def _write_failure(error: BaseException) -> str | None:
    """What went wrong, in words, when ``error`` (or one it was raised from) is a failed write to the
    file system: an OSError, or tensorstore's error for one (a ValueError whose text carries the
    operating system's message, e.g. "No space left on device [os_error_code='28']"). None otherwise."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return os.strerror(error.errno)
        text = str(error)
        if "os_error_code=" in text or "No space left on device" in text:
            for words in ("No space left on device", "Disk quota exceeded", "Read-only file system",
                          "Input/output error"):
                if words in text:
                    return words
            return text.splitlines()[0][:300] if text else type(error).__name__
        error = error.__cause__ or error.__context__
    return None


def _clear_unfinished(directory: str | os.PathLike) -> None:
    """Deletes what writes that never finished left in ``directory`` (orbax's temporary
    ``<step>.orbax-checkpoint-tmp*`` directories: a full disk, a kill mid-write), before a manager opens it.
    They hold no complete checkpoint. Left in place, orbax deletes one when that step is saved again,
    in a race with its own commit threads that fails the save ("Destination <step> already exists",
    "No such file or directory"). Process 0 deletes; the others wait for it."""
    path = epath.Path(directory)
    if jax.process_index() == 0 and path.exists():
        for left in path.glob("*.orbax-checkpoint-tmp*"):
            logging.info("removing %s, left by a checkpoint write that did not finish", left)
            left.rmtree() if left.is_dir() else left.unlink()
    parallel.barrier(f"checkpoint-clear-unfinished-{next(_OPENED)}")  # every process opens the same sequence


_OPENED = itertools.count()


class Checkpointer:
    """Saves one stage's checkpoints (see the module docstring for the items) and resumes from them.

    directory: the stage's checkpoint directory (``<workdir>/<stage>/checkpoints``), created on first use.
    max_to_keep: keep the latest N checkpoints (None: all).
    best_metric, best_mode ("max" or "min"): also keep the checkpoint with the best value of this metric.
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
        keep: list[Any] = [_policies.LatestN(n=max_to_keep)]
        if best_metric is not None:
            # BestN keeps the top n by the metric; checkpoints saved without metrics fall to LatestN alone.
            keep.append(_policies.BestN(get_metric_fn=_metric_fn(best_metric, best_mode),
                                        reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False))
        self._options = ocp.CheckpointManagerOptions(
            # best_fn makes orbax write the "metrics" item; retention itself is the preservation policy.
            best_fn=_metric_fn(best_metric, best_mode),
            best_mode=best_mode,
            preservation_policy=_policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.best_metric = best_metric
        _clear_unfinished(directory)
        self._manager = _manager(directory, self._options)
        self.directory = self._manager.directory
        # The newest step known complete on disk, and the one an asynchronous save is still writing.
        self._complete, self._writing = self._manager.latest_step(), None

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
        metrics: name -> scalar; needs ``best_metric`` among them when one was set, unless it is a
        validation metric (checkpoints between validations lack those).
        """
        step = int(step)
        if step in self._manager.all_steps():
            logging.info("checkpoint for step %d exists already in %s; not saving again", step, self.directory)
            return False
        if metrics:  # an empty dict ranks nothing: saved as "no metrics"
            metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
            missing = self.best_metric is not None and self.best_metric not in metrics
            if missing and self.best_metric not in VALIDATION_METRICS:  # a name never logged ranks nothing
                raise KeyError(f"best_metric={self.best_metric!r} is not among the saved metrics {sorted(metrics)}")
        else:
            metrics = None
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(_config_json(config))
        self.wait_until_finished()  # a failure of the previous save is reported as that step's
        with self._write_errors(step):
            saved = self._write(step, ocp.args.Composite(**items), metrics, force)
        if saved:
            self._writing = step
        return saved

    def _write(self, step: int, args: ocp.args.Composite, metrics: dict[str, float] | None, force: bool) -> bool:
        """Start writing one checkpoint (orbax: into a temporary directory renamed to ``<step>`` when
        complete). Every checkpoint write of a stage passes here."""
        return self._manager.save(step, args=args, metrics=metrics, force=force)

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        """A failed write of checkpoint ``step`` (a full disk, ...) as one `CheckpointWriteError` naming
        it and the newest complete checkpoint, which a rerun resumes from; other errors pass unchanged."""
        try:
            yield
        except Exception as e:
            reason = _write_failure(e)
            if reason is None:
                raise
            path = storage.join(self.directory, str(step)) if step is not None else str(self.directory)
            kept = (f"the checkpoint of step {self._complete} is intact" if self._complete is not None
                    else "no earlier checkpoint exists")
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {reason}. The run stopped; {kept}: free space there (or fix "
                f"the disk) and run the same command again to resume") from e

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def restore_intact(self, target_abstract_state: PyTree, *, data_iter: Any = None) -> tuple[PyTree, int]:
        """Restores the newest checkpoint that reads back whole; returns (state, its step).

        target_abstract_state: pytree of jax.ShapeDtypeStruct WITH shardings (from
            `training.state.abstract_state`): the layout to restore onto, any mesh or device count.
        data_iter: a grain iterator (or `parallel.DevicePrefetcher`) moved in place to the saved
            position of this process.

        A checkpoint that fails to read (a truncated file, a crash mid-write outside orbax's atomic
        rename) is named in a warning and moved aside to ``corrupt-<step>`` (nothing is deleted), so the
        run resumes from the previous one and later saves of that step are not refused. Raises
        `CorruptCheckpointError` naming the directory when no checkpoint is intact.
        """
        _check_target(target_abstract_state)
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            step_dir = storage.join(self.directory, str(step))
            # A wrong request, not damage: raised before the try, so no intact checkpoint is set aside.
            if data_iter is not None and not _has_item(self.directory, step, "data"):
                raise errors.CheckpointError(
                    f"checkpoint {step_dir} holds no data-iterator state; restore without data_iter")
            try:
                if data_iter is not None:
                    _restore_position(storage.join(step_dir, "data"), data_iter)
                args = ocp.args.Composite(state=ocp.args.StandardRestore(target_abstract_state))
                state = self._manager.restore(step, args=args).state
                self._complete = step
                return state, step
            except Exception as e:  # orbax and tensorstore raise many types for unreadable bytes
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                logging.warning("checkpoint %s cannot be read (%s); moving it to corrupt-%d and trying the "
                                "previous one", step_dir, reason, step)
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
        self._manager = _manager(self.directory, self._options)

    def wait_until_finished(self) -> None:
        """Blocks until every asynchronous save is on disk; `CheckpointWriteError` if one failed."""
        with self._write_errors(self._writing):
            self._manager.wait_until_finished()
        if self._writing is not None:
            self._complete, self._writing = self._writing, None

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # Leaving on an error: the pending save still completes, but a failure of it (the same full disk)
        # must not hide the error that is on its way out.
        try:
            self.close()
        except Exception as e:  # noqa: BLE001
            logging.warning("while stopping on an error, the checkpoint manager of %s failed too: %s",
                            self.directory, str(e).splitlines()[0] if str(e) else type(e).__name__)


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
            "training.state.abstract_state(init_fn, mesh, ...) or parallel.abstract_with_shardings"
        )


# --------------------------------------------------------------------------- trained runs, read-only
def _read_only(directory: str | os.PathLike, partial: bool = False, best_fn: Any = None,
               best_mode: str = "max") -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, best_fn=best_fn, best_mode=best_mode)
    return _manager(directory, options, partial)


def _saved_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    """``step`` (default: the latest) when ``manager`` holds it; FileNotFoundError naming the directory if not."""
    steps = manager.all_steps()
    if step is None:
        step = manager.latest_step()
    if step is None or step not in steps:
        raise errors.MissingError(
            f"no checkpoint {'' if step is None else f'for step {step} '}in {manager.directory} "
            f"(saved steps: {sorted(steps)}); check the checkpoint path in the config"
        )
    return int(step)


def restore_state(directory: str | os.PathLike, target: PyTree, step: int | None = None) -> PyTree:
    """Restores the train state of ``step`` (default: the latest) from a checkpoint directory.

    target: pytree of jax.ShapeDtypeStruct with shardings, as for `Checkpointer.restore_intact`.
    """
    _check_target(target)
    with _read_only(directory) as manager:
        step = _saved_step(manager, step)
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """The steps a checkpoints/ folder holds, oldest first (none when the folder does not exist)."""
    if not storage.isdir(directory):
        return []
    with _read_only(directory) as manager:
        return sorted(int(s) for s in manager.all_steps())


def _shape_mismatch(saved: PyTree, wanted: PyTree, prefix: str) -> str | None:
    """The first leaf of ``wanted`` (shapes) that ``saved`` (orbax metadata) lacks or holds with another
    shape, in words; None when every leaf matches."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(wanted):
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        node = saved
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                return f"{'/'.join([prefix, *keys])} is missing there, shaped {tuple(leaf.shape)} here"
        if tuple(node.shape) != tuple(leaf.shape):
            return f"{'/'.join([prefix, *keys])} is shaped {tuple(node.shape)} there, {tuple(leaf.shape)} here"
    return None


def restore_variables(directory: str | os.PathLike, target: PyTree, step: int | None = None) -> PyTree:
    """Restores the parameters and BatchNorm statistics of the subnetworks in ``target`` (from
    `factory.abstract_variables`) out of a saved train state, leaving the rest unread (optimizer
    state, other subnetworks). step: default the latest.

    Raises `CheckpointMismatchError`, before reading any array, naming the first parameter whose saved
    shape differs from ``target``'s (a checkpoint of another model size or architecture)."""
    _check_target(target)
    with _read_only(directory, partial=True) as manager:
        step = _saved_step(manager, step)
        item = {"params": target.params, "batch_stats": target.batch_stats}
        saved = manager.item_metadata(step)["state"]
        for name in ("params", "batch_stats"):
            mismatch = _shape_mismatch(dict(saved.get(name) or {}), item[name], name)
            if mismatch:
                raise CheckpointMismatchError(
                    f"checkpoint {storage.join(manager.directory, str(step))} holds another model shape: {mismatch} "
                    "(the config.model settings, e.g. model.width, differ from those it was trained with)")
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
    path = storage.absolute(path)
    for candidate in (storage.join(path, "checkpoints"), path):
        if storage.isdir(candidate) and any(n.isdigit() for n in storage.listdir(candidate)):
            return candidate
    raise errors.MissingError(
        f"no checkpoint in {path}: pass a stage directory written by training (e.g. <workdir>/stage3) "
        "or its checkpoints/ folder")


def read_trained_config(directory: str | os.PathLike, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a checkpoint was saved with (JSON lists back to tuples, as config files write them).

    directory: a checkpoints/ folder (see `checkpoint_directory`); step: default the latest.
    """
    with _read_only(directory) as manager:
        step = _saved_step(manager, step)
        if not _has_item(manager.directory, step, "config"):
            raise errors.MissingError(f"checkpoint {manager.directory}/{step} holds no config item; it was not "
                                      "written by cleaq_jax training")
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(_lists_to_tuples(restored.config))


def select_step(directory: str, which: int | str = "best") -> tuple[int, str]:
    """The step of a checkpoints/ folder to restore, and why, in words.

    which: "best" (the best by the metric the run ranked its checkpoints with, its config's
    checkpoint_metric, e.g. validation DR kappa; the latest when no checkpoint carries that metric),
    "latest", or a step number (an int or its digits).
    """
    if which == "best":
        cfg = read_trained_config(directory)
        metric, mode = str(cfg.checkpoint_metric), str(cfg.checkpoint_mode)
        rank = _metric_fn(metric, mode)
        with _read_only(directory, best_fn=rank, best_mode=mode) as manager:
            best, latest = manager.best_step(), _saved_step(manager, None)
            value = rank(manager.metrics(best)) if best is not None else math.nan
        if not math.isfinite(value):  # the best ranks last: none of them carries the metric
            return latest, f"latest: no checkpoint carries {metric}"
        return best, f"best by {metric} = {value:.4g}"
    with _read_only(directory) as manager:
        if which == "latest":
            return _saved_step(manager, None), "latest"
        if isinstance(which, int) or str(which).isdigit():
            return _saved_step(manager, int(which)), f"step {int(which)}, as asked"
    raise errors.ConfigError(f"checkpoint step {which!r}: use 'best', 'latest' or a step number")
