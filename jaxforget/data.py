"""Datasets with stable sample ids, seeded core/user/test splits, and a TensorFlow-free tfds reader.

**Ids.** Every sample of a :class:`Dataset` carries an ``int64`` id that never changes: subsets keep the
ids of their parent, and rows are always stored in increasing id order. Forget requests, the deletion
ledger, retrain oracles and reports all speak in ids, never in row positions, so that removing samples
never renumbers the others.

**Splits.** :func:`make_splits` draws, per class and from one seeded ``numpy`` generator, a held-out
test set and then partitions the remaining training set ``D`` into *core* samples (never forgotten; the
mixed-privacy methods train their core weights on them) and *user* samples (the deletable rest). The
same inputs always give the same id sets, and :meth:`Splits.to_json` records sizes, content fingerprints
and hashes of the id lists so that a report pins down exactly which data it was computed on.

**tfds without TensorFlow.** :func:`load_tfds` reads a dataset that was already prepared in the
``array_record`` format with ``tfds.data_source`` (random access, batched ``__getitems__``).
``tfds.load``, ``as_dataset`` and ``tfds.as_numpy`` all need TensorFlow and are never called, and
``download=False`` keeps a missing dataset from silently triggering a (TensorFlow-dependent) build.
Prepared datasets keep their record order, so a record's index within its split is a stable id.
Decoding ``tfds.features.Image`` records uses PIL (or OpenCV if installed).

Everything here is host-side ``numpy``; moving arrays to devices is the caller's job.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
import tqdm

from jaxforget import errors

# Records per ``__getitems__`` call: big enough to amortise the per-call overhead, small enough that a
# batch of decoded CIFAR/ImageNet-64 images stays a few MB.
_TFDS_READ_BATCH = 1024
# Below this many records reading takes well under a second and a progress bar is only noise.
_TFDS_PROGRESS_MIN = 10_000
# Fixed so that synthetic sets drawn with different seeds are samples of one and the same task.
_SYNTHETIC_TASK_SEED = 20240917
_SYNTHETIC_NUM_BASES = 12
_SYNTHETIC_CHUNK = 2048


def _read_only(a: np.ndarray) -> np.ndarray:
    # A read-only view makes the frozen dataclass actually immutable without copying large image arrays,
    # and leaves the caller's own array writable.
    view = a.view()
    view.flags.writeable = False
    return view


def _as_ids(ids: Any, what: str) -> np.ndarray:
    """Converts an integer sequence (or scalar) to an int64 array, raising ShapeDtypeError otherwise."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(arr.shape, np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise errors.ShapeDtypeError(f"{what} must be integers, got dtype {arr.dtype}.")
    return arr.astype(np.int64)


