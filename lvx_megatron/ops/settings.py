"""The cross-attention settings a config hands to the ops, checked in one place.

The run config (``model.cross_attention``), megatron-core's ``CrossAttentionTransformerConfig`` and
:class:`~.policy.CrossAttentionOp` name the same settings differently; each passes its own field
names and gets a :class:`~.errors.SettingError` naming the field to change.
"""

from dataclasses import dataclass

from .backends import check_backend_name
from .errors import SettingError
from .registry import AUTO, REGISTRY, STRATEGIES, TWO_LEVEL_STRATEGIES


@dataclass(frozen=True)
class SettingFields:
    """How a config names the settings in its messages."""

    strategy: str = "strategy"
    backend: str = "backend"
    ranks_per_node: str = "ranks_per_node"
    layers: str = "cross_attention_layers"


def check_registered_strategy(name: object, field: str, two_level_needs: str) -> None:
    """SettingError naming ``field`` unless ``name`` is ``"auto"`` or a registered strategy
    (``two_level_needs``: what the two-level ones need, for the message)."""
    if name != AUTO and name not in REGISTRY:
        raise SettingError(
            field,
            f"must be {AUTO!r} or one of {sorted(STRATEGIES)} (or {sorted(TWO_LEVEL_STRATEGIES)}, "
            f"with {two_level_needs}), got {name!r}",
        )


def check_strategy_name(name: object, field: str, ranks_per_node: int | None, ranks_field: str) -> None:
    """SettingError naming ``field`` unless ``name`` is ``"auto"`` or a registered strategy whose
    group the settings can make (a two-level one needs ``ranks_field``, the CP ranks of one node)."""
    check_registered_strategy(name, field, ranks_field)
    if name in TWO_LEVEL_STRATEGIES and ranks_per_node is None:
        raise SettingError(field, f"{name!r} needs {ranks_field} (the CP ranks of one node)")


def check_cross_attention_settings(
    strategy: str | list[str],
    backend: str,
    ranks_per_node: int | None,
    layers: list[int],
    fields: SettingFields = SettingFields(),
) -> None:
    """SettingError naming the field unless the settings are usable: ``strategy`` one name, or one
    per cross-attention layer (``layers``: their decoder indices), each registered (a two-level one
    with ``ranks_per_node``); ``backend`` a registered backend."""
    if isinstance(strategy, list) and len(strategy) != len(layers):
        raise SettingError(
            fields.strategy,
            f"needs one entry per cross-attention layer ({len(layers)}: {fields.layers} = {layers}) "
            f"or a single name, got {strategy}",
        )
    for name in strategy if isinstance(strategy, list) else [strategy]:
        check_strategy_name(name, fields.strategy, ranks_per_node, fields.ranks_per_node)
    check_backend_name(backend, fields.backend)
