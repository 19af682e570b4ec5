"""grain pipelines: per-process sharding, epoch shuffles, class balance, augmentation, state, padding."""

import collections
import itertools

import cv2
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cleaq_jax.data import balance, decode, pipeline, records
from cleaq_jax.data import shards
from cleaq_jax.data.pipeline import EpochSampling, RecordReading

SIZE = 32
# 24 examples, imbalanced DR grades: 12 x grade 0, 6 x grade 1, 3 x grade 2, 3 x grade 3.
GRADES = [0] * 12 + [1] * 6 + [2] * 3 + [3] * 3
N = len(GRADES)


def _fixture_example(i: int, grade: int) -> dict:
    """Image whose red channel is the retinal mask and whose green channel is the vessel mask; every
    example but each third has a reference: the image with its channels reversed."""
    rng = np.random.default_rng(i)
    blobs = cv2.resize(rng.random((8, 8, 2)), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC) > 0.5
    mask, vessel = blobs[..., 0].astype(np.uint8), blobs[..., 1].astype(np.uint8)
    image = np.stack([mask * 255, vessel * 255, rng.integers(0, 256, (SIZE, SIZE))], -1).astype(np.uint8)
    return {"image": image, "mask": mask, "vessel": vessel if i % 4 else None, "dr_grade": grade,
            "quality": i % 3, "id": f"ex{i:02d}", "source": "test",
            "reference": image[..., ::-1].copy() if i % 3 else None}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    for split in ("train", "test"):
        with shards.ShardWriter(out, "fixture", split, num_shards=3) as writer:
            for i, grade in enumerate(GRADES):
                writer.write(_fixture_example(i, grade))
    return out


def _ids(batches) -> list[int]:
    return [int(h) for b in batches for h in b["id_hash"]]


def _epoch_ids(data_dir, *, global_batch_size=8, num_epochs=1, **sampling) -> list[list[int]]:
    """Per epoch, the id hashes seen by all of 2 simulated processes (process 0's rows first)."""
    sampling = EpochSampling(seed=3, **sampling)
    steps = pipeline.num_batches_per_epoch(data_dir, global_batch_size=global_batch_size, sampling=sampling)
    per_process = [list(pipeline.train_loader(
        data_dir, global_batch_size=global_batch_size, sampling=sampling, num_epochs=num_epochs,
        reading=RecordReading(process_index=p, process_count=2, read_threads=0))) for p in range(2)]
    assert all(len(batches) == steps * num_epochs for batches in per_process)
    return [_ids(per_process[0][e * steps:(e + 1) * steps]) + _ids(per_process[1][e * steps:(e + 1) * steps])
            for e in range(num_epochs)]


def _grade_of_hash():
    return {records.id_hash(f"ex{i:02d}"): g for i, g in enumerate(GRADES)}


# --------------------------------------------------------------------------- sharding and shuffle
def test_natural_epoch_shows_every_example_once_across_two_processes(data_dir):
    all_ids = sorted(records.id_hash(f"ex{i:02d}") for i in range(N))
    for epoch in _epoch_ids(data_dir, num_epochs=2, augment=False):
        assert sorted(epoch) == all_ids


def test_each_epoch_has_a_different_order(data_dir):
    epochs = _epoch_ids(data_dir, num_epochs=3, augment=False)
    assert len({tuple(e) for e in epochs}) == 3


def test_global_batch_does_not_depend_on_process_count(data_dir):
    single = list(pipeline.train_loader(data_dir, global_batch_size=8, sampling=EpochSampling(seed=5), num_epochs=1,
                                        reading=RecordReading(process_index=0, process_count=1, read_threads=0)))
    split = [list(pipeline.train_loader(data_dir, global_batch_size=8, sampling=EpochSampling(seed=5), num_epochs=1,
                                        reading=RecordReading(process_index=p, process_count=2, read_threads=0)))
             for p in range(2)]
    for k, batch in enumerate(single):
        # Process p holds rows p, p + 2, ... of each global batch.
        for p in range(2):
            np.testing.assert_array_equal(batch["image"][p::2], split[p][k]["image"])
            np.testing.assert_array_equal(batch["id_hash"][p::2], split[p][k]["id_hash"])


