"""An offline synthetic dense benchmark: procedural 3D rooms rendered by vectorised ray casting.

A scene is a floor, a back wall (sometimes a side wall) and 3-6 objects (balls, boxes, pillars, cones) with random
poses, sizes and colours, seen by a pinhole camera. Every pixel keeps its nearest hit, which gives an exact class
label and metric depth (camera z distance, metres). Each class has its own texture statistics (checkers, stripes,
segments, planks, flutes, bands; colour ranges; noise frequency) under Lambertian shading with cast shadows, so a
linear probe on good patch features can separate the classes and regress depth.

Everything is deterministic: ``SyntheticScenes`` draws scene ``i`` of a split from ``derive_seed(seed, split, i)``.
``render_scene`` renders any hand-written ``Scene`` (used by the tests to check occlusion).
"""
# long: one cohesive scene generator (room geometry, objects, depth and labels drawn together); no clean seam

from __future__ import annotations

import colorsys
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from ph_reg.runtime import derive_seed
from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX, DenseDataset, DenseSample

CLASS_NAMES: tuple[str, ...] = ("floor", "wall", "ball", "box", "pillar", "cone")
FLOOR, WALL, BALL, BOX, PILLAR, CONE = range(len(CLASS_NAMES))
OBJECT_CLASSES = (BALL, BOX, PILLAR, CONE)

MIN_DEPTH = 0.001   # metres; hits nearer than this are invalid
MAX_DEPTH = 10.0    # metres; scenes are built so every pixel hits something within this range
GAMMA = 2.2         # linear -> display encoding
_EPS = 1e-6         # ray-parameter tolerance
_SHADOW_OFFSET = 1e-3  # metres; shadow rays start this far off the surface to avoid self-hits

Array = np.ndarray


# ----------------------------------------------------------------------------------------------------------------
# Scene description
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Camera:
    """A pinhole camera at ``(0, height, 0)`` looking along +z (y is up), square field of view ``fov`` radians."""

    height: float = 1.5
    pitch: float = 0.2    # radians, positive looks down
    yaw: float = 0.0      # radians, positive turns towards +x
    fov: float = 1.1      # radians, horizontal = vertical

    def basis(self) -> tuple[Array, Array, Array]:
        """(right, up, forward) unit vectors in world coordinates."""
        cy, sy, cp, sp = math.cos(self.yaw), math.sin(self.yaw), math.cos(self.pitch), math.sin(self.pitch)
        level = np.array([sy, 0.0, cy])
        right = np.array([cy, 0.0, -sy])
        forward = cp * level + np.array([0.0, -sp, 0.0])
        up = sp * level + np.array([0.0, cp, 0.0])
        return right, up, forward

    def rays(self, image_size: int) -> tuple[Array, Array]:
        """Origin (3,) and per-pixel directions (H*W, 3), row-major, scaled so the ray parameter is the z depth."""
        focal = (image_size / 2) / math.tan(self.fov / 2)
        coords = (np.arange(image_size) + 0.5 - image_size / 2) / focal
        x, y = np.meshgrid(coords, -coords, indexing="xy")
        right, up, forward = self.basis()
        dirs = x.reshape(-1, 1) * right + y.reshape(-1, 1) * up + forward
        return np.array([0.0, self.height, 0.0]), dirs


@dataclass(frozen=True)
class Material:
    """A procedural texture: ``pattern`` mixes two linear-RGB colours, modulated by band-limited noise."""

    pattern: str                      # checker | stripes | segments | planks | flutes | bands | plain
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    frequency: float = 1.0            # pattern repeats per unit of the surface coordinates
    phase: float = 0.0
    noise: float = 0.0                # relative amplitude of the albedo noise
    noise_frequency: float = 4.0      # cycles per unit of the surface coordinates


