"""Load a policy by preset name or path: YAML, `include:` inheritance, validation, compiled expressions.

Where a reference is looked for (`load_policy(ref)` and every `include:` entry):
  1. A path is used as it is and never searched for: a Path object, or a string that contains "/",
     ends in .yaml or .yml, or names an existing file. A relative path in `include:` is relative to
     the directory of the file that includes it (of the current directory for text without a file).
  2. A name (e.g. "balanced") is looked up as NAME.yaml, then NAME.yml, in the search path from the
     highest precedence down: with the default search path, /etc/optd/policies, then
     /usr/lib/optd/policies, then the presets bundled with optd (policies/presets/). `search_path`
     lists directories lowest precedence first, as DEFAULT_SEARCH_PATH does.
     A file that includes a name it is itself found under extends the next file of that name below
     it: /etc/optd/policies/balanced.yaml with `include: [balanced]` extends
     /usr/lib/optd/policies/balanced.yaml if there is one, else the bundled preset - the way an
     override file should, and no cycle.

How includes merge: each entry of `include:` is loaded (recursively) and merged in order, later ones
over earlier ones, then the including document over all of them. Merging is field by field: mappings
merge key by key at every depth (so a child may set only `spec.slo.itl_p95`), anything else - lists
(rules, guardrails, include), numbers, text - is replaced whole by the child's value. Each document
must name itself (apiVersion, kind, metadata.name); the effective policy has `include: []`. A cycle
of includes is an error showing the chain.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from optd.policies.errors import PolicyError
from optd.policies.expressions import Expression, compile_expression
from optd.policies.schema import KNOB_NAMES, Metadata, Policy
from optd.policies.yamldoc import Path as DocPath
from optd.policies.yamldoc import format_path, read_yaml

DEFAULT_SEARCH_PATH = [Path("/usr/lib/optd/policies"), Path("/etc/optd/policies")]
PRESETS_DIR = Path(__file__).parent / "presets"
MAX_INCLUDE_DEPTH = 16

Provenance = dict[DocPath, tuple[str | None, int]]


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    name: str
    source: str                                 # the file, or "preset:NAME" for a bundled preset
    text: str                                   # YAML of the effective policy (includes merged, defaults)
    expressions: dict[str, Expression] = field(default_factory=dict)  # document path of each `when`
    includes: tuple[str, ...] = ()              # sources merged in, in merge order (deepest first)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_policy(ref: str | Path, search_path: list[Path] | None = None) -> LoadedPolicy:
    """Load a preset name or a file (see the module docstring for the precedence)."""
    search = list(DEFAULT_SEARCH_PATH if search_path is None else search_path)
    target = _resolve(ref, None, search, skip=None)
    doc = _load_file(target, search, chain=[])
    return _finish(doc, target.source)


def parse_policy(text: str, file: str | None = None, search_path: list[Path] | None = None) -> LoadedPolicy:
    """Load a policy from YAML text; `file` names it in errors and anchors relative includes."""
    search = list(DEFAULT_SEARCH_PATH if search_path is None else search_path)
    base = Path(file).parent if file else None
    identity = str(Path(file).resolve()) if file else "<text>"
    doc = _load_text(text, file, base, identity, search, chain=[])
    return _finish(doc, file or "<text>")


@dataclass
class _Target:
    path: Path
    display: str        # how errors name it
    source: str         # LoadedPolicy.source
    identity: str       # resolved path, for cycles and "never finds itself"


@dataclass
class _Doc:
    data: dict
    prov: Provenance
    includes: list[str]


class _Header(BaseModel):
    """What every document must say about itself before its includes are followed."""

    model_config = ConfigDict(extra="forbid")
    apiVersion: Literal["optd/v1"]
    kind: Literal["Policy"]
    metadata: Metadata
    include: list[str] = []
    spec: dict = {}


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte: no such file either way
        return False


def _is_path(ref: str | Path, base: Path | None) -> bool:
    if isinstance(ref, Path):
        return True
    return ("/" in ref or os.sep in ref or ref.endswith((".yaml", ".yml"))
            or _is_file(Path(ref) if base is None else base / ref))


def _resolve(ref: str | Path, base: Path | None, search: list[Path], skip: str | None) -> _Target:
    """Find `ref`; `base` is the including file's directory (None: the current directory, and
    paths are shown as given)."""
    if not isinstance(ref, str | Path) or (isinstance(ref, str) and not ref.strip()):
        raise PolicyError(f"expected a preset name or a file path, got {ref!r}")
    if _is_path(ref, base):
        path = Path(ref).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if not _is_file(path):
            raise PolicyError(f"no such policy file: {path}")
        return _Target(path, str(path), str(path), str(path.resolve()))
    name = str(ref)
    candidates = [_Target(directory / f"{name}{ext}", str(directory / f"{name}{ext}"),
                          str(directory / f"{name}{ext}"), "")
                  for directory in reversed(search) for ext in (".yaml", ".yml")]
    bundled = PRESETS_DIR / f"{name}.yaml"
    candidates.append(_Target(bundled, str(bundled), f"preset:{name}", ""))
    found = [t for t in candidates if _is_file(t.path)]
    for t in found:
        t.identity = str(t.path.resolve())
    identities = [t.identity for t in found]
    if skip in identities:  # a file including its own name extends the next one below it
        found = found[identities.index(skip) + 1:]
    if found:
        return found[0]
    looked = ", ".join(str(d) for d in reversed(search))
    raise PolicyError(f"no policy named {name!r} (looked in {looked + ', ' if looked else ''}"
                      f"and the bundled presets: {', '.join(preset_names())})")


def _load_file(target: _Target, search: list[Path], chain: list[str]) -> _Doc:
    if target.identity in chain:
        names = [*chain[chain.index(target.identity):], target.identity]
        raise PolicyError(f"include cycle: {' -> '.join(names)}")
    if len(chain) >= MAX_INCLUDE_DEPTH:
        raise PolicyError(f"includes nest deeper than {MAX_INCLUDE_DEPTH} levels: {' -> '.join(chain)}")
    try:
        text = target.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"cannot read policy: {e}", "", target.display) from None
    return _load_text(text, target.display, target.path.parent, target.identity, search, chain)


def _load_text(text: str, file: str | None, base: Path | None, identity: str, search: list[Path],
               chain: list[str]) -> _Doc:
    data, lines = read_yaml(text, file)
    own_prov: Provenance = {path: (file, line) for path, line in lines.items()}
    if not isinstance(data, dict):
        raise PolicyError("a policy must be a mapping (apiVersion, kind, metadata, spec)", "", file,
                          lines[()])
    try:
        header = _Header.model_validate(data)
    except ValidationError as e:
        raise _translate(e, data, own_prov, model=Policy) from None
    chain = [*chain, identity]
    merged: dict = {}
    prov: Provenance = {(): own_prov[()]}
    includes: list[str] = []
    for i, ref in enumerate(header.include):
        line = lines.get(("include", i))
        try:
            target = _resolve(ref, base, search, skip=identity)
        except PolicyError as e:
            raise PolicyError(e.message, f"include[{i}]", file, line) from None
        try:
            parent = _load_file(target, search, chain)
        except PolicyError as e:
            if e.file is None:  # a cycle or too deep: reported at the include that closes it
                raise PolicyError(e.message, f"include[{i}]", file, line) from None
            raise
        _merge_into(merged, parent.data, prov, parent.prov, ())
        includes += [*parent.includes, target.source]
    own = {k: v for k, v in data.items() if k != "include"}
    _merge_into(merged, own, prov, own_prov, ())
    merged["include"] = []
    return _Doc(merged, prov, includes)


def _merge_into(dst: dict, src: dict, prov: Provenance, src_prov: Provenance, prefix: DocPath) -> None:
    """Merge `src` over `dst` in place (mappings key by key, everything else replaced whole), keeping
    `prov` (path -> file and line) pointing at the document each value now comes from."""
    for key, value in src.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            dst[key] = dict(dst[key])  # never mutate a parent's mapping in place
            if path in src_prov:
                prov[path] = src_prov[path]
            _merge_into(dst[key], value, prov, src_prov, path)
            continue
        dst[key] = value
        n = len(path)
        for stale in [p for p in prov if p[:n] == path]:
            del prov[stale]
        prov.update({p: where for p, where in src_prov.items() if p[:n] == path})


def _finish(doc: _Doc, source: str) -> LoadedPolicy:
    try:
        policy = Policy.model_validate(doc.data)
    except ValidationError as e:
        raise _translate(e, doc.data, doc.prov, model=Policy) from None
    slo = policy.spec.slo.model_dump()
    expressions: dict[str, Expression] = {}
    for section in ("guardrails", "rules"):
        for i, item in enumerate(getattr(policy.spec, section)):
            path = f"spec.{section}[{i}].when"
            expressions[path] = compile_expression(item.when, path, slo=slo)
    text = yaml.safe_dump(effective_document(policy), sort_keys=False, default_flow_style=False, width=100)
    return LoadedPolicy(policy=policy, name=policy.metadata.name, source=source, text=text,
                        expressions=expressions, includes=tuple(dict.fromkeys(doc.includes)))


def effective_document(policy: Policy) -> dict:
    """The policy as plain data for YAML: aliases (`for`), unused action operations left out, whole
    numbers written as integers (spec_length: 8, not 8.0). Loading it again gives the same policy."""
    data = policy.model_dump(mode="json", by_alias=True)
    for rule in data["spec"]["rules"]:
        rule["then"] = {op: changes for op, changes in rule["then"].items() if changes is not None}
    return _whole(data)


def _whole(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# --- pydantic errors -> PolicyError with file, document path and line --------------------------------


def _translate(error: ValidationError, data: Any, prov: Provenance, model: type[BaseModel]) -> PolicyError:
    found: list[PolicyError] = []
    seen: set[str] = set()
    for err in error.errors(include_url=False):
        loc = list(err["loc"])
        ctx = err.get("ctx") or {}
        if err["type"] == "policy":
            loc += list(ctx.get("subpath", ()))
        path = _existing_prefix(data, loc)
        rest = loc[len(path):]
        message = _message(err, loc, path, rest, model)
        if err["type"] == "missing" and len(rest) == 1 and isinstance(rest[0], str):
            path = (*path, rest[0])
        shown = format_path(path)
        if shown in seen:
            continue
        seen.add(shown)
        file, line = _where(path, prov)
        found.append(PolicyError(message, shown, file, line))
    found.sort(key=lambda e: (e.file or "", e.line or 0))
    first = found[0]
    return PolicyError(first.message, first.path, first.file, first.line, errors=found)


def _existing_prefix(data: Any, loc: list) -> DocPath:
    path: list[str | int] = []
    for part in loc:
        if (isinstance(data, dict) and isinstance(part, str) and part in data) or (
                isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)):
            data = data[part]
        else:
            break
        path.append(part)
    return tuple(path)


def _where(path: DocPath, prov: Provenance) -> tuple[str | None, int | None]:
    for n in range(len(path), -1, -1):
        if path[:n] in prov:
            return prov[path[:n]]
    return None, None


def _message(err: dict, loc: list, path: DocPath, rest: list, model: type[BaseModel]) -> str:
    kind, msg = err["type"], err["msg"]
    value = err.get("input")
    if kind == "missing":
        return "required key missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        return f"unknown key {loc[-1]!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if rest == ["[key]"] and kind == "literal_error":
        return f"unknown knob {value!r} (knobs: {', '.join(KNOB_NAMES)})"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind in ("policy", "assertion_error"):
        return msg
    if kind in ("model_type", "dict_type"):
        return f"expected a mapping, got {_short(value)}"
    if kind == "list_type":
        return f"expected a list, got {_short(value)}"
    return f"{msg}, got {_short(value)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed_keys(model: type[BaseModel], loc: list) -> list[str]:
    """The keys the model at `loc` accepts (for "unknown key" messages)."""
    t: Any = model
    for part in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            t = next((f.annotation for n, f in t.model_fields.items() if (f.alias or n) == part), None)
        elif get_origin(t) in (list, dict):
            t = get_args(t)[-1]
        else:
            return []
    t = _unwrap(t)
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [f.alias or n for n, f in t.model_fields.items()]
    return []


def _unwrap(t: Any) -> Any:
    while True:
        origin = get_origin(t)
        if origin is Annotated:
            t = get_args(t)[0]
        elif origin in (Union, UnionType):
            args = [a for a in get_args(t) if a is not type(None)]
            if len(args) != 1:
                return t
            t = args[0]
        else:
            return t