def test_batch_layout_matches_the_documented_dtypes_and_shapes(data_dir):
    batch = next(pipeline.train_loader(data_dir, global_batch_size=8, sampling=EpochSampling(seed=0),
                                       reading=RecordReading(process_index=1, process_count=2, read_threads=0)))
    layout = {k: (v.dtype, v.shape) for k, v in batch.items()}
    assert layout == {
        "image": (np.uint8, (4, SIZE, SIZE, 3)), "mask": (np.uint8, (4, SIZE, SIZE)),
        "vessel": (np.uint8, (4, SIZE, SIZE)), "has_vessel": (np.bool_, (4,)),
        "reference": (np.uint8, (4, SIZE, SIZE, 3)), "has_reference": (np.bool_, (4,)), "dr_grade": (np.int32, (4,)),
        "quality": (np.int32, (4,)), "id_hash": (np.int32, (4,)), "valid": (np.bool_, (4,))}
    assert set(np.unique(batch["mask"])) <= {0, 1} and set(np.unique(batch["vessel"])) <= {0, 1}
    assert batch["valid"].all()


def test_examples_without_vessel_mask_get_zeros_and_has_vessel_false(data_dir):
    batches = list(pipeline.eval_loader(data_dir, "test", global_batch_size=8,
                                        reading=RecordReading(process_index=0, process_count=1, read_threads=0)))
    has = np.concatenate([b["has_vessel"] for b in batches])
    vessel_sums = np.concatenate([b["vessel"].sum((1, 2)) for b in batches])
    without = {records.id_hash(f"ex{i:02d}") for i in range(0, N, 4)}  # the fixture drops every 4th mask
    np.testing.assert_array_equal(has, [int(h) not in without for b in batches for h in b["id_hash"]])
    assert (vessel_sums[~has] == 0).all() and (vessel_sums[has] > 0).all()


def test_references_are_decoded_and_augmented_with_the_image(data_dir):
    # The fixture's reference is its image with the channels reversed: one warp must move both alike.
    with_reference = {records.id_hash(f"ex{i:02d}") for i in range(N) if i % 3}
    batches = list(pipeline.train_loader(data_dir, global_batch_size=8, sampling=EpochSampling(seed=4), num_epochs=1,
                                         reading=RecordReading(process_index=0, process_count=1, read_threads=0)))
    for batch in batches:
        has = batch["has_reference"]
        np.testing.assert_array_equal(has, [int(h) in with_reference for h in batch["id_hash"]])
        np.testing.assert_array_equal(batch["reference"][has], batch["image"][has][..., ::-1])
        assert not batch["reference"][~has].any()
    assert any(b["has_reference"].any() for b in batches) and any((~b["has_reference"]).any() for b in batches)


def test_eval_padding_rows_have_no_reference(data_dir):
    batches = list(pipeline.eval_loader(data_dir, "test", global_batch_size=10,
                                        reading=RecordReading(process_index=0, process_count=1, read_threads=0)))
    pad = ~batches[-1]["valid"]
    assert pad.any() and not batches[-1]["has_reference"][pad].any() and not batches[-1]["reference"][pad].any()
    by_hash = {records.id_hash(r["id"]): r for r in shards.iter_records(data_dir, "test")}
    for b in batches:
        for h, ok, has, reference in zip(b["id_hash"], b["valid"], b["has_reference"], b["reference"]):
            if ok and has:
                np.testing.assert_array_equal(reference, by_hash[int(h)]["reference"])


def test_remainder_of_an_epoch_is_dropped_and_counted_by_num_batches_per_epoch(data_dir):
    # 24 examples, global batch 10: 2 batches per epoch, 4 examples dropped (a different 4 each epoch).
    assert pipeline.num_batches_per_epoch(data_dir, global_batch_size=10) == 2
    epochs = _epoch_ids(data_dir, global_batch_size=10, num_epochs=2, augment=False)
    assert [len(e) == len(set(e)) == 20 for e in epochs] == [True, True]
    assert set(epochs[0]) != set(epochs[1])


