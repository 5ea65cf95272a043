"""
What the shipped monitoring files ask of the metrics: the PromQL expressions of
``config/prometheus-alerts.yml`` and ``config/grafana-dashboard.json``, and the
metric names those expressions read.

The names are found lexically (PromQL has no parser in Python): strings, label
matchers, range selectors and grouping clauses are cut out, and what remains
that is neither a function call nor a keyword is a metric name. Rule files are
read the same way, one ``expr:`` key at a time (no YAML parser is a dependency);
the callers check the count against what ``promtool check rules`` found.
"""

import json
import re
from pathlib import Path
from typing import Any

KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    }
)
"""PromQL words that are not metric names (functions are told by their ``(``)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_WORD = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*\w+\s*\)")
_EXPR_KEY = re.compile(r"^(?P<indent>\s*)(?:-\s+)?expr:\s*(?P<value>.*)$")


def metric_names(expr: str) -> set[str]:
    """
    The metric names ``expr`` selects.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _WORD.finditer(text):
        word, call = match.groups()
        if call is None and word.lower() not in KEYWORDS:
            names.add(word)
    return names


def rule_expressions(path: Path) -> list[str]:
    """
    The ``expr`` of every rule in the rule file at ``path``, in file order:
    a plain scalar on the key's line, or a folded or literal block below it.
    """
    lines = path.read_text().splitlines()
    found: list[str] = []
    for index, line in enumerate(lines):
        match = _EXPR_KEY.match(line)
        if match is None:
            continue
        value = match["value"].strip()
        if value.split("#")[0].strip() in {">", ">-", "|", "|-"}:
            key_indent = len(match["indent"])
            block: list[str] = []
            for following in lines[index + 1 :]:
                indent = len(following) - len(following.lstrip())
                if following.strip() and indent <= key_indent:
                    break
                block.append(following.strip())
            value = " ".join(part for part in block if part)
        elif value[:1] in {"'", '"'} and value[-1:] == value[:1]:
            value = value[1:-1]
        found.append(value)
    return found


def dashboard_expressions(path: Path) -> list[str]:
    """
    The PromQL of every panel target and query variable of the Grafana
    dashboard at ``path``.
    """
    dashboard = json.loads(path.read_text())
    found: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            found.extend(
                target["expr"]
                for target in panel.get("targets", [])
                if "expr" in target
            )
            panels(panel.get("panels", []))

    panels(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query" and isinstance(query, dict):
            # label_values(SELECTOR, LABEL) is Grafana's, not PromQL: keep the
            # selector it reads.
            labels_of = _LABEL_VALUES.fullmatch(query["query"].strip())
            found.append(labels_of["selector"] if labels_of else query["query"])
    return found


def grafana_to_promql(expr: str) -> str:
    """
    ``expr`` with Grafana's variables replaced by what they stand for at query
    time, so that Prometheus tools can parse it.
    """
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?\w+\}?", ".+", expr)
