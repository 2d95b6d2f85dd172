import torch

from ph_reg.io.shards import ShardReader


def test_writes_one_denoised_target_grid_per_prepared_image(project):
    project.run("teacher_denoising")
    images = ShardReader(project.root / "data/02_intermediate/prepared_images")
    targets = ShardReader(project.root / "data/04_feature/teacher_targets")
    assert len(targets) == len(images)
    grid = project.params["data_preparation"]["image_size"] // 16   # ph-reg-tiny-ViT-16
    assert targets[0]["target"].shape[:2] == (grid, grid) and torch.isfinite(targets[0]["target"]).all()
    assert targets.attrs["tta"]["n_views"] == project.params["teacher_denoising"]["tta"]["n_views"]
