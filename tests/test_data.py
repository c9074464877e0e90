"""Tests for jaxforget.data: ids, seeded stratified splits, validation, the TensorFlow-free tfds reader."""

import hashlib
import json

import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from jaxforget import data, errors


def tiny(n=6, *, num_classes=3, ids=None, **overrides):
    """A small valid Dataset; keyword overrides replace single fields."""
    rng = np.random.default_rng(0)
    fields = dict(
        x=rng.uniform(size=(n, 2, 3, 1)).astype(np.float32),
        y=np.arange(n) % max(num_classes, 1),
        ids=np.arange(10, 10 + 3 * n, 3) if ids is None else ids,
        num_classes=num_classes,
        name="tiny",
    )
    fields.update(overrides)
    return data.Dataset(**fields)


# ---------------------------------------------------------------------------------------------- digits


def test_digits_shape_dtype_range_ids():
    ds = data.load_digits()
    assert ds.x.shape == (1797, 8, 8, 1) and ds.x.dtype == np.float32
    assert ds.y.shape == (1797,) and ds.y.dtype == np.int32
    assert ds.ids.dtype == np.int64 and np.array_equal(ds.ids, np.arange(1797))
    assert ds.num_classes == 10 and ds.name == "digits"
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    # The 0..16 grey levels divided by 16 exactly.
    assert np.array_equal(np.unique(ds.x * 16), np.arange(17, dtype=np.float32))
    assert set(np.unique(ds.y)) == set(range(10))


def test_digits_splits_partition_and_stratify():
    ds = data.load_digits()
    s = data.make_splits(ds, test_fraction=0.2, core_fraction=0.3, seed=0)
    train, test = s.train.ids, s.test.ids
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.union1d(train, test), ds.ids)
    assert np.intersect1d(s.core_ids, s.user_ids).size == 0
    assert np.array_equal(np.union1d(s.core_ids, s.user_ids), train)
    for ids in (s.core_ids, s.user_ids, train, test):
        assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
    # Subsets keep the parent's rows: ids still point at the same images and labels.
    assert np.array_equal(s.test.x, ds.x[s.test.ids]) and np.array_equal(s.train.y, ds.y[train])
    for c in range(10):
        n_c = int((ds.y == c).sum())
        n_test = int((s.test.y == c).sum())
        n_train = int((s.train.y == c).sum())
        n_core = int((s.core().y == c).sum())
        assert abs(n_test - 0.2 * n_c) <= 1
        assert abs(n_core - 0.3 * n_train) <= 1
        assert n_train + n_test == n_c
    assert len(s.core()) + len(s.user()) == len(s.train)


def test_splits_deterministic_and_seed_dependent():
    ds = data.load_digits()
    a = data.make_splits(ds, seed=3)
    b = data.make_splits(ds, seed=3)
    c = data.make_splits(ds, seed=4)
    for field in ("core_ids", "user_ids"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert np.array_equal(a.test.ids, b.test.ids)
    assert a.to_json() == b.to_json()
    assert not np.array_equal(a.test.ids, c.test.ids)
    assert not np.array_equal(a.core_ids, c.core_ids)
    # Stratification fixes the sizes; only the membership depends on the seed.
    assert len(a.test) == len(c.test) and len(a.core_ids) == len(c.core_ids)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(core_fraction=0.0),
        dict(core_fraction=1.0),
        dict(core_fraction=-0.1),
        dict(test_fraction=0.0),
        dict(test_fraction=1.5),
        dict(seed=-1),
    ],
)
def test_make_splits_rejects_bad_arguments(kwargs):
    with pytest.raises(errors.ConfigError):
        data.make_splits(data.load_digits(), **kwargs)


def test_make_splits_refuses_an_empty_part():
    # Two samples per class: rounding 0.2 * 2 gives no test sample at all.
    with pytest.raises(errors.ConfigError, match="test"):
        data.make_splits(tiny(6, num_classes=3), test_fraction=0.2, core_fraction=0.5)