# --------------------------------------------------------------------------- class balance
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_class_frequencies_follow_the_balance_exponent(data_dir, beta):
    n = collections.Counter(GRADES)
    # Paper IV-B: class c is augmented (n_max / n_c) ** beta times as often; totals rounded per class.
    expected = {c: round(n_c * (max(n.values()) / n_c) ** beta) for c, n_c in n.items()}
    assert sum(expected.values()) % 8 == 0  # whole global batches, so nothing is dropped
    grade = _grade_of_hash()
    for epoch in _epoch_ids(data_dir, num_epochs=2, class_balance=beta, augment=False):
        assert collections.Counter(grade[h] for h in epoch) == expected  # tolerance: exact


def test_fractional_repeats_average_to_the_class_rate_over_epochs():
    labels = np.array(GRADES)
    totals = balance.class_totals(collections.Counter(GRADES), 0.5)
    copies = np.stack([np.bincount(balance.epoch_plan(labels, seed=1, epoch=e, class_balance=0.5), minlength=N)
                       for e in range(400)])
    for c, total in totals.items():
        rate = total / GRADES.count(c)
        members = copies[:, labels == c]
        assert set(np.unique(members)) <= {int(np.floor(rate)), int(np.ceil(rate))}
        assert (members.sum(1) == total).all()
        # Every member gets the extra copy equally often: mean within 0.1 of the class rate.
        np.testing.assert_allclose(members.mean(0), rate, atol=0.1)


def test_copies_of_one_example_are_augmented_independently(data_dir):
    batches = list(pipeline.train_loader(data_dir, global_batch_size=8, num_epochs=1,
                                         sampling=EpochSampling(seed=0, class_balance=1.0),
                                         reading=RecordReading(process_index=0, process_count=1, read_threads=0)))
    images = collections.defaultdict(list)
    for batch in batches:
        for h, image in zip(batch["id_hash"], batch["image"]):
            images[int(h)].append(image.tobytes())
    rare = [copies for h, copies in images.items() if _grade_of_hash()[h] in (2, 3)]
    assert all(len(copies) == 4 for copies in rare)
    assert all(len(set(copies)) == 4 for copies in rare)


def test_unknown_labels_appear_once_and_do_not_count_as_a_class():
    labels = np.array([0, 0, 0, 0, 1, -1, -1])
    plan = balance.epoch_plan(labels, seed=0, epoch=0, class_balance=1.0)
    np.testing.assert_array_equal(np.bincount(plan, minlength=7), [1, 1, 1, 1, 4, 1, 1])
    assert balance.epoch_length(labels, 1.0) == 10


def test_num_batches_per_epoch_from_the_manifest_matches_the_loader(data_dir):
    for beta, by in [(0.5, "dr_grade"), (1.0, "quality"), (0.3, "dr_grade")]:
        sampling = EpochSampling(seed=0, class_balance=beta, balance_by=by, augment=False)
        expected = pipeline.num_batches_per_epoch(data_dir, global_batch_size=6, sampling=sampling)
        loader = pipeline.train_loader(data_dir, global_batch_size=6, sampling=sampling, num_epochs=1,
                                       reading=RecordReading(process_index=0, process_count=1, read_threads=0))
        assert sum(1 for _ in loader) == expected


# --------------------------------------------------------------------------- augmentation
def test_augmentation_keeps_image_mask_and_vessel_aligned(data_dir):
    batches = list(pipeline.train_loader(data_dir, global_batch_size=8, sampling=EpochSampling(seed=7), num_epochs=1,
                                         reading=RecordReading(process_index=0, process_count=1, read_threads=0)))
    image = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    vessel = np.concatenate([b["vessel"] for b in batches])
    has = np.concatenate([b["has_vessel"] for b in batches])
    # The fixture's red channel is the retinal mask and its green channel the vessel mask.
    np.testing.assert_array_equal(mask, image[..., 0] > 127)
    np.testing.assert_array_equal(vessel[has], image[has][..., 1] > 127)
    originals = {records.id_hash(f"ex{i:02d}"): _fixture_example(i, g)["mask"] for i, g in enumerate(GRADES)}
    ids = np.concatenate([b["id_hash"] for b in batches])
    moved = [not np.array_equal(m, originals[int(h)]) for m, h in zip(mask, ids)]
    assert sum(moved) >= N - 2  # geometry really changed (identity has probability ~1/2 * 0)


