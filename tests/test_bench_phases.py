"""bench.phases times the merge's own functions: they must still be there, and be put back."""
from bench import phases
from pipelines.merge import writer


def test_every_phase_is_timed_and_the_originals_are_restored(extracted, tmp_path):
    emit = writer.TrainingFileWriter._emit
    totals, wall, cpu, rss = phases.profile_merge(extracted, "eurusd", str(tmp_path / "t.parquet"))
    assert (tmp_path / "t.parquet").exists() and wall > 0 and cpu > 0 and rss > 0
    assert {label for *_, label, _thread in phases.PHASES} == set(totals)
    assert all(calls > 0 for calls, _wall, _cpu in totals.values())
    assert writer.TrainingFileWriter._emit is emit
