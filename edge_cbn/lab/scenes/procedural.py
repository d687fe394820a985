"""Seeded procedural textures for out-of-distribution scene backgrounds (`make-data --backgrounds
procedural`): fractal value noise, sinusoid plaids, Voronoi cells, random-walk blobs and colour gradients,
some blended in pairs, with palettes, grain and contrast set so that the scenes' mean chroma, contrast and
edge strength stay near the photo scenes'.  No photo pixel; numpy and OpenCV only."""
from __future__ import annotations

import cv2
import numpy as np


def _unit(field) -> np.ndarray:
    """`field` rescaled to [0, 1], float32."""
    low, high = float(field.min()), float(field.max())
    return ((field - low) / max(high - low, 1e-6)).astype(np.float32)


def _coordinates(hw):
    """(y, x) float32 pixel coordinates in units of the longer side: patterns keep their scale on any aspect."""
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float32)
    return yy / max(hw), xx / max(hw)


def _palette(rng, n: int) -> np.ndarray:
    """(n, 3) float32 colours around a random one: a spread of 15-110 gives families of hues from a single
    material to a carnival; saturation from grey (two palettes in five: half the photos are grey) to 0.7,
    which with the grain and contrast of `procedural_background` keeps the scenes' mean chroma, contrast
    and edge strength near the photo scenes' (so they differ in content, not in garishness)."""
    colours = np.clip(rng.uniform(0, 255, 3) + rng.normal(0, rng.uniform(15, 110), (n, 3)), 0, 255)
    grey = colours.mean(1, keepdims=True)
    saturation = 0.0 if rng.random() < 0.4 else rng.uniform(0.1, 0.7)
    return (grey + saturation * (colours - grey)).astype(np.float32)


def _ramp(rng, field) -> np.ndarray:
    """A field in [0, 1] through a random palette of 2-5 evenly spaced colour stops: (H, W, 3) float32."""
    stops = _palette(rng, int(rng.integers(2, 6)))
    at = np.linspace(0, 1, len(stops))
    return np.stack([np.interp(field, at, stops[:, c]) for c in range(3)], -1).astype(np.float32)


def value_noise(rng, hw, cells: float, octaves: int, persistence: float) -> np.ndarray:
    """Fractal value noise in [0, 1]: `octaves` random grids, the first `cells` cells along the longer side,
    each twice as fine and `persistence` times as strong as the one before, upsampled bicubically, summed."""
    h, w = hw
    total = np.zeros(hw, np.float32)
    for octave in range(octaves):
        n = min(cells * 2 ** octave, max(hw))
        grid = rng.random((max(2, round(n * h / max(hw))), max(2, round(n * w / max(hw)))), np.float32)
        total += persistence ** octave * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return _unit(total)


def noise_texture(rng, hw) -> np.ndarray:
    """Fractal noise of 1.5-12 cells and 1-5 octaves through a colour ramp (clouds, terrain, rust); ridged
    (1 - |2n - 1|: veins) on some, bent into marble bands on others."""
    field = value_noise(rng, hw, np.exp(rng.uniform(np.log(1.5), np.log(12))), int(rng.integers(1, 6)),
                        rng.uniform(0.35, 0.75))
    kind = rng.choice(("plain", "ridged", "marble"), p=(0.6, 0.2, 0.2))
    if kind == "ridged":
        field = 1 - np.abs(2 * field - 1)
    elif kind == "marble":
        yy, xx = _coordinates(hw)
        angle, cycles = rng.uniform(0, np.pi), rng.uniform(1, 8)
        along = np.cos(angle) * xx + np.sin(angle) * yy
        field = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * along + rng.uniform(2, 10) * field)
    return _ramp(rng, field)


