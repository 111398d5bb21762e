"""Config loading: YAML, dotted overrides, and one clear line per problem."""

import pytest

from moelab import Config, ConfigError, load_config
from moelab.cli import main
from moelab.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def problems(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    return e.value.problems


def test_defaults_yaml_and_override_precedence(tmp_path):
    cfg = load_config(
        write(tmp_path, "model:\n  d_model: 64\n  moe:\n    top_k: 1\n"),
        ["moe.top_k=3", "model.n_layers=2", "train.lr=0.01", "moe.layers=[0]"],
    )
    assert isinstance(cfg, Config)
    assert cfg.model.d_model == 64 and cfg.model.moe.top_k == 3 and cfg.model.n_layers == 2
    assert cfg.train.lr == 0.01 and cfg.model.moe.layers == [0]
    assert cfg.model.n_heads == Config().model.n_heads  # untouched default


def test_unknown_key_names_nearest(tmp_path):
    (p,) = problems(tmp_path, "model:\n  d_modle: 64\n")
    assert "model.d_modle: unknown key (did you mean 'd_model'?)" in p


def test_wrong_type(tmp_path):
    (p,) = problems(tmp_path, "model:\n  n_layers: four\n")
    assert p.startswith("model.n_layers: expected int, got str 'four'")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model:\n  moe:\n    top_k: 9\n", "model.moe.top_k: 9 is larger than moe.num_experts=8"),
        ("model:\n  d_model: 100\n  n_heads: 8\n", "model.d_model: 100 is not divisible by n_heads=8"),
        ("model:\n  n_heads: 8\n  n_kv_heads: 3\n", "model.n_heads: 8 is not divisible by n_kv_heads=3"),
        ("model:\n  moe:\n    router: softmx_topk\n", "did you mean 'softmax_topk'?"),
        ("model:\n  moe:\n    capacity_factor: -1\n", "model.moe.capacity_factor: expected > 0 or null"),
        ("model:\n  moe:\n    layers: every:x\n", "model.moe.layers: expected 'all', 'none'"),
        ("model:\n  moe:\n    layers: [0, 9]\n", "model.moe.layers: layer indices must be in [0, 4)"),
        ("model:\n  moe:\n    router: expert_choice\n", "expert_choice routing needs a capacity factor"),
        ("train:\n  dtype: float64\n", "train.dtype: expected one of float32, bfloat16, float16, got 'float64'"),
        ("train:\n  peak_flops: -1\n", "train.peak_flops: expected >= 0 (0 = no MFU) or null, got -1"),
    ],
)
def test_inconsistent_values(tmp_path, text, needle):
    ps = problems(tmp_path, text)
    assert any(needle in p for p in ps), ps


def test_every_problem_reported_once(tmp_path):
    ps = problems(tmp_path, "model:\n  d_modl: 1\n  moe:\n    top_k: 20\n    num_experts: 4\n")
    assert len(ps) == 2


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(write(tmp_path, ""), ["moe.top_k"])


def test_cli_reports_one_line_per_problem(tmp_path, capsys):
    path = write(tmp_path, "model:\n  d_modl: 1\n  moe:\n    top_k: 20\n")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("moelab info: error: ") for line in err)
    assert "Traceback" not in "".join(err)


def test_load_config_takes_a_path_a_dict_or_a_config_and_never_edits_its_input(tmp_path):
    from moelab.config import Config, load_config

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  moe:\n    top_k: 1\n")
    from_path = load_config(path, ["moe.num_experts=4"])
    data = {"model": {"moe": {"top_k": 1}}}
    from_dict_ = load_config(data, ["moe.num_experts=4"])
    assert data == {"model": {"moe": {"top_k": 1}}}  # the caller's dict is untouched
    from_cfg = load_config(from_dict_, ["train.lr=0.5"])
    assert from_path == from_dict_ and from_cfg.model == from_dict_.model and from_cfg.train.lr == 0.5
    assert from_dict_.train.lr != 0.5 and load_config(from_cfg) is from_cfg
    assert load_config() == Config()
    with pytest.raises(TypeError, match="YAML path"):
        load_config(42)