@dataclass(frozen=True)
class Plane:
    """The infinite plane ``normal . p = offset``."""

    normal: tuple[float, float, float]
    offset: float

    def intersect(self, origins: Array, dirs: Array) -> tuple[Array, Array, Array]:
        n = np.asarray(self.normal, dtype=np.float64)
        n = n / np.linalg.norm(n)
        denom = dirs @ n
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.offset - origins @ n) / denom
        t = np.where((np.abs(denom) > _EPS) & (t > _EPS), t, np.inf)
        points = origins + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs
        a = np.array([1.0, 0.0, 0.0]) if abs(n[1]) > 0.9 else np.cross([0.0, 1.0, 0.0], n)
        a = a / np.linalg.norm(a)
        b = np.cross(n, a)
        uv = np.stack([points @ a, points @ b], axis=1)
        return t, np.broadcast_to(n, dirs.shape), uv


@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float

    def bounds(self) -> tuple[Array, float]:
        return np.asarray(self.center, dtype=np.float64), self.radius

    def intersect(self, origins: Array, dirs: Array) -> tuple[Array, Array, Array]:
        oc = origins - np.asarray(self.center)
        a = np.einsum("ij,ij->i", dirs, dirs)
        b = np.einsum("ij,ij->i", oc, dirs)
        c = np.einsum("ij,ij->i", oc, oc) - self.radius**2
        t = _nearest_root(a, b, c, lambda t: np.ones_like(t, dtype=bool))
        normal = (origins + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs - np.asarray(self.center)) / self.radius
        uv = np.stack([np.arctan2(normal[:, 2], normal[:, 0]), np.arccos(np.clip(normal[:, 1], -1, 1))], axis=1)
        return t, normal, uv


@dataclass(frozen=True)
class Box:
    """A box with half extents ``half_size`` (x, y, z), rotated by ``yaw`` about the vertical axis."""

    center: tuple[float, float, float]
    half_size: tuple[float, float, float]
    yaw: float = 0.0

    _UV_AXES = ((2, 1), (0, 2), (0, 1))  # surface coordinates of the faces normal to x, y, z

    def bounds(self) -> tuple[Array, float]:
        return np.asarray(self.center, dtype=np.float64), float(np.linalg.norm(self.half_size))

    def _rotation(self) -> Array:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])

    def intersect(self, origins: Array, dirs: Array) -> tuple[Array, Array, Array]:
        rot = self._rotation()
        o = (origins - np.asarray(self.center)) @ rot      # world -> local (row vectors times R = R^T v)
        d = dirs @ rot
        h = np.asarray(self.half_size)
        d_safe = np.where(np.abs(d) < 1e-12, 1e-12, d)
        t0, t1 = (-h - o) / d_safe, (h - o) / d_safe
        t_min, t_max = np.minimum(t0, t1), np.maximum(t0, t1)
        axis = np.argmax(t_min, axis=1)
        near, far = t_min.max(axis=1), t_max.min(axis=1)
        t = np.where(near > _EPS, near, far)
        t = np.where((near <= far) & (t > _EPS), t, np.inf)
        rows = np.arange(len(t))
        normal_local = np.zeros_like(d)
        normal_local[rows, axis] = -np.sign(d_safe[rows, axis])
        local = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
        uv_axes = np.asarray(self._UV_AXES)[axis]
        uv = np.take_along_axis(local, uv_axes, axis=1)
        return t, normal_local @ rot.T, uv