def plaid_texture(rng, hw) -> np.ndarray:
    """2-4 sinusoidal gratings of random orientation, frequency (1-24 cycles), phase and colour over a base
    colour, some squared off into bands: fabrics, tartans, ripples, tiles."""
    yy, xx = _coordinates(hw)
    image = np.broadcast_to(_palette(rng, 1)[0], (*hw, 3)).copy()
    for _ in range(int(rng.integers(2, 5))):
        angle, cycles = rng.uniform(0, np.pi), np.exp(rng.uniform(0, np.log(24)))
        wave = np.sin(2 * np.pi * cycles * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.4:
            wave = np.tanh(wave * rng.uniform(2, 8))
        image += wave[..., None] * (_palette(rng, 1)[0] - 127.5) * rng.uniform(0.15, 0.5)
    return image


def cell_texture(rng, hw) -> np.ndarray:
    """Voronoi cells of 4-80 random sites, each a palette colour shaded by the distance to its site, half of
    them with soft borders of their own colour: stones, tiles, foam, tissue."""
    h, w = hw
    n = int(np.exp(rng.uniform(np.log(4), np.log(80))))
    sites = (rng.random((n, 2)) * [w, h]).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    distance = np.sqrt((xx[..., None] - sites[:, 0]) ** 2 + (yy[..., None] - sites[:, 1]) ** 2)
    nearest = np.partition(distance, 1, axis=-1)[..., :2]
    image = _palette(rng, n)[distance.argmin(-1)]
    spacing = np.sqrt(h * w / n)  # the typical cell diameter
    image *= (1 + rng.uniform(-0.6, 0.6) * (nearest[..., 0] / spacing - 0.5))[..., None]
    if rng.random() < 0.5:
        edge = np.clip((nearest[..., 1] - nearest[..., 0]) / rng.uniform(0.5, 0.15 * spacing + 1), 0, 1)
        image = image * edge[..., None] + _palette(rng, 1)[0] * (1 - edge[..., None])
    return image


def walk_texture(rng, hw) -> np.ndarray:
    """2-10 random walks of random colour, width and stride drawn thick over a base colour, then blurred:
    blobs, streaks, smears, foliage-like clutter."""
    h, w = hw
    image = np.broadcast_to(_palette(rng, 1)[0], (h, w, 3)).copy()
    side = max(hw)
    for _ in range(int(rng.integers(2, 11))):
        steps = int(rng.integers(10, 120))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, rng.uniform(0.2, 1.2), steps))
        stride = rng.uniform(0.005, 0.04) * side
        path = rng.random(2) * [w, h] + np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1) * stride, 0)
        cv2.polylines(image, [np.round(path).astype(np.int32)], False, _palette(rng, 1)[0].tolist(),
                      thickness=max(1, int(rng.uniform(0.01, 0.12) * side)))
    return cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 0.03 * side + 0.5))


def gradient_texture(rng, hw) -> np.ndarray:
    """A linear or radial ramp through 2-5 palette colours (sky, walls, lit studio backdrops)."""
    yy, xx = _coordinates(hw)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        return _ramp(rng, _unit(np.cos(angle) * xx + np.sin(angle) * yy))
    cy, cx = rng.uniform(-0.3, 1.3, 2)  # the centre may lie outside the image
    return _ramp(rng, _unit(np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)))


TEXTURES = (noise_texture, plaid_texture, cell_texture, walk_texture, gradient_texture)
TEXTURE_P = (0.3, 0.15, 0.2, 0.15, 0.2)


def texture(rng, hw) -> np.ndarray:
    """One of TEXTURES drawn with TEXTURE_P, clipped to 0-255 as a photo's pixels are (gratings and shaded
    cells overshoot)."""
    return np.clip(TEXTURES[rng.choice(len(TEXTURES), p=TEXTURE_P)](rng, hw), 0, 255)


def procedural_background(rng, hw) -> np.ndarray:
    """A seeded procedural texture of size `hw` from TEXTURES, in a third of scenes blended with a second one
    through a soft noise mask, in most given fine grain (the photos' detail), then brightness and contrast
    jitter; float32 RGB.  Uses no photo."""
    image = texture(rng, hw)
    if rng.random() < 0.35:
        mask = value_noise(rng, hw, rng.uniform(1.5, 6), 3, 0.5)
        mask = np.clip((mask - rng.uniform(0.3, 0.7)) / rng.uniform(0.02, 0.3) + 0.5, 0, 1)[..., None]
        image = image * (1 - mask) + texture(rng, hw) * mask
    if rng.random() < 0.7:
        grain = value_noise(rng, hw, max(hw) / rng.uniform(1, 3), 2, 0.5) - 0.5
        image = image + grain[..., None] * rng.uniform(20, 80)
    mean = image.mean((0, 1))
    return (image - mean) * rng.uniform(0.8, 1.8) + mean * rng.uniform(0.7, 1.1) + rng.uniform(-25, 25)