def test_augment_matrix_is_a_rotation_with_flips_about_the_centre():
    rng = np.random.default_rng(0)
    mats = [decode.augment_matrix(rng, 64) for _ in range(400)]
    centre = np.array([31.5, 31.5, 1.0])
    for m in mats:
        np.testing.assert_allclose(m[:, :2] @ m[:, :2].T, np.eye(2), atol=1e-12)  # rigid
        np.testing.assert_allclose(m @ centre, centre[:2], atol=1e-9)  # centre stays put
    dets = np.array([np.linalg.det(m[:, :2]) for m in mats])
    angles = np.array([np.arctan2(m[1, 0], m[0, 0]) for m in mats])
    assert 0.4 < (dets < 0).mean() < 0.6  # an odd number of flips half the time
    assert np.histogram(angles, bins=8, range=(-np.pi, np.pi))[0].min() > 25  # any angle, not multiples of 90


def test_without_augmentation_train_images_are_the_record_images(data_dir):
    batch = next(pipeline.train_loader(data_dir, global_batch_size=8, sampling=EpochSampling(seed=0, augment=False),
                                       reading=RecordReading(process_index=0, process_count=1, read_threads=0)))
    by_hash = {records.id_hash(r["id"]): r for r in shards.iter_records(data_dir, "train")}
    for h, image, mask in zip(batch["id_hash"], batch["image"], batch["mask"]):
        np.testing.assert_array_equal(image, by_hash[int(h)]["image"])
        np.testing.assert_array_equal(mask, by_hash[int(h)]["mask"])


def test_image_size_resizes_every_field(data_dir):
    batch = next(pipeline.eval_loader(data_dir, "test", global_batch_size=4,
                                      reading=RecordReading(image_size=16, process_index=0, process_count=1,
                                                            read_threads=0)))
    assert batch["image"].shape == (4, 16, 16, 3)
    assert batch["mask"].shape == batch["vessel"].shape == (4, 16, 16)
    first = records.decode_record(next(iter(grain.sources.ArrayRecordDataSource(
        shards.split_shards(data_dir, "test")))))
    np.testing.assert_array_equal(batch["image"][0], cv2.resize(first["image"], (16, 16),
                                                                 interpolation=cv2.INTER_AREA))


# --------------------------------------------------------------------------- state
def test_restored_iterator_continues_with_identical_batches(data_dir):
    kwargs = dict(global_batch_size=8, sampling=EpochSampling(seed=11, class_balance=0.5),
                  reading=RecordReading(process_index=1, process_count=2, read_threads=2))
    reference = pipeline.train_loader(data_dir, **kwargs)
    for _ in range(5):  # past the first epoch boundary (4 batches per epoch here)
        next(reference)
    state = reference.get_state()
    expected = [next(reference) for _ in range(4)]
    restored = pipeline.train_loader(data_dir, **kwargs)
    restored.set_state(state)
    for want, got in zip(expected, (next(restored) for _ in range(4))):
        assert want.keys() == got.keys()
        for key in want:
            assert want[key].tobytes() == got[key].tobytes(), key


def test_iterator_state_round_trips_through_an_orbax_checkpoint(data_dir, tmp_path):
    kwargs = dict(global_batch_size=8, sampling=EpochSampling(seed=2),
                  reading=RecordReading(process_index=0, process_count=1, read_threads=0))
    loader = pipeline.train_loader(data_dir, **kwargs)
    for _ in range(3):
        next(loader)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader)))
        manager.wait_until_finished()
    expected = next(loader)
    restored = pipeline.train_loader(data_dir, **kwargs)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    got = next(restored)
    assert got["image"].tobytes() == expected["image"].tobytes()
    np.testing.assert_array_equal(got["id_hash"], expected["id_hash"])


