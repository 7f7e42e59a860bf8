"""M-RoPE positions: the 3D (temporal, height, width) rotary position of every prompt token, from the token ids
and the media grids alone. Pure index maths on prompt data, shared by the model and the engine's runner."""

from __future__ import annotations

import torch

from .config import Qwen2VLConfig


def mrope_positions(input_ids: list[int], image_grid_thw, video_grid_thw, cfg: Qwen2VLConfig,
                    start: int = 0) -> tuple[torch.Tensor, int]:
    """3D rotary positions (3, T) of one prompt and its ``rope_delta`` (max position + 1 - T).

    Text tokens get the same position on the t, h and w axes. A block of image/video pad tokens with grid
    (t, h, w) at text offset ``st`` gets t-, h- and w-indices of the merged (t, h/2, w/2) grid, each plus ``st``;
    the text after it continues from the block's largest position + 1.

    Worked example: "<vs>" + 6 image pads for grid (1, 4, 6) + "<ve>" + "hi", start = 0:
        tokens    : <vs>  p0 p1 p2 p3 p4 p5  <ve>  h  i
        t axis    :  0    1  1  1  1  1  1    4    5  6
        h axis    :  0    1  1  1  2  2  2    4    5  6
        w axis    :  0    1  2  3  1  2  3    4    5  6
    The merged grid is 1 x 2 x 3, so the block spans positions 1..3 and "<ve>" continues at 4.
    T = 10 tokens, largest position 6: rope_delta = 6 + 1 - 10 = -3, and decode step n (0-based, after the
    prompt) uses position T + n + rope_delta on all three axes.
    """
    merge = cfg.vision.spatial_merge_size
    grids = {cfg.image_token_id: iter(image_grid_thw or []), cfg.video_token_id: iter(video_grid_thw or [])}
    T = len(input_ids)
    pos = torch.empty(3, T, dtype=torch.long)
    i, nxt = 0, start  # nxt: the position the next text token takes
    while i < T:
        tok = input_ids[i]
        if tok in grids:
            try:
                t, h, w = (int(x) for x in next(grids[tok]))
            except StopIteration:
                raise ValueError("more image/video pad blocks in the prompt than grids given") from None
            gh, gw = h // merge, w // merge
            n = t * gh * gw
            if input_ids[i:i + n].count(tok) != n:
                raise ValueError(f"expected {n} consecutive pad tokens for grid {(t, h, w)} at index {i}")
            pos[0, i:i + n] = torch.arange(t).repeat_interleave(gh * gw) + nxt  # (t*gh*gw,)
            pos[1, i:i + n] = torch.arange(gh).repeat_interleave(gw).repeat(t) + nxt
            pos[2, i:i + n] = torch.arange(gw).repeat(t * gh) + nxt
            nxt += max(t, gh, gw)
            i += n
        else:
            j = i
            while j < T and input_ids[j] not in grids:
                j += 1
            pos[:, i:j] = torch.arange(nxt, nxt + j - i)
            nxt += j - i
            i = j
    for tok, it in grids.items():
        if next(it, None) is not None:
            raise ValueError("more grids given than image/video pad blocks in the prompt")
    return pos, nxt - (start + T)
