"""YAML text -> plain data plus the line of every key and list item, for error messages.

PyYAML's composer keeps each node's start mark; walking the node tree alongside gives a map
from document paths (tuples of keys and indices) to 1-based lines. The walk also rejects what a
plain safe_load would silently accept: duplicate keys (the last would win), non-text keys
(`yes:`, `1:`), merge keys (`<<`), recursive aliases, and alias bombs.
"""

from typing import Any

import yaml

from optd.policies.errors import PolicyError

Path = tuple[str | int, ...]
MAX_NODES = 50_000
_STR_TAG = "tag:yaml.org,2002:str"


def format_path(path: Path) -> str:
    """("spec", "rules", 2, "when") -> "spec.rules[2].when"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part and all(c.isalnum() or c in "_-" for c in part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def read_yaml(text: str, file: str | None = None) -> tuple[Any, dict[Path, int]]:
    """The document's data and {path: line}; PolicyError (with the line) for bad YAML."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks for unprintable characters already
        node = loader.get_single_node()
        if node is None:
            raise PolicyError("empty document: expected a policy (apiVersion, kind, metadata, spec)",
                              "", file, 1)
        lines: dict[Path, int] = {(): node.start_mark.line + 1}
        _walk(node, (), lines, set(), [0], file)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PolicyError(f"invalid YAML: {problem}", "", file, mark.line + 1 if mark else None) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def _walk(node: yaml.Node, path: Path, lines: dict[Path, int], active: set[int], count: list[int],
          file: str | None) -> None:
    count[0] += 1
    if count[0] > MAX_NODES:
        raise PolicyError(f"document too large (more than {MAX_NODES} nodes after aliases)", "", file)
    if id(node) in active:
        raise PolicyError("recursive YAML alias", format_path(path), file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        active.add(id(node))
        seen: set[str] = set()
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise PolicyError("YAML merge keys (<<) are not supported: use include:",
                                  format_path(path), file, line)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
                raise PolicyError(f"keys must be text, got {shown!r} (quote it)", format_path(path), file,
                                  line)
            key = key_node.value
            if key in seen:
                raise PolicyError(f"duplicate key {key!r}", format_path((*path, key)), file, line)
            seen.add(key)
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, active, count, file)
        active.discard(id(node))
    elif isinstance(node, yaml.SequenceNode):
        active.add(id(node))
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines, active, count, file)
        active.discard(id(node))
