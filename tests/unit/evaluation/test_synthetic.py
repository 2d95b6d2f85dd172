"""The procedural 3D benchmark: determinism, value ranges and geometric consistency of labels and depth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ph_reg.evaluation.benchmarks import SyntheticScenes, render_scene
from ph_reg.evaluation.benchmarks.synthetic import (
    BALL,
    BOX,
    CLASS_NAMES,
    FLOOR,
    WALL,
    Box,
    Camera,
    Material,
    Plane,
    Scene,
    Sphere,
    Surface,
)

SIZE = 48
PLAIN = Material("plain", ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))


def _room(*objects: Surface, camera: Camera | None = None, light=(0.0, 1.0, -1.0)) -> Scene:
    """Camera 1 m above the floor looking straight ahead; back wall 5 m away."""
    camera = camera or Camera(height=1.0, pitch=0.0, yaw=0.0, fov=1.0)
    floor = Surface(Plane((0.0, 1.0, 0.0), 0.0), FLOOR, PLAIN, casts_shadow=False)
    wall = Surface(Plane((0.0, 0.0, -1.0), -5.0), WALL, PLAIN, casts_shadow=False)
    return Scene(camera, (floor, wall, *objects), light=light, sensor_noise=0.0)


def test_deterministic_and_seeded() -> None:
    a, b = SyntheticScenes(3, SIZE, seed=7), SyntheticScenes(3, SIZE, seed=7)
    for i in range(3):
        x, y = a[i], b[i]
        assert torch.equal(x.image, y.image) and torch.equal(x.label, y.label) and torch.equal(x.depth, y.depth)
        assert x.name == f"synthetic/train/{i:05d}"
    assert not torch.equal(a[0].image, SyntheticScenes(3, SIZE, seed=8)[0].image)
    assert not torch.equal(a[0].image, SyntheticScenes(3, SIZE, seed=7, split="val")[0].image)
    assert not torch.equal(a[0].image, a[1].image)


def test_ranges_and_dtypes() -> None:
    ds = SyntheticScenes(12, SIZE, seed=0)
    assert ds.class_names == list(CLASS_NAMES) and ds.num_classes == 6
    seen = set()
    for sample in ds:
        assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, SIZE, SIZE)
        assert sample.label.dtype == torch.int64 and sample.label.shape == (SIZE, SIZE)
        assert sample.depth.dtype == torch.float32 and sample.depth.shape == (SIZE, SIZE)
        assert torch.isfinite(sample.depth).all()
        assert sample.depth.min() > 0.001 and sample.depth.max() <= 10.0
        assert sample.label.min() >= 0 and sample.label.max() < ds.num_classes     # every pixel hits something
        assert sample.image.float().std() > 5                                        # not a blank image
        seen |= set(sample.label.unique().tolist())
    assert seen == set(range(ds.num_classes))        # floor, wall and every object class are visible somewhere


def test_occluder_in_front_of_wall() -> None:
    radius, distance = 0.5, 3.0
    ball = Surface(Sphere((0.0, 1.0, distance), radius), BALL, PLAIN)
    with_ball = render_scene(_room(ball), SIZE)
    without = render_scene(_room(), SIZE)
    covered = with_ball.label == BALL
    # The silhouette of a sphere on the optical axis is a disk of radius f * r / sqrt(d^2 - r^2) pixels.
    focal = (SIZE / 2) / math.tan(0.5)
    expected_area = math.pi * (focal * radius / math.sqrt(distance**2 - radius**2)) ** 2
    assert abs(int(covered.sum()) - expected_area) < 0.1 * expected_area
    assert covered[SIZE // 2, SIZE // 2]
    centre_depth = with_ball.depth[SIZE // 2 - 1 : SIZE // 2 + 1, SIZE // 2 - 1 : SIZE // 2 + 1]
    torch.testing.assert_close(centre_depth, torch.full((2, 2), distance - radius), atol=0.01, rtol=0)
    # Behind the ball is the wall: the covered pixels are wall at 5 m without the ball, and nearer with it.
    assert (without.label[covered] == WALL).all()
    assert (with_ball.depth[covered] < without.depth[covered]).all()
    assert (with_ball.depth[covered] < 5.0).all() and (with_ball.depth[covered] >= distance - radius - 1e-3).all()
    # Elsewhere nothing changes.
    assert torch.equal(with_ball.label[~covered], without.label[~covered])
    assert torch.equal(with_ball.depth[~covered], without.depth[~covered])


def test_depth_is_z_distance_not_ray_length() -> None:
    sample = render_scene(_room(), SIZE)
    wall = sample.label == WALL
    assert wall[0].all()                                       # the top row looks at the wall
    torch.testing.assert_close(sample.depth[wall], torch.full_like(sample.depth[wall], 5.0))
    floor = sample.label == FLOOR
    assert floor[-1].all()
    # A floor pixel at image row v is at z = height * f / (v + 0.5 - SIZE / 2).
    focal = (SIZE / 2) / math.tan(0.5)
    row = SIZE - 1
    torch.testing.assert_close(sample.depth[row, 0].item(), 1.0 * focal / (row + 0.5 - SIZE / 2), rtol=1e-5, atol=0)


def test_nearer_object_wins_overlap() -> None:
    ball = Surface(Sphere((0.0, 1.0, 2.5), 0.3), BALL, PLAIN)
    box = Surface(Box((0.3, 1.0, 4.0), (0.5, 0.5, 0.2)), BOX, PLAIN)
    for order in ((ball, box), (box, ball)):                   # independent of the surface order
        sample = render_scene(_room(*order), SIZE)
        centre = (SIZE // 2, SIZE // 2)
        assert sample.label[centre] == BALL and sample.depth[centre] < 2.3
        box_pixels = sample.label == BOX
        assert box_pixels.any()
        torch.testing.assert_close(sample.depth[box_pixels], torch.full_like(sample.depth[box_pixels], 3.8))
    only_box = render_scene(_room(box), SIZE)
    assert (only_box.label[sample.label == BALL] != BALL).all()
    assert ((only_box.label == BOX) & (sample.label == BALL)).any()    # the ball occludes part of the box


def test_shadows_darken_without_changing_geometry() -> None:
    ball = Surface(Sphere((0.0, 0.4, 2.5), 0.4), BALL, PLAIN)
    scene = _room(ball, light=(0.0, 1.0, 0.0))                 # light straight above: shadow under the ball
    lit, flat = render_scene(scene, SIZE), render_scene(scene, SIZE, shadows=False)
    assert torch.equal(lit.label, flat.label) and torch.equal(lit.depth, flat.depth)
    darker = lit.image.float().mean(0) < flat.image.float().mean(0) - 10
    assert darker.any() and (lit.label[darker] == FLOOR).all()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="num_images"):
        SyntheticScenes(0)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticScenes(2, image_size=4)
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes(2, split="a/b")
    bad = Surface(Sphere((0.0, 1.0, 3.0), 0.5), BALL, Material("zigzag", ((0, 0, 0), (1, 1, 1))))
    with pytest.raises(ValueError, match="pattern"):
        render_scene(_room(bad), SIZE)
    with pytest.raises(IndexError):
        SyntheticScenes(2, SIZE)[2]


def test_missed_rays_are_invalid() -> None:
    scene = Scene(Camera(height=1.0, pitch=0.0), (Surface(Sphere((0.0, 1.0, 3.0), 0.5), BALL, PLAIN),))
    sample = render_scene(scene, SIZE)
    missed = sample.label == 255
    assert missed.any() and (sample.depth[missed] == 0).all() and (sample.depth[~missed] > 0).all()
    assert np.isclose(sample.depth[SIZE // 2, SIZE // 2].item(), 2.5, atol=0.01)
