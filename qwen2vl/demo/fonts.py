"""The sans fonts the demo tasks draw text with, found on this machine (none are shipped).

Owns: which installed font files count (:data:`LATIN_REGULAR`, :data:`LATIN_BOLD`, :data:`CJK`: DejaVu Sans and
DejaVu Sans Condensed, Liberation Sans and Liberation Sans Narrow, Noto Sans, regular / bold, from Debian's
fonts-dejavu, fonts-liberation and fonts-noto-core; Noto Sans CJK from fonts-noto-cjk), how they are found
(``fc-list`` when fontconfig is installed, else a walk of :data:`FONT_DIRS`), and loading them at a pixel size
(cached). ``QWEN2VL_FONT_DIR`` names one more folder, searched first (a machine where apt cannot install them, e.g. a
lent GPU box with no network). Lists come back sorted by file name, so a seed picks the same font on every machine
that has the same fonts. :class:`FontsNotFoundError` names the apt packages when a kind of font is missing.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

from PIL import ImageFont

__all__ = ["Font", "FontsNotFoundError", "APT_PACKAGES", "latin_fonts", "cjk_font", "load_font", "find_font_files"]

APT_PACKAGES = "fonts-dejavu fonts-liberation fonts-noto-core fonts-noto-cjk"
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")

#: File names of the Latin sans fonts, by weight.
LATIN_REGULAR = ("DejaVuSans.ttf", "DejaVuSansCondensed.ttf", "LiberationSans-Regular.ttf",
                 "LiberationSansNarrow-Regular.ttf", "NotoSans-Regular.ttf")
LATIN_BOLD = ("DejaVuSans-Bold.ttf", "DejaVuSansCondensed-Bold.ttf", "LiberationSans-Bold.ttf",
              "LiberationSansNarrow-Bold.ttf", "NotoSans-Bold.ttf")
#: Noto Sans CJK collections (Debian) or single-language files (other distributions), by weight.
CJK = {"regular": ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "NotoSansCJKkr-Regular.otf"),
       "bold": ("NotoSansCJK-Bold.ttc", "NotoSansCJKsc-Bold.otf", "NotoSansCJKkr-Bold.otf")}
#: Face index in the NotoSansCJK-*.ttc collections: JP 0, KR 1, SC 2, TC 3, HK 4.
TTC_FACE = {"sc": 2, "kr": 1}


class FontsNotFoundError(RuntimeError):
    """The fonts a task needs are not installed; the message names the apt packages that bring them."""


@dataclass(frozen=True)
class Font:
    path: str
    index: int = 0  # face in a .ttc collection

    @property
    def name(self) -> str:
        return os.path.basename(self.path) + (f"#{self.index}" if self.index else "")


def _fc_list() -> list[str] | None:
    exe = shutil.which("fc-list")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--format", "%{file}\n"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _walk(dirs: tuple[str, ...]) -> list[str]:
    found = []
    for root in dirs:
        for here, _, files in os.walk(root):
            found += [os.path.join(here, f) for f in files]
    return found


@functools.lru_cache(maxsize=1)
def find_font_files() -> dict[str, str]:
    """File name -> path of every wanted font installed (the first path fontconfig or the walk lists)."""
    wanted = set(LATIN_REGULAR) | set(LATIN_BOLD) | set(CJK["regular"]) | set(CJK["bold"])
    listed = _fc_list()
    extra = os.environ.get("QWEN2VL_FONT_DIR")
    paths = (_walk((extra,)) if extra else []) + (listed if listed else _walk(FONT_DIRS))
    found: dict[str, str] = {}
    for p in (sorted(paths) if not extra else paths):
        base = os.path.basename(p)
        if base in wanted and base not in found and os.path.isfile(p):
            found[base] = p
    return found


def _missing(what: str) -> FontsNotFoundError:
    return FontsNotFoundError(f"no {what} font found (looked with fc-list and under {', '.join(FONT_DIRS)}); "
                              f"install Debian's fonts: apt-get install {APT_PACKAGES}")


def latin_fonts(weight: str) -> list[Font]:
    """The installed Latin sans fonts of a weight ("regular" or "bold"), sorted by file name."""
    names = {"regular": LATIN_REGULAR, "bold": LATIN_BOLD}[weight]
    files = find_font_files()
    fonts = [Font(files[n]) for n in sorted(names) if n in files]
    if not fonts:
        raise _missing(f"{weight} sans (DejaVu Sans, Liberation Sans or Noto Sans)")
    return fonts


def cjk_font(weight: str, script: str) -> Font:
    """Noto Sans CJK of a weight for a script ("sc": simplified Chinese, "kr": Korean). A single-language .otf
    holds every CJK glyph too, so any one found serves both scripts."""
    files = find_font_files()
    for name in CJK[weight]:
        if name in files:
            index = TTC_FACE[script] if name.endswith(".ttc") else 0
            return Font(files[name], index)
    raise _missing(f"Noto Sans CJK {weight} ({script})")


@functools.lru_cache(maxsize=4096)
def load_font(font: Font, size: int) -> ImageFont.FreeTypeFont:
    """The font at a pixel size (em size), cached."""
    return ImageFont.truetype(font.path, size=size, index=font.index)
