"""Phase 1: per-layer sparsity ranges.

rho_min(l) / rho_max(l) are the min / max sparsity that the single-criterion baselines (MAG, SNIP, GraSP as in
the paper, plus LAMP and ERK, whose allocations win on CNNs; at three global targets) leave in layer l.
Architecture rules — data files in ``edgeprune/rules/`` — then clip those ranges. A rule matches layers by role,
name pattern and size, and clips their range into its own; rules apply in order, so a later (more specific) rule
wins. A file's rules may declare the global sparsity ``band`` they were written for; outside it they do not clip.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .baselines import Plan
from .errors import EdgepruneError
from .inventory import ROLES, Layer
from .schema import Int, NameList, Num, Pattern, Range01, Str, check_object, read_json_file, show

# One rule of a rules file, field by field (edgeprune.schema checks it and names the bad field).
RULE_SCHEMA = {
    "roles": NameList(ROLES, "role"),
    "not_roles": NameList(ROLES, "role"),
    "name": Pattern(),  # searched in the layer name; bounded (schema.safe_pattern) so matching cannot hang
    "max_params": Int(lo=0),
    "min_params": Int(lo=0),
    "max_share": Num(0.0, 1.0, lo_open=True),
    "range": Range01(),
    "why": Str(),
}
RULE_KEYS = set(RULE_SCHEMA)


@dataclass(frozen=True)
class Rule:
    range: tuple[float, float]
    roles: tuple[str, ...] | None = None
    not_roles: tuple[str, ...] = ()
    name: str | None = None  # regex searched in the layer name
    max_params: int | None = None
    min_params: int | None = None
    max_share: float | None = None  # the layer's share of the model's prunable weights, at most
    why: str = ""
    band: tuple[float, float] | None = None  # global sparsities its file was written for; outside, it does not clip

    def matches(self, layer: Layer, total: int = 0) -> bool:
        """``total``: the model's prunable weights (for ``max_share``; 0 = unknown, the share test passes)."""
        return (
            (self.roles is None or layer.role in self.roles)
            and layer.role not in self.not_roles
            and (self.name is None or re.search(self.name, layer.name) is not None)
            and (self.max_params is None or layer.numel <= self.max_params)
            and (self.min_params is None or layer.numel >= self.min_params)
            and (self.max_share is None or total <= 0 or layer.numel <= self.max_share * total)
        )


@dataclass
class LayerRange:
    lo: float
    hi: float
    baseline: tuple[float, float] | None = None  # before the rules, None for layers the baselines skip
    rules: list[str] = field(default_factory=list)  # the `why` of every rule that clipped it
    conflict: str | None = None  # set when a rule did not overlap the range: what was pinned, and by which rule


def parse_rules(data: dict, source: str, key: str = "rules") -> list[Rule]:
    """Validate a rules document ({"rules": [...]}) and turn the list under ``key`` into Rule objects."""
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise EdgepruneError(f"rules file {source}: expected an object with a 'rules' list")
    unknown = set(data) - {"description", "rules", "late_rules", "structured", "band"}
    if unknown:
        raise EdgepruneError(f"rules file {source}: unknown top-level key(s) {sorted(unknown)}")
    band = parse_band(data.get("band"), source)
    for name in ("late_rules", "structured"):
        if not isinstance(data.get(name, []), list):
            raise EdgepruneError(f"rules file {source}: {name} must be a list of rules, got {show(data[name])}")
    items = data.get(key, [])
    rules = []
    for i, raw in enumerate(items):
        check_object(raw, RULE_SCHEMA, f"rules file {source}", f"{key}[{i}]", required=("range",))
        lo, hi = float(raw["range"][0]), float(raw["range"][1])
        share = raw.get("max_share")
        rules.append(
            Rule(
                range=(lo, hi),
                roles=tuple(raw["roles"]) if "roles" in raw else None,
                not_roles=tuple(raw.get("not_roles", ())),
                name=raw.get("name"),
                max_params=raw.get("max_params"),
                min_params=raw.get("min_params"),
                max_share=None if share is None else float(share),
                why=raw.get("why", f"{source} rule {i + 1}"),
                band=band,
            )
        )
    return rules


def _builtin(name: str, key: str = "rules") -> list[Rule]:
    res = resources.files("edgeprune.rules").joinpath(f"{name}.json")
    return parse_rules(json.loads(res.read_text()), f"{name}.json", key) if res.is_file() else []