def test_splits_to_json_and_validation():
    s = data.make_splits(data.load_digits(), seed=0)
    summary = json.loads(json.dumps(s.to_json()))
    assert summary["seed"] == 0 and summary["num_classes"] == 10 and summary["image_shape"] == [8, 8, 1]
    assert summary["train"]["size"] + summary["test"]["size"] == 1797
    assert summary["core"]["size"] + summary["user"]["size"] == summary["train"]["size"]
    assert summary["train"]["fingerprint"] == s.train.fingerprint()
    assert summary["core"]["ids_sha256"] == hashlib.sha256(s.core_ids.astype("<i8").tobytes()).hexdigest()
    with pytest.raises(errors.ConfigError, match="both core and user"):
        data.Splits(s.train, s.test, s.core_ids, np.union1d(s.user_ids, s.core_ids[:1]), seed=0)
    with pytest.raises(errors.ConfigError, match="partition"):
        data.Splits(s.train, s.test, s.core_ids, s.user_ids[1:], seed=0)


# ----------------------------------------------------------------------------- Dataset: ids, validation


def test_subset_index_of_round_trip():
    ds = tiny(8)
    wanted = ds.ids[[6, 1, 3]]
    pos = ds.index_of(wanted)
    assert pos.dtype == np.int64 and pos.tolist() == [6, 1, 3]
    assert np.array_equal(ds.ids[pos], wanted)
    sub = ds.subset(wanted)
    assert sub.ids.tolist() == sorted(wanted.tolist())
    assert np.array_equal(sub.x, ds.x[[1, 3, 6]]) and np.array_equal(sub.y, ds.y[[1, 3, 6]])
    assert sub.num_classes == ds.num_classes
    assert np.array_equal(sub.index_of(wanted), [2, 0, 1])
    empty = ds.subset([])
    assert len(empty) == 0 and empty.x.shape == (0, 2, 3, 1)


