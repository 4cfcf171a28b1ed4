"""Where each node's box goes in the main view, and how big it is: a layer x position grid.

Rows are layers, bottom to top: the prompt's token embeddings, CLT features and MLP error
nodes of each layer, output logits; a layer with no node gets no row. Columns are token
positions, left to right. Rows and columns are sized for the graph area of a 1400x900 window
(GRID_W x GRID_H model px, which the page fits at a zoom of about 1, so that a model px is a
screen px there):

- columns: each wants room for its most crowded cell on one line of full-size boxes; when
  they do not all fit, the sparse ones get what they want and the crowded ones share the
  rest equally (water-filling);
- rows (bands): each gets one line's height (a layer with only error nodes a thinner band;
  all of them less when there are too many rows for that); the height left over goes, a
  line at a time, to the row where one to six more lines of boxes let the most labels be
  drawn legibly (per line added), and what is left after that is spread over all rows.

The nodes of a (layer, position) cell are laid out inside that cell, lines of boxes centred
in it, with as many lines as give the most legible labels (then the biggest boxes): a crowded
cell gets smaller boxes, never more room than its cell. Cells do not overlap, so neither do
boxes (MIN_GAP px apart or more, unless a cell is too crowded for that), and every box stays
inside its layer's band.

A box's label is drawn at a font size that fits its box, at least MIN_CHARS characters wide
(cut to fit, in layout.py); the stylesheet hides labels smaller than LEGIBLE px on screen, so
a crowded cell's labels appear when the reader zooms in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from clt_forge.artifacts.graph import EMBEDDING, ERROR, LOGIT
from clt_forge.serve.style import BOX_H, BOX_W, LEGIBLE

__all__ = ["CHAR_W", "GRID_H", "GRID_W", "MIN_CHARS", "Box", "Grid", "font_size", "grid", "row_of"]

GRID_W, GRID_H = 860.0, 616.0  # the grid in model px: the fitted view of a 1400x900 window
GAP_X, GAP_Y = 8.0, 4.0  # px between the boxes of a cell (less between small boxes)
MIN_GAP = 3.0  # px: the least gap between boxes (when they fit)
ERROR_ROW = 11.0  # px: the band of a layer with only error nodes (their labels show when zoomed in)
COLUMN_PAD, ROW_PAD = 10.0, 3.0  # px between positions; between layer bands
SLOT_W, LINE_H = BOX_W + GAP_X, BOX_H + GAP_Y  # a full-size box with the gap beside it
FONT = 11.0  # px: the largest label
CHAR_W = 0.62  # a character's width in ems (DejaVu Sans, on the wide side)
MIN_CHARS = 7  # a label is drawn at least this many characters wide (smaller, if need be)


@dataclass(frozen=True)
class Box:
    """A node's box: centre and size (model px)."""

    x: float
    y: float
    w: float
    h: float


@dataclass
class Grid:
    """The boxes of the nodes (`boxes`: node_id -> Box) and their rows, and the axes: each row's band
    (`bands`: row -> (top, bottom)), the x of each position, the drawing's width and height."""

    boxes: dict[str, Box] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    bands: dict[int, tuple[float, float]] = field(default_factory=dict)
    col_x: list[float] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0

    @property
    def coords(self) -> dict[str, tuple[float, float]]:
        return {node_id: (b.x, b.y) for node_id, b in self.boxes.items()}

    @property
    def row_y(self) -> dict[int, float]:
        return {row: (top + bottom) / 2 for row, (top, bottom) in self.bands.items()}


def row_of(node: dict[str, Any], n_layers: int) -> int:
    kind = node["feature_type"]
    if kind == EMBEDDING:
        return 0
    if kind == LOGIT:
        return n_layers + 1
    return int(node["layer"]) + 1


def font_size(w: float, h: float, chars: int = MIN_CHARS) -> float:
    """The label font (px) of a w x h box: as large as fits `chars` characters, at most FONT."""
    return max(0.1, min(FONT, 0.7 * h, (w - 4) / (CHAR_W * chars)))


def _fit(room: float, count: int, gap: float, most: float) -> tuple[float, float]:
    """`count` boxes side by side in `room` px: (box size, gap between boxes), at most `most` px
    a box. The gaps shrink with the boxes, to 3 px (a box's outline is drawn outside it), and
    below only when the boxes would not fit otherwise."""
    if count == 1:
        return max(0.5, min(most, room)), 0.0
    gap = min(gap, max(MIN_GAP, 0.3 * room / count))
    if room - gap * (count - 1) < count:
        gap = 0.3 * room / count
    return max(0.5, min(most, (room - gap * (count - 1)) / count)), gap


