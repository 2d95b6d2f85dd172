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
    probes = _json(project, "probes")
    assert {"teacher", "student"} <= set(probes["results"])
    planted = _json(project, "planted_artifacts")
    assert {"teacher", "target", "student"} <= set(planted["sources"])
    summary = _json(project, "summary")
    assert set(summary["zero_shot_avg_miou"]) == set(settings["zero_shot"]["heads"])
    for source in ("teacher", "target", "student"):   # the summary copies the reports' numbers, rounded
        assert summary["planted"][source]["outlier_rate"] == round(planted["sources"][source]["direction"]["rate"], 4)
