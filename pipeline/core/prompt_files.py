"""Versioned prompt templates (prompts/<set>/*.jinja|*.txt) and JSON schemas (schemas/*.json).

A prompt set is one directory, e.g. prompts/clue/. Every file in it starts with a version header
and all files of a set must carry the same version, so one string ("clue/v1") says which texts
made a sample (it goes into every request's cache key and every sample):

    *.jinja  first line  {# version: clue/v1 #}   (a Jinja comment: renders to nothing)
    *.txt    first line  # version: clue/v1        then one phrasing per line; '#' lines are comments;
                                                    each phrasing is itself a Jinja template

A schema carries its version in its own "version" field (falling back to "$id").

The directories are found with pipeline.core.data_files: beside the package in a checkout or an editable
install, under <prefix>/share/mg-geo/ in a regular install (setup.py's data_files).
Everything loaded here is plain strings and dicts, so a Stage holding it pickles; the compiled Jinja
templates live in a per-process cache instead.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import jinja2
import jsonschema

from pipeline.core.data_files import data_path

_HEADER = re.compile(r"^\s*(?:\{#|#)\s*version:\s*(?P<version>[A-Za-z0-9._/-]+)\s*(?:#\})?\s*$")
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False,
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)


class PromptFileError(ValueError):
    """A prompt or schema file is missing, has no version header, or disagrees with its set."""


@dataclass(frozen=True)
class PromptSet:
    name: str                           # "clue"
    version: str                        # "clue/v1"
    templates: dict                     # stem -> Jinja source (header line removed), from *.jinja
    phrasings: dict                     # stem -> tuple of Jinja one-liners, from *.txt

    def render(self, template: str, **context) -> str:
        if template not in self.templates:
            raise PromptFileError(f"prompt set {self.name!r} has no template {template!r}.jinja")
        return _compile(self.templates[template]).render(**context).strip()

    def phrase(self, phrasing: str, index: int, **context) -> str:
        """Phrasing number `index` (mod the count) of prompts/<set>/<phrasing>.txt, rendered."""
        lines = self.phrasing_lines(phrasing)
        return _compile(lines[index % len(lines)]).render(**context).strip()

    def phrasing_lines(self, phrasing: str) -> tuple:
        if phrasing not in self.phrasings:
            raise PromptFileError(f"prompt set {self.name!r} has no phrasings {phrasing!r}.txt")
        return self.phrasings[phrasing]


@dataclass(frozen=True)
class Schema:
    name: str       # "clue"
    version: str    # the schema's "version" field
    schema: dict    # the JSON schema itself, as sent to the LVLM and used to re-check answers

    def problem(self, value) -> Optional[str]:
        """None when `value` is valid, else a short description of the first error."""
        validator = _validator(json.dumps(self.schema, sort_keys=True))
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"{where}: {error.message}"[:300]


def read_version(first_line: str, path: Path) -> str:
    match = _HEADER.match(first_line)
    if not match:
        raise PromptFileError(f"{path}: first line must be a version header like "
                              "'{# version: clue/v1 #}' (.jinja) or '# version: clue/v1' (.txt), "
                              f"got {first_line[:80]!r}")
    return match.group("version")


@lru_cache(maxsize=None)
def load_prompt_set(name: str, root: Optional[str] = None) -> PromptSet:
    """prompts/<name>/ as a PromptSet; `root` overrides the data directory (tests)."""
    directory = Path(root) / "prompts" / name if root else _find(f"prompts/{name}")
    if not directory.is_dir():
        raise PromptFileError(f"prompt set directory {directory} not found")
    versions: dict = {}
    templates: dict = {}
    phrasings: dict = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in (".jinja", ".txt"):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        versions[path.name] = read_version(lines[0] if lines else "", path)
        body = lines[1:]
        if path.suffix == ".jinja":
            source = "\n".join(body)
            _check_syntax(source, path)
            templates[path.stem] = source
        else:
            entries = tuple(line.strip() for line in body if line.strip() and not line.lstrip().startswith("#"))
            if not entries:
                raise PromptFileError(f"{path}: no phrasings after the version header")
            for entry in entries:
                _check_syntax(entry, path)
            phrasings[path.stem] = entries
    distinct = sorted(set(versions.values()))
    if not distinct:
        raise PromptFileError(f"{directory}: no .jinja or .txt prompt files")
    if len(distinct) > 1:
        raise PromptFileError(f"{directory}: files disagree on the version ({versions}); a set has one "
                              "version, bump every header when any file changes")
    return PromptSet(name, distinct[0], templates, phrasings)


@lru_cache(maxsize=None)
def load_schema(name: str, root: Optional[str] = None) -> Schema:
    """schemas/<name>.schema.json as a Schema; checked to be a valid JSON schema."""
    path = Path(root) / "schemas" / f"{name}.schema.json" if root else _find(f"schemas/{name}.schema.json")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PromptFileError(f"{path}: cannot read schema ({exc})") from exc
    version = schema.get("version") or schema.get("$id")
    if not version:
        raise PromptFileError(f"{path}: a schema needs a \"version\" (or \"$id\") field")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise PromptFileError(f"{path}: not a valid JSON schema: {exc.message}") from exc
    return Schema(name, str(version), schema)


def _find(relative: str) -> Path:
    try:
        return data_path(relative)
    except FileNotFoundError as exc:
        raise PromptFileError(str(exc)) from exc


def _check_syntax(source: str, path: Path) -> None:
    try:
        _compile(source)
    except jinja2.TemplateSyntaxError as exc:
        raise PromptFileError(f"{path}: Jinja syntax error line {exc.lineno}: {exc.message}") from exc


@lru_cache(maxsize=512)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


@lru_cache(maxsize=32)
def _validator(schema_json: str):
    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema)
