"""The model families: one module each, registered here once; training code looks a family up by
``model.architecture`` and never branches on its name (docs/architectures.md: how to add one)."""

from ..config import RunConfig
from .mllama import MLLAMA
from .mplug_owl3 import MPLUG_OWL3
from .openflamingo import OPENFLAMINGO
from .spec import ModelFamily

FAMILIES: dict[str, ModelFamily] = {
    MLLAMA.name: MLLAMA,
    OPENFLAMINGO.name: OPENFLAMINGO,
    MPLUG_OWL3.name: MPLUG_OWL3,
}


def family(cfg: RunConfig) -> ModelFamily:
    """The family of ``cfg.model.architecture`` (validated against :data:`FAMILIES` by the config)."""
    return FAMILIES[cfg.model.architecture]


__all__ = ["FAMILIES", "ModelFamily", "family"]
