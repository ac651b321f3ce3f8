"""Everything afpq-jax takes from qwix that qwix does not export publicly, in one place, pinned by
`TESTED_QWIX_VERSIONS` (a new qwix release that moves these breaks only this module).

From ``qwix._src.utils.flax_util``: which module is running and its path, which of its parameters an array is,
unboxing Flax metadata, whether qwix is in its initializing call, reading a value by path. From
``qwix.QuantizationProvider``'s private members: the rule that matched the current op, and the provider's rules.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import qwix
from qwix._src.utils import flax_util

TESTED_QWIX_VERSIONS = ("0.1.8",)


def check_qwix_version(version: str = qwix.__version__) -> None:
    """Warns when the installed qwix is not one these providers were tested with (they use qwix internals)."""
    if version not in TESTED_QWIX_VERSIONS:
        warnings.warn(f"afpq_jax.qwix was tested with qwix {', '.join(TESTED_QWIX_VERSIONS)}, found {version}; "
                      f"if it fails, install a tested one: pip install 'afpq-jax[qwix]'", stacklevel=3)


def unbox(value: Any) -> Any:
    """``value`` without Flax's metadata boxes (``nn.Partitioned``, NNX variables)."""
    return flax_util.unbox(value)


def current_module() -> Any:
    """The Flax module whose method is running (inside an intercepted op)."""
    return flax_util.get_current_module()


def current_module_path() -> tuple:
    """The running module's path (names from the model's root)."""
    return tuple(flax_util.get_current_module_path())


def find_param(array: Any) -> str | None:
    """The name of the running module's parameter that ``array`` is, or None."""
    return flax_util.find_param(array)


def initializing() -> bool:
    """Whether qwix runs its own first (initializing) call, not a real batch."""
    return not flax_util.should_update_quant_stats()


def value_at(tree: Any, path: Sequence) -> Any:
    """The value at ``path`` in a model or params tree."""
    return flax_util.get_value_from_path(tree, path)


def current_rule(provider: qwix.QuantizationProvider, op_name: str) -> qwix.QuantizationRule | None:
    """The rule of ``provider`` that matched the running op (None: no rule)."""
    rule, _ = provider._get_current_rule_and_op_id(op_name, only_rule=True)
    return rule


def provider_rules(provider: qwix.QuantizationProvider) -> list[qwix.QuantizationRule]:
    """The rules ``provider`` was built with."""
    return list(provider._rules)