@lru_cache(maxsize=65536)
def _arrange(n: int, width: float, height: float) -> tuple[bool, int, float, float]:
    """n boxes in a width x height cell: (labels legible, lines, box w, box h), the best of
    every number of lines: legible labels first, then MIN_GAP between boxes, then the biggest boxes."""
    best: tuple[tuple[bool, bool, float], int, float, float] | None = None
    for lines in range(1, n + 1):
        if lines > 1 and height / lines < 2:
            break
        per_line = math.ceil(n / lines)
        (w, gap_x), (h, gap_y) = _fit(width, per_line, GAP_X, BOX_W), _fit(height, lines, GAP_Y, BOX_H)
        apart = (per_line == 1 or gap_x >= MIN_GAP) and (lines == 1 or gap_y >= MIN_GAP)
        key = (font_size(w, h) >= LEGIBLE, apart, min(w / BOX_W, h / BOX_H))
        if best is None or key > best[0]:
            best = (key, lines, w, h)
    assert best is not None
    return best[0][0], best[1], best[2], best[3]


def _share(wants: list[float], total: float) -> list[float]:
    """`total` shared out: everyone gets what they want and the rest is spread evenly, or,
    when that is too much, the most wanting share what the others leave (water-filling)."""
    if sum(wants) <= total:
        extra = (total - sum(wants)) / len(wants)
        return [w + extra for w in wants]
    left, count, level = total, len(wants), 0.0
    for want in sorted(wants):
        if want * count > left:
            level = left / count
            break
        left -= want
        count -= 1
    return [min(want, level) for want in wants]


def _legible(cells: list[tuple[int, int, float]], height: float) -> int:
    """Labelled nodes of a row's cells (nodes, labelled nodes, column width) whose labels are
    legible in a band `height` px high."""
    return sum(k for n, k, width in cells if k and _arrange(n, width - COLUMN_PAD, height - ROW_PAD)[0])


def _heights(rows: dict[int, list[tuple[int, int, float]]]) -> dict[int, float]:
    """Each row's band height: a line each (less for rows of error nodes only, and less again
    when there are too many rows for that), then lines where they make the most labels legible."""
    heights = {row: BOX_H + ROW_PAD if any(k for _, k, _ in cells) else ERROR_ROW for row, cells in rows.items()}
    scale = min(1.0, GRID_H / sum(heights.values()))
    heights = {row: h * scale for row, h in heights.items()}
    left = GRID_H - sum(heights.values())
    while left >= LINE_H:
        gains = {}
        for row, cells in rows.items():
            now = _legible(cells, heights[row])
            gains[row] = max(
                (_legible(cells, heights[row] + k * LINE_H) - now) / k for k in range(1, 7) if k * LINE_H <= left
            )
        row = max(gains, key=lambda r: (gains[r], -r))
        if gains[row] <= 0:
            break
        heights[row] += LINE_H
        left -= LINE_H
    return {row: h + left / len(rows) for row, h in heights.items()}


def grid(nodes: list[dict[str, Any]], n_layers: int, n_pos: int) -> Grid:
    """The boxes of `nodes` on the layer x position grid (Cytoscape's model coordinates, y down)."""
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for node in nodes:
        cells.setdefault((node["ctx_idx"], row_of(node, n_layers)), []).append(node)
    n_cols = max(n_pos, 1 + max((pos for pos, _ in cells), default=0))
    wants = [SLOT_W + COLUMN_PAD] * n_cols
    for (pos, _), members in cells.items():
        wants[pos] = max(wants[pos], len(members) * SLOT_W + COLUMN_PAD)
    widths = _share(wants, GRID_W)
    rows: dict[int, list[tuple[int, int, float]]] = {0: [], n_layers + 1: []}
    for (pos, row), members in cells.items():
        labelled = sum(m["feature_type"] != ERROR for m in members)
        rows.setdefault(row, []).append((len(members), labelled, widths[pos]))
    heights = _heights(rows)
    out = Grid()
    y = 0.0
    for row in sorted(heights, reverse=True):  # logits at the top
        out.bands[row] = (y, y + heights[row])
        y += heights[row]
    out.height = y
    x = 0.0
    for width in widths:
        out.col_x.append(x + width / 2)
        x += width
    out.width = x
    for (pos, row), members in cells.items():
        members.sort(key=lambda n: (n["feature_type"] == ERROR, -(n.get("activation") or 0.0), n["node_id"]))
        top, bottom = out.bands[row]
        cell_w, cell_h = widths[pos] - COLUMN_PAD, bottom - top - ROW_PAD
        _, lines, w, h = _arrange(len(members), cell_w, cell_h)
        per_line = math.ceil(len(members) / lines)
        gap_x, gap_y = _fit(cell_w, per_line, GAP_X, BOX_W)[1], _fit(cell_h, lines, GAP_Y, BOX_H)[1]
        centre_y = (top + bottom) / 2
        for i, node in enumerate(members):
            line, slot = divmod(i, per_line)
            in_line = min(per_line, len(members) - line * per_line)
            bx = out.col_x[pos] + (slot - (in_line - 1) / 2) * (w + gap_x)
            by = centre_y + (line - (lines - 1) / 2) * (h + gap_y)
            bw = min(w, max(h * 1.4, 12.0)) if node["feature_type"] == ERROR else w
            out.rows[node["node_id"]] = row
            out.boxes[node["node_id"]] = Box(round(bx, 2), round(by, 2), round(bw, 2), round(h, 2))
    return out
