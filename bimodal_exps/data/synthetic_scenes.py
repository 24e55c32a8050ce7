"""What a synthetic scene is: attribute vocabularies, sampling, drawing and captions.

A scene is a background colour plus 1 to 3 objects, each with a shape, a colour, a size and a
position (at most one object per position). Shapes and colours are long-tailed (Zipf-like:
p(rank k) proportional to 1 / (k + 1), k = 0, 1, ...); backgrounds, sizes, positions and the
object count are uniform. Every random choice comes from the ``numpy.random.Generator`` passed in,
so a scene, its pixels and its captions are fixed by that generator's seed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Vocabularies, most frequent first (the order is the Zipf rank). RGB values were picked so every
# object colour differs from every other object colour and every background by CIELAB
# delta-E >= 35, i.e. clearly, even after JPEG and downsampling to 32 px.
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 35),
    "green": (30, 170, 60),
    "blue": (30, 90, 245),
    "yellow": (250, 225, 25),
    "orange": (255, 140, 0),
    "purple": (160, 40, 170),
    "pink": (255, 135, 210),
    "brown": (140, 80, 30),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (120, 120, 120),
    "beige": (200, 180, 135),
    "teal": (25, 120, 125),
    "navy": (30, 40, 115),
    "olive": (120, 125, 35),
    "maroon": (105, 20, 45),
    "lavender": (175, 150, 225),
    "mint": (140, 220, 170),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
MAX_OBJECTS = 3
NUM_CAPTION_TEMPLATES = 5

# Geometry in units of the image side. Positions sit far enough apart that two large objects
# (half-extent 0.14, +10% size jitter, +-2 px place jitter at 64 px) at most touch.
_CENTRES = {"left": (0.19, 0.5), "right": (0.81, 0.5), "top": (0.5, 0.19), "bottom": (0.5, 0.81)}
_CENTRES["centre"] = (0.5, 0.5)
_HALF_EXTENT = {"small": 0.09, "large": 0.14}
_PLACE_JITTER = 2 / 64
_SIZE_JITTER = 0.1
_TINT_JITTER = 6  # RGB levels, per channel
_NOISE_HALF_WIDTH = 4  # RGB levels; per-pixel noise is triangular on [-8, 8], std 3.7
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges


def zipf_probabilities(n: int) -> np.ndarray:
    """Probabilities [n] with p[k] proportional to 1 / (k + 1)."""
    weights = 1.0 / np.arange(1, n + 1)
    return weights / weights.sum()


SHAPE_PROBABILITIES = zipf_probabilities(len(SHAPES))
COLOUR_PROBABILITIES = zipf_probabilities(len(COLOURS))


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A background and its objects, ordered by position (so equal scenes compare equal)."""

    background: str
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position} for o in self.objects
            ],
        }


def _pick(rng: np.random.Generator, options: tuple[str, ...], p: np.ndarray | None = None) -> str:
    return options[int(rng.choice(len(options), p=p))]