@dataclass(frozen=True)
class Cylinder:
    """A capped vertical cylinder standing at ``(x, bottom, z)``."""

    x: float
    z: float
    radius: float
    height: float
    bottom: float = 0.0

    def bounds(self) -> tuple[Array, float]:
        return (np.array([self.x, self.bottom + self.height / 2, self.z]),
                math.hypot(self.radius, self.height / 2))

    def intersect(self, origins: Array, dirs: Array) -> tuple[Array, Array, Array]:
        top = self.bottom + self.height
        dx, dz = origins[:, 0] - self.x, origins[:, 2] - self.z
        ux, uy, uz = dirs[:, 0], dirs[:, 1], dirs[:, 2]

        def on_side(t: Array) -> Array:
            y = origins[:, 1] + t * uy
            return (y >= self.bottom) & (y <= top)

        side = _nearest_root(ux**2 + uz**2, dx * ux + dz * uz, dx**2 + dz**2 - self.radius**2, on_side)
        caps = [_disk(origins, dirs, self.x, self.z, level, self.radius) for level in (top, self.bottom)]
        t = np.minimum(side, np.minimum(*caps))
        points = origins + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs
        radial = np.stack([points[:, 0] - self.x, np.zeros_like(t), points[:, 2] - self.z], axis=1) / self.radius
        vertical = np.zeros_like(radial)
        vertical[:, 1] = np.where(t == caps[0], 1.0, -1.0)
        normal = np.where((t == side)[:, None], radial, vertical)
        uv = np.stack([np.arctan2(points[:, 2] - self.z, points[:, 0] - self.x), points[:, 1]], axis=1)
        return t, normal, uv


@dataclass(frozen=True)
class Cone:
    """A vertical cone with base radius ``radius`` at ``(x, bottom, z)`` and its apex ``height`` above."""

    x: float
    z: float
    radius: float
    height: float
    bottom: float = 0.0

    def bounds(self) -> tuple[Array, float]:
        return (np.array([self.x, self.bottom + self.height / 2, self.z]),
                math.hypot(self.radius, self.height / 2))

    def intersect(self, origins: Array, dirs: Array) -> tuple[Array, Array, Array]:
        top = self.bottom + self.height
        k2 = (self.radius / self.height) ** 2
        dx, dz, dy = origins[:, 0] - self.x, origins[:, 2] - self.z, top - origins[:, 1]
        ux, uy, uz = dirs[:, 0], dirs[:, 1], dirs[:, 2]

        def on_side(t: Array) -> Array:
            below_apex = dy - t * uy
            return (below_apex >= 0) & (below_apex <= self.height)

        side = _nearest_root(
            ux**2 + uz**2 - k2 * uy**2, dx * ux + dz * uz + k2 * dy * uy, dx**2 + dz**2 - k2 * dy**2, on_side
        )
        base = _disk(origins, dirs, self.x, self.z, self.bottom, self.radius)
        t = np.minimum(side, base)
        points = origins + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs
        gradient = np.stack([points[:, 0] - self.x, k2 * (top - points[:, 1]), points[:, 2] - self.z], axis=1)
        gradient /= np.maximum(np.linalg.norm(gradient, axis=1, keepdims=True), 1e-12)
        normal = np.where((t == side)[:, None], gradient, np.array([0.0, -1.0, 0.0]))
        uv = np.stack([np.arctan2(points[:, 2] - self.z, points[:, 0] - self.x), points[:, 1]], axis=1)
        return t, normal, uv


Shape = Plane | Sphere | Box | Cylinder | Cone


@dataclass(frozen=True)
class Surface:
    """A shape with its class id and material; planes (floor, walls) usually cast no shadow."""

    shape: Shape
    label: int
    material: Material
    casts_shadow: bool = True


@dataclass(frozen=True)
class Scene:
    camera: Camera
    surfaces: tuple[Surface, ...]
    light: tuple[float, float, float] = (0.3, 0.8, -0.5)   # direction towards a distant light
    ambient: float = 0.35
    sensor_noise: float = 0.01    # std of the additive image noise (display units in [0, 1])
    noise_seed: int = 0


def cast(shape: Shape, origins: Array, dirs: Array) -> tuple[Array, Array, Array]:
    """``shape.intersect`` on the rays that pass its bounding sphere (if it has one); misses get t = inf."""
    if not hasattr(shape, "bounds"):
        return shape.intersect(origins, dirs)
    center, radius = shape.bounds()
    oc = origins - center
    b = np.einsum("ij,ij->i", oc, dirs)
    disc = b * b - np.einsum("ij,ij->i", dirs, dirs) * (np.einsum("ij,ij->i", oc, oc) - radius**2)
    candidates = np.flatnonzero(disc >= 0)
    t = np.full(len(dirs), np.inf)
    normal, uv = np.zeros(dirs.shape), np.zeros((len(dirs), 2))
    if len(candidates):
        t[candidates], normal[candidates], uv[candidates] = shape.intersect(origins[candidates], dirs[candidates])
    return t, normal, uv


