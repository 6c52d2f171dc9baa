"""Structured (channel / attention-head) Mix-and-Match: ``--granularity channel``.

- ``groups``: coupled groups from torch-pruning's DependencyGraph, head groups, physical removal;
- ``signals``: group magnitude / Taylor gradient / product scores and global-threshold baselines;
- ``planning``: widths rounded to the target's channel multiple, units to remove;
- ``flow``: channel mode's search (``search_channels``, behind `granularity.Search`), latency-aware selection
  and the report additions.
"""

from __future__ import annotations

from .flow import channel_target, load_structured_rules, search_channels, select_structured
from .groups import ChannelGroup, CompactBuild, GroupGraph, check_forward, compact
from .planning import allowed_keeps, keep_units, units_to_remove, widths_for
from .signals import accumulate_gradients, global_threshold_ratios, group_scores

__all__ = [
    "ChannelGroup",
    "CompactBuild",
    "GroupGraph",
    "accumulate_gradients",
    "allowed_keeps",
    "channel_target",
    "check_forward",
    "compact",
    "global_threshold_ratios",
    "group_scores",
    "keep_units",
    "load_structured_rules",
    "search_channels",
    "select_structured",
    "units_to_remove",
    "widths_for",
]
