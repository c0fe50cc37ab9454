import pytest

from pipelines.catalog import classify, load_catalog, plan_tables, table_stem
from pipelines.errors import PipelineError

CAT = load_catalog()
TS = ("interval_time", "TIMESTAMP")


def test_28_pairs_in_market_order():
    assert len(CAT.pairs) == 28
    assert {"eurusd", "audcad", "gbpjpy", "audusd"} <= set(CAT.pairs)
    assert "usdeur" not in CAT.pairs


@pytest.mark.parametrize("pair, message", [
    ("usdeur", "unknown pair 'usdeur'"),
    ("eurusx", "unknown pair 'eurusx'"),
    ("EURUSD", "malformed pair"),
    ("eur-usd", "malformed pair"),
    ("../etc", "malformed pair"),
    ("", "no pair given"),
])
def test_bad_pairs_are_named(pair, message):
    with pytest.raises(PipelineError, match=message):
        CAT.check_pair(pair)


@pytest.mark.parametrize("table, group", [
    ("reg_eurusd", "pair"),
    ("cov_agg_eurgbp_eurusd", "pair"),
    ("corr_etf_idx_eurusd_ewa", "pair"),
    ("tri_agg_eur_usd_gbp", "tri"),
    ("mkt_vol", "mkt"),
    ("mkt_vol_summary", None),
    ("var_agg_usd", "var"),
    ("csi_mom_eur", "csi"),
    ("reg_gbpusd", None),
    ("xeurusd_reg", None),
])
def test_group_rules(table, group):
    rule = classify(CAT, table, "eurusd")
    assert (rule.name if rule else None) == group


def test_stems_drop_only_the_pair():
    assert table_stem("corr_etf_idx_audusd_ewa", "audusd") == "corr_etf_idx_ewa"
    assert table_stem("cov_agg_audcad_audusd", "audusd") == "cov_agg_audcad"
    assert table_stem("cov_agg_audcad_audusd", "audcad") == "cov_agg_audusd"


def test_plan_orders_prefixes_and_drops_identity_columns():
    features = {
        "tri_agg_eur_usd_gbp": [TS, ("base_curr", "VARCHAR"), ("x", "DOUBLE")],
        "reg_eurusd": [TS, ("pair", "VARCHAR"), ("slope", "DOUBLE"), ("n", "BIGINT")],
        "corr_etf_eurusd_ewa": [TS, ("fx_pair", "VARCHAR"), ("fx_pair_corr", "DOUBLE")],
        "reg_gbpusd": [TS, ("slope", "DOUBLE")],
    }
    specs = plan_tables(CAT, "eurusd", features, [TS, ("bqx_45", "DOUBLE"), ("target_a", "DOUBLE")])
    assert [s.table for s in specs] == ["targets_eurusd", "corr_etf_eurusd_ewa", "reg_eurusd",
                                        "tri_agg_eur_usd_gbp"]
    assert specs[0].output_names == ["target_a"]
    assert specs[2].output_names == ["reg_slope", "reg_n"]
    assert [c.type for c in specs[2].columns] == ["FLOAT64", "INT64"]
    assert specs[3].output_names == ["tri_agg_eur_usd_gbp_x"]
    assert specs[3].shared and not specs[2].shared


def test_collision_names_both_tables():
    features = {
        "reg_eurusd": [TS, ("x_y", "DOUBLE")],
        "reg_x_eurusd": [TS, ("y", "DOUBLE")],
    }
    with pytest.raises(PipelineError, match="reg_x_y.*reg_eurusd.*reg_x_eurusd"):
        plan_tables(CAT, "eurusd", features, [TS, ("target_a", "DOUBLE")])


@pytest.mark.parametrize("features, message", [
    ({"reg_eurusd": [TS, ("a;drop", "DOUBLE")]}, "malformed name 'a;drop'"),
    ({"reg_eurusd`x": [TS]}, None),  # not matched: `x is not the pair part... see below
    ({"reg_eurusd": [("t", "TIMESTAMP"), ("a", "DOUBLE")]}, "has no 'interval_time'"),
    ({"reg_eurusd": [("interval_time", "DATE"), ("a", "DOUBLE")]}, "type 'DATE'"),
    ({"reg_eurusd": [TS, ("a", "NUMERIC")]}, "NUMERIC"),
])
def test_malformed_tables_are_refused(features, message):
    if message is None:
        with pytest.raises(PipelineError, match="no feature tables"):
            plan_tables(CAT, "eurusd", features, [TS, ("target_a", "DOUBLE")])
        return
    with pytest.raises(PipelineError, match=message):
        plan_tables(CAT, "eurusd", features, [TS, ("target_a", "DOUBLE")])


def test_malformed_table_name_containing_pair_is_refused():
    with pytest.raises(PipelineError, match="malformed name"):
        plan_tables(CAT, "eurusd", {"reg_eurusd_x'y": [TS]}, [TS, ("target_a", "DOUBLE")])