def _nearest_root(a: Array, b: Array, c: Array, valid) -> Array:
    """Smallest t > 0 solving ``a t^2 + 2 b t + c = 0`` with ``valid(t)``; inf where there is none."""
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = b * b - a * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        a_safe = np.where(np.abs(a) < 1e-12, 1e-12, a)
        r1, r2 = (-b - sq) / a_safe, (-b + sq) / a_safe
    lo, hi = np.minimum(r1, r2), np.maximum(r1, r2)
    hit = disc >= 0
    lo_ok = hit & (lo > _EPS) & valid(lo)
    hi_ok = hit & (hi > _EPS) & valid(hi)
    return np.where(lo_ok, lo, np.where(hi_ok, hi, np.inf))


def _disk(origins: Array, dirs: Array, x: float, z: float, level: float, radius: float) -> Array:
    """Ray parameter of the horizontal disk of ``radius`` centred at ``(x, level, z)``; inf where missed."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (level - origins[:, 1]) / dirs[:, 1]
    px, pz = origins[:, 0] + t * dirs[:, 0] - x, origins[:, 2] + t * dirs[:, 2] - z
    return np.where(np.isfinite(t) & (t > _EPS) & (px**2 + pz**2 <= radius**2), t, np.inf)


# ----------------------------------------------------------------------------------------------------------------
# Textures and rendering
# ----------------------------------------------------------------------------------------------------------------
def _pattern(material: Material, uv: Array) -> Array:
    """Mixing weight in [0, 1] between the two colours of ``material`` at surface coordinates ``uv``."""
    u, v, f, phase = uv[:, 0], uv[:, 1], material.frequency, material.phase
    if material.pattern == "checker":
        return ((np.floor(u * f + phase) + np.floor(v * f + phase)) % 2).astype(np.float64)
    if material.pattern == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * f * u + phase)
    if material.pattern == "segments":   # u is an angle: f equal sectors
        return (np.floor((u + np.pi) * f / (2 * np.pi) + phase) % 2).astype(np.float64)
    if material.pattern == "planks":     # thin dark grooves across v
        return (((v * f + phase) % 1.0) < 0.12).astype(np.float64)
    if material.pattern == "flutes":     # u is an angle: f vertical flutes
        return 0.5 + 0.5 * np.cos(f * u + phase)
    if material.pattern == "bands":      # horizontal bands along v (height)
        return (np.floor(v * f + phase) % 2).astype(np.float64)
    if material.pattern == "plain":
        return np.zeros_like(u)
    raise ValueError(f"Material.pattern must be one of checker, stripes, segments, planks, flutes, bands, plain; "
                     f"got {material.pattern!r}")


def _albedo(material: Material, uv: Array, rng: np.random.Generator, octaves: int = 4) -> Array:
    """Linear-RGB albedo (N, 3): the pattern's colour mix times band-limited multiplicative noise."""
    weight = _pattern(material, uv)[:, None]
    c0, c1 = np.asarray(material.colors[0]), np.asarray(material.colors[1])
    color = (1 - weight) * c0 + weight * c1
    if material.noise > 0:
        angles = rng.uniform(0, 2 * np.pi, octaves)
        scales = material.noise_frequency * rng.uniform(0.5, 2.0, octaves)
        phases = rng.uniform(0, 2 * np.pi, octaves)
        directions = np.stack([np.cos(angles), np.sin(angles)], axis=1) * scales[:, None]
        noise = np.cos(2 * np.pi * uv @ directions.T + phases).mean(axis=1)
        color = color * (1 + material.noise * noise)[:, None]
    return np.clip(color, 0.0, 1.0)


