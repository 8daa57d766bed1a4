"""Synthetic shape scenes for `smolvlm-shapes`: a seeded generator of images with questions and
answers, and the scoring of answers. Pillow and numpy only (the accuracy test runs it without torch).

A scene holds one to five shapes, each a named colour, in its own cell of a 3 x 3 grid (so
"where" has one answer: "at the top left" ... "in the centre"), sometimes a rendered string of
one to six characters in a band of its own (one character per column of the 6 x 6 image-token
grid, from a random column on, in the band's upper row of tokens); on a plain, gradient or
noisy background, at a random size (160..512 px) and aspect ratio, JPEG-compressed. Squares and
rectangles are told apart after the image processor squashes the picture to a square tile
because aspect ratios stay within 3:4..4:3 and rectangles are at least 2.2 times longer than wide.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

COLOURS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 225, 30), "green": (40, 170, 60),
    "blue": (35, 75, 220), "purple": (130, 50, 170), "pink": (245, 130, 190), "brown": (120, 75, 35),
    "black": (15, 15, 15), "white": (250, 250, 250), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "rectangle", "triangle", "star", "heart", "diamond")
# Grid cell (row, col) -> where it is, as said in answers.
PLACES = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
TEXT_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"  # no I/O: they read as 1/0
GRID = 6  # image tokens per side (a 192-px tile, 16-px patches, pixel shuffle 2): 2 x 2 per scene cell

DESCRIBE = ("What is in this image?", "Describe the image.", "What do you see?", "Describe this picture.",
            "What is shown in the picture?", "What can you see in this image?")
COUNT = ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes.",
         "How many objects can you see?", "How many shapes do you see?")
COLOUR = ("What colour is the {shape}?", "What color is the {shape}?", "Which colour is the {shape}?",
          "What is the colour of the {shape}?", "What color does the {shape} have?")
WHERE = ("Where is the {thing}?", "Where is the {thing} in the image?", "Where can you see the {thing}?",
         "In which part of the image is the {thing}?")
READ = ("What does the text say?", "Read the text.", "What is written in the image?",
        "What does the text in the image say?", "What word is written here?")


@dataclass
class Shape:
    colour: str
    shape: str
    cell: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    image: Image.Image
    shapes: list[Shape]  # in reading order (by cell, row-major)
    text: str | None = None
    text_row: int | None = None  # the band of cells the text is in
    text_column: int | None = None  # the image-token column of its first character
    questions: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, question, answer)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(shapes: list[Shape], text: str | None) -> str:
    """The answer to "What is in this image?": each shape in reading order, then the text."""
    items = [f"{_a(s.name)} {s.name}" for s in shapes] + ([f'the text "{text}"'] if text else [])
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"I see {body}."


def count_answer(n: int) -> str:
    return "There is 1 shape." if n == 1 else f"There are {n} shapes."


def _background(rng: np.random.Generator, w: int, h: int, avoid: list[tuple[int, int, int]]) -> Image.Image:
    """Plain, gradient or noisy; its colours kept away from every shape colour in the scene."""
    def colour() -> np.ndarray:
        for _ in range(100):
            c = rng.integers(0, 256, 3)
            if all(np.abs(c - np.array(a)).sum() > 200 for a in avoid):
                return c
        return c

    kind = rng.choice(["plain", "gradient", "noise"])
    a = colour().astype(np.float32)
    if kind == "plain":
        return Image.new("RGB", (w, h), tuple(int(v) for v in a))
    if kind == "gradient":  # one row or column of colours, repeated (as uint8: cheap)
        b = colour().astype(np.float32)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if len(t) == w else t[:, None, None]
        line = np.clip(a + (b - a) * t, 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.broadcast_to(line, (h, w, 3))))
    arr = a + rng.normal(0, rng.uniform(6, 22), (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], phase: float) -> list[tuple[float, float]]:
        pts = []
        for i in range(n * len(radii)):
            rad = radii[i % len(radii)] * r
            t = phase + 2 * math.pi * i / (n * len(radii))
            pts.append((cx + rad * math.cos(t), cy + rad * math.sin(t)))
        return pts

    if shape == "triangle":
        return ring(3, [1.0], -math.pi / 2 + angle)
    if shape == "star":
        return ring(5, [1.0, 0.45], -math.pi / 2 + angle)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 17, cy - r * y / 17 - 0.1 * r))
        return pts
    raise ValueError(shape)


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: Shape, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if s.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.shape == "square":
        a = r * 0.85
        draw.rectangle([cx - a, cy - a, cx + a, cy + a], fill=fill)
    elif s.shape == "rectangle":
        long, short = r * 1.1, r * 1.1 / rng.uniform(2.4, 3.2)
        dx, dy = (long, short) if rng.random() < 0.6 else (short, long)
        draw.rectangle([cx - dx, cy - dy, cx + dx, cy + dy], fill=fill)
    else:
        draw.polygon(_polygon(s.shape, cx, cy, r, rng.uniform(-0.25, 0.25)), fill=fill)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-18, 19), 0, 255)) for c in rgb)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled TrueType font: the same everywhere


def make_scene(rng: np.random.Generator, n_shapes: int | None = None, with_text: bool | None = None) -> Scene:
    """One random scene with its image and a question of each kind that applies."""
    with_text = bool(rng.random() < 0.3) if with_text is None else with_text
    text_row = int(rng.integers(0, 3)) if with_text else None
    cells = [(r, c) for r in range(3) for c in range(3) if r != text_row]
    n = int(rng.integers(1, 6 if not with_text else 4)) if n_shapes is None else n_shapes
    chosen = sorted(rng.choice(len(cells), size=n, replace=False))
    shapes = [Shape(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), cells[i]) for i in chosen]

    # sqrt(width x height) 160..512 px, log-uniform: the tile is 192 px, and drawing, noise, blur
    # and JPEG cost grow with the area (half the time per scene of uniform 160..640).
    side = float(np.exp(rng.uniform(math.log(160), math.log(512))))
    aspect = float(np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3))))
    w, h = int(side * math.sqrt(aspect)), int(side / math.sqrt(aspect))
    image = _background(rng, w, h, [COLOURS[s.colour] for s in shapes])
    draw = ImageDraw.Draw(image)
    cw, ch = w / 3, h / 3
    for s in shapes:
        r = min(cw, ch) * rng.uniform(0.28, 0.55)
        cx = (s.cell[1] + rng.uniform(0.35, 0.65)) * cw
        cy = (s.cell[0] + rng.uniform(0.35, 0.65)) * ch
        _draw_shape(draw, rng, s, cx, cy, r, _jitter(rng, COLOURS[s.colour]))

    text, text_column = None, None
    if with_text:  # one character per image-token column, from a random column on
        text = "".join(rng.choice(list(TEXT_ALPHABET), size=int(rng.integers(1, 7))))
        text_column = int(rng.integers(0, GRID - len(text) + 1))
        # Each character inside one image token: its column, and the band's upper row of tokens
        # (a glyph across two rows leaves each token half of it to read).
        pitch, row = w / GRID, ch / 2
        size = int(ch * rng.uniform(0.35, 0.6))
        font = _font(size)
        while size > 8 and any(b[2] - b[0] > 0.85 * pitch or b[3] - b[1] > 0.8 * row
                               for b in (draw.textbbox((0, 0), c, font=font) for c in text)):
            size = int(size * 0.9)
            font = _font(size)
        bg = np.asarray(image.crop((0, int(text_row * ch), w, int((text_row + 1) * ch)))).reshape(-1, 3).mean(0)
        ink = _jitter(rng, (15, 15, 15) if bg.mean() > 110 else (245, 245, 245))
        cy = (text_row + 0.25 + rng.uniform(-0.04, 0.04)) * ch
        for k, c in enumerate(text):
            box = draw.textbbox((0, 0), c, font=font)
            cx = (text_column + k + 0.5 + rng.uniform(-0.06, 0.06)) * pitch
            draw.text((cx - (box[0] + box[2]) / 2, cy - (box[1] + box[3]) / 2), c, fill=ink, font=font)

    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(rng.integers(30, 96)))
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    scene = Scene(image, shapes, text, text_row, text_column)
    scene.questions.append(("describe", str(rng.choice(DESCRIBE)), describe(shapes, text)))
    scene.questions.append(("count", str(rng.choice(COUNT)), count_answer(n)))
    kinds = [s.shape for s in shapes]
    unique_shapes = [s for s in shapes if kinds.count(s.shape) == 1]
    if unique_shapes:
        s = unique_shapes[int(rng.integers(len(unique_shapes)))]
        scene.questions.append(("colour", str(rng.choice(COLOUR)).format(shape=s.shape),
                                f"The {s.shape} is {s.colour}."))
    names = [s.name for s in shapes]
    unique_names = [s for s in shapes if names.count(s.name) == 1]
    if unique_names:
        s = unique_names[int(rng.integers(len(unique_names)))]
        thing = s.shape if s in unique_shapes and rng.random() < 0.5 else s.name
        scene.questions.append(("where", str(rng.choice(WHERE)).format(thing=thing),
                                f"The {thing} is {PLACES[s.cell]}."))
    if text:
        scene.questions.append(("read", str(rng.choice(READ)), f'The text says "{text}".'))
    return scene


PLACE_WORDS = (" top", " bottom", " left", " right", " centre")


def scene_words() -> list[str]:
    """Every word `scene_tokens` can write."""
    return ([str(n) for n in range(1, 6)] + [" " + c for c in COLOURS] + [" " + s for s in SHAPES]
            + list(PLACE_WORDS) + [" text"] + list(TEXT_ALPHABET))


def scene_tokens(scene: Scene) -> list[str]:
    """The scene as one word per image token (6 x 6, row-major): the targets the vision tower is
    first trained to put on its tokens. Each cell of the 3 x 3 scene grid owns 2 x 2 tokens:
    a shape's colour and name above its place in the answers' own words (" top" " left" for
    "at the top left", " top" " top" for "at the top", " centre" " centre" for "in the
    centre"); an empty cell says the number of shapes four times; the text's band holds each
    character in the column it is drawn in, " text" elsewhere."""
    grid = [[str(len(scene.shapes))] * GRID for _ in range(GRID)]
    for s in scene.shapes:
        r, c = 2 * s.cell[0], 2 * s.cell[1]
        place = PLACES[s.cell].split()[2:]  # "at the top left" -> top, left
        grid[r][c], grid[r][c + 1] = " " + s.colour, " " + s.shape
        grid[r + 1][c], grid[r + 1][c + 1] = " " + place[0], " " + place[-1]
    if scene.text:
        r, c = 2 * scene.text_row, scene.text_column
        grid[r] = [" text"] * c + [*scene.text] + [" text"] * (GRID - c - len(scene.text))
        grid[r + 1] = [" text"] * GRID
    return [w for row in grid for w in row]


def score(kind: str, expected: str, answer: str) -> bool:
    """Whether an answer is right: the exact fact asked for, ignoring case and surrounding words."""
    a, e = answer.strip().lower(), expected.lower()
    if kind == "read":
        got = re.findall(r'"([^"]*)"', answer)
        return bool(got) and got[0] == re.findall(r'"([^"]*)"', expected)[0]
    if kind == "count":
        return re.findall(r"\d+", a)[:1] == re.findall(r"\d+", e)[:1]
    if kind == "describe":
        named = re.findall(r"\ban? (\w+ \w+)", a)
        return named == re.findall(r"\ban? (\w+ \w+)", e)
    return a.rstrip(".") == e.rstrip(".")


HELD_OUT_SEED = 31337  # never used for training (scripts/train_shapes_vlm.py draws from seeds 0 and 1)
# The tasks: which question is asked of which scenes.
TASKS = {
    "colour and shape, one object": ("describe", {"n_shapes": 1, "with_text": False}),
    "count, 1-5 objects": ("count", {"with_text": False}),
    "position": ("where", {}),
    "text, 1-6 characters": ("read", {"with_text": True}),
}
# The targets (#13), for 100 held-out scenes per task through the default path
# (scripts/eval_shapes_vlm.py; docs/smolvlm-shapes.md has the table).
TARGETS = {"colour and shape, one object": 0.95, "count, 1-5 objects": 0.90, "position": 0.85,
           "text, 1-6 characters": 0.70}


def held_out_questions(per_task: int, seed: int = HELD_OUT_SEED) -> list[tuple[str, Image.Image, str, str]]:
    """(task, image, question, expected answer) for `per_task` fresh scenes per task."""
    rng = np.random.default_rng(seed)
    out = []
    for task, (kind, options) in TASKS.items():
        made = 0
        while made < per_task:
            scene = make_scene(rng, **options)
            asked = [(q, a) for k, q, a in scene.questions if k == kind]
            if asked:
                out.append((task, scene.image, *asked[0]))
                made += 1
    return out


def accuracy(answer: Callable[[Image.Image, str], str], per_task: int, seed: int = HELD_OUT_SEED
             ) -> dict[str, float]:
    """Share of right answers per task; `answer(image, question)` is the model under test."""
    right: dict[str, list[bool]] = {}
    for task, image, question, expected in held_out_questions(per_task, seed):
        right.setdefault(task, []).append(score(TASKS[task][0], expected, answer(image, question)))
    return {task: sum(r) / len(r) for task, r in right.items()}
