"""Tasks 3 and 4, "reading" and "weather": a sign holding one city name, read aloud or passed to a tool.

Owns the sign distribution: each image side uniform from what the sign needs (at least 196) to 308 px, a uniform
background; one word uniform over :data:`WORDS` (40 Latin-script cities and 6 in their own scripts); the word in
a uniform sans font (Latin: DejaVu / Liberation / Noto Sans, regular or bold; Chinese and Korean: Noto Sans CJK
regular or bold, the SC or KR face; the Latin faces include DejaVu Sans Condensed and Liberation Sans Narrow),
dark (each channel 0-70), its size "18-32 px high" read each of three ways a third of the time (an integer drawn
uniformly): the word's *ink* height (the font size fitted to it), the *font size* (the ink then 12-32 px high:
capitals are about 0.7 of the size), or the height of a *capital* H (a Chinese or Korean word: its ink; the ink of
a word with a descender then up to 43 px); the sign a filled light rectangle (each channel 235-255) with a dark
2 px border (each channel 0-70), 6-16 px of padding left and right and 4-12 px above and below the ink, at a
uniform position fully inside the image.

* reading: "What is written on the sign?" Answer: the word, in one of three phrasings. Truth: the word.
* weather (the release's function-call demo): the request carries :data:`TOOLS` (``get_weather(city: string)``);
  "What's the weather like in the city on this sign?" Answer: one call in the Qwen2-VL / Qwen2.5 Hermes form,
  ``<tool_call>\\n{"name": "get_weather", "arguments": {"city": WORD}}\\n</tool_call>`` (exactly what
  :func:`qwen2vl.tool_calls.tool_call_block` writes; non-ASCII kept). Truth: the word.
"""

from __future__ import annotations

from PIL import ImageDraw

from ..tool_calls import tool_call_block
from .common import SIDE, Sample, background, canvas, fit_text, ink_box, pick, pick_font, randint, task_rng, user
from .fonts import cjk_font, latin_fonts, load_font

__all__ = ["WORDS", "LATIN_WORDS", "CJK_WORDS", "TOOLS", "READ_QUESTION", "WEATHER_QUESTION", "draw_sign",
           "reading_answer", "weather_answer", "sample_reading", "sample_weather"]

LATIN_WORDS = ("Beijing Shanghai Hangzhou Shenzhen Tokyo Osaka Seoul Busan Paris London Berlin Madrid Rome Cairo "
               "Lagos Nairobi Mumbai Delhi Sydney Toronto Chicago Boston Denver Seattle Lima Bogota Santiago Lisbon "
               "Dublin Oslo Vienna Prague Warsaw Athens Istanbul Dubai Bangkok Hanoi Manila Jakarta").split()
#: word -> Noto Sans CJK face ("sc" simplified Chinese, "kr" Korean)
CJK_WORDS = {"北京": "sc", "上海": "sc", "杭州": "sc", "东京": "sc", "서울": "kr", "부산": "kr"}
WORDS: tuple[str, ...] = tuple(LATIN_WORDS) + tuple(CJK_WORDS)
TEXT_HEIGHT = (18, 32)
SIZE_MODES = ("ink", "em", "cap")  # "18-32 px high": the ink's height, the font size, or the capitals' height
BORDER = 2
READ_QUESTION = "What is written on the sign?"
WEATHER_QUESTION = "What's the weather like in the city on this sign?"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name."}},
                   "required": ["city"]}}}]


def _dark(rng) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 71, size=3))


def _font(rng, word: str):
    if word in CJK_WORDS:
        return cjk_font(pick(rng, ("regular", "bold")), CJK_WORDS[word])
    return pick_font(rng, latin_fonts("regular") + latin_fonts("bold"))


def draw_sign(rng) -> tuple:
    """(image, info) of one sign scene; info holds the word, the sign's and the ink's pixel boxes, the font."""
    word = pick(rng, WORDS)
    font = _font(rng, word)
    text_h = randint(rng, *TEXT_HEIGHT)
    size_mode = pick(rng, SIZE_MODES)  # how "18-32 px high" is read (the module docstring)
    if size_mode == "ink" or (size_mode == "cap" and word in CJK_WORDS):
        face, bb = fit_text(font, word, text_h, TEXT_HEIGHT)
    elif size_mode == "cap":
        face, _ = fit_text(font, "H", text_h, TEXT_HEIGHT)
        bb = ink_box(font, face.size, word)
    else:
        face, bb = load_font(font, text_h), ink_box(font, text_h, word)
        if bb[3] - bb[1] > TEXT_HEIGHT[1]:  # a tall script or descender at size 32: the ink at most 32
            face, bb = fit_text(font, word, TEXT_HEIGHT[1], TEXT_HEIGHT)
    pad_x, pad_y = randint(rng, 6, 16), randint(rng, 4, 12)
    sign_w = (bb[2] - bb[0]) + 2 * (pad_x + BORDER)
    sign_h = (bb[3] - bb[1]) + 2 * (pad_y + BORDER)
    width = randint(rng, max(SIDE[0], sign_w), SIDE[1])
    height = randint(rng, max(SIDE[0], sign_h), SIDE[1])
    x, y = randint(rng, 0, width - sign_w), randint(rng, 0, height - sign_h)
    img = canvas(width, height, background(rng))
    fill = tuple(int(v) for v in rng.integers(235, 256, size=3))
    border, ink = _dark(rng), _dark(rng)
    draw = ImageDraw.Draw(img)
    draw.rectangle((x, y, x + sign_w - 1, y + sign_h - 1), fill=fill, outline=border, width=BORDER)
    tx, ty = x + BORDER + pad_x, y + BORDER + pad_y
    draw.text((tx - bb[0], ty - bb[1]), word, font=face, fill=ink)
    info = {"word": word, "font": font.name, "font_size": face.size, "size_mode": size_mode,
            "text_height": bb[3] - bb[1],
            "sign": (x, y, x + sign_w, y + sign_h), "text": (tx, ty, tx + bb[2] - bb[0], ty + bb[3] - bb[1]),
            "fill": fill, "border": border, "ink": ink, "image": img}
    return img, info


def reading_answer(word: str, style: int) -> str:
    return (f'The sign says "{word}".', f'It says "{word}".', f'The word on the sign is "{word}".')[style]


def weather_answer(word: str) -> str:
    return tool_call_block("get_weather", {"city": word})


def sample_reading(seed: int) -> Sample:
    rng = task_rng("reading", seed)
    img, info = draw_sign(rng)
    answer = reading_answer(info["word"], randint(rng, 0, 2))
    return Sample("reading", "reading", seed, [user({"type": "image", "image": img}, READ_QUESTION)], answer,
                  info["word"], info=info)


def sample_weather(seed: int) -> Sample:
    rng = task_rng("weather", seed)
    img, info = draw_sign(rng)
    return Sample("weather", "weather", seed, [user({"type": "image", "image": img}, WEATHER_QUESTION)],
                  weather_answer(info["word"]), info["word"], tools=TOOLS, info=info)