def _sha256_ids(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def _check_int(value: Any, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise errors.ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory labelled image set with stable integer ids (host numpy arrays).

    Construction validates everything and normalises ``y`` to int32 and ``ids`` to int64; the stored arrays
    are read-only views. Equality and hashing are by identity (arrays have no cheap ``==``); compare
    :meth:`fingerprint` values for content equality.

    Attributes:
      x: ``[n, H, W, C]`` float32 in ``[0, 1]``, NHWC.
      y: ``[n]`` int32 class labels in ``[0, num_classes)``.
      ids: ``[n]`` int64, unique and strictly increasing; a sample's id never changes.
      num_classes: number of classes (labels of a subset need not cover all of them).
      name: a human-readable name used in messages and reports.

    Raises:
      ShapeDtypeError: ``x`` not 4-D float32, ``y``/``ids`` not 1-D integer of length ``n``.
      NonFiniteError: NaN or Inf in ``x``.
      ConfigError: pixels outside ``[0, 1]``, labels outside ``[0, num_classes)``, duplicate or
        unsorted ids, ``num_classes < 1``.

    Examples:
      >>> ds = Dataset(x=np.zeros((3, 2, 2, 1), np.float32), y=np.array([0, 1, 1]),
      ...              ids=np.array([4, 7, 9]), num_classes=2, name="tiny")
      >>> len(ds), ds.y.dtype.name, ds.ids.dtype.name
      (3, 'int32', 'int64')
    """

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    num_classes: int
    name: str = ""

    def __post_init__(self):
        label = f"Dataset {self.name!r}" if self.name else "Dataset"
        num_classes = _check_int(self.num_classes, f"{label}: num_classes", minimum=1)

        x = np.asarray(self.x)
        if x.ndim != 4 or x.dtype != np.float32:
            raise errors.ShapeDtypeError(
                f"{label}: x must be a 4-D [n, H, W, C] float32 array, got shape {x.shape} and dtype "
                f"{x.dtype}."
            )
        n = x.shape[0]
        y = np.asarray(self.y)
        if y.ndim != 1 or y.shape[0] != n or not np.issubdtype(y.dtype, np.integer):
            raise errors.ShapeDtypeError(
                f"{label}: y must be a 1-D integer array of length {n} (one label per image), got shape "
                f"{y.shape} and dtype {y.dtype}."
            )
        ids = np.asarray(self.ids)
        if ids.ndim != 1 or ids.shape[0] != n or not np.issubdtype(ids.dtype, np.integer):
            raise errors.ShapeDtypeError(
                f"{label}: ids must be a 1-D integer array of length {n}, got shape {ids.shape} and "
                f"dtype {ids.dtype}."
            )

        if n:
            # min/max propagate NaN and expose Inf without allocating an [n, H, W, C] mask.
            lo, hi = x.min(), x.max()
            if not (np.isfinite(lo) and np.isfinite(hi)):
                errors.check_finite(x, f"{label}: images x")
            if lo < 0 or hi > 1:
                raise errors.ConfigError(
                    f"{label}: pixel values must lie in [0, 1], got min {float(lo)} and max {float(hi)}."
                )
            bad = (y < 0) | (y >= num_classes)
            if bad.any():
                raise errors.ConfigError(
                    f"{label}: labels must lie in [0, {num_classes}), got "
                    f"{errors._preview(np.unique(y[bad]))} (at ids {errors._preview(ids[bad])})."
                )
            steps = np.diff(ids)
            if (steps == 0).any():
                raise errors.ConfigError(f"{label}: duplicate ids {errors._preview(ids[1:][steps == 0])}.")
            if (steps < 0).any():
                i = int(np.argmax(steps < 0))
                raise errors.ConfigError(
                    f"{label}: ids must be strictly increasing (rows sorted by id), but id {ids[i + 1]} "
                    f"follows id {ids[i]} at row {i + 1}."
                )

        object.__setattr__(self, "num_classes", num_classes)
        object.__setattr__(self, "x", _read_only(x))
        object.__setattr__(self, "y", _read_only(y.astype(np.int32, copy=False)))
        object.__setattr__(self, "ids", _read_only(ids.astype(np.int64, copy=False)))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        return tuple(int(d) for d in self.x.shape[1:])

    def index_of(self, ids: Any) -> np.ndarray:
        """Row positions of the given ids in this dataset.

        Args:
          ids: integer id(s), any shape (e.g. ``[k]``).

        Returns:
          int64 array of the same shape as ``ids``: ``self.ids[result] == ids``.

        Raises:
          ShapeDtypeError: non-integer ids.
          UnknownIdsError: some ids are not in this dataset (all of them are named, up to a preview limit).

        Examples:
          >>> ds = Dataset(np.zeros((3, 1, 1, 1), np.float32), np.array([0, 1, 0]), np.array([4, 7, 9]), 2)
          >>> ds.index_of([9, 4]).tolist()
          [2, 0]
        """
        arr = _as_ids(ids, "Ids")
        pos = np.searchsorted(self.ids, arr)
        found = np.zeros(arr.shape, bool)
        inside = pos < len(self.ids)
        found[inside] = self.ids[pos[inside]] == arr[inside]
        if not found.all():
            missing = np.unique(arr[~found])
            where = f" {self.name!r}" if self.name else ""
            raise errors.UnknownIdsError(
                f"Unknown sample ids (not in dataset{where}): {errors._preview(missing)}."
            )
        return pos.astype(np.int64)

    def subset(self, ids: Any) -> Dataset:
        """The rows with the given ids, in increasing id order (duplicates in ``ids`` are ignored).

        Args:
          ids: ``[k]`` integer ids, all present in this dataset; may be empty.

        Returns:
          A :class:`Dataset` with the same ``num_classes`` and ``name`` and the original ids.

        Raises:
          ShapeDtypeError: non-integer ids.
          UnknownIdsError: some ids are not in this dataset.

        Examples:
          >>> ds = Dataset(np.zeros((3, 1, 1, 1), np.float32), np.array([0, 1, 0]), np.array([4, 7, 9]), 2)
          >>> ds.subset([9, 4, 9]).ids.tolist()
          [4, 9]
        """
        wanted = np.unique(_as_ids(ids, "Ids").ravel())
        pos = self.index_of(wanted)
        return Dataset(self.x[pos], self.y[pos], self.ids[pos], self.num_classes, self.name)

    def fingerprint(self) -> str:
        """A short content key (16 hex digits of a sha256) over ``x``, ``y``, ``ids`` and ``num_classes``.

        The name is not part of it: renaming a dataset does not invalidate caches keyed by its content.

        Examples:
          >>> ds = Dataset(np.zeros((2, 1, 1, 1), np.float32), np.array([0, 1]), np.array([0, 1]), 2)
          >>> len(ds.fingerprint()), ds.fingerprint() == ds.subset([0, 1]).fingerprint()
          (16, True)
        """
        h = hashlib.sha256(b"jaxforget.data.Dataset/v1")
        h.update(repr((self.x.shape, self.num_classes)).encode())
        # Fixed little-endian encodings make the key independent of the host's byte order.
        h.update(np.ascontiguousarray(self.x, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(self.y, dtype="<i4").tobytes())
        h.update(np.ascontiguousarray(self.ids, dtype="<i8").tobytes())
        return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """A training set ``D`` partitioned into core and user samples, plus a held-out test set.

    Ids are only meaningful within their own dataset: the train and test ids may overlap when the two come
    from different tfds splits (each numbered from 0).

    Attributes:
      train: the task training set ``D`` (core + user).
      test: held-out test set.
      core_ids: ``[n_core]`` int64 sorted ids of train samples that are core (never forgotten).
      user_ids: ``[n_user]`` int64 sorted ids of the rest of train (deletable).
      seed: the seed the split was drawn with.

    Raises:
      ConfigError: core and user ids overlap, or together differ from ``train.ids``.
    """

    train: Dataset
    test: Dataset
    core_ids: np.ndarray
    user_ids: np.ndarray
    seed: int

    def __post_init__(self):
        core = np.sort(_as_ids(self.core_ids, "core_ids").ravel())
        user = np.sort(_as_ids(self.user_ids, "user_ids").ravel())
        both = np.intersect1d(core, user)
        if both.size:
            raise errors.ConfigError(f"Ids are both core and user: {errors._preview(both)}.")
        union = np.union1d(core, user)
        if union.size != core.size + user.size or not np.array_equal(union, self.train.ids):
            extra = np.setdiff1d(union, self.train.ids)
            left = np.setdiff1d(self.train.ids, union)
            raise errors.ConfigError(
                "core_ids and user_ids must partition train.ids: "
                f"{errors._preview(extra)} are not in train, {errors._preview(left)} are in neither."
            )
        object.__setattr__(self, "core_ids", _read_only(core))
        object.__setattr__(self, "user_ids", _read_only(user))
        object.__setattr__(self, "seed", int(self.seed))

    def core(self) -> Dataset:
        """The core samples, ``train.subset(core_ids)``."""
        return self.train.subset(self.core_ids)

    def user(self) -> Dataset:
        """The user (deletable) samples, ``train.subset(user_ids)``."""
        return self.train.subset(self.user_ids)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary for reports: sizes, seed, content fingerprints and id-list hashes.

        Returns:
          ``{"seed", "num_classes", "image_shape", "train": {"name", "size", "fingerprint"}, "test": {...},
          "core": {"size", "ids_sha256"}, "user": {"size", "ids_sha256"}}``; the hashes are sha256 hex
          digests of the sorted ids as little-endian int64.
        """

        def describe(ds: Dataset) -> dict[str, Any]:
            return {"name": ds.name, "size": len(ds), "fingerprint": ds.fingerprint()}

        return {
            "seed": self.seed,
            "num_classes": self.train.num_classes,
            "image_shape": list(self.train.image_shape),
            "train": describe(self.train),
            "test": describe(self.test),
            "core": {"size": int(self.core_ids.size), "ids_sha256": _sha256_ids(self.core_ids)},
            "user": {"size": int(self.user_ids.size), "ids_sha256": _sha256_ids(self.user_ids)},
        }


@functools.cache
def load_digits() -> Dataset:
    """scikit-learn's embedded handwritten digits (no download): 1797 images of 8x8 pixels, 10 classes.

    The result is cached; it is immutable, so sharing it is safe.

    Returns:
      A :class:`Dataset` named ``"digits"``: ``x`` ``[1797, 8, 8, 1]`` float32 (the 0..16 grey levels
      divided by 16), ``y`` ``[1797]`` int32, ``ids = arange(1797)`` int64.

    Examples:
      >>> ds = load_digits()
      >>> ds.x.shape, ds.num_classes, float(ds.x.max())
      ((1797, 8, 8, 1), 10, 1.0)
    """
    import sklearn.datasets  # lazy: importing scikit-learn takes about a second

    raw = sklearn.datasets.load_digits()
    x = (raw.images.astype(np.float32) / np.float32(16.0))[..., None]
    ids = np.arange(x.shape[0], dtype=np.int64)
    return Dataset(x=x, y=raw.target.astype(np.int32), ids=ids, num_classes=10, name="digits")


def _stratified_partition(
    ds: Dataset, *, test_fraction: float, core_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (test, core, user) ids, drawn per class from one permutation of that class's ids."""
    rng = np.random.default_rng(seed)
    test, core, user = [], [], []
    for c in range(ds.num_classes):
        ids_c = rng.permutation(ds.ids[ds.y == c])
        # Round half up, so each class's share is within half a sample of the requested fraction.
        n_test = int(np.floor(test_fraction * ids_c.size + 0.5))
        n_core = int(np.floor(core_fraction * (ids_c.size - n_test) + 0.5))
        test.append(ids_c[:n_test])
        core.append(ids_c[n_test : n_test + n_core])
        user.append(ids_c[n_test + n_core :])
    return tuple(np.sort(np.concatenate(part)).astype(np.int64) for part in (test, core, user))


def _check_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not 0 < value < 1:
        raise errors.ConfigError(f"{what} must be a number strictly between 0 and 1, got {value!r}.")
    return float(value)


def _require_nonempty(parts: dict[str, np.ndarray], ds: Dataset) -> None:
    empty = [name for name, ids in parts.items() if ids.size == 0]
    if empty:
        raise errors.ConfigError(
            f"Splitting {len(ds)} samples of {ds.name or 'the dataset'!r} leaves {', '.join(empty)} empty; "
            "use more data or less extreme fractions."
        )


def make_splits(
    ds: Dataset, *, test_fraction: float = 0.2, core_fraction: float = 0.3, seed: int = 0
) -> Splits:
    """Splits ``ds`` into train (core + user) and test, stratified by class and seeded.

    For each class (in label order) the ids of that class are permuted by one ``numpy`` generator seeded
    with ``seed``: the first ``round(test_fraction * n_c)`` go to test, and of the remaining ``m_c`` the
    next ``round(core_fraction * m_c)`` are core, the rest user (rounding half up). Identical inputs give
    identical id sets.

    Args:
      ds: the full dataset.
      test_fraction: share of each class held out for testing, in ``(0, 1)``.
      core_fraction: share of each class's training samples that are core, in ``(0, 1)``.
      seed: non-negative integer seed.

    Returns:
      :class:`Splits` whose ``train`` and ``test`` are subsets of ``ds`` keeping its ids.

    Raises:
      ConfigError: a fraction outside ``(0, 1)``, a negative seed, or a split that would be empty.

    Examples:
      >>> s = make_splits(synthetic(100, image_shape=(4, 4, 1), num_classes=2), test_fraction=0.2,
      ...                 core_fraction=0.5, seed=0)
      >>> len(s.train), len(s.test), len(s.core_ids), len(s.user_ids)
      (80, 20, 40, 40)
    """
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    core_fraction = _check_fraction(core_fraction, "core_fraction")
    seed = _check_int(seed, "seed", minimum=0)
    test, core, user = _stratified_partition(
        ds, test_fraction=test_fraction, core_fraction=core_fraction, seed=seed
    )
    _require_nonempty({"test": test, "core": core, "user": user}, ds)
    train = ds.subset(np.union1d(core, user))
    return Splits(train=train, test=ds.subset(test), core_ids=core, user_ids=user, seed=seed)


def _split_core_user(train: Dataset, test: Dataset, *, core_fraction: float, seed: int) -> Splits:
    """Splits built around a given test set: only train is divided into core and user."""
    core_fraction = _check_fraction(core_fraction, "core_fraction")
    seed = _check_int(seed, "seed", minimum=0)
    _, core, user = _stratified_partition(train, test_fraction=0.0, core_fraction=core_fraction, seed=seed)
    _require_nonempty({"core": core, "user": user}, train)
    return Splits(train=train, test=test, core_ids=core, user_ids=user, seed=seed)


def synthetic(
    n: int,
    *,
    image_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    seed: int = 0,
    name: str = "synthetic",
) -> Dataset:
    """Learnable synthetic images of realistic shape (e.g. CIFAR-sized), for benchmarks and tests.

    Each image is a random combination of a fixed set of smooth (low-frequency cosine) basis patterns,
    with class-dependent mean coefficients, plus per-sample coefficient noise and pixel noise:
    ``x = clip(0.5 + 0.12 * (coef @ bases) / sqrt(B) + 0.08 * noise, 0, 1)``, ``coef ~ N(mu_y, I)``.
    Classes overlap, so the task is not trivial, but a linear classifier beats chance by far. The bases and
    class means depend only on ``image_shape`` and ``num_classes``: sets drawn with different seeds are
    independent samples of the same task (e.g. a separate test set). Labels are balanced.

    Args:
      n: number of images.
      image_shape: ``(H, W, C)``.
      num_classes: number of classes, at least 2.
      seed: seed of the samples (labels, coefficients, noise).
      name: the dataset's name.

    Returns:
      A :class:`Dataset` with ``x`` ``[n, H, W, C]`` float32 in ``[0, 1]``, ``y`` ``[n]`` int32,
      ``ids = arange(n)``.

    Raises:
      ConfigError: non-positive ``n`` or image dimensions, or fewer than 2 classes.

    Examples:
      >>> ds = synthetic(6, image_shape=(4, 4, 3), num_classes=3, seed=1)
      >>> ds.x.shape, sorted(ds.y.tolist())
      ((6, 4, 4, 3), [0, 0, 1, 1, 2, 2])
    """
    n = _check_int(n, "n", minimum=1)
    num_classes = _check_int(num_classes, "num_classes", minimum=2)
    if len(image_shape) != 3:
        raise errors.ConfigError(f"image_shape must be (H, W, C), got {tuple(image_shape)}.")
    h, w, c = (_check_int(d, "image_shape entries", minimum=1) for d in image_shape)
    num_bases = _SYNTHETIC_NUM_BASES

    task = np.random.default_rng([_SYNTHETIC_TASK_SEED, h, w, c, num_classes])
    yy = (np.arange(h, dtype=np.float64) / h)[:, None, None]
    xx = (np.arange(w, dtype=np.float64) / w)[None, :, None]
    bases = np.empty((num_bases, h, w, c))
    for b in range(num_bases):
        # Up to 3 cycles across the image: smooth blobs and stripes, like natural-image low frequencies,
        # with an independent phase per channel so that colour carries signal too.
        fy, fx = task.integers(-3, 4, size=2)
        phase = task.uniform(0, 2 * np.pi, size=(1, 1, c))
        pattern = np.cos(2 * np.pi * (fy * yy + fx * xx) + phase)
        bases[b] = pattern / max(float(np.sqrt(np.mean(pattern**2))), 1e-6)
    bases = bases.reshape(num_bases, -1).astype(np.float32)
    class_means = task.standard_normal((num_classes, num_bases)).astype(np.float32)

    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    x = np.empty((n, h * w * c), np.float32)
    scale = np.float32(0.12 / np.sqrt(num_bases))
    for start in range(0, n, _SYNTHETIC_CHUNK):  # chunks bound the float temporaries for large n
        stop = min(start + _SYNTHETIC_CHUNK, n)
        coef = class_means[y[start:stop]] + rng.standard_normal((stop - start, num_bases), dtype=np.float32)
        noise = rng.standard_normal((stop - start, h * w * c), dtype=np.float32)
        chunk = np.float32(0.5) + scale * (coef @ bases) + np.float32(0.08) * noise
        np.clip(chunk, 0.0, 1.0, out=x[start:stop])
    return Dataset(
        x=x.reshape(n, h, w, c), y=y, ids=np.arange(n, dtype=np.int64), num_classes=num_classes, name=name
    )


def load_tfds(
    name: str,
    *,
    split: str,
    data_dir: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    id_key: str | None = None,
    max_examples: int | None = None,
) -> Dataset:
    """Reads a prepared ``array_record`` tfds dataset into memory, without TensorFlow.

    Uses ``tfds.data_source(name, split=split, data_dir=data_dir, download=False)`` and batched
    ``__getitems__`` (with a tqdm progress bar for large splits); never ``tfds.load``.

    Args:
      name: tfds name, optionally with config/version (``"mnist"``, ``"cifar10:3.0.2"``).
      split: a tfds split string (``"train"``, ``"test"``, ``"train[:10%]"``).
      data_dir: where the prepared data lives; ``None`` or ``""`` for tfds's default (``~/tensorflow_datasets``).
      image_key: feature holding ``[H, W, C]`` or ``[H, W]`` images, uint8 (divided by 255) or float
        (taken as is, must lie in ``[0, 1]``).
      label_key: feature holding integer labels; ``num_classes`` comes from its ``ClassLabel`` metadata,
        else from the largest label.
      id_key: optional integer feature used as sample ids; by default a record's index within its named
        split (stable, since prepared datasets keep their record order; a slice like ``"train[10:20]"``
        keeps the ids 10..19 that ``"train"`` gives those records).
      max_examples: read only the first this many records.

    Returns:
      A :class:`Dataset` named ``"{name}/{split}"``, rows in increasing id order.

    Raises:
      ConfigError: the dataset is not found or not prepared as ``array_record``; the split string is malformed or
        names a split the prepared dataset does not have (the message lists the splits that exist); a key is
        missing; or a split string combines several splits (``"train+test"``) without an ``id_key``.
      ShapeDtypeError: images of differing shapes or unsupported dtype, non-integer labels or ids.

    Examples:
      >>> ds = load_tfds("mnist", split="test", data_dir="/data/tfds")  # doctest: +SKIP
      >>> ds.x.shape, ds.num_classes  # doctest: +SKIP
      ((10000, 28, 28, 1), 10)
    """
    import tensorflow_datasets as tfds  # lazy: heavy import, and only this loader needs it

    if not isinstance(split, str) or not split:
        raise errors.ConfigError(f"split must be a non-empty tfds split string, got {split!r}.")
    data_dir = data_dir or None  # "" means tfds's default too, as in a config's data section
    where = f"{data_dir!r}" if data_dir is not None else "the default tfds data_dir"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:  # DatasetNotFoundError is a ValueError
        _raise_split_error(tfds, name, split, data_dir, where, e)
        raise errors.ConfigError(
            f"Cannot read tfds dataset {name!r} split {split!r} from {where}: it must already be prepared in "
            "the array_record format (e.g. `tfds build NAME --file_format=array_record`, or "
            "`builder.download_and_prepare()` with file_format='array_record'); jaxforget never downloads "
            f"or builds it. tfds said: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e

    total = len(source)
    if max_examples is not None:
        total = min(total, _check_int(max_examples, "max_examples", minimum=0))
    if total == 0:
        raise errors.ConfigError(f"tfds dataset {name!r} split {split!r} in {where} has no examples to read.")
    get_many = getattr(source, "__getitems__", None) or (lambda idx: [source[i] for i in idx])

    x = y = ids = None
    with tqdm.tqdm(
        total=total, desc=f"reading {name}/{split}", unit="img", disable=total < _TFDS_PROGRESS_MIN
    ) as bar:
        for start in range(0, total, _TFDS_READ_BATCH):
            stop = min(start + _TFDS_READ_BATCH, total)
            records = get_many(list(range(start, stop)))
            if x is None:
                wanted = [image_key, label_key] + ([id_key] if id_key is not None else [])
                missing = [k for k in wanted if k not in records[0]]
                if missing:
                    raise errors.ConfigError(
                        f"tfds dataset {name!r} has no feature(s) {missing}; available: {sorted(records[0])}."
                    )
                first = np.asarray(records[0][image_key])
                shape = first.shape + (1,) if first.ndim == 2 else first.shape
                if len(shape) != 3:
                    raise errors.ShapeDtypeError(
                        f"tfds feature {image_key!r} must hold [H, W] or [H, W, C] images, got {first.shape}."
                    )
                if first.dtype != np.uint8 and not np.issubdtype(first.dtype, np.floating):
                    raise errors.ShapeDtypeError(
                        f"tfds feature {image_key!r} must be uint8 or float images, got dtype {first.dtype}."
                    )
                x = np.empty((total, *shape), np.float32)
                y = np.empty(total, np.int64)
                ids = np.empty(total, np.int64) if id_key is not None else _record_ids(source, split)[:total]
            try:
                images = np.stack([np.asarray(r[image_key]).reshape(shape) for r in records])
            except ValueError as e:
                raise errors.ShapeDtypeError(
                    f"tfds feature {image_key!r}: images between records {start} and {stop - 1} do not all "
                    f"have shape {shape}."
                ) from e
            # float32 division by 255 is correctly rounded, so pixels equal v / 255 to float32 precision.
            x[start:stop] = (
                images.astype(np.float32) / np.float32(255) if images.dtype == np.uint8 else images
            )
            y[start:stop] = _as_ids([r[label_key] for r in records], f"tfds labels {label_key!r}")
            if id_key is not None:
                ids[start:stop] = _as_ids([r[id_key] for r in records], f"tfds ids {id_key!r}")
            bar.update(stop - start)

    features = getattr(getattr(source, "dataset_info", None), "features", None)
    try:
        feature = features[label_key] if features is not None else None
    except KeyError:
        feature = None
    if isinstance(feature, tfds.features.ClassLabel):
        num_classes = int(feature.num_classes)
    else:
        num_classes = int(y.max()) + 1
    if (np.diff(ids) < 0).any():  # Dataset stores rows by increasing id
        order = np.argsort(ids, kind="stable")
        x, y, ids = x[order], y[order], ids[order]
    return Dataset(x=x, y=y, ids=ids, num_classes=num_classes, name=f"{name}/{split}")


def _prepared_splits(tfds: Any, name: str, data_dir: str | None) -> list[str]:
    """The split names recorded in a prepared dataset's info (read without TensorFlow); [] if not prepared."""
    try:
        splits = tfds.builder(name, data_dir=data_dir).info.splits
        return [str(s) for s in splits.keys()]
    except Exception:  # not found, unreadable metadata, ...: nothing is known to be prepared
        return []


def _raise_split_error(tfds: Any, name: str, split: str, data_dir: str | None, where: str, cause: Exception) -> None:
    """Raises ConfigError if ``split`` is malformed or names a split the prepared dataset lacks; else returns.

    Called only once ``tfds.data_source`` has failed, so reading the builder's metadata costs nothing on success.
    """
    try:
        tfds.core.ReadInstruction.from_spec(split)
    except (ValueError, NotImplementedError) as e:
        raise errors.ConfigError(
            f"Invalid tfds split string {split!r}: expected split names, each optionally sliced, joined by '+' "
            "(e.g. 'train', 'test[:10%]', 'train[100:200]+test')."
        ) from e
    available = _prepared_splits(tfds, name, data_dir)
    if not available:
        return  # not prepared (or not readable): the caller's "must be prepared" message applies
    asked = [part.split("[", 1)[0].strip() for part in split.split("+")]
    unknown = [s for s in asked if s not in available and s != "all"]
    if unknown:
        raise errors.ConfigError(
            f"tfds dataset {name!r} in {where} has no split {', '.join(map(repr, unknown))} (asked for "
            f"split={split!r}); the splits that exist are {available}. Slices and sums of them are accepted, "
            "e.g. 'train[:10%]' or 'train+test'."
        ) from cause


def _record_ids(source: Any, split: str) -> np.ndarray:
    """Positions of a split's records within their whole named split, as int64 ids.

    A sliced split such as ``"train[100:200]"`` thus keeps the ids that ``"train"`` gives the same records.
    """
    splits = getattr(getattr(source, "dataset_info", None), "splits", None)
    if splits is None or split in splits:
        return np.arange(len(source), dtype=np.int64)
    first = {}  # shard file -> (its split, position of its first record in that split)
    for base in splits.keys():
        offset = 0
        for shard in splits[base].file_instructions:
            first[shard.filename] = (base, offset)
            offset += shard.examples_in_shard
    parts, bases = [], set()
    for shard in splits[split].file_instructions:
        base, offset = first[shard.filename]
        bases.add(base)
        parts.append(offset + shard.skip + np.arange(shard.take, dtype=np.int64))
    if len(bases) > 1:
        raise errors.ConfigError(
            f"Split {split!r} combines the splits {sorted(bases)}, whose record positions collide as ids; "
            "read them separately or pass id_key."
        )
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if ids.size != len(source):
        raise errors.ConfigError(
            f"Could not map the {len(source)} records of split {split!r} to positions in their split "
            f"(found {ids.size}); pass id_key."
        )
    return ids


def default_config() -> ml_collections.ConfigDict:
    """Every field of a job's ``data`` section, with defaults (only the fields of ``name`` are read).

    ``name``: a key of :data:`DATASETS`. Splits: ``seed``, ``test_fraction`` (held out unless a tfds ``test_split``
    is given), ``core_fraction`` (of each class of the training split: never forgotten). ``synthetic``: ``n``,
    ``image_shape``, ``num_classes``. ``tfds``: ``tfds_name``, ``data_dir`` ("" for tfds's default),
    ``train_split``, ``test_split`` ("" to split the train split three ways), ``image_key``, ``label_key``,
    ``id_key`` ("" for record positions) and ``max_examples`` (0: all).
    """
    return ml_collections.ConfigDict(dict(
        name="digits", seed=0, test_fraction=0.2, core_fraction=0.3,
        n=1000, image_shape=(32, 32, 3), num_classes=10,
        tfds_name="", data_dir="", train_split="train", test_split="", image_key="image", label_key="label",
        id_key="", max_examples=0,
    ))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks a ``data`` section: exactly the fields of :func:`default_config`, valid values for its ``name``.

    Raises:
      KeyError: unknown ``name`` (the valid names are listed). ConfigError: an unknown, missing or invalid field.
    """
    want = default_config()
    have = set(config.keys())
    if have - set(want.keys()):
        raise errors.ConfigError(f"data: unknown config field(s) {sorted(have - set(want.keys()))}; valid: "
                                 f"{sorted(want.keys())}.")
    if set(want.keys()) - have:
        raise errors.ConfigError(f"data: missing config field(s) {sorted(set(want.keys()) - have)}.")
    if config.name not in DATASETS:
        raise KeyError(f"Unknown dataset name {config.name!r}; valid names: {sorted(DATASETS)}.")
    _check_int(config.seed, "data.seed", minimum=0)
    _check_fraction(config.test_fraction, "data.test_fraction")
    _check_fraction(config.core_fraction, "data.core_fraction")
    if config.name == "synthetic":
        _check_int(config.n, "data.n", minimum=2)
        _check_int(config.num_classes, "data.num_classes", minimum=2)
    if config.name == "tfds":
        if not config.tfds_name:
            raise errors.ConfigError("data.tfds_name is required when data.name='tfds'.")
        _check_int(config.max_examples, "data.max_examples", minimum=0)
        for field in ("tfds_name", "data_dir", "train_split", "test_split", "image_key", "label_key", "id_key"):
            if not isinstance(config[field], str):
                raise errors.ConfigError(f"data.{field} must be a string, got {config[field]!r}.")


def _digits_splits(config: ml_collections.ConfigDict) -> Splits:
    return make_splits(load_digits(), test_fraction=config.test_fraction, core_fraction=config.core_fraction,
                       seed=config.seed)


def _synthetic_splits(config: ml_collections.ConfigDict) -> Splits:
    ds = synthetic(config.n, image_shape=tuple(config.image_shape), num_classes=config.num_classes, seed=config.seed)
    return make_splits(ds, test_fraction=config.test_fraction, core_fraction=config.core_fraction, seed=config.seed)


def _tfds_splits(config: ml_collections.ConfigDict) -> Splits:
    kwargs = dict(data_dir=config.data_dir or None, image_key=config.image_key, label_key=config.label_key,
                  id_key=config.id_key or None, max_examples=config.max_examples or None)
    train = load_tfds(config.tfds_name, split=config.train_split, **kwargs)
    if not config.test_split:
        return make_splits(train, test_fraction=config.test_fraction, core_fraction=config.core_fraction,
                           seed=config.seed)
    test = load_tfds(config.tfds_name, split=config.test_split, **kwargs)
    if train.num_classes != test.num_classes:  # only without ClassLabel metadata: inferred from max label
        k = max(train.num_classes, test.num_classes)
        train, test = dataclasses.replace(train, num_classes=k), dataclasses.replace(test, num_classes=k)
    return _split_core_user(train, test, core_fraction=config.core_fraction, seed=config.seed)


DATASETS: dict[str, Callable[[ml_collections.ConfigDict], Splits]] = {
    "digits": _digits_splits,
    "synthetic": _synthetic_splits,
    "tfds": _tfds_splits,
}


def get_splits(config: ml_collections.ConfigDict) -> Splits:
    """Builds the :class:`Splits` described by a config's ``data`` section (:func:`default_config`).

    With a tfds ``test_split`` that split is the test set and only the train split is divided into core and user;
    without one, the train split is split three ways as in :func:`make_splits`.

    Args:
      config: the ``data`` section; it may name only some fields (the rest take :func:`default_config`'s values).

    Returns:
      The :class:`Splits`.

    Raises:
      KeyError: unknown ``name``; the message lists the valid names.
      ConfigError: unknown or invalid fields, or an unprepared tfds dataset.

    Examples:
      >>> import ml_collections
      >>> cfg = ml_collections.ConfigDict(dict(name="synthetic", n=100, image_shape=(4, 4, 1),
      ...                                      num_classes=2, seed=0, test_fraction=0.2, core_fraction=0.5))
      >>> s = get_splits(cfg)
      >>> len(s.train), len(s.test), s.train.image_shape
      (80, 20, (4, 4, 1))
    """
    full = default_config()
    given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(given) - set(full.keys()))
    if unknown:
        raise errors.ConfigError(f"data: unknown config field(s) {unknown}; valid: {sorted(full.keys())}.")
    for key, value in given.items():
        try:
            full[key] = value
        except TypeError as e:  # ConfigDict keeps each field's type; name the field rather than re-raise as is
            raise errors.ConfigError(
                f"data.{key} must be of type {type(full[key]).__name__} (default {full[key]!r}), got {value!r} of "
                f"type {type(value).__name__}."
            ) from e
    validate_config(full)
    return DATASETS[full.name](full)


def batch_indices(
    n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True, drop_last: bool = False
) -> list[np.ndarray]:
    """Row-index batches for one epoch, reproducible from ``(seed, epoch)`` alone.

    The permutation is drawn from a generator seeded with ``[seed, epoch]``, independent of any earlier
    epoch, so a run resumed at epoch ``e`` replays exactly the batches of an uninterrupted run.

    Args:
      n: number of rows.
      batch_size: rows per batch, at least 1.
      seed: non-negative run seed.
      epoch: non-negative epoch number.
      shuffle: permute the rows (else ``0..n-1`` in order).
      drop_last: drop a final batch shorter than ``batch_size``.

    Returns:
      A list of int64 arrays ``[batch_size]`` (the last may be shorter unless ``drop_last``) that together
      hold every index in ``range(n)`` once (minus the dropped tail).

    Raises:
      ConfigError: negative ``n``, ``seed`` or ``epoch``, or ``batch_size < 1``.

    Examples:
      >>> [b.tolist() for b in batch_indices(5, 2, seed=0, epoch=0, shuffle=False)]
      [[0, 1], [2, 3], [4]]
      >>> len(batch_indices(5, 2, seed=0, epoch=3, drop_last=True))
      2
    """
    n = _check_int(n, "n", minimum=0)
    batch_size = _check_int(batch_size, "batch_size", minimum=1)
    seed = _check_int(seed, "seed", minimum=0)
    epoch = _check_int(epoch, "epoch", minimum=0)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return [order[i : i + batch_size].astype(np.int64) for i in range(0, stop, batch_size)]


def draw_disjoint(ids, num: int, size: int, *, seed: int) -> list[np.ndarray]:
    """``num`` disjoint, sorted draws of ``size`` ids each, from a fixed-seed permutation of ``ids``.

    The one id-draw helper: forget requests of a planned stream, a comparison's request and its warm-up request.

    Raises:
      ValueError: ``num × size`` exceeds the ids available (both named).

    Examples:
      >>> [d.tolist() for d in draw_disjoint(np.arange(10), 2, 3, seed=0)]
      [[2, 4, 6], [3, 5, 7]]
    """
    ids = np.asarray(ids)
    if num * size > len(ids):
        raise ValueError(f"{num} draw(s) of {size} ids exceed the {len(ids)} ids available.")
    order = np.random.default_rng(seed).permutation(ids)
    return [np.sort(order[k * size : (k + 1) * size]) for k in range(num)]


def pad_to_multiple(n: int, multiple: int) -> int:
    """The smallest ``m >= max(n, multiple)`` with ``m % multiple == 0`` (never zero, so shapes stay valid).

    Args:
      n: a non-negative size.
      multiple: a positive integer.

    Raises:
      ConfigError: negative ``n`` or non-positive ``multiple``.

    Examples:
      >>> pad_to_multiple(10, 4), pad_to_multiple(8, 4), pad_to_multiple(0, 4)
      (12, 8, 4)
    """
    n = _check_int(n, "n", minimum=0)
    multiple = _check_int(multiple, "multiple", minimum=1)
    return max(multiple, -(-n // multiple) * multiple)
