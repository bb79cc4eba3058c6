from pathlib import Path

import pytest
import yaml

from dtrain.config import Config, ConfigError, describe_keys, iter_keys, load_config, save_run_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.optim.lr == 1e-4 and cfg.parallel.engine == "ddp"


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_config_loads(path):
    load_config(path)


def test_yaml_then_overrides_in_order(tmp_path):
    cfg_file = write(tmp_path / "a.yaml", "optim:\n  lr: 3e-5\n  name: lamb\ndata:\n  max_seq_len: 256\n")
    cfg = load_config(cfg_file, ["optim.lr=1e-4", "data.num_workers=0", "model.dropout=null"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.name == "lamb"  # from the file, untouched by the overrides
    assert cfg.data.max_seq_len == 256 and cfg.data.num_workers == 0
    assert cfg.model.dropout is None
    # YAML 1.1 reads 3e-5 as a string; the float field accepts it as a number
    assert load_config(cfg_file).optim.lr == pytest.approx(3e-5)


def test_override_value_types():
    cfg = load_config(None, ["optim.betas=[0.8, 0.95]", "peft.lora_target_modules=query,key,value",
                             "data.shuffle=false", "parallel.engine=deepspeed", "parallel.zero_stage=3",
                             "schedule.max_steps=100"])
    assert cfg.optim.betas == [0.8, 0.95]
    assert cfg.peft.lora_target_modules == ["query", "key", "value"]
    assert cfg.data.shuffle is False
    assert cfg.parallel.zero_stage == 3 and isinstance(cfg.parallel.zero_stage, int)
    assert cfg.schedule.max_steps == 100


def test_unknown_key_names_path_and_closest_valid_key():
    with pytest.raises(ConfigError, match=r"^unknown key optim\.lrr — did you mean optim\.lr\? "):
        load_config(None, ["optim.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key otpim\.lr — did you mean optim\.lr\?"):
        load_config(None, ["otpim.lr=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key data\.zzzzzz — run `dtrain config keys`"):
        load_config(None, ["data.zzzzzz=1"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    cfg_file = write(tmp_path / "bad.yaml", "data:\n  max_seq_lenn: 128\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file)
    assert str(e.value) == (f"unknown key data.max_seq_lenn — did you mean data.max_seq_len? (in {cfg_file})")


def test_wrong_type_names_path_expected_type_and_value(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lr=abc"])
    assert str(e.value) == "optim.lr: expected float, got abc (command-line override optim.lr=abc)"
    cfg_file = write(tmp_path / "t.yaml", "data:\n  max_seq_len: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"^data\.max_seq_len: expected int, got \[1, 2\] \(list\) \(in .*t\.yaml\)"):
        load_config(cfg_file)
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage: expected one of 0, 1, 2, 3, got 5 \(command-line"):
        load_config(None, ["parallel.zero_stage=5"])
    with pytest.raises(ConfigError, match=r"data\.shuffle: expected bool, got maybe"):
        load_config(None, ["data.shuffle=maybe"])
    with pytest.raises(ConfigError, match=r"optim is a section: set its keys"):
        load_config(None, ["optim=3"])


def test_out_of_range_and_cross_key_checks():
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be > 0, got -1\.0 \(command-line override optim\.lr=-1\)"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage=2 needs parallel\.engine=deepspeed"):
        load_config(None, ["parallel.zero_stage=2"])


def test_malformed_override():
    with pytest.raises(ConfigError, match=r"override 'optim\.lr' must look like key=value"):
        load_config(None, ["optim.lr"])


def test_inheritance_base_and_defaults_list(tmp_path):
    write(tmp_path / "root.yaml", "seed: 1\noptim:\n  lr: 0.1\n  name: lamb\n")
    write(tmp_path / "mid.yaml", "base: root.yaml\noptim:\n  lr: 0.2\ndata:\n  max_seq_len: 64\n")
    write(tmp_path / "extra.yaml", "data:\n  num_workers: 7\n")
    leaf = write(tmp_path / "leaf.yaml", "defaults: [mid.yaml, extra.yaml]\ndata:\n  max_seq_len: 32\n")
    cfg = load_config(leaf)
    assert (cfg.seed, cfg.optim.name, cfg.optim.lr) == (1, "lamb", 0.2)
    assert (cfg.data.max_seq_len, cfg.data.num_workers) == (32, 7)


def test_inheritance_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base file .*nowhere\.yaml not found; fix the base: entry"):
        load_config(tmp_path / "c.yaml")


def test_invalid_yaml_is_one_line(tmp_path):
    cfg_file = write(tmp_path / "broken.yaml", "optim: {lr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file)
    assert "broken.yaml: not valid YAML" in str(e.value) and "\n" not in str(e.value)


def test_run_config_round_trips_and_is_never_silently_overwritten(tmp_path):
    cfg = load_config(REPO / "configs/pretrain/debug.yaml", [f"run_dir={tmp_path / 'run'}"])
    path = save_run_config(cfg)
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(path) == cfg
    save_run_config(cfg)  # same config again: nothing new
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
    changed = load_config(path, ["optim.lr=0.5"])
    save_run_config(changed)
    assert load_config(path).optim.lr == 0.5
    assert load_config(path.parent / "config.1.yaml") == cfg


def test_readme_documents_every_key_as_the_schema_says():
    readme = (REPO / "README.md").read_text()
    assert describe_keys(markdown=True) in readme, "stale README key table: paste `dtrain config keys --markdown`"
    assert all(f"| `{p}` |" in readme for p, _, _ in iter_keys())


def test_to_yaml_is_plain_yaml():
    assert yaml.safe_load(Config().to_yaml()) == Config().to_dict()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_resolves(path):
    cfg = load_config(REPO / path)
    if path.startswith("configs/finetune/"):
        assert cfg.data.train, "a fine-tuning config names its training set"