def test_unknown_ids_error_names_the_ids():
    ds = tiny(4)  # ids 10, 13, 16, 19
    with pytest.raises(errors.UnknownIdsError, match=r"\[11, 99\]"):
        ds.subset([10, 11, 99])
    with pytest.raises(KeyError, match=r"\[-1\]"):  # UnknownIdsError is also a KeyError
        ds.index_of([-1, 13])
    with pytest.raises(errors.ShapeDtypeError):
        ds.index_of([1.5])


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(x=np.full((6, 2, 3, 1), np.nan, np.float32)), errors.NonFiniteError, "non-finite"),
        (dict(x=np.full((6, 2, 3, 1), np.inf, np.float32)), errors.NonFiniteError, "non-finite"),
        (dict(x=np.full((6, 2, 3, 1), 1.5, np.float32)), errors.ConfigError, r"\[0, 1\]"),
        (dict(x=np.zeros((6, 2, 3, 1), np.float64)), errors.ShapeDtypeError, "float32"),
        (dict(x=np.zeros((6, 2, 3), np.float32)), errors.ShapeDtypeError, "4-D"),
        (dict(y=np.zeros(6, np.float32)), errors.ShapeDtypeError, "integer"),
        (dict(y=np.zeros(5, np.int32)), errors.ShapeDtypeError, "length 6"),
        (dict(y=np.array([0, 1, 2, 3, 0, 1])), errors.ConfigError, r"labels must lie in \[0, 3\)"),
        (dict(ids=np.array([0, 1, 2, 2, 3, 4])), errors.ConfigError, r"duplicate ids \[2\]"),
        (dict(ids=np.array([0, 1, 5, 3, 6, 7])), errors.ConfigError, "strictly increasing"),
        (dict(ids=np.arange(6.0)), errors.ShapeDtypeError, "ids"),
        (dict(num_classes=0), errors.ConfigError, "num_classes"),
    ],
)
def test_dataset_validation(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny(6, **overrides)


def test_dataset_is_read_only_without_freezing_the_source():
    x = np.zeros((2, 1, 1, 1), np.float32)
    ds = data.Dataset(x, np.array([0, 1]), np.array([0, 1]), 2)
    with pytest.raises(ValueError):
        ds.x[0, 0, 0, 0] = 1.0
    x[0, 0, 0, 0] = 0.5  # the caller's array stays writable
    assert ds.y.dtype == np.int32 and ds.ids.dtype == np.int64


def test_fingerprint_is_a_content_key():
    ds = tiny(6)
    x = np.array(ds.x)
    x[3, 1, 2, 0] = np.nextafter(x[3, 1, 2, 0], np.float32(1))  # one pixel, by one ulp
    changed = data.Dataset(x, ds.y, ds.ids, ds.num_classes, ds.name)
    assert changed.fingerprint() != ds.fingerprint()
    same = data.Dataset(np.array(ds.x), np.array(ds.y), np.array(ds.ids), ds.num_classes, "renamed")
    assert same.fingerprint() == ds.fingerprint()
    relabelled = data.Dataset(ds.x, (ds.y + 1) % 3, ds.ids, ds.num_classes)
    assert relabelled.fingerprint() != ds.fingerprint()
    assert data.Dataset(ds.x, ds.y, ds.ids + 1, ds.num_classes).fingerprint() != ds.fingerprint()
    assert data.Dataset(ds.x, ds.y, ds.ids, 4).fingerprint() != ds.fingerprint()


# --------------------------------------------------------------------------------------------- tfds

_TRAIN_IMAGES = np.random.default_rng(1).integers(0, 256, size=(12, 4, 4), dtype=np.uint8)
_TRAIN_LABELS = np.arange(12) % 3
_TRAIN_UIDS = 1000 + 7 * np.arange(12)
_TEST_IMAGES = np.random.default_rng(2).integers(0, 256, size=(6, 4, 4), dtype=np.uint8)
_TEST_LABELS = np.arange(6) % 3


class JaxforgetTestTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """12 train and 6 test 4x4 grey images, written in generation order.

    ``skip_registration`` keeps the class out of tfds's global registry (no name clashes however often
    the module is imported); ``load_tfds`` then reads the prepared files from ``data_dir`` alone, just as
    it would a dataset prepared on another machine.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(4, 4, 1), dtype=np.uint8),
                    "pixels": tfds.features.Tensor(shape=(4, 4), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=3),
                    "uid": np.int64,
                }
            ),
            disable_shuffling=True,  # keep generation order, so record positions are stable ids
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(_TRAIN_IMAGES, _TRAIN_LABELS, _TRAIN_UIDS),
            "test": self._generate_examples(_TEST_IMAGES, _TEST_LABELS, np.arange(6)),
        }

    def _generate_examples(self, images, labels, uids):
        for i, (image, label, uid) in enumerate(zip(images, labels, uids, strict=True)):
            # Image features encode numpy arrays with tf.image; a PIL image is encoded with PIL instead.
            yield (
                i,
                {
                    "image": PIL.Image.fromarray(image, mode="L"),
                    "pixels": image,
                    "label": int(label),
                    "uid": int(uid),
                },
            )


TFDS_NAME = "jaxforget_test_tiny_images"


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = JaxforgetTestTinyImages(data_dir=str(data_dir), file_format="array_record")
    assert builder.name == TFDS_NAME
    builder.download_and_prepare()
    return str(data_dir)


def test_load_tfds_round_trip(tfds_dir, monkeypatch):
    # Small read batches and an always-on progress bar exercise the multi-batch path on 12 records.
    monkeypatch.setattr(data, "_TFDS_READ_BATCH", 5)
    monkeypatch.setattr(data, "_TFDS_PROGRESS_MIN", 0)
    ds = data.load_tfds(TFDS_NAME, split="train", data_dir=tfds_dir, id_key="uid")
    assert ds.x.shape == (12, 4, 4, 1) and ds.x.dtype == np.float32
    assert np.array_equal(ds.x, _TRAIN_IMAGES[..., None].astype(np.float32) / np.float32(255))
    assert np.array_equal(ds.y, _TRAIN_LABELS) and np.array_equal(ds.ids, _TRAIN_UIDS)
    assert ds.num_classes == 3 and ds.name == f"{TFDS_NAME}/train"

    # Default ids are record positions; an [H, W] tensor feature becomes [H, W, 1].
    test = data.load_tfds(TFDS_NAME, split="test", data_dir=tfds_dir, image_key="pixels")
    assert np.array_equal(test.ids, np.arange(6))
    assert np.array_equal(test.x, _TEST_IMAGES[..., None] / np.float32(255))
    assert np.array_equal(test.y, _TEST_LABELS)


def test_load_tfds_slices_keep_split_positions_as_ids(tfds_dir):
    full = data.load_tfds(TFDS_NAME, split="train", data_dir=tfds_dir)
    part = data.load_tfds(TFDS_NAME, split="train[5:9]", data_dir=tfds_dir)
    assert part.ids.tolist() == [5, 6, 7, 8]
    assert part.fingerprint() == full.subset([5, 6, 7, 8]).fingerprint()
    head = data.load_tfds(TFDS_NAME, split="train", data_dir=tfds_dir, max_examples=4)
    assert head.fingerprint() == full.subset(np.arange(4)).fingerprint()
    with pytest.raises(errors.ConfigError, match="combines"):
        data.load_tfds(TFDS_NAME, split="train+test", data_dir=tfds_dir)


_SPLITS_EXIST = r"the splits that exist are \['train', 'test'\]"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="jaxforget_no_such_dataset", split="train"), "must already be prepared in the array_record"),
        # A prepared dataset and an unknown split: name the split asked for and list the ones that exist.
        (dict(name=TFDS_NAME, split="validation"), r"no split 'validation'.*" + _SPLITS_EXIST),
        (dict(name=TFDS_NAME, split="tran"), r"no split 'tran'.*" + _SPLITS_EXIST),
        (dict(name=TFDS_NAME, split="tran[:10%]"), r"no split 'tran' \(asked for split='tran\[:10%\]'\)"),
        (dict(name=TFDS_NAME, split="train+valid[:2]"), r"no split 'valid' .*" + _SPLITS_EXIST),
        (dict(name=TFDS_NAME, split="train[:"), r"Invalid tfds split string 'train\[:'"),
        (dict(name=TFDS_NAME, split="train", image_key="img"), "'img'"),
    ],
)
def test_load_tfds_reports_missing_data(tfds_dir, kwargs, match):
    with pytest.raises(errors.ConfigError, match=match) as info:
        data.load_tfds(data_dir=tfds_dir, **kwargs)
    if kwargs["split"] != "train":  # a bad split of a prepared dataset is not reported as "not prepared"
        assert "must already be prepared" not in str(info.value)


def test_load_tfds_unprepared_dataset_says_prepare_it(tmp_path):
    # A registered tfds dataset with no files in data_dir: the split may well exist, the data does not.
    with pytest.raises(errors.ConfigError, match="must already be prepared in the array_record") as info:
        data.load_tfds("mnist", split="validation", data_dir=str(tmp_path))
    assert "splits that exist" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # reading never builds or downloads anything


def test_load_tfds_percent_slices_of_existing_splits(tfds_dir):
    head = data.load_tfds(TFDS_NAME, split="train[:25%]", data_dir=tfds_dir)
    assert head.ids.tolist() == [0, 1, 2]
    tail = data.load_tfds(TFDS_NAME, split="test[50%:]", data_dir=tfds_dir)
    assert tail.ids.tolist() == [3, 4, 5] and np.array_equal(tail.y, _TEST_LABELS[3:])


def test_get_splits_tfds(tfds_dir):
    base = dict(name="tfds", tfds_name=TFDS_NAME, data_dir=tfds_dir, seed=0, core_fraction=0.5, id_key="uid")
    given = data.get_splits(ml_collections.ConfigDict(dict(base, train_split="train", test_split="test")))
    assert len(given.train) == 12 and len(given.test) == 6
    assert np.array_equal(given.train.ids, _TRAIN_UIDS)
    assert len(given.core_ids) == 6 and np.array_equal(
        np.union1d(given.core_ids, given.user_ids), _TRAIN_UIDS
    )

    # test_split "" (the default): the train split is split three ways.
    split = data.get_splits(ml_collections.ConfigDict(dict(base, train_split="train", test_fraction=0.25)))
    assert len(split.test) == 3 and len(split.train) == 9  # one test sample per class
    assert np.array_equal(np.union1d(split.train.ids, split.test.ids), _TRAIN_UIDS)

    # max_examples and id_key "" / 0 mean "record positions" / "all"; positive max_examples reads a prefix.
    head = data.get_splits(ml_collections.ConfigDict(dict(base, id_key="", test_split="test", max_examples=6)))
    assert head.train.ids.tolist() == list(range(6)) and len(head.test) == 6


def _parse_command_line(*overrides):
    """The finetune job config after ``--config.<path>=<value>`` overrides, parsed by ml_collections as launch/ does."""
    from absl import flags
    from ml_collections import config_flags

    from jaxforget import config as config_lib

    job = config_lib.forget_job("finetune", model=dict(name="mlp", hidden=(8,), num_classes=3))
    argv = ["forget", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", job, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    config_lib.validate_forget_job(config)
    return config


def test_get_splits_tfds_from_the_command_line(tfds_dir):
    """``--config.data.name=tfds --config.data.tfds_name=X --config.data.data_dir=D`` on a stock job config."""
    from jaxforget import methods

    argv = ["--config.data.name=tfds", f"--config.data.tfds_name={TFDS_NAME}", f"--config.data.data_dir={tfds_dir}"]
    config = _parse_command_line(*argv)
    assert (config.data.name, config.data.tfds_name, config.data.data_dir) == ("tfds", TFDS_NAME, tfds_dir)
    s = data.get_splits(config.data)  # defaults: the train split is split three ways, ids are record positions
    assert (len(s.train), len(s.test), len(s.core_ids), len(s.user_ids)) == (9, 3, 3, 6)
    assert np.array_equal(np.union1d(s.train.ids, s.test.ids), np.arange(12))
    assert s.train.image_shape == (4, 4, 1) and s.train.num_classes == 3

    config = _parse_command_line(*argv, "--config.data.test_split=test")
    method = methods.build(config)
    assert (len(method.splits.train), len(method.splits.test)) == (12, 6)
    assert method.splits.test.name == f"{TFDS_NAME}/test"
    assert np.array_equal(method.splits.train.x, _TRAIN_IMAGES[..., None] / np.float32(255))
    assert np.array_equal(method.splits.test.y, _TEST_LABELS)

    # A misspelt split on the command line names the splits that exist.
    config = _parse_command_line(*argv, "--config.data.test_split=validation")
    with pytest.raises(errors.ConfigError, match=r"no split 'validation'.*" + _SPLITS_EXIST):
        data.get_splits(config.data)


# --------------------------------------------------------------------------------- registry, batching


def test_get_splits_digits_matches_make_splits_and_unknown_name():
    cfg = ml_collections.ConfigDict(dict(name="digits", seed=1, test_fraction=0.2, core_fraction=0.3))
    s = data.get_splits(cfg)
    assert s.to_json() == data.make_splits(data.load_digits(), seed=1).to_json()
    # Omitted fields take default_config()'s values; the full default section is the same split.
    full = data.default_config()
    full.seed = 1
    assert data.get_splits(full).to_json() == s.to_json()
    with pytest.raises(KeyError, match="digits.*synthetic.*tfds"):
        data.get_splits(ml_collections.ConfigDict(dict(name="cifar")))


def test_default_config_is_valid_and_complete():
    cfg = data.default_config()
    data.validate_config(cfg)
    assert cfg.name == "digits" and cfg.data_dir == "" and cfg.test_split == "" and cfg.max_examples == 0
    assert set(cfg.keys()) == {
        "name", "seed", "test_fraction", "core_fraction", "n", "image_shape", "num_classes", "tfds_name",
        "data_dir", "train_split", "test_split", "image_key", "label_key", "id_key", "max_examples",
    }
    assert data.default_config() is not cfg  # a fresh copy each call: editing one never changes the defaults
    cfg.seed = 5
    assert data.default_config().seed == 0


def _config(**fields):
    cfg = data.default_config()
    for key, value in fields.items():
        cfg[key] = value
    return cfg


def test_unknown_config_field_is_named_with_the_valid_ones():
    valid = r"valid: \['core_fraction', 'data_dir', .*'test_split', 'tfds_name', 'train_split'\]"
    with pytest.raises(errors.ConfigError, match=r"unknown config field\(s\) \['sede'\]; " + valid):
        data.get_splits(ml_collections.ConfigDict(dict(name="digits", sede=1)))
    cfg = data.default_config()
    with cfg.unlocked():
        cfg.tfds_dir = "/data"
    with pytest.raises(errors.ConfigError, match=r"\['tfds_dir'\]; " + valid):
        data.validate_config(cfg)
    del cfg["tfds_dir"], cfg["max_examples"]
    with pytest.raises(errors.ConfigError, match=r"missing config field\(s\) \['max_examples'\]"):
        data.validate_config(cfg)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(test_fraction=1.5), r"data\.test_fraction must be a number strictly between 0 and 1, got 1\.5"),
        (dict(core_fraction=0.0), r"data\.core_fraction .* got 0\.0"),
        (dict(core_fraction=-0.25), r"data\.core_fraction .* got -0\.25"),
        (dict(seed=-1), r"data\.seed must be an integer >= 0, got -1"),
        (dict(name="synthetic", n=1), r"data\.n must be an integer >= 2, got 1"),
        (dict(name="synthetic", num_classes=1), r"data\.num_classes must be an integer >= 2, got 1"),
        (dict(name="tfds"), r"data\.tfds_name is required when data\.name='tfds'"),
        (dict(name="tfds", tfds_name="mnist", data_dir=None), r"data\.data_dir must be a string, got None"),
        (dict(name="tfds", tfds_name="mnist", max_examples=-1), r"data\.max_examples must be an integer >= 0"),
    ],
)
def test_validate_config_names_the_bad_field(fields, match):
    with pytest.raises(errors.ConfigError, match=match):
        data.validate_config(_config(**fields))
    with pytest.raises(errors.ConfigError, match=match):  # get_splits validates before reading any data
        data.get_splits(ml_collections.ConfigDict(fields))


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(seed="0"), r"data\.seed must be of type int \(default 0\), got '0' of type str"),
        (dict(test_fraction="0.2"), r"data\.test_fraction must be of type float .* got '0\.2' of type str"),
        (dict(name="synthetic", n=10.0), r"data\.n must be of type int .* got 10\.0 of type float"),
    ],
)
def test_get_splits_wrong_type_names_the_field(fields, match):
    with pytest.raises(errors.ConfigError, match=match):
        data.get_splits(ml_collections.ConfigDict(fields))


def test_validate_config_checks_only_the_fields_of_its_dataset():
    # Unused tfds fields may hold anything a string field holds; a digits job never reads them.
    data.validate_config(_config(name="digits", tfds_name="", train_split="whatever"))
    data.validate_config(_config(name="tfds", tfds_name="mnist", data_dir="/data", test_split="test"))
    with pytest.raises(KeyError, match=r"Unknown dataset name 'mnist'; valid names: \['digits'"):
        data.validate_config(_config(name="mnist"))


def test_get_splits_synthetic_uses_its_fields():
    s = data.get_splits(ml_collections.ConfigDict(dict(name="synthetic", n=40, image_shape=(4, 4, 2), num_classes=4,
                                                       seed=2, test_fraction=0.2, core_fraction=0.5)))
    assert (len(s.train), len(s.test), s.train.image_shape, s.train.num_classes) == (32, 8, (4, 4, 2), 4)
    same = data.make_splits(data.synthetic(40, image_shape=(4, 4, 2), num_classes=4, seed=2), test_fraction=0.2,
                            core_fraction=0.5, seed=2)
    assert s.to_json() == same.to_json()


# ------------------------------------------------------------------------------------------- draw_disjoint


def test_draw_disjoint_is_disjoint_sorted_and_reproducible():
    ids = np.arange(100, 160, 3)  # 20 ids, not positions
    draws = data.draw_disjoint(ids, 3, 5, seed=4)
    assert [len(d) for d in draws] == [5, 5, 5]
    flat = np.concatenate(draws)
    assert np.unique(flat).size == 15 and np.isin(flat, ids).all()
    assert all(np.all(np.diff(d) > 0) for d in draws)
    again = data.draw_disjoint(ids, 3, 5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(draws, again, strict=True))
    other = data.draw_disjoint(ids, 3, 5, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(draws, other, strict=True))
    # The first draws do not depend on how many are asked for: a longer stream extends a shorter one.
    assert all(np.array_equal(a, b) for a, b in zip(draws, data.draw_disjoint(ids, 4, 5, seed=4), strict=False))
    everything = data.draw_disjoint(ids, 4, 5, seed=0)
    assert np.array_equal(np.sort(np.concatenate(everything)), ids)  # exactly all of them fits
    assert data.draw_disjoint(ids, 0, 5, seed=0) == []


def test_draw_disjoint_too_many_names_the_numbers():
    with pytest.raises(ValueError, match=r"3 draw\(s\) of 7 ids exceed the 20 ids available"):
        data.draw_disjoint(np.arange(20), 3, 7, seed=0)


def test_batch_indices_cover_each_index_once_and_replay():
    n, bs = 103, 10
    batches = data.batch_indices(n, bs, seed=7, epoch=2)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    flat = np.concatenate(batches)
    assert flat.dtype == np.int64 and np.array_equal(np.sort(flat), np.arange(n))
    replay = data.batch_indices(n, bs, seed=7, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, replay, strict=True))
    other_epoch = np.concatenate(data.batch_indices(n, bs, seed=7, epoch=3))
    other_seed = np.concatenate(data.batch_indices(n, bs, seed=8, epoch=2))
    assert not np.array_equal(flat, other_epoch) and not np.array_equal(flat, other_seed)

    dropped = data.batch_indices(n, bs, seed=7, epoch=2, drop_last=True)
    assert len(dropped) == 10 and all(len(b) == bs for b in dropped)
    assert np.unique(np.concatenate(dropped)).size == 100
    ordered = data.batch_indices(n, bs, seed=7, epoch=2, shuffle=False)
    assert np.array_equal(np.concatenate(ordered), np.arange(n))
    assert data.batch_indices(0, bs, seed=0, epoch=0) == []
    with pytest.raises(errors.ConfigError):
        data.batch_indices(n, 0, seed=0, epoch=0)


@pytest.mark.parametrize(
    "n, multiple, expected", [(0, 4, 4), (1, 4, 4), (4, 4, 4), (5, 4, 8), (1797, 128, 1920)]
)
def test_pad_to_multiple(n, multiple, expected):
    assert data.pad_to_multiple(n, multiple) == expected


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_well_formed():
    a = data.synthetic(50, image_shape=(8, 6, 3), num_classes=5, seed=3)
    b = data.synthetic(50, image_shape=(8, 6, 3), num_classes=5, seed=3)
    c = data.synthetic(50, image_shape=(8, 6, 3), num_classes=5, seed=4)
    assert a.x.shape == (50, 8, 6, 3) and a.x.dtype == np.float32 and a.y.dtype == np.int32
    assert 0.0 <= a.x.min() and a.x.max() <= 1.0 and np.array_equal(a.ids, np.arange(50))
    assert np.bincount(a.y).tolist() == [10] * 5
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.x.std() > 0.1  # real texture, not a flat grey image


def test_synthetic_is_learnable_by_a_linear_model():
    from sklearn.linear_model import LogisticRegression

    shape, k = (8, 8, 3), 10
    # A different seed draws a fresh sample of the same task, so it serves as a test set.
    train = data.synthetic(400, image_shape=shape, num_classes=k, seed=0)
    test = data.synthetic(300, image_shape=shape, num_classes=k, seed=1)
    clf = LogisticRegression(max_iter=300).fit(train.x.reshape(len(train), -1), train.y)
    accuracy = clf.score(test.x.reshape(len(test), -1), test.y)
    assert accuracy > 0.5, accuracy  # chance is 0.1
