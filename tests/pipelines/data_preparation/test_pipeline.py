import torch

from ph_reg.io.shards import ShardReader


def test_prepares_uint8_square_crops_split_into_train_and_val(project):
    project.run("data_preparation")
    settings = project.params["data_preparation"]
    images = ShardReader(project.root / "data/02_intermediate/prepared_images")
    assert len(images) == settings["max_images"] * settings["crops_per_image"]
    size = settings["image_size"]
    assert images[0]["image"].dtype == torch.uint8 and images[0]["image"].shape == (3, size, size)
    assert images.indices(split="train") and images.indices(split="val")
