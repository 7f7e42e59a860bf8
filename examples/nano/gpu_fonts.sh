#!/bin/bash
# Build ./.fonts (git-ignored) for a lent GPU machine, which has no Debian fonts and no network: the Latin sans
# fonts the demo tasks draw with, copied from this machine, and Noto Sans CJK SC cut to the glyphs of the six CJK
# sign words (it renders them pixel for pixel as the full collection's face 2 does; Hangul is the same in every
# face). Needs Debian's fonts-dejavu fonts-liberation fonts-noto-core fonts-noto-cjk and fonttools (pyftsubset).
# Then carry .fonts in the device call and set QWEN2VL_FONT_DIR=$PWD/.fonts there (gpu_run.sh, gpu_session.sh).
set -eu
mkdir -p .fonts
grep -qx '/.fonts/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.fonts/' >> .git/info/exclude; }
for f in DejaVuSans.ttf DejaVuSans-Bold.ttf LiberationSans-Regular.ttf LiberationSans-Bold.ttf NotoSans-Regular.ttf \
         NotoSans-Bold.ttf; do
  cp "$(fc-list --format '%{file}\n' | grep "/$f\$" | head -1)" .fonts/
done
words=$(python3 -c "from qwen2vl.demo.signs import WORDS; print(''.join(w for w in WORDS if not w.isascii()))")
for w in Regular Bold; do
  pyftsubset "$(fc-list --format '%{file}\n' | grep "/NotoSansCJK-$w.ttc\$" | head -1)" --font-number=2 \
    --text="$words" --output-file=.fonts/NotoSansCJKsc-$w.otf
done
ls -la .fonts