def render_scene(scene: Scene, image_size: int, *, min_depth: float = MIN_DEPTH, max_depth: float = MAX_DEPTH,
                 shadows: bool = True, name: str = "scene") -> DenseSample:
    """Ray-cast ``scene``: per pixel the nearest surface gives the label and the z depth (metres).

    Pixels that hit nothing within ``[min_depth, max_depth]`` get label ``IGNORE_INDEX`` and depth 0 (invalid).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    origin, dirs = scene.camera.rays(image_size)
    count = dirs.shape[0]
    origins = np.broadcast_to(origin, dirs.shape)
    best_t = np.full(count, np.inf)
    best = np.full(count, -1)
    normal = np.zeros((count, 3))
    uv = np.zeros((count, 2))
    for index, surface in enumerate(scene.surfaces):
        t, n, st = cast(surface.shape, origins, dirs)
        closer = t < best_t
        best_t[closer], best[closer], normal[closer], uv[closer] = t[closer], index, n[closer], st[closer]

    valid = np.isfinite(best_t) & (best_t >= min_depth) & (best_t <= max_depth)
    best[~valid] = -1
    normal = np.where((np.einsum("ij,ij->i", normal, dirs) > 0)[:, None], -normal, normal)  # face the camera

    light = np.asarray(scene.light, dtype=np.float64)
    light = light / np.linalg.norm(light)
    lambert = np.clip(normal @ light, 0.0, None)
    if shadows:
        lit = np.flatnonzero(valid & (lambert > 0))
        points = origin + best_t[lit, None] * dirs[lit] + _SHADOW_OFFSET * normal[lit]
        light_dirs = np.broadcast_to(light, points.shape)
        blocked = np.zeros(len(lit), dtype=bool)
        for surface in scene.surfaces:
            if surface.casts_shadow:
                blocked |= np.isfinite(cast(surface.shape, points, light_dirs)[0])
        lambert[lit[blocked]] = 0.0
    shading = scene.ambient + (1 - scene.ambient) * lambert

    rng = np.random.default_rng(scene.noise_seed)
    color = np.zeros((count, 3))
    label = np.full(count, IGNORE_INDEX, dtype=np.int64)
    for index, surface in enumerate(scene.surfaces):
        mask = best == index
        texture_rng = np.random.default_rng([scene.noise_seed, index])
        if mask.any():
            color[mask] = _albedo(surface.material, uv[mask], texture_rng) * shading[mask, None]
            label[mask] = surface.label
    display = np.clip(color, 0.0, 1.0) ** (1 / GAMMA) + scene.sensor_noise * rng.standard_normal(color.shape)
    image = np.round(np.clip(display, 0.0, 1.0) * 255).astype(np.uint8)

    depth = np.where(valid, best_t, 0.0).astype(np.float32)
    size = (image_size, image_size)
    return DenseSample(
        torch.from_numpy(image.reshape(*size, 3)).permute(2, 0, 1).contiguous(),
        torch.from_numpy(label.reshape(size)),
        torch.from_numpy(depth.reshape(size)),
        name,
    )


# ----------------------------------------------------------------------------------------------------------------
# Random scenes
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassStyle:
    """Texture statistics of one class: pattern, colour distribution (HSV ranges) and frequencies."""

    pattern: str
    hue: tuple[float, float]
    saturation: tuple[float, float]
    value: tuple[float, float]
    frequency: tuple[float, float]
    contrast: tuple[float, float]      # how far the second colour moves towards the accent
    accent: str                        # black | white | random (another random hue)
    noise: tuple[float, float]
    noise_frequency: tuple[float, float]
    integer_frequency: bool = False    # angular patterns need a whole number of repeats


CLASS_STYLES: dict[int, ClassStyle] = {
    FLOOR: ClassStyle("checker", (0.04, 0.12), (0.25, 0.6), (0.35, 0.75), (1.0, 2.5), (0.3, 0.6), "black",
                      (0.05, 0.15), (6.0, 12.0)),
    WALL: ClassStyle("stripes", (0.0, 1.0), (0.05, 0.3), (0.6, 0.95), (2.0, 5.0), (0.1, 0.3), "white",
                     (0.02, 0.06), (1.0, 3.0)),
    BALL: ClassStyle("segments", (0.0, 1.0), (0.7, 1.0), (0.6, 1.0), (2.0, 4.0), (0.8, 1.0), "random",
                     (0.0, 0.03), (2.0, 4.0), integer_frequency=True),
    BOX: ClassStyle("planks", (0.06, 0.11), (0.4, 0.7), (0.45, 0.8), (6.0, 12.0), (0.5, 0.7), "black",
                    (0.08, 0.2), (15.0, 30.0)),
    PILLAR: ClassStyle("flutes", (0.0, 1.0), (0.0, 0.12), (0.6, 0.9), (8.0, 16.0), (0.2, 0.4), "black",
                       (0.03, 0.08), (3.0, 6.0), integer_frequency=True),
    CONE: ClassStyle("bands", (0.0, 0.07), (0.8, 1.0), (0.8, 1.0), (3.0, 6.0), (0.8, 1.0), "white",
                     (0.0, 0.03), (2.0, 4.0)),
}


def _linear_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    return tuple(float(c) ** GAMMA for c in colorsys.hsv_to_rgb(h % 1.0, s, v))  # type: ignore[return-value]


def sample_material(label: int, rng: np.random.Generator) -> Material:
    """A random material of class ``label`` drawn from ``CLASS_STYLES``."""
    style = CLASS_STYLES[label]
    base = (rng.uniform(*style.hue), rng.uniform(*style.saturation), rng.uniform(*style.value))
    accent = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0)}.get(style.accent)
    if accent is None:
        accent = _linear_rgb(base[0] + rng.uniform(0.25, 0.75), rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    c0 = np.asarray(_linear_rgb(*base))
    contrast = rng.uniform(*style.contrast)
    c1 = (1 - contrast) * c0 + contrast * np.asarray(accent)
    frequency = rng.uniform(*style.frequency)
    if style.integer_frequency:
        frequency = float(round(frequency))
        if style.pattern == "segments":
            frequency *= 2  # an even number of alternating sectors wraps around seamlessly
    return Material(
        pattern=style.pattern,
        colors=(tuple(c0.tolist()), tuple(c1.tolist())),
        frequency=frequency,
        phase=float(rng.uniform(0, 2 * np.pi)),
        noise=float(rng.uniform(*style.noise)),
        noise_frequency=float(rng.uniform(*style.noise_frequency)),
    )


def sample_scene(
    rng: np.random.Generator,
    *,
    num_objects: tuple[int, int] = (3, 6),
    max_depth: float = MAX_DEPTH,
    camera_height: tuple[float, float] = (1.2, 1.8),
    camera_pitch: tuple[float, float] = (0.1, 0.35),
    camera_yaw: tuple[float, float] = (-0.25, 0.25),
    fov: tuple[float, float] = (0.95, 1.25),
    wall_distance: tuple[float, float] = (4.5, 9.0),
    side_wall_probability: float = 0.6,
    side_wall_distance: tuple[float, float] = (1.5, 3.5),
) -> Scene:
    """A random room: floor, back wall (within ``max_depth`` of every pixel), maybe a side wall, and objects."""
    camera = Camera(rng.uniform(*camera_height), rng.uniform(*camera_pitch), rng.uniform(*camera_yaw),
                    rng.uniform(*fov))
    # Rays are scaled to unit camera z; their smallest world-z component bounds the depth of the back wall.
    corners = np.array([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]) * math.tan(camera.fov / 2)
    right, up, forward = camera.basis()
    min_dz = min((x * right + y * up + forward)[2] for x, y in corners)
    wall_z = min(rng.uniform(*wall_distance), 0.97 * max_depth * min_dz)

    surfaces = [
        Surface(Plane((0.0, 1.0, 0.0), 0.0), FLOOR, sample_material(FLOOR, rng), casts_shadow=False),
        Surface(Plane((0.0, 0.0, -1.0), -wall_z), WALL, sample_material(WALL, rng), casts_shadow=False),
    ]
    side, side_x = 0.0, math.inf
    if rng.uniform() < side_wall_probability:
        side = float(rng.choice([-1.0, 1.0]))
        side_x = rng.uniform(*side_wall_distance)
        surfaces.append(Surface(Plane((-side, 0.0, 0.0), -side * side_x), WALL, sample_material(WALL, rng),
                                casts_shadow=False))

    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        label = int(rng.choice(OBJECT_CLASSES))
        angle = camera.yaw + rng.uniform(-0.4, 0.4) * camera.fov
        distance = rng.uniform(1.8, max(wall_z - 0.5, 2.0))
        x, z = distance * math.sin(angle), distance * math.cos(angle)
        if label == BALL:
            radius = rng.uniform(0.2, 0.55)
            x, z = _inside(x, z, radius, wall_z, side, side_x)
            shape: Shape = Sphere((x, radius, z), radius)
        elif label == BOX:
            half = (rng.uniform(0.2, 0.6), rng.uniform(0.15, 0.6), rng.uniform(0.2, 0.6))
            x, z = _inside(x, z, math.hypot(half[0], half[2]), wall_z, side, side_x)
            shape = Box((x, half[1], z), half, rng.uniform(0, math.pi / 2))
        elif label == PILLAR:
            radius = rng.uniform(0.08, 0.25)
            x, z = _inside(x, z, radius, wall_z, side, side_x)
            shape = Cylinder(x, z, radius, rng.uniform(1.0, 2.8))
        else:
            radius = rng.uniform(0.15, 0.45)
            x, z = _inside(x, z, radius, wall_z, side, side_x)
            shape = Cone(x, z, radius, rng.uniform(0.4, 1.2))
        surfaces.append(Surface(shape, label, sample_material(label, rng)))

    light = (rng.uniform(-0.6, 0.6), rng.uniform(0.6, 1.0), rng.uniform(-0.8, -0.2))
    return Scene(camera, tuple(surfaces), light, ambient=rng.uniform(0.25, 0.45),
                 noise_seed=int(rng.integers(2**31)))


def _inside(x: float, z: float, size: float, wall_z: float, side: float, side_x: float) -> tuple[float, float]:
    """Move an object footprint of radius ``size`` inside the walls."""
    margin = size + 0.05
    z = min(z, wall_z - margin)
    if side != 0.0:
        x = min(x, side_x - margin) if side > 0 else max(x, -side_x + margin)
    return x, z


class SyntheticScenes(DenseDataset):
    """``num_images`` procedural rooms per split, with exact labels (``CLASS_NAMES``) and depth in metres.

    Image ``i`` is rendered on the fly from ``derive_seed(seed, split, i)``: the same arguments always give the
    same tensors, and different splits or seeds give different scenes.
    """

    def __init__(self, num_images: int, image_size: int = 224, seed: int = 0, split: str = "train",
                 max_depth: float = MAX_DEPTH):
        if int(num_images) < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", split):
            raise ValueError(f"split must be a non-empty name of letters, digits, '_' or '-', got {split!r}")
        if not MIN_DEPTH < max_depth:
            raise ValueError(f"max_depth must be > {MIN_DEPTH} metres, got {max_depth}")
        self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)
        self.max_depth = float(max_depth)
        self.name, self.split, self.class_names = "synthetic", split, list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.num_images

    def scene(self, index: int) -> Scene:
        """The scene description of image ``index``."""
        return sample_scene(np.random.default_rng(derive_seed(self.seed, self.split, index)),
                            max_depth=self.max_depth)

    def _load(self, index: int) -> DenseSample:
        return render_scene(self.scene(index), self.image_size, max_depth=self.max_depth,
                            name=f"{self.name}/{self.split}/{index:05d}")

