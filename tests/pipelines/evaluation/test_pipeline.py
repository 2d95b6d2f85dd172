import json


def _json(project, name):
    return json.loads((project.root / "data/08_reporting" / f"{name}.json").read_text())


def test_writes_every_report_and_a_summary_of_them(project):
    project.run("evaluation")
    settings = project.params["evaluation"]
    assert set(_json(project, "evaluation")["per_source"]) == {"teacher", "target", "student"}
    zero_shot = _json(project, "zero_shot")
    assert zero_shot["random_weights"] is True
    assert set(zero_shot["results"]) == set(settings["zero_shot"]["heads"])
    assert {"ttr", "ttr_maskclip"} <= set(zero_shot["table"]["rows"])   # the test-time-register heads (Table 1)
    assert "| ttr |" in (project.root / "data/08_reporting/zero_shot.md").read_text()
    probes = _json(project, "probes")
    assert settings["probes"]["ttr"] is True
    assert {"teacher", "student", "ttr"} <= set(probes["results"]) and "ttr" in probes["table"]
    assert set(probes["results"]["ttr"]) == set(probes["results"]["teacher"])
    probe_report = (project.root / "data/08_reporting/probes.md").read_text()
    assert "| ttr |" in probe_report and "ttr = the teacher with test-time registers" in probe_report
    planted = _json(project, "planted_artifacts")
    assert {"teacher", "target", "student"} <= set(planted["sources"])
    # the test-time-registers rows (evaluation.planted.both: true in conf/base): the neurons of register_neurons
    assert {"ttr", "both"} <= set(planted["sources"]) and "ttr: cosine to clean above the teacher's" in planted["targets"]
    assert planted["test_time_registers"]["neurons"] == _json(project, "../04_feature/register_neurons")["neurons"]
    assert "| ttr |" in (project.root / "data/08_reporting/planted_artifacts.md").read_text()
    summary = _json(project, "summary")
    assert set(summary["zero_shot_avg_miou"]) == set(settings["zero_shot"]["heads"])
    for source in ("teacher", "target", "student"):   # the summary copies the reports' numbers, rounded
        assert summary["planted"][source]["outlier_rate"] == round(planted["sources"][source]["direction"]["rate"], 4)
