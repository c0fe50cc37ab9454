import datetime as dt

import duckdb
import pytest
import sqlglot

from pipelines import sql
from pipelines.catalog import Column, TableSpec
from pipelines.errors import PipelineError
from pipelines.window import UTC, Window, as_of_day, shards, window_covering, window_from_dates

SPEC = TableSpec("ds", "reg_eurusd", "pair", False, "reg",
                 (Column("slope", "reg_slope", "FLOAT64"), Column("select", "reg_select", "INT64")))


def test_window_includes_the_end_day_and_shards_tile_it():
    w = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 3, 1))
    assert w.end == dt.datetime(2025, 3, 2, tzinfo=UTC)
    parts = shards(w, 28)
    assert parts[0].start == w.start and parts[-1].end == w.end
    assert all(a.end == b.start for a, b in zip(parts, parts[1:]))
    # Boundaries are global: the same interior shard for another window.
    other = shards(window_from_dates(dt.date(2024, 12, 1), dt.date(2025, 6, 1)), 28)
    assert parts[1] in other
    assert Window.from_id(w.id) == w


def test_bad_dates():
    with pytest.raises(PipelineError, match="before"):
        window_from_dates(dt.date(2025, 2, 1), dt.date(2025, 1, 1))
    with pytest.raises(PipelineError):
        shards(window_from_dates(dt.date(2025, 1, 1), dt.date(2025, 1, 2)), 0)


def test_the_default_window_leaves_out_a_day_not_yet_over():
    def at(day, hour=0):
        return dt.datetime(2026, 12, day, hour, tzinfo=UTC)

    today = dt.date(2026, 12, 7)
    through_6th = window_from_dates(dt.date(2026, 12, 1), dt.date(2026, 12, 6))
    # Targets that end before today: every day they touch.
    assert window_covering(at(1, 5), at(6, 23), today) == through_6th
    # Reaching today, or keys stamped in the future: up to yesterday.
    for last in (at(7), at(7, 13), at(9)):
        assert window_covering(at(1, 5), last, today) == through_6th
    with pytest.raises(PipelineError, match=r"cover only 2026-12-07 \.\. 2026-12-07, no whole "
                                            r"day before today \(2026-12-07, UTC\): give --start-date"):
        window_covering(at(7, 1), at(7, 13), today)


def test_as_of_is_the_day_taken_as_today_for_the_default_window():
    """--as-of (AS_OF_DATE) pins "today" for a run: not after the real today (that would
    take in a day not yet over), and not with dates, whose window it does not shape."""
    today = dt.date(2026, 12, 7)
    assert as_of_day(None, today, dates_given=False) is None
    assert as_of_day("", today, dates_given=True) is None
    assert as_of_day("2026-12-05", today, dates_given=False) == dt.date(2026, 12, 5)
    assert as_of_day("2026-12-07", today, dates_given=False) == today
    with pytest.raises(PipelineError, match=r"^--as-of 2026-12-08 is after today \(2026-12-07, UTC\)"):
        as_of_day("2026-12-08", today, dates_given=False)
    with pytest.raises(PipelineError, match=r"^give --as-of or --start-date/--end-date, not both"):
        as_of_day("2026-12-05", today, dates_given=True)
    # Only YYYY-MM-DD: Python's ISO parser alone takes the last two as 2026-12-05.
    for text in ("12/05/2026", "20261205", "2026-W49-6"):
        with pytest.raises(PipelineError, match=rf"^--as-of '{text}' is not a date like 2024-01-31$"):
            as_of_day(text, today, dates_given=False)
    # The window it gives, and its error naming the day for what it is.
    keys = dt.datetime(2026, 12, 1, tzinfo=UTC), dt.datetime(2026, 12, 6, 23, tzinfo=UTC)
    assert window_covering(*keys, dt.date(2026, 12, 5)) == window_from_dates(
        dt.date(2026, 12, 1), dt.date(2026, 12, 4))
    with pytest.raises(PipelineError, match=r"no whole day before the --as-of day \(2026-12-01, UTC\)"):
        window_covering(*keys, dt.date(2026, 12, 1), "the --as-of day")


