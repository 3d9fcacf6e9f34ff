"""The model-family registry: the only place that knows the architectures' names."""

import inspect
import re
from pathlib import Path

import pytest
from train_harness import TINY

from lvx_megatron import training
from lvx_megatron.training.config import ConfigError, load_config
from lvx_megatron.training.families import FAMILIES

TRAINING = Path(training.__file__).parent


def test_unknown_architecture_names_every_registered_family():
    allowed = ", ".join(repr(name) for name in list(FAMILIES)[:-1]) + f" or {list(FAMILIES)[-1]!r}"
    with pytest.raises(ConfigError) as error:
        load_config(TINY, {"model.architecture": "llava"})
    assert str(error.value) == f"config error: model.architecture: Input should be {allowed} (got 'llava')"
    assert list(FAMILIES) == ["mllama", "openflamingo", "mplug_owl3"]


def test_training_code_never_branches_on_the_architecture_name():
    names = "|".join(FAMILIES)
    branch = re.compile(rf"architecture\s*(==|!=|\bin\b|\bnot in\b)|(==|!=)\s*[\"']({names})[\"']")
    families = TRAINING / "families"
    offending = [
        f"{path.relative_to(TRAINING)}:{number}: {line.strip()}"
        for path in sorted(TRAINING.rglob("*.py"))
        if families not in path.parents
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert not offending, offending


@pytest.mark.parametrize("name", list(FAMILIES))
def test_model_inputs_are_the_forward_arguments(name):
    """What the trainer hands the model is exactly what the family's ``forward`` takes."""
    family = FAMILIES[name]
    model_class = inspect.signature(family.build).return_annotation
    assert family.name == name
    assert set(family.model_inputs) == set(inspect.signature(model_class.forward).parameters) - {"self"}
