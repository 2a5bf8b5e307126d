"""FLOPs accounting, counted as multiply-accumulates (1 FLOP = 1 MAC; docs/METHOD.md §1.1, §7.3).

``formulas`` holds the only MAC formulas of the project; ``counter`` records the work that layers
really perform while a :func:`count_flops` context is active.
"""

from dydit.flops.counter import FlopCounter, count_flops, record
from dydit.flops.formulas import (
    attention_macs,
    config_macs_table,
    dit_macs_table,
    layer_costs,
    linear_macs,
    mlp_macs,
    token_router_macs,
)

__all__ = [
    "FlopCounter",
    "attention_macs",
    "config_macs_table",
    "count_flops",
    "dit_macs_table",
    "layer_costs",
    "linear_macs",
    "mlp_macs",
    "record",
    "token_router_macs",
]