def test_an_extraction_of_targets_still_appended_to_stops_at_yesterday(warehouse, tmp_path, caplog):
    """A targets row stamped now (a table still being written to) does not pull today's
    partial day into the default window."""
    import logging
    import shutil

    from pipelines.catalog import load_catalog
    from pipelines.extract.plan import default_window
    from pipelines.sources import DuckDBSource

    path = str(tmp_path / "w.duckdb")
    shutil.copy(warehouse, path)
    catalog = load_catalog()
    before = DuckDBSource(path)
    try:
        settled = default_window(before, catalog, "eurusd")
    finally:
        before.close()
    con = duckdb.connect(path)
    con.execute(f"INSERT INTO {catalog.targets_dataset}.{catalog.targets_table_for('eurusd')} "
                "(interval_time) VALUES (now())")
    con.close()
    source = DuckDBSource(path)
    days = {dt.datetime.now(UTC).date()}  # and the next, should midnight pass meanwhile
    try:
        with caplog.at_level(logging.INFO, logger="pipelines.extract.plan"):
            live = default_window(source, catalog, "eurusd")
    finally:
        source.close()
    days.add(dt.datetime.now(UTC).date())
    assert live.start == settled.start and live.end.time() == dt.time() and live.end.date() in days
    last_day = live.end.date() - dt.timedelta(days=1)
    assert f"window ends with {last_day}, the last whole day before today" in caplog.text


def test_queries_parse_in_both_dialects_and_quote_identifiers():
    w = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 7))
    for text in (sql.select_shard(SPEC, "interval_time", w, "bqx-ml"),
                 sql.count_shard(SPEC, "interval_time", w, dt.datetime(2000, 1, 1, tzinfo=UTC))):
        tree = sqlglot.parse_one(text, read="bigquery")
        assert tree is not None
        sqlglot.parse_one(sql.to_duckdb(text), read="duckdb")
    select = sql.select_shard(SPEC, "interval_time", w)
    # Every identifier is quoted, keywords included; anything stranger than letters,
    # digits and '_' never gets here (pipelines.catalog.check_identifier refuses it).
    assert "`select` AS `reg_select`" in select
    assert "WHERE `interval_time` >= CAST('2025-01-06 00:00:00.000000+00' AS TIMESTAMP)" in select


def test_translated_query_runs_on_duckdb():
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'; CREATE SCHEMA ds")
    con.execute("CREATE TABLE ds.reg_eurusd AS SELECT TIMESTAMPTZ '2025-01-06 00:00:00+00' "
                "+ to_minutes(i::INT) AS interval_time, i * 1.0 AS slope, i AS \"select\" "
                "FROM range(3000) r(i)")
    w = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 6))
    out = con.execute(sql.to_duckdb(sql.select_shard(SPEC, "interval_time", w))).to_arrow_table()
    assert out.num_rows == 1440
    assert out.schema.names == ["interval_time", "reg_slope", "reg_select"]


def test_duckdb_rendering_is_sqlglots_translation_of_the_googlesql():
    """Queries carry a DuckDB rendering made at build time: it must be exactly what
    sqlglot's transpiler makes of the GoogleSQL text."""
    w = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 7))
    for query in (sql.select_shard(SPEC, "interval_time", w),
                  sql.select_shard(SPEC, "interval_time", w, "bqx-ml"),
                  sql.count_shard(SPEC, "interval_time", w, None),
                  sql.count_shard(SPEC, "interval_time", w, dt.datetime(2000, 1, 1, tzinfo=UTC)),
                  sql.key_range("ds", "t", "interval_time", dt.datetime(2000, 1, 1, tzinfo=UTC))):
        assert query.duckdb == sqlglot.transpile(str(query), read="bigquery", write="duckdb")[0]
        assert sql.to_duckdb(query) == query.duckdb


def test_select_list_refuses_anything_but_plain_identifiers():
    w = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 7))
    bad = TableSpec("ds", "t", "pair", False, "t", (Column("a`b", "t_a`b", "FLOAT64"),))
    with pytest.raises(ValueError, match="not a plain identifier"):
        sql.select_shard(bad, "interval_time", w)


