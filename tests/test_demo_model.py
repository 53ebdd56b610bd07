"""The synthetic picture generator and the shipped demo model (offline, a few seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vitattn.demo import CLASS_NAMES, DEMO_MODEL_DIR
from vitattn.demo.synthetic import (
    DEFAULT_SIZE,
    HELDOUT_SEED_BASE,
    TRAIN_SEED_STRIDE,
    make_dataset,
    make_picture,
    train_batch_seed,
)

# Seeds of this file's pictures: in the held-out range, and apart from the seeds that training uses
# for early stopping (HELDOUT_SEED_BASE) and for its reported accuracy (HELDOUT_SEED_BASE + 1).
TEST_SEED = HELDOUT_SEED_BASE + 2
GEOMETRY_PICTURES = 100
ACCURACY_PICTURES = 200
MIN_ACCURACY = 0.90
MAX_MODEL_BYTES = 5 * 1024 * 1024


def test_same_seed_gives_same_picture() -> None:
    first, again, other = make_picture(TEST_SEED), make_picture(TEST_SEED), make_picture(TEST_SEED + 1)

    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert (first.label, first.box, first.colour, first.fill) == (again.label, again.box, again.colour, again.fill)
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_dataset_is_a_sequence_of_pictures() -> None:
    batch = make_dataset(3, TEST_SEED)
    single = make_picture(TEST_SEED)

    assert batch.images.shape == (3, DEFAULT_SIZE, DEFAULT_SIZE, 3)
    assert batch.images.dtype == np.uint8
    assert np.array_equal(batch.images[0], np.asarray(single.image))
    assert batch.picture(0).box == single.box
    assert batch.picture(0).label == single.label
    assert np.array_equal(make_dataset(3, TEST_SEED).images, batch.images)


def test_boxes_lie_inside_and_match_the_object_pixels() -> None:
    batch = make_dataset(GEOMETRY_PICTURES, TEST_SEED)
    for index in range(GEOMETRY_PICTURES):
        picture = batch.picture(index)
        left, top, right, bottom = picture.box
        assert 0 <= left < right <= DEFAULT_SIZE and 0 <= top < bottom <= DEFAULT_SIZE

        rows, cols = np.nonzero(picture.mask)
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == picture.box

        # the object is drawn flat: its pixels hold only the fill and the (grey) outline colour,
        # and most of them the fill, so the mask (hence the box) is where the object is drawn
        pixels = np.asarray(picture.image)[picture.mask]  # (M, 3)
        is_fill = (pixels == np.array(picture.fill)).all(axis=1)
        outline = pixels[~is_fill]
        assert is_fill.mean() > 0.5
        assert len(np.unique(outline, axis=0)) == 1
        assert outline[0, 0] == outline[0, 1] == outline[0, 2]


def test_labels_are_balanced_and_independent_of_colour() -> None:
    batch = make_dataset(ACCURACY_PICTURES, TEST_SEED)
    counts = np.bincount(batch.labels, minlength=len(CLASS_NAMES))

    assert len(counts) == len(CLASS_NAMES)
    assert counts.min() > ACCURACY_PICTURES / len(CLASS_NAMES) / 2
    # every shape appears in more than one colour family: colour cannot give the label away
    for label in range(len(CLASS_NAMES)):
        assert len(set(batch.colours[batch.labels == label].tolist())) > 1


def test_training_seeds_never_reach_the_heldout_range() -> None:
    assert train_batch_seed(999, TRAIN_SEED_STRIDE - 1) < HELDOUT_SEED_BASE
    with pytest.raises(ValueError):
        train_batch_seed(HELDOUT_SEED_BASE // TRAIN_SEED_STRIDE, 0)
    with pytest.raises(ValueError):
        train_batch_seed(0, TRAIN_SEED_STRIDE)


def test_model_folder_is_small_and_names_its_labels() -> None:
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text(encoding="utf-8"))
    weights = DEMO_MODEL_DIR / "model.safetensors"

    assert config["label_names"] == list(CLASS_NAMES)
    assert config["pretrained_cfg"]["input_size"] == [3, DEFAULT_SIZE, DEFAULT_SIZE]
    assert 0 < weights.stat().st_size < MAX_MODEL_BYTES


def test_shipped_model_classifies_heldout_pictures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm
    import torch
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model(f"local-dir:{DEMO_MODEL_DIR}", pretrained=True).eval()
    data_config = resolve_model_data_config(model)
    transform = create_transform(**data_config, is_training=False)
    assert model.num_classes == len(CLASS_NAMES)
    assert tuple(data_config["input_size"]) == (3, DEFAULT_SIZE, DEFAULT_SIZE)

    batch = make_dataset(ACCURACY_PICTURES, TEST_SEED)
    inputs = torch.stack([transform(batch.picture(i).image) for i in range(len(batch))])  # (N, 3, H, W)
    with torch.no_grad():
        predicted = model(inputs).argmax(dim=1).numpy()  # (N,)

    accuracy = float((predicted == batch.labels).mean())
    assert accuracy >= MIN_ACCURACY, f"held-out accuracy {accuracy:.3f}"
