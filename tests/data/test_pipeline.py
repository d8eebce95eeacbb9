"""The input pipeline: exact evaluation, seeded shuffles, process shards, and augmentation."""

import numpy as np
import pytest

from attnjax import data
from attnjax.data import augment, pipeline
from attnjax.data.dataset import ArraySource, Dataset
from attnjax.validate import InputError


def indexed_dataset(n_train=100, n_test=37):
    """Images whose pixels hold their own index, normalisation off, so batches reveal which examples they hold."""

    def images(n):
        return np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 4, 4, 1)).copy()

    return Dataset(
        name="indexed",
        train=ArraySource(images(n_train), np.arange(n_train) % 10),
        test=ArraySource(images(n_test), np.arange(n_test) % 10),
        class_names=[str(k) for k in range(10)],
        image_shape=(4, 4, 1),
        mean=(0.0,),
        std=(1.0,),
        default_augment="none",
    )


def ids(batch):
    return batch["image"][:, 0, 0, 0].astype(int)


def epoch(ds, batch_size=16, seed=0, epoch=1, **kwargs):
    return [ids(b) for b in pipeline.train_batches(ds, batch_size, seed=seed, epoch=epoch, **kwargs)]


@pytest.mark.parametrize("process_count", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [6, 12, 36])
def test_evaluation_counts_every_example_exactly_once(process_count, batch_size):
    ds = indexed_dataset()
    seen, steps = [], set()
    for p in range(process_count):
        batches = list(pipeline.eval_batches(ds, batch_size, process_index=p, process_count=process_count))
        steps.add(len(batches))
        for b in batches:
            assert b["image"].shape == (batch_size // process_count, 4, 4, 1)
            seen.extend(ids(b)[b["mask"] > 0])
            np.testing.assert_array_equal(b["label"][b["mask"] > 0], ids(b)[b["mask"] > 0] % 10)
    assert len(steps) == 1, "every process must run the same number of evaluation steps"
    assert sorted(seen) == list(range(37))


def test_train_epochs_are_full_shuffled_and_reproducible():
    ds = indexed_dataset()
    first = epoch(ds, epoch=1)
    assert [len(b) for b in first] == [16] * 6  # 100 // 16 full batches
    assert len(set(np.concatenate(first))) == 96
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(epoch(ds, epoch=1)))
    assert not np.array_equal(np.concatenate(first), np.concatenate(epoch(ds, epoch=2)))
    assert not np.array_equal(np.concatenate(first), np.concatenate(epoch(ds, epoch=1, seed=1)))


def test_two_process_shards_cover_the_global_batches_without_overlap():
    ds = indexed_dataset()
    single = epoch(ds, batch_size=16)
    shards = [epoch(ds, batch_size=16, process_index=p, process_count=2) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single)
    for step, global_batch in enumerate(single):
        a, b = shards[0][step], shards[1][step]
        assert len(a) == len(b) == 8 and not set(a) & set(b)
        assert sorted(np.concatenate([a, b])) == sorted(global_batch)  # the same global batch as one process


def test_batch_that_does_not_split_over_processes_is_refused():
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        epoch(indexed_dataset(), batch_size=16, process_count=3)


def test_augmentation_is_reproducible_and_changes_the_images():
    ds = indexed_dataset()

    def first_batch(seed, mode):
        return next(iter(pipeline.train_batches(ds, 16, seed=seed, epoch=1, augment=mode)))["image"]

    np.testing.assert_array_equal(first_batch(0, "crop"), first_batch(0, "crop"))
    assert not np.array_equal(first_batch(0, "crop"), first_batch(0, "none"))  # shifted into zero padding


def natural_images(n=8, h=12, w=10, c=3, dtype=np.uint8):
    rng = np.random.default_rng(0)
    if dtype == np.uint8:
        return rng.integers(1, 256, (n, h, w, c)).astype(np.uint8)
    return rng.uniform(0.01, 1, (n, h, w, c)).astype(dtype)


