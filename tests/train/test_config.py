"""Config loading: defaults, bundled configs, overrides, and the clean errors for bad input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddtrain.config import Config, config_path, load_config
from ddtrain.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("name", ["mlp", "quickstart", "tanh", "tiny"])
def test_bundled_configs_load(name):
    cfg = load_config(name)
    assert cfg.model.layers and cfg.train.batch_size >= 1


def test_quickstart_is_the_tutorial():
    cfg = load_config("quickstart")
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.001, 0.0)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.data.normalize) == (64, 5, "unit")
    assert [l.get("out") for l in cfg.model.layers if l["type"] == "linear"] == [512, 512, 10]


def test_overrides_and_sets_apply_in_order():
    cfg = load_config("tiny", {"train.epochs": 3, "optimizer.lr": 0.2}, ["optimizer.lr=0.3", "dist.overlap=false"])
    assert cfg.train.epochs == 3 and cfg.optimizer.lr == 0.3 and cfg.dist.overlap is False


def test_int_accepted_for_float_and_digest_is_stable():
    a = load_config("tiny", sets=["optimizer.lr=1"])
    assert a.optimizer.lr == 1.0 and isinstance(a.optimizer.lr, float)
    assert a.digest() == load_config("tiny", sets=["optimizer.lr=1.0"]).digest()
    assert a.digest() != load_config("tiny").digest()


@pytest.mark.parametrize("text, message", [
    ("optimizer: {lrr: 0.1}\n", "unknown key optimizer.lrr (did you mean 'lr'?)"),
    ("optimiser: {lr: 0.1}\n", "unknown section 'optimiser' (did you mean 'optimizer'?)"),
    ("optimizer: {lr: fast}\n", "optimizer.lr: expected float, got str 'fast'"),
    ("optimizer: {lr: -0.1}\n", "optimizer.lr must be > 0.0, got -0.1"),
    ("optimizer: {lr: 0}\n", "optimizer.lr must be > 0.0, got 0.0"),
    ("train: {epochs: 2.5}\n", "train.epochs: expected int, got float 2.5"),
    ("train: {batch_size: true}\n", "train.batch_size: expected int, got bool True"),
    ("optimizer: {name: adamm}\n", "optimizer.name must be one of sgd, adam, adamw, not 'adamm' (did you mean 'adam'?)"),
    ("train: [1, 2]\n", "section 'train' must be a mapping of keys, got list"),
    ("- 1\n- 2\n", "expected a mapping of sections"),
    ("train: {epochs: 1\n", "malformed YAML at line 2"),
    ("model: {layers: []}\n", "model.layers must be a non-empty list"),
    ("dist: {shared_memory: maybe}\n", "dist.shared_memory: expected bool or 'auto', got str 'maybe'"),
    ("dist: {shared_memory: 1}\n", "dist.shared_memory: expected bool or 'auto', got int 1"),
])
def test_bad_config_files_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_unknown_config_name_lists_bundled():
    with pytest.raises(ConfigError, match="one of cnn, cnn-small, mlp, quickstart, tanh, tiny.*did you mean 'mlp'"):
        config_path("mpl")


def test_shared_memory_takes_auto_true_or_false():
    assert load_config("mlp").dist.shared_memory == "auto"  # the default: wherever it applies
    for text, value in (("auto", "auto"), ("true", True), ("false", False)):
        assert load_config("mlp", sets=[f"dist.shared_memory={text}"]).dist.shared_memory == value


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("tiny", sets=["lr"])
    with pytest.raises(ConfigError, match="expected section.key"):
        load_config("tiny", sets=["lr=0.1"])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_yaml_text_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(text)
    try:
        cfg = load_config(str(path))
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(cfg, Config)


yaml_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "optimizer", "train", "data", "dist", "schedule", "x"]),
                       st.dictionaries(st.sampled_from(["lr", "epochs", "batch_size", "name", "layers", "overlap",
                                                        "seed", "normalize", "y"]), yaml_values, max_size=3),
                       max_size=3))
def test_arbitrary_config_structures_never_crash(tmp_path_factory, data):
    import yaml
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(str(path))
    except ConfigError:
        pass
