"""Image-classification data sets from tensorflow-datasets (an optional extra)."""

from __future__ import annotations

import numpy as np

from jaxcomp.data._dataset import DataError, Dataset, from_arrays


def _source(tfds, name: str, split: str, data_dir: str | None, download: bool):
    """``tfds.data_source`` for one split, with errors turned into :class:`DataError`."""
    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            builder_kwargs={"file_format": "array_record"},
        )
    except tfds.core.DatasetNotFoundError:
        raise DataError(
            f"tfds has no data set {name!r}; see tfds.list_builders() for the names"
        ) from None
    except (KeyError, ValueError) as e:
        detail = str(e.args[0] if e.args else e).splitlines()[0]
        where = data_dir or "TFDS's default data_dir"
        raise DataError(
            f"tfds:{name} split {split!r} could not be loaded ({detail}); with download="
            f"{download}, it must be prepared in array_record format in {where}: pass "
            "download=True (needs network) or run `tfds build --file_format=array_record`"
        ) from e


def _to_numpy(source, name: str, image_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    examples = [source[i] for i in range(len(source))]
    images = [np.asarray(ex[image_key]) for ex in examples]
    shapes = sorted({x.shape for x in images})
    if len(shapes) > 1:
        raise DataError(f"tfds:{name} has images of several shapes {shapes[:3]}...; resize first")
    images = np.stack(images)
    labels = np.asarray([ex[label_key] for ex in examples])
    return images, labels


def _load_tfds(
    name: str, *, data_dir: str | None, seed: int, validation_fraction: float, download: bool
) -> Dataset:
    """Loads ``tfds:NAME`` through ``tfds.data_source`` (random access, no TensorFlow).

    The test split is TFDS's ``test`` split, else its ``validation`` split, else a
    stratified 20% hold-out of ``train``; the validation split is always held out
    from ``train`` (see :func:`jaxcomp.data.from_arrays`). Images must be 8-bit.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            f"load('tfds:{name}') needs tensorflow-datasets: pip install jaxcomp[tfds]"
        ) from None
    train = _source(tfds, name, "train", data_dir, download)
    info = train.dataset_info
    known = set(info.splits)  # empty when TFDS cannot list them (e.g. under mock_data)
    test_split = next((s for s in ("test", "validation") if not known or s in known), None)
    keys = info.supervised_keys or ("image", "label")
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        raise DataError(f"tfds:{name} has supervised keys {keys!r}; expected (image, label)")
    image_key, label_key = keys
    label = info.features[label_key]
    num_classes = getattr(label, "num_classes", None)
    if num_classes is None:
        raise DataError(f"tfds:{name} feature {label_key!r} is {label!r}, not a ClassLabel")
    x, y = _to_numpy(train, name, image_key, label_key)
    x_test = y_test = None
    if test_split is not None:
        x_test, y_test = _to_numpy(
            _source(tfds, name, test_split, data_dir, download), name, image_key, label_key
        )
    return from_arrays(
        f"tfds:{name}",
        x,
        y,
        x_test,
        y_test,
        max_value=255,
        num_classes=num_classes,
        class_names=tuple(label.names),
        seed=seed,
        validation_fraction=validation_fraction,
    )
