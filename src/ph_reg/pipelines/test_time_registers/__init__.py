"""The test_time_registers pipeline."""

from ph_reg.pipelines.test_time_registers.pipeline import create_pipeline

__all__ = ["create_pipeline"]