def _canonical(background: str, objects: list[SceneObject]) -> Scene:
    return Scene(background, tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene from the long-tailed training distribution."""
    background = _pick(rng, tuple(BACKGROUNDS))
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = [
        SceneObject(
            shape=_pick(rng, SHAPES, SHAPE_PROBABILITIES),
            colour=_pick(rng, tuple(COLOURS), COLOUR_PROBABILITIES),
            size=_pick(rng, SIZES),
            position=POSITIONS[int(i)],
        )
        for i in positions
    ]
    return _canonical(background, objects)


def sample_single_object_scene(rng: np.random.Generator, shape: str) -> Scene:
    """One object of the given shape; colour, size, position and background uniform."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    obj = SceneObject(shape, _pick(rng, tuple(COLOURS)), _pick(rng, SIZES), _pick(rng, POSITIONS))
    return _canonical(_pick(rng, tuple(BACKGROUNDS)), [obj])


# ---------------------------------------------------------------- drawing


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    corners = []
    for i in range(2 * points):
        radius = 1.0 if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / points
        corners.append((radius * math.cos(angle), radius * math.sin(angle)))
    return corners


def _heart(steps: int = 48) -> list[tuple[float, float]]:
    # The classic parametric heart curve; image y grows downwards, hence the minus sign.
    ts = np.linspace(0, 2 * math.pi, steps, endpoint=False)
    xs = 16 * np.sin(ts) ** 3
    ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def _centred(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Shift and scale a polygon so its bounding box is centred on 0 with half-extent 1."""
    xs, ys = zip(*points, strict=True)
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return [((x - cx) / half, (y - cy) / half) for x, y in points]


_ARM = 0.32  # half-width of the cross's arms
# Unit polygons (bounding-box half-extent 1, before the per-shape scale below).
_POLYGONS = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (0.8, 0), (0, 1), (-0.8, 0)],
    "triangle": _centred([(0, -1), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5)]),
    "star": _centred(_star()),
    "heart": _centred(_heart()),
    "cross": [
        (-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
        (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM),
    ],
}  # fmt: skip
# Filled squares look bigger than stars of the same extent; scale so sizes read alike.
_SHAPE_SCALE = {"square": 0.82, "circle": 0.95, "ring": 0.95}
_RING_WIDTH = 0.45  # fraction of the radius; leaves a hole still visible at 32 px


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, rng: np.random.Generator) -> None:
    """Draw one object on a ``side`` x ``side`` canvas, with place, size and tint jitter."""
    cx, cy = _CENTRES[obj.position]
    cx = (cx + rng.uniform(-_PLACE_JITTER, _PLACE_JITTER)) * side
    cy = (cy + rng.uniform(-_PLACE_JITTER, _PLACE_JITTER)) * side
    radius = _HALF_EXTENT[obj.size] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER) * side
    radius *= _SHAPE_SCALE.get(obj.shape, 1.0)
    tint = rng.integers(-_TINT_JITTER, _TINT_JITTER + 1, size=3)
    fill = tuple(int(c) for c in np.clip(np.array(COLOURS[obj.colour]) + tint, 0, 255))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(_RING_WIDTH * radius)))
    else:
        draw.polygon([(cx + x * radius, cy + y * radius) for x, y in _POLYGONS[obj.shape]], fill=fill)


def draw_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels."""
    side = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw_object(draw, obj, side, rng)
    pixels = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.int16)
    # Sum of two uniform integers: near-Gaussian noise, several times cheaper to draw.
    noise = rng.integers(-_NOISE_HALF_WIDTH, _NOISE_HALF_WIDTH + 1, size=(2, *pixels.shape), dtype=np.int16)
    return Image.fromarray(np.clip(pixels + noise.sum(axis=0), 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of ``image`` (baseline, no metadata, so the bytes depend on the pixels only)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------- captions

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "to the left"),
    "right": ("on the right", "at the right side", "to the right"),
    "top": ("at the top", "near the top", "up top"),
    "bottom": ("at the bottom", "near the bottom", "down at the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
_COUNT_WORDS = ("one shape", "two shapes", "three shapes")


def _a(word: str) -> str:
    """``word`` with its indefinite article."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _and_join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _while_join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " while " + parts[-1]


def caption(scene: Scene, template: int, rng: np.random.Generator) -> str:
    """One English description of ``scene`` in paraphrase ``template`` (0..4).

    Every template names each object's size, colour, shape and position and the background;
    objects come in random order and synonyms (big/large, centre/center/middle, ...) at random.
    """
    if not 0 <= template < NUM_CAPTION_TEMPLATES:
        raise ValueError(f"caption template {template} out of range 0..{NUM_CAPTION_TEMPLATES - 1}")
    mentions = []  # (object, size word, position phrase), in random object order
    for i in rng.permutation(len(scene.objects)):
        obj = scene.objects[int(i)]
        size = _SIZE_WORDS[obj.size][int(rng.integers(2))]
        where = _POSITION_PHRASES[obj.position][int(rng.integers(3))]
        mentions.append((obj, size, where))
    bg = scene.background
    if template == 0:
        items = [f"{_a(size)} {o.colour} {o.shape} {where}" for o, size, where in mentions]
        return f"{_and_join(items)} on {_a(bg)} background"
    if template == 1:
        items = [f"the {o.shape} {where} is {o.colour} and {size}" for o, size, where in mentions]
        return f"on {bg}, {_while_join(items)}"
    if template == 2:
        # "of little size" reads oddly: this template keeps the plain size names.
        items = [f"{_a(o.colour)} {o.shape} of {o.size} size {where}" for o, _, where in mentions]
        return f"{_COUNT_WORDS[len(mentions) - 1]} over {_a(bg)} backdrop: {_and_join(items)}"
    if template == 3:
        items = [f"{where} there is {_a(size)} {o.colour} {o.shape}" for o, size, where in mentions]
        return f"{_and_join(items)}; the background is {bg}"
    items = [f"{_a(size)} {o.shape} in {o.colour} {where}" for o, size, where in mentions]
    return f"picture of {_a(bg)} background with {_and_join(items)}"


def caption_vocabulary() -> list[str]:
    """Every word the caption templates can emit, sorted (guarantees tokenizer coverage)."""
    fixed = ["a", "an", "the", "and", "while", "on", "of", "over", "in", "is", "there", "with", "size"]
    fixed += ["shape", "shapes", "backdrop", "background", "picture", "one", "two", "three"]
    phrases = [p for options in _POSITION_PHRASES.values() for p in options]
    words = set(fixed) | {w for p in phrases for w in p.split()}
    words |= set(SHAPES) | set(COLOURS) | set(BACKGROUNDS)
    words |= {w for options in _SIZE_WORDS.values() for w in options}
    return sorted(words)
