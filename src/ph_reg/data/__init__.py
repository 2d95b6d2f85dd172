"""Unlabelled training images: sources, loading and the prepare stage."""