def load_rules(family: str | None = None, user_file: str | Path | None = None) -> list[Rule]:
    """Default rules, the model family's rules (if a file exists), the user's file, then the defaults'
    late (safety) rules: small layers, patch embeddings and norms, which per-stage rules must not loosen."""
    rules = _builtin("default")
    if family:
        rules += _builtin(family)
    if user_file is not None:
        rules += parse_rules(read_rules_file(user_file), str(user_file))
    return rules + _builtin("default", "late_rules")


def read_rules_file(path: str | Path) -> dict:
    """A user's rules file as JSON, with one-line errors for a missing, unreadable or malformed file."""
    return read_json_file(path, "rules file")


def range_targets(sparsity: float) -> tuple[float, float, float]:
    """Three global targets around the requested sparsity (paper: 70/80/90 % for 80 %)."""
    return (max(0.0, sparsity - 0.1), sparsity, min(sparsity + 0.1, (1.0 + sparsity) / 2, 0.99))


def baseline_ranges(plans: list[Plan]) -> dict[str, tuple[float, float]]:
    """min / max over the baseline runs of each layer's sparsity (no accuracy filtering, as in the paper)."""
    names = plans[0].keys()
    return {n: (min(p[n] for p in plans), max(p[n] for p in plans)) for n in names}


def parse_band(band: object, source: str) -> tuple[float, float] | None:
    """A rules file's optional ``"band": [min, max]``: the global sparsities its rules were written for."""
    if band is None:
        return None
    if not (isinstance(band, list) and len(band) == 2 and all(isinstance(v, (int, float)) for v in band)):
        raise EdgepruneError(f"rules file {source}: 'band' must be [min, max] global sparsities, got {band!r}")
    lo, hi = float(band[0]), float(band[1])
    if not 0.0 <= lo <= hi < 1.0:
        raise EdgepruneError(f"rules file {source}: band [{lo}, {hi}] must satisfy 0 <= min <= max < 1")
    return lo, hi


def clip_range(lo: float, hi: float, rule: tuple[float, float]) -> tuple[float, float, bool]:
    """Clip [lo, hi] into the rule's range; the third value says the two did not overlap.

    A rule is a limit, so it wins: a range lying wholly outside it ends on the rule's nearest bound. That empties
    what the baselines asked for, so the flag lets ``apply_rules`` report it instead of collapsing it silently.
    """
    rlo, rhi = rule
    disjoint = hi < rlo or lo > rhi
    return min(max(lo, rlo), rhi), min(max(hi, rlo), rhi), disjoint


def in_band(rule: Rule, sparsity: float | None) -> bool:
    """Whether a rule clips at this global sparsity (None: no target, e.g. ``inspect`` - every rule shows)."""
    return rule.band is None or sparsity is None or rule.band[0] - 1e-9 <= sparsity <= rule.band[1] + 1e-9


def apply_rules(
    layers: list[Layer],
    rules: list[Rule],
    base: dict[str, tuple[float, float]] | None = None,
    sparsity: float | None = None,
) -> dict[str, LayerRange]:
    """Final per-layer ranges. Without ``base`` the rules alone define them (what ``inspect`` shows).

    ``sparsity``: the global target; a rule whose file declares a ``band`` clips only inside it (the authors'
    per-stage rules were written for one regime and cap the model outside it). A rule that does not overlap
    the range so far pins it to the rule's bound and says so in ``conflict``.
    """
    out = {}
    total = sum(layer.numel for layer in layers if layer.prunable)
    for layer in layers:
        start = base.get(layer.name) if base else None
        lo, hi = start if start is not None else (0.0, 0.99)
        applied, conflicts = [], []
        for rule in rules:
            if rule.matches(layer, total) and in_band(rule, sparsity):
                new_lo, new_hi, disjoint = clip_range(lo, hi, rule.range)
                if (new_lo, new_hi) != (lo, hi):
                    applied.append(rule.why)
                if disjoint:
                    rlo, rhi = rule.range
                    conflicts.append(
                        f"{lo:.0%}-{hi:.0%} lies outside {rlo:.0%}-{rhi:.0%} ({rule.why}): pinned at {new_lo:.0%}"
                    )
                lo, hi = new_lo, new_hi
        out[layer.name] = LayerRange(lo=lo, hi=hi, baseline=start, rules=applied, conflict="; ".join(conflicts) or None)
    return out
