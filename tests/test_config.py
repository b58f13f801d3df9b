from pathlib import Path

import pytest

from tsopsd.config import Config, ConfigError, load_config, parse_set

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
REQUIRED = {"model.path": "ckpt", "data.prompts": "p.jsonl", "output.out": "out"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path, REQUIRED)
    assert isinstance(cfg, Config)
    assert path.read_text().startswith("# tsopsd reheat")  # each file opens with its command


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    assert load_config(None, REQUIRED).train.steps == 200
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  steps: 7\n  lr: 0.5\nseed: 3\n")
    cfg = load_config(y, REQUIRED)
    assert (cfg.train.steps, cfg.train.lr, cfg.seed) == (7, 0.5, 3)
    cfg = load_config(y, {**REQUIRED, "train.steps": "9"})
    assert (cfg.train.steps, cfg.train.lr) == (9, 0.5)  # coerced from a string; other keys kept


def test_rollout_compile_takes_yamls_booleans_and_refuses_others(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("rollout:\n  compile: true\n")
    assert load_config(y, REQUIRED).rollout.compile == "true"
    assert load_config(None, REQUIRED).rollout.compile == "auto"
    with pytest.raises(ConfigError, match="rollout.compile: must be one of"):
        load_config(None, {**REQUIRED, "rollout.compile": "always"})


def test_unknown_keys_and_bad_values_reported_all_at_once(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  stepz: 7\n  lr: fast\nloss:\n  divergence: kl\n  beta: 1.5\nteacher:\n  temperature: 0.8\n")
    with pytest.raises(ConfigError) as e:
        load_config(y, REQUIRED)
    msg = str(e.value)
    for part in ("train.stepz: unknown key", "train.lr: must be a number", "loss.divergence: must be one of",
                 "teacher.temperature: must be > 1", "loss.beta: must be in (0, 1)", str(y)):
        assert part in msg, part


def test_teacher_needs_exactly_one_setting_and_adapter_needs_lora():
    with pytest.raises(ConfigError, match="exactly one of temperature, target_entropy"):
        load_config(None, {**REQUIRED, "teacher.temperature": None})  # none chosen (one alone now unsets tau)
    cfg = load_config(None, {**REQUIRED, "teacher.temperature": None, "teacher.target_entropy": 2.0})
    assert cfg.teacher.temperature is None and cfg.teacher.target_entropy == 2.0
    with pytest.raises(ConfigError, match="'adapter' needs train.mode lora"):
        load_config(None, {**REQUIRED, "train.mode": "full", "output.save": "adapter"})
    with pytest.raises(ConfigError, match="model.path: required"):
        load_config(None, {"data.prompts": "p", "output.out": "o"})


def test_parse_set_and_bad_yaml(tmp_path):
    cfg = load_config(None, {**REQUIRED, **parse_set(["train.lr=2e-5", "stop.rollback=false", "model.base="])})
    assert (cfg.train.lr, cfg.stop.rollback, cfg.model.base) == (2e-5, False, None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["oops"])
    y = tmp_path / "bad.yaml"
    y.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(y, REQUIRED)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml", REQUIRED)


def test_choosing_one_teacher_way_unsets_the_default_temperature(tmp_path):
    """A YAML with only `teacher.target_entropy` means that: not that plus the default tau, refused."""
    from tsopsd.config import load_config

    only = tmp_path / "only.yaml"
    only.write_text("teacher:\n  target_entropy: 2.0\n")
    t = load_config(only, inputs=False).teacher
    assert (t.temperature, t.target_entropy, t.target_entropy_from) == (None, 2.0, None)
    t = load_config(only, {"teacher.temperature": 1.3}, inputs=False).teacher  # a later layer's choice wins
    assert (t.temperature, t.target_entropy) == (1.3, None)
    t = load_config(None, {"teacher.target_entropy_from": "sft"}, inputs=False).teacher
    assert (t.temperature, t.target_entropy_from) == (None, "sft")
    with pytest.raises(ConfigError, match="set exactly one"):  # two in one layer are still a contradiction
        load_config(None, {"teacher.target_entropy": 2.0, "teacher.temperature": 1.5}, inputs=False)


def test_a_shipped_config_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the repository: the name still finds configs/lora.yaml
    assert load_config("lora", inputs=False).train.mode == "lora"
    assert load_config("tiny-cpu", inputs=False) == load_config(CONFIGS[0].parent / "tiny-cpu.yaml", inputs=False)
    with pytest.raises(ConfigError, match="shipped configs by name: .*lora"):
        load_config("lorra", inputs=False)


def test_default_yaml_is_made_from_the_config_fields_and_loads_as_the_defaults():
    """configs/default.yaml is `python -m tsopsd.config_doc`'s output: every key with its default and the help of its
    field, so a key's sentence is written once (the CLI's flags take theirs from the same fields)."""
    import dataclasses

    from tsopsd.config_doc import default_yaml, help_of

    shipped = (ROOT / "configs" / "default.yaml").read_text()
    assert shipped == default_yaml(), "regenerate: python -m tsopsd.config_doc > configs/default.yaml"
    assert load_config(ROOT / "configs" / "default.yaml", inputs=False) == Config()
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        names = [f"{section.name}.{f.name}" for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) \
            else [section.name]
        for key in names:
            said = help_of(key)
            assert said and " ".join(said.split()[:4]) in " ".join(shipped.replace("#", " ").split()), key
