"""The project's Kedro datasets: atomic saving through AtomicFileDataset."""

import pandas as pd
import pytest

from ph_reg.kedro_datasets import AtomicFileDataset


def test_atomic_file_dataset_round_trip_and_failed_save(tmp_path):
    path = tmp_path / "history.csv"
    dataset = AtomicFileDataset(str(path), {"type": "pandas.CSVDataset", "save_args": {"index": False}})
    frame = pd.DataFrame({"epoch": [1, 2], "loss": [0.5, 0.25]})
    dataset.save(frame)
    pd.testing.assert_frame_equal(dataset.load(), frame)

    class Broken:
        def to_csv(self, *args, **kwargs):
            raise RuntimeError("disk trouble")

    with pytest.raises(Exception, match="disk trouble"):
        dataset.save(Broken())
    pd.testing.assert_frame_equal(dataset.load(), frame)  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]  # no temporary left behind
