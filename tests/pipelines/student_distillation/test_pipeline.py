import json

from ph_reg.io.files import load_tensors
from ph_reg.method.student import load_student


def test_trains_and_exports_a_student_that_loads(project):
    project.run("student_distillation")
    folder = project.root / "data/06_models/student"
    config = json.loads((folder / "config.json").read_text())
    assert set(load_tensors(folder / "weights.safetensors")) == set(config["trainable_parameters"])
    student = load_student(folder)
    assert student.config.num_registers == project.params["student_distillation"].get("num_registers", 16)
    epochs = project.params["student_distillation"]["training"]["epochs"]
    history = (project.root / "data/07_model_output/loss_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch") and len(history) == 1 + epochs