def test_worker_processes_yield_the_same_batches_and_states_as_in_process_loading(data_dir):
    kwargs = dict(global_batch_size=4, sampling=EpochSampling(seed=4), num_epochs=1)
    in_process = list(pipeline.train_loader(
        data_dir, reading=RecordReading(process_index=0, process_count=1, read_threads=0), **kwargs))
    workers = pipeline.train_loader(
        data_dir, reading=RecordReading(process_index=0, process_count=1, worker_count=2), **kwargs)
    try:
        head = [next(workers) for _ in range(2)]
        state = workers.get_state()
        with_workers = head + list(workers)
    finally:
        workers.close()
    assert len(with_workers) == len(in_process) == N // 4
    for want, got in zip(in_process, with_workers):
        assert want["image"].tobytes() == got["image"].tobytes()
    resumed = pipeline.train_loader(
        data_dir, reading=RecordReading(process_index=0, process_count=1, read_threads=0), **kwargs)
    resumed.set_state(state)  # saved with 2 workers, restored without any
    assert next(resumed)["image"].tobytes() == in_process[2]["image"].tobytes()


def test_state_restores_into_another_process_count(data_dir):
    kwargs = dict(global_batch_size=8, sampling=EpochSampling(seed=6))
    single = pipeline.train_loader(data_dir, reading=RecordReading(process_index=0, process_count=1, read_threads=0),
                                   **kwargs)
    for _ in range(3):
        next(single)
    state = single.get_state()
    expected = next(single)
    for p in range(2):
        part = pipeline.train_loader(data_dir, reading=RecordReading(process_index=p, process_count=2, read_threads=0),
                                     **kwargs)
        part.set_state(state)
        np.testing.assert_array_equal(next(part)["image"], expected["image"][p::2])


def test_state_of_a_loader_with_other_settings_is_rejected(data_dir):
    kwargs = dict(global_batch_size=8, reading=RecordReading(process_index=0, process_count=1, read_threads=0))
    state = pipeline.train_loader(data_dir, sampling=EpochSampling(seed=1), **kwargs).get_state()
    with pytest.raises(ValueError, match="does not fit this loader.*'seed': \\(1, 2\\)"):
        pipeline.train_loader(data_dir, sampling=EpochSampling(seed=2), **kwargs).set_state(state)


# --------------------------------------------------------------------------- eval
def test_eval_loader_pads_the_final_batch_with_invalid_rows(data_dir):
    # 24 records, global batch 10 over 2 processes: 3 batches of 5 rows each, 6 padding rows.
    assert pipeline.num_eval_batches(data_dir, "test", global_batch_size=10) == 3
    per_process = [list(pipeline.eval_loader(data_dir, "test", global_batch_size=10,
                                             reading=RecordReading(process_index=p, process_count=2, read_threads=0)))
                   for p in range(2)]
    assert [len(b) for b in per_process] == [3, 3]
    rows = [b for batches in per_process for b in batches]
    assert all(b["image"].shape[0] == 5 for b in rows)
    valid = np.concatenate([b["valid"] for b in rows])
    ids = np.concatenate([b["id_hash"] for b in rows])
    assert sorted(ids[valid].tolist()) == sorted(records.id_hash(f"ex{i:02d}") for i in range(N))
    assert (~valid).sum() == 6
    for b in rows:
        pad = ~b["valid"]
        assert not b["image"][pad].any() and not b["mask"][pad].any() and (b["dr_grade"][pad] == -1).all()


def test_eval_loader_reads_records_in_order_interleaved_over_processes(data_dir):
    order = [records.id_hash(r["id"]) for r in shards.iter_records(data_dir, "test", decode_images=False)]
    per_process = [list(pipeline.eval_loader(data_dir, "test", global_batch_size=8,
                                             reading=RecordReading(process_index=p, process_count=2, read_threads=0)))
                   for p in range(2)]
    global_rows = [h for k in range(3) for pair in zip(per_process[0][k]["id_hash"], per_process[1][k]["id_hash"])
                   for h in pair]
    assert global_rows == order


