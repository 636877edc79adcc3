"""Parse PromQL expressions and list the metrics they select; run by the tools venv.

Reads a JSON list of expressions on stdin and prints a JSON object: ``{"names": {expr: [metric, ...]},
"errors": {expr: message}}``. The parser is promql-parser (the Rust `promql-parser` crate, the
grammar of Prometheus 2.x/3.x), pinned in deploy/tools/. Grafana's variables are replaced by
sample values first, as Grafana does before it sends a query.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import promql_parser

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$namespace": "spr"}
CHILDREN = ("lhs", "rhs", "expr", "args", "param", "vector_selector")


def selected_metrics(node: Any) -> set[str]:
    """Metric names of every vector selector in the expression tree."""
    if type(node).__name__ == "VectorSelector":
        return {node.name} if node.name else set()
    names: set[str] = set()
    for attribute in CHILDREN:
        child = getattr(node, attribute, None)
        for item in child if isinstance(child, list | tuple) else [child]:
            if item is not None and not isinstance(item, str | int | float):
                names |= selected_metrics(item)
    return names


def main() -> int:
    names: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    for expr in json.load(sys.stdin):
        query = expr
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        try:
            names[expr] = sorted(selected_metrics(promql_parser.parse(query)))
        except ValueError as exc:
            errors[expr] = str(exc)
    json.dump({"names": names, "errors": errors}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
