from pathlib import Path

import pytest

from sft_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
name: x
model: {path: some/model}
data:
  train: [{path: train.jsonl, format: instruction}]
"""


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    assert cfg.name
    assert Path(cfg.storage.path).is_absolute() or cfg.storage.path.startswith("s3://")
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and "--config jobs/configs/" + path.name in first_line


def test_defaults_and_relative_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.storage.path == str(tmp_path / "runs")
    assert cfg.data.train[0].path == str(tmp_path / "train.jsonl")
    assert cfg.model.path == "some/model"  # not a local folder: kept as a hub id
    assert cfg.quantization is None and cfg.lora.r == 8


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rat: unknown key"):
        load_config(_write(tmp_path, BASE + "train: {learning_rat: 0.1}\n"))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"modle: unknown key"):
        load_config(_write(tmp_path, BASE + "modle: {}\n"))


def test_bad_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate: .*greater than 0"):
        load_config(_write(tmp_path, BASE), ["train.learning_rate=-1"])
    with pytest.raises(ConfigError, match=r"data\.train\.0\.format"):
        load_config(_write(tmp_path, BASE.replace("format: instruction", "format: nope")))
    blamed = r"scaling\.num_workers: .*integer.* \(from the override scaling.num_workers=two\)"
    with pytest.raises(ConfigError, match=blamed):
        load_config(_write(tmp_path, BASE), ["scaling.num_workers=two"])
    with pytest.raises(ConfigError) as err:  # a bad value in the file is not blamed on an override
        load_config(_write(tmp_path, BASE + "train: {epochs: -1}\n"), ["train.learning_rate=0.1"])
    assert "train.epochs: Input should be greater than 0" in str(err.value) and "override" not in str(err.value)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        _write(tmp_path, BASE),
        ["train.learning_rate=1e-3", "scaling.num_workers=3", "lora.target_modules=[q_proj]", "name=y"],
    )
    assert cfg.train.learning_rate == 1e-3 and cfg.scaling.num_workers == 3
    assert cfg.lora.target_modules == ["q_proj"] and cfg.name == "y"


def test_override_syntax_and_sections(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(_write(tmp_path, BASE), ["train.learning_rate"])
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(_write(tmp_path, BASE), ["name.x=1"])
    with pytest.raises(ConfigError, match=r"storage\.nope: unknown key"):
        load_config(_write(tmp_path, BASE), ["storage.nope=1"])
    with pytest.raises(ConfigError, match=r"override 'lora.target_modules=\[foo': the value is not valid YAML"):
        load_config(_write(tmp_path, BASE), ["lora.target_modules=[foo"])
    with pytest.raises(ConfigError, match="override 'name=\x01': the value is not valid YAML"):
        load_config(_write(tmp_path, BASE), ["name=\x01"])  # a reader error, not a parser error


def test_model_path_is_a_folder_or_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert load_config(_write(tmp_path, BASE), ["model.path=models/mine"]).model.path == str(tmp_path / "models/mine")
    assert load_config(_write(tmp_path, BASE), ["model.path=Qwen/Qwen2.5-0.5B"]).model.path == "Qwen/Qwen2.5-0.5B"
    for missing in ("/no/such/model", "./models/nope", "models/a/b", "~/nope-model-dir", "~nosuchuser/m"):
        with pytest.raises(ConfigError, match=r"model.path: .* is neither a folder.* nor a hub id"):
            load_config(_write(tmp_path, BASE), [f"model.path={missing}"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"model: Field required"):
        load_config(_write(tmp_path, "name: x\ndata: {train: [{path: a}]}\n"))


def test_reserved_name(tmp_path):
    with pytest.raises(ConfigError, match="reserved"):
        load_config(_write(tmp_path, BASE), ["name=datasets"])


def test_an_unknown_key_suggests_the_close_one(tmp_path):
    text = BASE.replace("format: instruction}", "formt: instruction}") + "quantization: {quant_typ: nf4}\n"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), ["data.chat_template_kwarg={enable_thinking: false}"])
    message = str(err.value)
    assert "data.train.0.formt: unknown key (did you mean format?)" in message
    assert "quantization.quant_typ: unknown key (did you mean quant_type?)" in message
    assert "data.chat_template_kwarg: unknown key (did you mean chat_template_kwargs?) (from the override" in message


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["lora=null", "quantization.quant_type=nf4"], "set lora, or quantization: null"),
        (["scaling.strategy=fsdp", "scaling.num_workers=1"], "scaling.strategy=fsdp shards the model over the workers"),
        (["scaling.cpu_offload=true"], "scaling.cpu_offload .* needs scaling.strategy=fsdp"),
        (["scaling.strategy=fsdp", "scaling.cpu_offload=true"], "scaling.cpu_offload: the workers train on CPUs"),
        (["scaling.strategy=fsdp", "data.chat_template=chatml"], "data.chat_template=chatml .* FSDP cannot shard"),
    ],
)
def test_combinations_that_cannot_train_are_refused_naming_the_keys(tmp_path, overrides, names):
    with pytest.raises(ConfigError, match=names):
        load_config(_write(tmp_path, BASE), overrides)


def test_full_fine_tuning_and_fsdp_combinations_that_train_load(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["lora=null", "scaling.strategy=fsdp", "data.chat_template=chatml"])
    assert cfg.lora is None and cfg.scaling.strategy == "fsdp"
    cfg = load_config(_write(tmp_path, BASE), ["scaling.strategy=fsdp", "quantization.quant_type=nf4"])
    assert cfg.quantization.quant_type == "nf4" and cfg.lora is not None