# --------------------------------------------------------------------------- errors
def test_indivisible_global_batch_names_the_config_key(data_dir):
    with pytest.raises(ValueError, match="global_batch_size=9 .* process count \\(2\\)"):
        pipeline.train_loader(data_dir, global_batch_size=9, sampling=EpochSampling(seed=0),
                              reading=RecordReading(process_index=0, process_count=2))


def test_global_batch_larger_than_an_epoch_is_an_error(data_dir):
    with pytest.raises(ValueError, match="exceeds the 24 examples per epoch"):
        pipeline.train_loader(data_dir, global_batch_size=32, sampling=EpochSampling(seed=0),
                              reading=RecordReading(process_index=0, process_count=1))


def test_unknown_split_lists_the_available_ones(data_dir):
    with pytest.raises(KeyError, match="'valid' is not in .*manifest.json.*'test', 'train'"):
        pipeline.eval_loader(data_dir, "valid", global_batch_size=8,
                             reading=RecordReading(process_index=0, process_count=1))


def test_process_defaults_come_from_jax(data_dir):
    batch = next(pipeline.eval_loader(data_dir, "test", global_batch_size=8))  # one process here
    assert batch["image"].shape[0] == 8


def test_plan_cache_is_bounded_and_survives_pickling():
    import pickle

    cache = balance.PlanCache(np.array(GRADES), 0, 0.5)
    plans = [cache(e) for e in itertools.chain(range(10), [9])]
    assert len(cache._plans) == 2
    np.testing.assert_array_equal(plans[-1], plans[9])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(cache))(3), plans[3])


# --------------------------------------------------------------------------- damaged shards
def _damaged_copy(tmp_path, damage) -> tuple[str, str]:
    """A 2-shard set written with a recorded prep command, one shard damaged; (directory, that shard)."""
    out = str(tmp_path / "shards")
    with shards.ShardWriter(out, "fixture", "train", num_shards=2,
                             extra_manifest={"prep_command": f"python -m cleaq_jax.data_prep.eyeq --out {out}"}) as writer:
        for i, grade in enumerate(GRADES):
            writer.write(_fixture_example(i, grade))
    shard = shards.split_shards(out, "train")[1]
    with open(shard, "rb") as f:
        data = bytearray(f.read())
    with open(shard, "wb") as f:
        f.write(damage(data))
    return out, shard


def _truncated(data: bytearray) -> bytes:
    return bytes(data[: len(data) // 2])


def _scrambled(data: bytearray) -> bytes:
    data[200:300] = b"\xff" * 100  # inside the first record's chunk, whose hash the reader checks
    return bytes(data)


def test_a_truncated_shard_is_named_with_its_rebuild_command_before_any_batch(tmp_path):
    out, shard = _damaged_copy(tmp_path, _truncated)
    balanced = EpochSampling(seed=0, class_balance=0.5)
    for make in (lambda: pipeline.train_loader(out, global_batch_size=4, sampling=balanced),
                 lambda: pipeline.eval_loader(out, "train", global_batch_size=4)):
        with pytest.raises(shards.ShardError) as error:
            make()
        assert shard in str(error.value) and f"`python -m cleaq_jax.data_prep.eyeq --out {out}`" in str(error.value)


@pytest.mark.parametrize("read_threads", [0, 2])
def test_a_corrupt_record_is_named_with_its_shard_and_rebuild_command(tmp_path, read_threads):
    out, shard = _damaged_copy(tmp_path, _scrambled)
    loader = pipeline.eval_loader(out, "train", global_batch_size=4, reading=RecordReading(read_threads=read_threads))
    with pytest.raises(shards.ShardError, match="reading its record 0 failed") as error:
        list(loader)
    assert shard in str(error.value) and "rebuild it with `python -m cleaq_jax.data_prep.eyeq" in str(error.value)