def test_window_from_options_both_or_neither():
    from pipelines.window import window_from_options

    assert window_from_options(None, None) is None
    assert window_from_options("2025-01-06", "2025-01-06").end == dt.datetime(2025, 1, 7, tzinfo=UTC)
    with pytest.raises(PipelineError, match="both --start-date and --end-date"):
        window_from_options("2025-01-06", None)
    with pytest.raises(PipelineError, match="not a date"):
        window_from_options("2025-13-01", "2025-01-06")
    # --days chooses among default windows, so it goes without dates.
    assert window_from_options(None, None, 70) is None
    with pytest.raises(PipelineError, match="--days or --start-date/--end-date, not both"):
        window_from_options(None, "2025-01-06", 70)
    with pytest.raises(PipelineError, match="--days must be at least 1, not 0"):
        window_from_options(None, None, 0)


def test_last_days_of_a_window():
    from pipelines.window import last_days, length_days

    december = window_from_dates(dt.date(2026, 12, 1), dt.date(2026, 12, 31))
    assert length_days(december) == 31
    assert last_days(december, 7) == window_from_dates(dt.date(2026, 12, 25), dt.date(2026, 12, 31))
    assert last_days(december, 31) == december == last_days(december, 400)
    assert december.last_day == dt.date(2026, 12, 31)


def test_templated_queries_equal_direct_renderings():
    """Queries are rendered once per shape and names/bounds spliced in: the text must be
    exactly what rendering each table's own tree gives (it is fingerprinted)."""
    import datetime as dt

    from pipelines import sql
    from pipelines.catalog import Column, TableSpec
    from pipelines.window import UTC, Window

    spec = TableSpec("bqx_ml_v3_features_v2", "reg_eurusd_45", "pair", False, "reg_45",
                     (Column("mean", "reg_45_mean", "FLOAT64"), Column("n", "reg_45_n", "INT64")))
    shard = Window(dt.datetime(2025, 1, 6, tzinfo=UTC), dt.datetime(2025, 2, 3, 12, 30, tzinfo=UTC))
    columns = [("interval_time", None), ("mean", "reg_45_mean"), ("n", "reg_45_n")]
    for project in (None, "bqx-ml"):
        direct = sql._rendered(sql.select_expression(spec.dataset, spec.table, "interval_time",
                                                     shard, project), columns)
        got = sql.select_shard(spec, "interval_time", shard, project)
        assert (str(got), got.duckdb) == (str(direct), direct.duckdb)
        for min_valid in (None, dt.datetime(2000, 1, 1, tzinfo=UTC)):
            direct = sql._rendered(sql.count_expression(spec.dataset, spec.table, "interval_time",
                                                        shard, min_valid, project))
            got = sql.count_shard(spec, "interval_time", shard, min_valid, project)
            assert (str(got), got.duckdb) == (str(direct), direct.duckdb)


def test_count_batch_answers_each_count_query_as_it_would_alone():
    """One query for several shards' counts gives, row for row, what each task's own
    count query gives (n_bad only where that query counts bad keys), on DuckDB, and
    its GoogleSQL text is what sqlglot translates to the DuckDB one."""
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'; CREATE SCHEMA ds")
    con.execute("CREATE TABLE ds.reg_eurusd AS SELECT TIMESTAMPTZ '2025-01-06 00:00:00+00' "
                "+ to_minutes((i % 2500)::INT) AS interval_time, i * 1.0 AS slope, i AS \"select\" "
                "FROM range(3000) r(i)")
    con.execute("INSERT INTO ds.reg_eurusd VALUES (TIMESTAMPTZ '1970-01-01 00:00:00+00', 0, 0)")
    floor = dt.datetime(2000, 1, 1, tzinfo=UTC)
    parts = shards(window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 8)), 1)
    queries = [(sql.count_shard(SPEC, "interval_time", w, floor if i == 0 else None), i == 0)
               for i, w in enumerate(parts)]
    batch = sql.count_batch(queries)
    got = con.execute(batch.duckdb).fetchall()
    assert sorted(row[0] for row in got) == list(range(len(parts)))
    for task, n_rows, n_keys, n_bad in got:
        query, with_bad = queries[task]
        alone = con.execute(query.duckdb).fetchone()
        assert (n_rows, n_keys) == alone[:2]
        assert n_bad == (alone[2] if with_bad else None)
    assert [r for r in got if r[0] == 0][0][1:] == (1940, 1440, 1)  # 500 keys twice, 1 bad
    assert batch.duckdb == sqlglot.transpile(str(batch), read="bigquery", write="duckdb")[0]
    with pytest.raises(ValueError):
        sql.count_batch([("SELECT 1", False)])
