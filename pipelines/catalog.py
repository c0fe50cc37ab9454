"""The catalog: which tables make up a pair, and what their columns are called.

Everything here is pure: discovery takes the table and column listings that a source
read from INFORMATION_SCHEMA and returns a plan; no IO happens in this module except
reading the catalog file itself.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import tomllib
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from pipelines.errors import PipelineError
from pipelines.schema import bigquery_type

DEFAULT_CATALOG = Path(__file__).with_name("catalog.toml")

# BigQuery identifiers we accept from INFORMATION_SCHEMA. Anything else (quotes,
# backticks, spaces, semicolons, dots, slashes) is refused rather than quoted into SQL
# and file paths. Matched with fullmatch: "$" would let a trailing newline through.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,299}")
_PAIR_SHAPE = re.compile(r"[a-z]{6}")


class MalformedName(PipelineError, ValueError):
    """An identifier that is not plain letters, digits and '_' (also a ValueError, what
    the query builder raised before it named the culprit)."""


@dataclasses.dataclass(frozen=True)
class GroupRule:
    """One table group of the catalog and the rule that discovers its tables."""

    name: str
    shared: bool
    prefix: str | None = None
    exclude_suffix: str | None = None
    contains_pair: bool = False

    def matches(self, table: str, pair: str) -> bool:
        """True when ``table`` belongs to this group for ``pair``."""
        if self.prefix is not None and not table.startswith(self.prefix):
            return False
        if self.exclude_suffix is not None and table.endswith(self.exclude_suffix):
            return False
        if self.contains_pair and pair not in table.split("_"):
            return False
        return True


@dataclasses.dataclass(frozen=True)
class Catalog:
    """The parsed catalog file."""

    key: str
    min_valid_key: str
    features_dataset: str
    targets_dataset: str
    targets_table: str
    target_column_prefix: str
    currencies: tuple[str, ...]
    identity_columns: frozenset[str]
    groups: tuple[GroupRule, ...]

    @property
    def pairs(self) -> tuple[str, ...]:
        """The currency pairs, named base+quote in market order (``eurusd``)."""
        return tuple(a + b for a, b in itertools.combinations(self.currencies, 2))

    def check_pair(self, pair: str | None) -> str:
        """Return ``pair`` if the catalog knows it; raise a PipelineError otherwise."""
        if not pair:
            raise PipelineError("no pair given: pass --pair (or set PAIR), e.g. --pair eurusd")
        if not isinstance(pair, str) or not _PAIR_SHAPE.fullmatch(pair):
            raise PipelineError(
                f"malformed pair {pair!r}: expected six lower-case letters like 'eurusd'")
        if pair not in self.pairs:
            close = difflib.get_close_matches(pair, self.pairs, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise PipelineError(
                f"unknown pair {pair!r}{hint}; known pairs: {' '.join(self.pairs)}")
        return pair

    def targets_table_for(self, pair: str) -> str:
        """Name of the targets table of ``pair``."""
        return self.targets_table.format(pair=pair)


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read a catalog TOML file (the shipped one by default)."""
    path = Path(path) if path else DEFAULT_CATALOG
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"catalog file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"catalog file {path} is not valid TOML: {exc}") from None
    try:
        groups = tuple(
            GroupRule(
                name=g["name"],
                shared=bool(g.get("shared", False)),
                prefix=g.get("prefix"),
                exclude_suffix=g.get("exclude_suffix"),
                contains_pair=bool(g.get("contains_pair", False)),
            )
            for g in raw["groups"]
        )
        catalog = Catalog(
            key=raw["key"],
            min_valid_key=raw["min_valid_key"],
            features_dataset=raw["features_dataset"],
            targets_dataset=raw["targets_dataset"],
            targets_table=raw["targets_table"],
            target_column_prefix=raw["target_column_prefix"],
            currencies=tuple(raw["currencies"]),
            identity_columns=frozenset(raw.get("identity_columns", ())),
            groups=groups,
        )
    except KeyError as exc:
        raise PipelineError(f"catalog file {path} lacks the setting {exc.args[0]!r}") from None
    for name in (catalog.key, catalog.features_dataset, catalog.targets_dataset):
        check_identifier(name, f"catalog file {path}")
    # The targets table's name becomes a SQL identifier and a checkpoint folder.
    try:
        example = catalog.targets_table_for("eurusd")
    except (KeyError, IndexError, ValueError):
        raise PipelineError(f"catalog file {path}: targets_table {catalog.targets_table!r} "
                            "may use no placeholder but {pair}") from None
    check_identifier(example, f"catalog file {path} (targets_table)")
    return catalog


def check_identifier(name: str, where: str) -> str:
    """Return ``name`` if it is a plain identifier; raise naming ``where`` otherwise."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise MalformedName(f"malformed name {name!r} in {where}: not a plain identifier "
                            "(only letters, digits and '_' are accepted)")
    return name


@dataclasses.dataclass(frozen=True)
class Column:
    """A source column and the name it takes in checkpoints and the training file."""

    source: str
    output: str
    type: str  # BigQuery type name: FLOAT64, INT64, STRING, BOOL, TIMESTAMP


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One table to extract: where it lives, its group, and its output columns."""

    dataset: str
    table: str
    group: str  # a catalog group name, or "targets"
    shared: bool
    stem: str  # the table name without the pair: the prefix of its feature columns
    columns: tuple[Column, ...]

    @property
    def output_names(self) -> list[str]:
        """The table's output column names (without the key)."""
        return [c.output for c in self.columns]


