"""One definition per option: the flags are made from the config dataclasses."""

import dataclasses
import typing

import pytest
from absl import flags

from jaxgpt import config, main  # noqa: F401  (main: the entry point loads)
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.run import cli, configs
from jaxgpt.run.configs import MeshConfig, RunConfig, SampleConfig

FLAG_FIELDS = {
    f.name: (f, hint) for cls in configs.ALL for f, hint in config.flag_fields(cls)
}


def test_every_option_is_a_flag_with_its_default_and_help():
    """91 options, one flag each, whose default and help are the field's."""
    assert (
        len(FLAG_FIELDS) == sum(len(config.flag_fields(c)) for c in configs.ALL) == 91
    )
    main_flags = {
        name
        for name, flag in flags.FLAGS._flags().items()
        if flags.FLAGS.find_module_defining_flag(name) == cli.__name__
        and name == flag.name
        and name not in ("help", "helpshort")  # absl's, shown by cli.help_text.
    }
    assert main_flags == set(FLAG_FIELDS)  # No flag without a field, nor the reverse.
    for name, (field, hint) in FLAG_FIELDS.items():
        flag = flags.FLAGS[name]
        assert flag.default == field.default, name
        assert flag.help.endswith(field.metadata["help"]), name  # Enums add choices.
        if typing.get_origin(hint) is typing.Literal:
            assert flag.parser.enum_values == list(typing.get_args(hint)), name


def test_fields_without_help_are_not_flags():
    assert "vocab_size" not in FLAG_FIELDS  # Set by the tokenizer.
    assert not hasattr(flags.FLAGS, "vocab_size")


def test_bias_has_one_default():
    """It once defaulted to True in ModelConfig and to False as a flag."""
    assert ModelConfig(vocab_size=5).bias is flags.FLAGS["bias"].default is False


@pytest.mark.parametrize(
    "cls,kw,words",
    [
        (ModelConfig, {"vocab_size": 5, "model": "lstm"}, ["--model='lstm'", "'gpt'"]),
        (ModelConfig, {"vocab_size": 5, "dtype": "fp8"}, ["--dtype='fp8'"]),
        (RunConfig, {"mode": "serve"}, ["--mode='serve'", "'sample'"]),
        (SampleConfig, {"checkpoint": "oldest"}, ["--checkpoint='oldest'"]),
        (SampleConfig, {"top_k": -1}, ["--top_k=-1"]),
        (RunConfig, {"peak_tflops": 0.0}, ["--peak_tflops=0.0"]),
        (MeshConfig, {"mesh_fsdp": 0}, ["--mesh_fsdp=0"]),
        (MeshConfig, {"num_processes": 2}, ["--coordinator_address"]),
    ],
)
def test_configs_validate_and_name_the_flag(cls, kw, words):
    with pytest.raises(ConfigError) as e:
        cls(**kw)
    for word in words:
        assert word in str(e.value)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SampleConfig().top_k = 3


def test_docs_flags_md_is_made_from_the_configs():
    """docs/flags.md lists every flag as config.py defines it (regenerate it
    with `python -m jaxgpt.run.cli > docs/flags.md`)."""
    from conftest import REPO

    from jaxgpt.run import cli

    assert (REPO / "docs" / "flags.md").read_text() == cli.markdown()


def test_every_model_name_has_its_kind():
    """--model's choices and config.KINDS name the same models."""
    hint = typing.get_type_hints(ModelConfig)["model"]
    assert set(typing.get_args(hint)) == set(config.KINDS)
    assert ModelConfig(vocab_size=5, model="lecture_head").kind.lecture
    assert not ModelConfig(vocab_size=5, model="bigram").kind.gpt


def test_the_option_lists_name_fields_of_their_config():
    """ARCHITECTURE_CHOICES, RUNTIME_FIELDS and FREE_ON_RESUME name fields of
    their config, in its order (a renamed field would drop out unnoticed)."""
    lists = [
        (ModelConfig, config.ARCHITECTURE_CHOICES),
        (ModelConfig, config.RUNTIME_FIELDS),
        *configs.FREE_ON_RESUME.items(),
    ]
    for cls, names in lists:
        fields = [f.name for f in dataclasses.fields(cls)]
        assert [n for n in fields if n in names] == list(names), (cls, names)
