"""Which models `kiln serve` registers: --model (repeatable, NAME=MODEL), --models-config,
--model-id, and the checks on them. No model is loaded here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kiln.cli.main import build_parser
from kiln.cli.options import EngineOptions
from kiln.cli.serve import ServedModels, model_specs
from kiln.config import ConfigError
from kiln.serving.models import ModelManager, ModelSpec, default_name, read_models_config


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("/models/llama-3/", "llama-3"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
        ("owner/repo:model.Q4_1.gguf", "repo"),
        ("/models/smol.gguf", "smol.gguf"),
        (None, "smollm2-135m-instruct"),
    ],
)
def test_default_names(model: str | None, name: str):
    assert default_name(model) == name


def test_parse_model_flags():
    assert ModelSpec.parse("/m/llama", dtype="float32") == ModelSpec(
        "llama", "/m/llama", {"dtype": "float32"}
    )
    assert ModelSpec.parse("chat=owner/repo") == ModelSpec("chat", "owner/repo", {})


def test_specs_are_checked():
    with pytest.raises(ConfigError, match="unknown option"):
        ModelSpec("a", "/m/a", {"temperature": 0.5})
    with pytest.raises(ConfigError, match="non-empty"):
        ModelSpec("", "/m/a")
    with pytest.raises(ConfigError, match="two models are named 'a'"):
        ModelManager([ModelSpec("a", "/x/a"), ModelSpec("a", "/y/a")])
    with pytest.raises(ConfigError, match="at least one"):
        ModelManager([])


def test_models_config(tmp_path: Path):
    path = tmp_path / "models.json"
    path.write_text(
        json.dumps(
            {
                "models": [
                    {"name": "llama3", "model": "/models/llama3", "dtype": "bfloat16"},
                    {"model": "/models/mistral"},
                ],
                "default": "mistral",
            }
        )
    )
    specs, default = read_models_config(path, dtype="auto", device="cpu")
    assert specs == [
        ModelSpec("llama3", "/models/llama3", {"dtype": "bfloat16", "device": "cpu"}),
        ModelSpec("mistral", "/models/mistral", {"dtype": "auto", "device": "cpu"}),
    ]
    assert default == "mistral"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "cannot read"),
        ('{"models": []}', "expected"),
        ('{"models": [{"model": 3}]}', "bad model"),
        ('{"models": [{"model": "/m", "flavour": "x"}]}', "unknown option"),
    ],
)
def test_bad_models_config(tmp_path: Path, content: str, needle: str):
    path = tmp_path / "models.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        read_models_config(path)


def _serve_specs(*argv: str) -> tuple[list[ModelSpec], str]:
    args = vars(build_parser().parse_args(["serve", *argv]))
    models = ServedModels(**{k: args[k] for k in ("model", "dtype", "device", "threads")})
    return model_specs(models, args["models_config"], args["model_id"], max_num_seqs=4)


def test_serve_registers_every_model(tmp_path: Path):
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": [{"name": "c", "model": "/m/c"}]}))

    specs, default = _serve_specs(
        "--model", "/m/a", "--model", "b=/m/b", "--models-config", str(config), "--dtype", "float32"
    )

    assert [(s.name, s.model) for s in specs] == [("a", "/m/a"), ("b", "/m/b"), ("c", "/m/c")]
    assert default == "a"
    assert specs[0].options["dtype"] == "float32"
    assert specs[0].options["max_num_seqs"] == 4


def test_serve_defaults_and_model_id():
    specs, default = _serve_specs()
    assert [(s.name, s.model) for s in specs] == [("smollm2-135m-instruct", None)]
    assert default == "smollm2-135m-instruct"

    specs, default = _serve_specs("--model", "/m/a", "--model", "/m/b", "--model-id", "mine")
    assert [s.name for s in specs] == ["mine", "b"]
    assert default == "mine"


def test_serve_default_must_be_registered(tmp_path: Path):
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": [{"model": "/m/c"}], "default": "d"}))
    with pytest.raises(ConfigError, match="'d' is none of"):
        _serve_specs("--models-config", str(config))


def test_serve_engine_flags_reach_every_model_spec():
    args = vars(
        build_parser().parse_args(
            ["serve", "--model", "/m/a", "--block-size", "32", "--no-enable-prefix-caching"]
        )
    )
    engine = EngineOptions(**{f.name: args[f.name] for f in dataclasses.fields(EngineOptions)})
    models = ServedModels(**{k: args[k] for k in ("model", "dtype", "device", "threads")})
    (spec,), _ = model_specs(models, None, None, **engine.as_options())
    assert spec.args.block_size == 32
    assert spec.args.enable_prefix_caching is False
    assert spec.args.max_num_seqs == EngineOptions().max_num_seqs == 64


def test_serve_quantize_flag_reaches_the_model_spec():
    args = vars(build_parser().parse_args(["serve", "--model", "/m/a", "--quantize", "int8"]))
    models = ServedModels(**{k: args[k] for k in ("model", "dtype", "quantize", "device")})
    (spec,), _ = model_specs(models)
    assert spec.args.quantize == "int8"
