"""Nodes by name: what results, log lines and the progress line call a node instead of its 20-digit id.

A node's name is the coordinator's own record, never the node's claim: the name the coordinator gave
its key at registration (`flwr supernode register KEY.pub <connection> --name hospital-a`, which Flower
keeps with the node and hands the ServerApp in `grid.get_nodes()`), or, for a simulated node, its
partition (`node-3`). A node admitted without registration (`--insecure`) has no name: its id is shown.

Flower stores any string as a name, so a name is shown only in the characters `fedsafe node-keys`
allows in one (a newline could forge a log line, brackets could mimic another node's label). Two nodes
may be registered under one name, and a name of digits reads like a node id: such names are shown with
the end of the node's id beside them. Machine-readable outputs keep the id (`node`) and add the name
(`node_name`, `node_names`); human-readable lines print the label.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping

log = logging.getLogger("fedsafe.server")

# What a node name (and a file name stem) may hold: `fedsafe node-keys` (fedsafe.credentials) registers
# names in these characters only, and results and logs show a registered name in them. Defined here,
# not in fedsafe.credentials, so that naming nodes does not import the cryptography that module needs.
NODE_NAME_CHARACTERS = "A-Za-z0-9._-"
NODE_NAME_MAX_LENGTH = 64

ID_SUFFIX_DIGITS = 6  # the end of the id shown beside a name two nodes share


def virtual_node_name(partition: int) -> str:
    """A simulated node's name: the data partition it holds."""
    return f"node-{partition}"


def shown_name(raw: object) -> str | None:
    """A registered name in the characters `fedsafe node-keys` allows in a node name ([A-Za-z0-9._-], at
    most 64; anything else becomes '_'); None when nothing of it is left."""
    if not isinstance(raw, str):
        return None
    text = re.sub(f"[^{NODE_NAME_CHARACTERS}]", "_", raw.strip())[:NODE_NAME_MAX_LENGTH]
    return text if text.strip("_") else None


class NodeNames:
    """Node id → name, learnt from the coordinator's records; labels for people, names for files."""

    def __init__(self, names: Mapping[int | str, str] | None = None) -> None:
        self._names: dict[int, str] = {}
        for node, name in (names or {}).items():
            self._remember(int(node), name)

    def _remember(self, node: int, raw: object) -> None:
        name = shown_name(raw)
        if name is not None:
            self._names[node] = name

    def learn(self, grid) -> None:
        """Add the names of the grid's nodes (Flower's registration records, `Grid.get_nodes()`). Names
        only decorate output: a grid without them, or one that cannot list them now, leaves the ids."""
        get_nodes = getattr(grid, "get_nodes", None)
        if get_nodes is None:
            return
        try:
            nodes = list(get_nodes())
        except Exception as err:  # noqa: BLE001 - a name is never worth failing a round for
            log.debug("node names not available: %s: %s", type(err).__name__, err)
            return
        for info in nodes:
            self._remember(int(info.node_id), getattr(info, "name", None))

    def name(self, node: int | str) -> str | None:
        return self._names.get(int(node))

    def label(self, node: int | str) -> str:
        """What a log line or the progress line calls the node: its name; its name and the end of its id
        where the name alone could point at another node; its id when it has no name."""
        node = int(node)
        name = self._names.get(node)
        if name is None:
            return str(node)
        if name.isdigit() or Counter(self._names.values())[name] > 1:
            return f"{name} (id …{str(node)[-ID_SUFFIX_DIGITS:]})"
        return name

    def labels(self, nodes: Iterable[int | str]) -> str:
        return ", ".join(self.label(node) for node in nodes)

    def of(self, nodes: Iterable[int | str]) -> dict[str, str]:
        """{id: name} of the named ones among `nodes`, for the results (JSON keys are strings)."""
        return {str(int(n)): self._names[int(n)] for n in sorted({int(n) for n in nodes}) if int(n) in self._names}

    def with_name(self, entry: Mapping) -> dict:
        """A problem entry ({"node": id, …}) with the node's name beside its id, when it has one."""
        name = self.name(entry["node"])
        return dict(entry) if name is None else {**entry, "node_name": name}