@pytest.mark.parametrize("mode", ["crop", "flip", "crop+flip", "rrc", "rrc+flip"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augmentation_keeps_shapes_and_dtypes(mode, dtype):
    images = natural_images(dtype=dtype)
    out = augment.augment(images, np.random.default_rng(1), mode)
    assert out.shape == images.shape and out.dtype == images.dtype


def test_no_augmentation_is_the_identity():
    ds = indexed_dataset()
    plain = list(pipeline.train_batches(ds, 16, seed=0, epoch=1, augment="none"))
    order = epoch(ds)
    for batch, expected in zip(plain, order, strict=True):
        np.testing.assert_array_equal(batch["image"], ds.train.get_batch(expected)["image"])


def test_random_crop_shifts_the_image_and_fills_with_zeros():
    images = natural_images(n=32)
    out = augment.random_crop(images, np.random.default_rng(3), padding=2)
    for original, cropped in zip(images, out, strict=True):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = np.zeros_like(original)
                src = original[max(dy, 0) : 12 + min(dy, 0), max(dx, 0) : 10 + min(dx, 0)]
                shifted[max(-dy, 0) : max(-dy, 0) + src.shape[0], max(-dx, 0) : max(-dx, 0) + src.shape[1]] = src
                found |= np.array_equal(shifted, cropped)
        assert found
    assert (out == 0).any()  # some images were shifted into the zero padding


def test_random_flip_mirrors_about_half():
    images = natural_images(n=200)
    out = augment.random_flip(images, np.random.default_rng(4))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 70 < sum(flipped) < 130


def test_normalize_uses_unit_range_pixels():
    images = np.array([[[[0, 255]]]], np.uint8)
    np.testing.assert_allclose(augment.normalize(images, (0.5, 0.5), (0.25, 0.5)), [[[[-2.0, 1.0]]]])


def test_auto_augmentation_follows_the_dataset():
    ds = indexed_dataset()
    assert data.resolve_augment("auto", ds) == "none"
    assert data.resolve_augment("flip", ds) == "flip"
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        data.resolve_augment("rotate", ds)


def test_too_large_update_batch_advice_names_grad_accum():
    with pytest.raises(InputError) as error:
        data.pipeline.steps_per_epoch(1437, 128 * 20)
    message = str(error.value)
    assert "2560" in message and "1437" in message and "--grad-accum" in message and "--batch-size" in message


@pytest.mark.parametrize("height, width", [(12, 10), (224, 224), (20, 200), (200, 20)])
def test_resized_crop_boxes_are_timms_area_and_aspect_ranges_inside_the_image(height, width):
    rng = np.random.default_rng(5)
    boxes = [augment.resized_crop_box(height, width, rng) for _ in range(400)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    if height == width == 224:  # no rounding to speak of: the draws span timm's ranges
        area = np.array([h * w for _, _, h, w in boxes]) / (height * width)
        aspect = np.array([w / h for _, _, h, w in boxes])
        assert area.min() >= 0.079 and area.max() <= 1 and area.min() < 0.15 and area.max() > 0.9
        assert aspect.min() >= 0.74 and aspect.max() <= 1.35 and aspect.min() < 0.8 and aspect.max() > 1.25
    if width / height > 4 / 3 * 2:  # very wide: most draws fit, none is wider than 4:3 allows after rounding
        assert all(w / h <= 4 / 3 + 0.2 for _, _, h, w in boxes)


def test_the_centre_fallback_keeps_the_nearest_aspect_ratio():
    class Misses:  # every draw asks for the whole area at ratio 4:3, which a 10 x 100 strip cannot hold
        def uniform(self, low, high):
            return high

        def integers(self, low, high):
            raise AssertionError("a crop that fits was drawn")

    assert augment.resized_crop_box(10, 100, Misses()) == (0, (100 - 13) // 2, 10, 13)


def test_random_resized_crop_is_pillows_resize_of_the_drawn_box():
    from PIL import Image

    images = natural_images(n=6, h=20, w=16)
    out = augment.random_resized_crop(images, np.random.default_rng(8))
    rng = np.random.default_rng(8)
    for image, got in zip(images, out, strict=True):
        top, left, h, w = augment.resized_crop_box(20, 16, rng)
        box = (left, top, left + w, top + h)
        want = np.asarray(Image.fromarray(image).resize((16, 20), Image.BILINEAR, box=box))
        np.testing.assert_array_equal(got, want)
    floats = augment.random_resized_crop(images.astype(np.float32) / 255, np.random.default_rng(8))
    np.testing.assert_allclose(floats, out / 255, atol=1 / 255 + 1e-6)  # the same crops, without uint8 rounding