def table_stem(table: str, pair: str) -> str:
    """The table's name with the pair's own part removed.

    ``corr_etf_idx_audusd_ewa`` -> ``corr_etf_idx_ewa`` for audusd; a cov table keeps its
    partner: ``cov_agg_audcad_audusd`` -> ``cov_agg_audcad``.
    """
    parts = table.split("_")
    if pair in parts:
        parts.remove(pair)
    return "_".join(parts)


def classify(catalog: Catalog, table: str, pair: str) -> GroupRule | None:
    """The first catalog group whose rule ``table`` matches, or None."""
    for rule in catalog.groups:
        if rule.matches(table, pair):
            return rule
    return None


def plan_tables(
    catalog: Catalog,
    pair: str,
    feature_columns: Mapping[str, Sequence[tuple[str, str]]],
    target_columns: Sequence[tuple[str, str]],
) -> list[TableSpec]:
    """Turn INFORMATION_SCHEMA listings into the ordered list of tables to extract.

    ``feature_columns`` maps every table of the features dataset to its (column, type)
    pairs in ordinal order; ``target_columns`` lists the targets table's columns. The
    result starts with the targets table, then the feature tables in catalog order
    (group, then table name). Raises PipelineError for malformed names, tables without
    the key, and output columns that collide.
    """
    targets_name = check_identifier(catalog.targets_table_for(pair), "the catalog's targets_table")
    specs = [_targets_spec(catalog, targets_name, target_columns)]
    by_group: dict[str, list[str]] = {g.name: [] for g in catalog.groups}
    for table in feature_columns:
        rule = classify(catalog, table, pair)
        if rule is not None:
            check_identifier(table, f"{catalog.features_dataset} table list")
            by_group[rule.name].append(table)
    if not any(by_group.values()):
        raise PipelineError(
            f"no feature tables for pair {pair!r} in dataset {catalog.features_dataset}")
    for rule in catalog.groups:
        for table in sorted(by_group[rule.name]):
            specs.append(_feature_spec(catalog, rule, table, pair, feature_columns[table]))
    _check_collisions(catalog, specs)
    return specs


def _targets_spec(catalog: Catalog, table: str, columns: Sequence[tuple[str, str]]) -> TableSpec:
    where = f"{catalog.targets_dataset}.{table}"
    _check_key(catalog, where, columns)
    cols = tuple(
        Column(check_identifier(c, where), c, bigquery_type(t, f"{where}.{c}"))
        for c, t in columns if c.startswith(catalog.target_column_prefix)
    )
    if not cols:
        raise PipelineError(
            f"targets table {where} has no columns starting {catalog.target_column_prefix!r}")
    return TableSpec(catalog.targets_dataset, table, "targets", False, table, cols)


def _feature_spec(catalog: Catalog, rule: GroupRule, table: str, pair: str,
                  columns: Sequence[tuple[str, str]]) -> TableSpec:
    where = f"{catalog.features_dataset}.{table}"
    _check_key(catalog, where, columns)
    stem = table_stem(table, pair) if not rule.shared else table
    cols = tuple(
        Column(check_identifier(c, where), f"{stem}_{c}", bigquery_type(t, f"{where}.{c}"))
        for c, t in columns
        if c != catalog.key and c not in catalog.identity_columns
    )
    return TableSpec(catalog.features_dataset, table, rule.name, rule.shared, stem, cols)


def _check_key(catalog: Catalog, where: str, columns: Sequence[tuple[str, str]]) -> None:
    types = dict(columns)
    if catalog.key not in types:
        raise PipelineError(f"table {where} has no {catalog.key!r} column")
    if bigquery_type(types[catalog.key], f"{where}.{catalog.key}") != "TIMESTAMP":
        raise PipelineError(f"key column {where}.{catalog.key} has type "
                            f"{types[catalog.key]!r}, expected TIMESTAMP")


def _check_collisions(catalog: Catalog, specs: Iterable[TableSpec]) -> None:
    check_output_columns(catalog.key, specs)


def check_output_columns(key: str, specs: Iterable[TableSpec]) -> None:
    """Refuse two tables giving the same output column (or one named like the key),
    naming both tables; also names over BigQuery's 300 characters."""
    # Case-insensitive: DuckDB and BigQuery column names are, so 'reg_X' and 'reg_x'
    # would be one column to the merge and the export.
    owner: dict[str, tuple[str, str]] = {key.lower(): (key, "the key")}
    for spec in specs:
        here = f"{spec.dataset}.{spec.table}"
        for col in spec.columns:
            if col.output.lower() in owner:
                first_name, first = owner[col.output.lower()]
                same = "" if first_name == col.output else f" (as {first_name!r})"
                raise PipelineError(
                    f"output column {col.output!r} comes from both {first}{same} and "
                    f"{here}; rename one of them")
            owner[col.output.lower()] = (col.output, here)
            if len(col.output) > 300:
                raise PipelineError(f"output column name {col.output!r} of "
                                    f"{spec.dataset}.{spec.table} exceeds 300 characters")
