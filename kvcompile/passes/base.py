"""The pass interface, the registry of passes by name, and the composition check done at `optimize` time."""
from __future__ import annotations

import ast

from dataclasses import dataclass
from typing import ClassVar, Union

from torch import fx

from kvcompile.cache import KVState
from kvcompile.errors import PassError
from kvcompile.graph.sites import AttentionSite

_REGISTRY: dict[str, type["Pass"]] = {}


@dataclass
class StepGraph:
    """One captured step (a fixed number of new tokens per row) being rewritten by passes."""

    module: fx.GraphModule
    sites: list[AttentionSite]
    state: KVState
    positions: fx.Node

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph


class Pass:
    """A rewrite of attention sites. Subclasses are dataclasses holding the method's configuration.

    `axis` names what the pass decides: "storage" (how the cache is kept: dense, ring, evicting, quantized,
    merged) or "read" (which cached tokens a query reads). Two passes on the same axis conflict.
    """

    name: ClassVar[str]
    axis: ClassVar[str]
    paper: ClassVar[str] = ""
    # Storage: whether a stored token can be emptied and stored again (what cache correction does).
    tokens_rewritable: ClassVar[bool] = True

    def validate(self) -> None:
        """Raise `PassError` for a configuration that cannot work; called by `optimize` before any capture."""

    def apply(self, step: StepGraph) -> None:
        """Rewrite the sites of `step` in place."""
        raise NotImplementedError

    def runtime_hook(self, state: KVState):
        """Work this pass does between steps, outside the step graphs: an object with `reset()` (called when
        the cache is sized for a new sequence) and `after_step(new_tokens)` (after each step), or None."""
        return None

    def describe(self) -> str:
        """Short configuration summary for `explain()`."""
        return repr(self)


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of every registered pass."""
    return sorted(_REGISTRY)


def _literal(text: str):
    """`4` -> 4, `0.5` -> 0.5, `True` -> True; anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def from_spec(spec: str) -> Pass:
    """A pass from its name, optionally configured: `"streamingllm"` or
    `"streamingllm:sink_tokens=4,window_tokens=252"`."""
    name, _, options = spec.partition(":")
    cls = _REGISTRY.get(name.strip().lower())
    if cls is None:
        listing = "; ".join(f"{n}: {_REGISTRY[n].paper}" if _REGISTRY[n].paper else n for n in available())
        raise PassError(f"unknown pass {name!r}; available passes: {listing}. Pass a name or a configured object "
                        "such as kvcompile.passes.StreamingLLM(window_tokens=1020).")
    kwargs = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise PassError(f"pass option {item!r} in {spec!r} must look like key=value.")
        kwargs[key.strip()] = _literal(value.strip())
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise PassError(f"bad options for pass {name!r}: {error}") from None


def resolve(passes: Union[str, Pass, list, tuple]) -> list[Pass]:
    """Turn names/specs and configured objects into validated passes, storage first (dense if none)."""
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    if not isinstance(passes, (list, tuple)):
        raise PassError(f"passes must be a pass name, a Pass object or a list of them, got {type(passes).__name__}.")
    resolved = []
    for item in passes:
        if isinstance(item, Pass):
            resolved.append(item)
        elif isinstance(item, str):
            resolved.append(from_spec(item))
        else:
            raise PassError(f"passes must be names or Pass objects, got {type(item).__name__}.")
    by_axis: dict[str, Pass] = {}
    for p in resolved:
        p.validate()
        if p.axis in by_axis:
            raise PassError(
                f"passes {by_axis[p.axis].name!r} and {p.name!r} both decide the {p.axis} of the KV cache and "
                f"cannot be combined; keep one of them.")
        by_axis[p.axis] = p
    if "storage" not in by_axis:
        resolved.insert(0, _REGISTRY["dense"]())
    return sorted(resolved, key=lambda p: p.axis != "storage")
