"""Tests of the sample warehouse generator (pipelines/sample.py)."""
from __future__ import annotations

import datetime as dt
import time

import duckdb
import pytest

from pipelines import sample
from pipelines.catalog import classify, load_catalog, plan_tables
from pipelines.errors import PipelineError

CAT = load_catalog()
FEAT = CAT.features_dataset
ROWS = 300
K = 2


def _quiet(_line: str) -> None:
    pass


def _build(path, pairs="eurusd", rows=ROWS, seed=0, k=K, **kw):
    return sample.build_warehouse(path, pairs, rows=rows, seed=seed, tables_per_group=k,
                                  log=_quiet, **kw)


def _tables(con, schema=FEAT) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = ? "
        "ORDER BY 1", [schema]).fetchall()]


def _columns(con, schema=FEAT) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for table, column, dtype in con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = ? ORDER BY table_name, ordinal_position", [schema]).fetchall():
        out.setdefault(table, []).append((column, dtype))
    return out


def _content_hash(con, schema: str, table: str) -> str:
    return con.execute(
        f"SELECT md5(string_agg(CAST(t AS VARCHAR), '|' ORDER BY CAST(t AS VARCHAR))) "
        f'FROM "{schema}"."{table}" AS t').fetchone()[0]


def _all_hashes(path) -> dict[tuple[str, str], str]:
    with duckdb.connect(str(path), read_only=True) as con:
        return {(s, t): _content_hash(con, s, t) for s, t in con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema <> 'main'").fetchall()}


def _expected_group(table: str, pair: str) -> str | None:
    """The discovery group a generated table must land in, from its name alone."""
    if table.endswith("_summary") or table in sample.DECOY_TABLES:
        return None
    for prefix in ("tri_", "mkt_", "var_", "csi_"):
        if table.startswith(prefix):
            return prefix[:-1]
    assert pair in table.split("_"), table
    return "pair"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """eurusd at 300 rows, at most 2 tables per kind-group."""
    path = tmp_path_factory.mktemp("small") / "w.duckdb"
    summary = _build(path)
    return path, summary


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """eurusd with every table at 50 rows, and how long it took."""
    path = tmp_path_factory.mktemp("full") / "w.duckdb"
    began = time.perf_counter()
    summary = _build(path, rows=50, k=None)
    return path, summary, time.perf_counter() - began


def test_naming_rules(small):
    path, summary = small
    with duckdb.connect(str(path), read_only=True) as con:
        tables = _tables(con)
        assert _tables(con, CAT.targets_dataset) == ["targets_eurusd"]
    assert tables, "no feature tables"
    for table in tables:
        rule = classify(CAT, table, "eurusd")
        assert (rule.name if rule else None) == _expected_group(table, "eurusd"), table
    # K caps every kind-group: pair-level, cov, corr of the pair; tri, mkt, var, csi.
    for prefix in ("cov_", "corr_", "tri_", "var_", "csi_"):
        assert len([t for t in tables if t.startswith(prefix)]) == K, prefix
    assert len([t for t in tables if t.startswith("mkt_") and not t.endswith("_summary")]) == K
    assert {"mkt_regime_summary", "mkt_vol_summary", *sample.DECOY_TABLES} <= set(tables)
    # Another pair that shares no table with eurusd sees only the shared groups.
    assert not any(classify(CAT, t, "audnzd") and classify(CAT, t, "audnzd").name == "pair"
                   for t in tables)
    assert summary["created"] == summary["tables"] and summary["skipped"] == 0


def test_full_size_counts(full):
    path, summary, seconds = full
    with duckdb.connect(str(path), read_only=True) as con:
        columns = _columns(con)
        targets = _columns(con, CAT.targets_dataset)
        assert con.execute(
            'SELECT count(*) FROM "bqx_ml_v3_features_v2"."reg_eurusd"').fetchone()[0] == 50
    per_group: dict[str, int] = {}
    features: dict[str, int] = {}
    types: dict[str, int] = {}
    for table, cols in columns.items():
        rule = classify(CAT, table, "eurusd")
        if rule is None:
            continue
        per_group[rule.name] = per_group.get(rule.name, 0) + 1
        feats = [(c, t) for c, t in cols if c != CAT.key and c not in CAT.identity_columns]
        features[rule.name] = features.get(rule.name, 0) + len(feats)
        for _, t in feats:
            types[t] = types.get(t, 0) + 1
    assert per_group == {"pair": 256, "tri": 194, "mkt": 10, "var": 63, "csi": 144}
    total = sum(features.values())
    assert abs(total - 16_988) <= 0.03 * 16_988, features
    assert abs(features["pair"] - 4_173) <= 0.03 * 4_173
    assert summary["feature_columns"] == total
    assert types["BOOLEAN"] == 1
    assert 0.92 <= types["DOUBLE"] / total <= 0.96, types
    assert 0.025 <= types["BIGINT"] / total <= 0.055, types
    assert 0.01 <= types["VARCHAR"] / total <= 0.03, types
    assert set(types) == {"DOUBLE", "BIGINT", "VARCHAR", "BOOLEAN"}
    # The catalog's planner accepts the warehouse: keys, names, types, no collisions.
    specs = plan_tables(CAT, "eurusd", columns, targets["targets_eurusd"])
    assert len(specs) == 1 + 667
    assert sum(len(s.columns) for s in specs[1:]) == total
    assert len(specs[0].columns) == 49
    # 667 tables at 50 rows must stay quick (about 10 s on 2 shared cores).
    assert seconds < 120, seconds


def test_targets(small):
    path, _ = small
    with duckdb.connect(str(path), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        cols = [c for c, _ in _columns(con, CAT.targets_dataset)["targets_eurusd"]]
        want = [f"target_bqx{w}_h{h}" for w in sample.BQX_WINDOWS for h in sample.HORIZONS]
        assert [c for c in cols if c.startswith("target_")] == want
        assert cols[:2] == ["interval_time", "pair"]
        rows = con.execute(
            'SELECT * FROM "bqx_ml_v3_analytics_v2"."targets_eurusd" ORDER BY interval_time'
        ).fetchall()
    assert len(rows) == ROWS
    at = {c: i for i, c in enumerate(cols)}
    start = dt.datetime(2025, 1, 6, tzinfo=dt.timezone.utc)
    assert [r[0] for r in rows] == [start + dt.timedelta(minutes=i) for i in range(ROWS)]
    for w in (45, 180):
        bqx = [r[at[f"bqx_{w}"]] for r in rows]
        assert all(v is None for v in bqx[:w]) and all(v is not None for v in bqx[w:])
        for h in (15, 105):
            target = [r[at[f"target_bqx{w}_h{h}"]] for r in rows]
            assert target == bqx[h:] + [None] * h, (w, h)
    # 1440 and 2880 minute windows have no history within 300 rows.
    assert all(r[at["bqx_2880"]] is None for r in rows)


def test_defects(small):
    path, _ = small
    with duckdb.connect(str(path), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        tables = _tables(con)

        def q(sql):
            return con.execute(sql).fetchone()

        # Gaps: 5-11% of the minutes missing, no duplicates, in corr, var, regime.
        gapped = [t for t in tables if t.startswith(sample.GAP_PREFIXES)]
        assert any(t.startswith("corr_") for t in gapped) and any(t.startswith("var_") for t in gapped)
        for t in gapped:
            n, distinct = q(f'SELECT count(*), count(DISTINCT interval_time) FROM {FEAT}."{t}"')
            assert n == distinct
            assert 0.045 <= 1 - n / ROWS <= 0.115, (t, n)
        # Duplicate keys with differing values, in three tables.
        dups = {}
        for t in tables:
            n, distinct = q(f'SELECT count(*), count(DISTINCT interval_time) FROM {FEAT}."{t}"')
            if n != distinct:
                dups[t] = n - distinct
        assert dups == {"agg_eurusd": 5, "tri_agg_eur_gbp_aud": 5, "csi_agg_eur": 5}
        for t in dups:
            differ = q(f'SELECT count(*) FROM (SELECT interval_time FROM {FEAT}."{t}" AS x '
                       f'GROUP BY interval_time HAVING count(*) > 1 '
                       f'AND count(DISTINCT CAST(x AS VARCHAR)) > 1)')[0]
            assert differ == 5, t
        # 1970 keys in every mkt table, nowhere else.
        for t in tables:
            old = q(f"SELECT count(*) FROM {FEAT}.\"{t}\" WHERE interval_time < TIMESTAMPTZ "
                    f"'{CAT.min_valid_key} 00:00:00+00'")[0]
            assert old == (sample.EPOCH_ROWS if t.startswith("mkt_") else 0), t
        # NULL runs: consecutive minutes, in some columns.
        cols = _columns(con)
        runs = 0
        for t in ("agg_eurusd", "tri_agg_eur_gbp_aud", "csi_agg_eur", "cov_agg_euraud_eurusd"):
            for c, _ in cols[t]:
                n, first, last = q(
                    f'SELECT count(*), min(interval_time), max(interval_time) '
                    f'FROM {FEAT}."{t}" WHERE "{c}" IS NULL')
                if n:
                    assert (last - first) == dt.timedelta(minutes=n - 1), (t, c)
                    runs += 1
        assert runs >= 4
        # The targets carry only their natural NULLs: complete, unique minutes.
        n, distinct = q('SELECT count(*), count(DISTINCT interval_time) '
                        'FROM bqx_ml_v3_analytics_v2.targets_eurusd')
        assert n == distinct == ROWS


def test_same_seed_same_content(small, tmp_path):
    path, _ = small
    again = tmp_path / "again.duckdb"
    # Fewer threads and another order of creation must not change a single value.
    _build(again, workers=1)
    assert _all_hashes(again) == _all_hashes(path)
    other = tmp_path / "other.duckdb"
    _build(other, seed=7)
    first, second = _all_hashes(path), _all_hashes(other)
    assert first.keys() == second.keys()
    assert all(first[k] != second[k] for k in first)


def test_add_second_pair(tmp_path):
    path = tmp_path / "w.duckdb"
    _build(path, "eurusd")
    before = _all_hashes(path)
    summary = _build(path, "gbpusd")
    after = _all_hashes(path)
    for key, digest in before.items():
        assert after[key] == digest, key
    for group in ("tri", "mkt", "var", "csi", "excluded (summary, decoy)"):
        assert summary["groups"][group]["created"] == 0, group
    assert summary["groups"]["gbpusd pair-specific"]["created"] == 3 * K
    new = {t for _, t in after.keys() - before.keys()}
    assert "targets_gbpusd" in new and "agg_gbpusd" in new
    assert all("gbpusd" in t.split("_") for t in new)
    assert not any(p.name.endswith((".tmp", ".wal")) for p in tmp_path.iterdir())
    # The same call again is a no-op.
    again = _build(path, "eurusd,gbpusd")
    assert again["created"] == 0 and again["skipped"] == again["tables"]
    assert _all_hashes(path) == after


def test_cov_table_shared_by_both_pairs(tmp_path):
    path = tmp_path / "w.duckdb"
    # K=None for pair-specific tables would be slow; 12 cov tables reach every partner.
    _build(path, "eurusd,gbpusd", rows=20, k=12)
    with duckdb.connect(str(path), read_only=True) as con:
        tables = _tables(con)
        row = con.execute(f"SELECT DISTINCT pair1, pair2 FROM {FEAT}.cov_agg_eurusd_gbpusd").fetchall()
    assert row == [("eurusd", "gbpusd")]
    for pair in ("eurusd", "gbpusd"):
        mine = [t for t in tables if t.startswith("cov_agg_") and pair in t.split("_")]
        assert len(mine) == 12, (pair, mine)


def test_bad_input(tmp_path):
    path = tmp_path / "w.duckdb"
    with pytest.raises(PipelineError, match="abcdef"):
        _build(path, "eurusd,abcdef")
    with pytest.raises(PipelineError, match="EURUSD"):
        _build(path, "EURUSD")
    with pytest.raises(PipelineError, match="no pair"):
        _build(path, " , ")
    with pytest.raises(PipelineError, match="rows"):
        _build(path, rows=0)
    with pytest.raises(PipelineError, match="seed"):
        _build(path, seed="1")
    with pytest.raises(PipelineError, match="min_valid_key"):
        _build(path, start=dt.datetime(1999, 1, 1))
    assert not path.exists()


def test_other_settings_refused(tmp_path):
    path = tmp_path / "w.duckdb"
    _build(path, rows=20, k=1)
    with pytest.raises(PipelineError, match="rows=20"):
        _build(path, "gbpusd", rows=30, k=1)


def test_crash_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "w.duckdb"
    real = sample._table_sql

    def failing(table, *args):
        if table.name.startswith("tri_"):
            return "SELECT no_such_column FROM range(1)"
        return real(table, *args)

    monkeypatch.setattr(sample, "_table_sql", failing)
    with pytest.raises(PipelineError, match="tri_"):
        _build(path)
    assert list(tmp_path.iterdir()) == []


def test_main(tmp_path, capsys):
    path = tmp_path / "sub" / "w.duckdb"
    code = sample.main(["--warehouse", str(path), "--pairs", "eurusd", "--rows", "30",
                        "--seed", "3", "--tables-per-group", "1", "--start", "2024-03-01"])
    out, err = capsys.readouterr()
    assert code == 0
    assert str(path) in out and "30 rows" in out
    assert "tri: 1 tables created" in err
    with duckdb.connect(str(path), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        first = con.execute("SELECT min(interval_time) FROM bqx_ml_v3_analytics_v2.targets_eurusd"
                            ).fetchone()[0]
    assert first == dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)

    code = sample.main(["--warehouse", str(path), "--pairs", "eurusd,zzzzzz"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: ") and "zzzzzz" in err and err.count("\n") == 1
