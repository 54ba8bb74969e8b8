"""`View`: the typed, frozen slice of the config that one pipeline node reads (docs/ARCHITECTURE.md).

Kept apart from `stages/` so that shared pieces of views (the dataset view in `data/`) do not
depend on the stage package.
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class View(BaseModel):
    """The config a node reads. Subclasses declare fields and `origins`."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    NEUTRAL: ClassVar[frozenset[str]] = frozenset()  # dotted field paths left out of the fingerprint
    # Fields that shape the node's own output (where and how it is stored) but not the values its
    # dependents read: in the node's fingerprint, not in what its dependents' fingerprints hash.
    LAYOUT: ClassVar[frozenset[str]] = frozenset()
    LINEAGE: ClassVar[tuple[str, ...]] = ()
    # Fields added after outputs keyed by the earlier fingerprint existed (dotted path → the value
    # that behaves as before): left out of both payloads while they hold that value, so adding an
    # option does not make every existing run's nodes run again.
    ADDED: ClassVar[dict[str, Any]] = {}

    def origins(self) -> dict[str, str | None]:
        """Field → the config path it was read from (None: fixed by the recipe, not the config)."""
        raise NotImplementedError(f"{type(self).__name__} must say where each field comes from")

    def fingerprint_payload(self) -> dict:
        """What the node's fingerprint hashes: the view as JSON, minus NEUTRAL fields."""
        return self._dump_without(self.NEUTRAL)

    def content_payload(self) -> dict:
        """What the fingerprints of the node's dependents hash: minus NEUTRAL and LAYOUT fields."""
        return self._dump_without(self.NEUTRAL | self.LAYOUT)

    def _dump_without(self, fields: frozenset[str]) -> dict:
        exclude: dict[str, Any] = {}
        for dotted in fields:
            *parents, leaf = dotted.split(".")
            node = exclude
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = True
        dump = self.model_dump(mode="json", exclude=exclude or None)
        self._drop_added(dump)
        return dump

    def _drop_added(self, dump: dict) -> None:
        """Remove ADDED fields holding their as-before value, here and in nested views."""
        for dotted, default in self.ADDED.items():
            *parents, leaf = dotted.split(".")
            node = dump
            for p in parents:
                node = node.get(p) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf in node and node[leaf] == default:
                del node[leaf]
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, View) and isinstance(dump.get(name), dict):
                value._drop_added(dump[name])

    def config_paths(self) -> dict[str, str | None]:
        """Every leaf of the view (dotted) → the config path it holds (None: recipe constant)."""
        out: dict[str, str | None] = {}
        dump = self.model_dump(mode="json")
        origins = self.origins()
        for name in type(self).model_fields:
            value, origin = getattr(self, name), origins[name]
            if isinstance(value, View):
                out.update({f"{name}.{k}": v for k, v in value.config_paths().items()})
                continue
            for leaf in flatten(dump[name]):
                out[f"{name}.{leaf}" if leaf else name] = (
                    None if origin is None else f"{origin}.{leaf}" if leaf else origin)
        return out

    def lineage(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.LINEAGE}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → {dotted path: leaf}; a non-dict is one leaf with path ''."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}
