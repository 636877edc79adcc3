"""Model-native box formats: parse descriptions into mentions, render and rewrite box markup.

SPEC §2 "Parsing": each description becomes a list of mentions (phrase, optional box); unparseable
output is a valid candidate with no boxes, never an error. So :func:`parse` never raises on any text:
a malformed box is repaired or dropped (see :func:`services.core.boxes.sanitize_box`) and a warning
says why.

Formats (``CoordinateFormat`` values are the strings of proto ``Candidate.coordinate_format``):

* ``QWEN25_JSON``   — Qwen2.5-VL: ``[{"bbox_2d": [x1, y1, x2, y2], "label": "dog"}, ...]`` in absolute
  pixels of the frame the model saw, usually inside a fenced json block with text around it.
* ``QWEN2_TOKENS``  — Qwen2-VL: ``<|object_ref_start|>dog<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)
  <|box_end|>``, bins 0–1000; a box may come without a ref.
* ``BRACKET_999``   — Ferret/Shikra/CogVLM: ``a dog [x1, y1, x2, y2]``, integer bins 0–999
  (CogVLM's ``[[...];[...]]`` and Shikra's ``[a,b,c,d;e,f,g,h]`` multi-box forms included).
* ``BRACKET_FLOAT`` — the same with 0–1 floats: ``a dog [0.12, 0.30, 0.50, 0.90]``.

Bin conventions are in :mod:`services.core.boxes`. Boxes in mentions are pixels of the model's frame;
:func:`mentions_to_image` moves them to the full image (undoing the crop).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np

from services.core.boxes import (
    BINS_FERRET,
    BINS_QWEN2,
    Box,
    Coords,
    FloatArray,
    boxes_to_array,
    frame_to_image,
    frame_to_image_array,
    from_bins,
    from_normalized,
    sanitize_box,
    to_bins,
    to_normalized,
)


class CoordinateFormat(str, Enum):
    QWEN25_JSON = "qwen25_json"
    QWEN2_TOKENS = "qwen2_tokens"
    BRACKET_999 = "bracket_999"
    BRACKET_FLOAT = "bracket_float"


Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Mention:
    """A phrase of a description and, when the model gave one, its box in pixels of the model's frame.

    ``span`` is the character span of the box markup in the text (``[...]``, the ``bbox_2d`` array,
    or ``<|box_start|>...<|box_end|>``; inside Shikra's ``[a,b,c,d;e,f,g,h]`` just the four numbers),
    which is what :func:`replace_boxes` rewrites. It is ``None`` when there is no box.
    """

    phrase: str
    box: Box | None = None
    span: Span | None = None


@dataclass(frozen=True, slots=True)
class ParseResult:
    mentions: list[Mention]
    warnings: list[str]

    @property
    def boxes(self) -> list[Box]:
        return [m.box for m in self.mentions if m.box is not None]


# --- native coordinates ---------------------------------------------------------------------------

#: Placeholders that processors expand into image or video features (LLaVA, Qwen-VL). Never part of a
#: valid answer: a text that carries one, written by a model producing garbage, would be counted as an
#: image by the processor and break any training example it became.
MEDIA_PLACEHOLDERS = (
    "<image>",
    "<video>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
)


def strip_media_placeholders(text: str) -> str:
    """``text`` without any of :data:`MEDIA_PLACEHOLDERS`."""
    for placeholder in MEDIA_PLACEHOLDERS:
        text = text.replace(placeholder, "")
    return text


_FLOAT_DECIMALS = 3  # Shikra writes three decimals; one "bin" of BRACKET_FLOAT is 0.001 of the frame


Numbers = tuple[str, str, str, str]


def _encode(box: Box, fmt: CoordinateFormat, frame_w: float, frame_h: float) -> Numbers:
    """The four numbers a model of this format would write for ``box`` (pixels of its frame)."""
    if fmt is CoordinateFormat.QWEN25_JSON:
        x1, y1, x2, y2 = (str(round(v)) for v in box.as_tuple())
    elif fmt is CoordinateFormat.BRACKET_FLOAT:
        x1, y1, x2, y2 = (f"{v:.{_FLOAT_DECIMALS}f}" for v in to_normalized(box, frame_w, frame_h))
    else:
        x1, y1, x2, y2 = (str(v) for v in to_bins(box, frame_w, frame_h, _bins(fmt)))
    return (x1, y1, x2, y2)


def _decode(values: Coords, fmt: CoordinateFormat, frame_w: float, frame_h: float) -> Box:
    """Native numbers -> frame pixels, unchecked (may be inverted, outside, or non-finite)."""
    if fmt is CoordinateFormat.QWEN25_JSON:
        return Box(*values)
    if fmt is CoordinateFormat.BRACKET_FLOAT:
        return from_normalized(values, frame_w, frame_h)
    return from_bins(values, frame_w, frame_h, _bins(fmt))


def _bins(fmt: CoordinateFormat) -> int:
    return BINS_QWEN2 if fmt is CoordinateFormat.QWEN2_TOKENS else BINS_FERRET


def _wrap(numbers: Numbers, fmt: CoordinateFormat) -> str:
    if fmt is CoordinateFormat.QWEN2_TOKENS:
        x1, y1, x2, y2 = numbers
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    return "[" + ", ".join(numbers) + "]"


def render_box(box: Box, fmt: CoordinateFormat, frame_w: float, frame_h: float) -> str:
    """Box markup in the model's native format, e.g. ``[120, 33, 480, 610]`` for BRACKET_999."""
    return _wrap(_encode(box, fmt, frame_w, frame_h), fmt)


@dataclass(frozen=True, slots=True)
class NativeBox:
    """A box as a model of one format writes it: the numbers of its markup and the box (frame
    pixels, on the format's grid) that :func:`parse` reads back from them."""

    numbers: Numbers
    box: Box


def to_native(box: Box, fmt: CoordinateFormat, frame_w: float, frame_h: float) -> NativeBox | None:
    """How ``box`` is written in ``fmt``; None when it vanishes on the format's grid (parse drops it)."""
    numbers = _encode(box, fmt, frame_w, frame_h)
    x1, y1, x2, y2 = (float(v) for v in numbers)
    read_back, _ = sanitize_box(
        *_decode((x1, y1, x2, y2), fmt, frame_w, frame_h).as_tuple(), frame_w, frame_h
    )
    return None if read_back is None else NativeBox(numbers, read_back)


def to_native_grid(
    boxes: FloatArray, fmt: CoordinateFormat, sizes: FloatArray
) -> tuple[FloatArray, FloatArray] | None:
    """:func:`to_native` of many boxes before its check: the numbers written for each row of ``boxes``
    (``(n, 4)`` frame pixels; ``sizes`` ``(n, 4)`` holds each row's frame width, height, width, height)
    and the boxes read back from them, both as floats, bit for bit what the scalar path computes.

    None for BRACKET_FLOAT, whose numbers are decimal strings (formatting rounds differently). The read
    back boxes still need :func:`~services.core.boxes.sanitize_box`.
    """
    if fmt is CoordinateFormat.BRACKET_FLOAT:
        return None
    if fmt is CoordinateFormat.QWEN25_JSON:
        pixels: FloatArray = np.rint(boxes)  # round(v): half to even, as Python's round
        return pixels, pixels
    bins = _bins(fmt)
    numbers: FloatArray = np.rint(boxes * bins / sizes)  # to_bins: v * B / size, then round
    read_back: FloatArray = numbers * sizes / bins  # from_bins: bin * size / B
    return numbers, read_back


def quantize(box: Box, fmt: CoordinateFormat, frame_w: float, frame_h: float) -> Box | None:
    """The box that ``parse(render_box(box))`` yields: rounded to the format's grid and sanitized."""
    native = to_native(box, fmt, frame_w, frame_h)
    return None if native is None else native.box


def _to_coords(fields: Sequence[str]) -> Coords | None:
    """Four numbers (NaN/inf allowed: sanitize_box reports them) or None."""
    return _four([_to_float(f) for f in fields])


def _four(values: Sequence[float | None]) -> Coords | None:
    if len(values) != 4:
        return None
    x1, y1, x2, y2 = values
    if x1 is None or y1 is None or x2 is None or y2 is None:
        return None
    return (x1, y1, x2, y2)


def _to_float(field: str) -> float | None:
    try:
        return float(field)
    except ValueError:
        return None


# --- phrases --------------------------------------------------------------------------------------

# The bracket formats put the box right after its noun phrase ("a man [..] riding a bike [..]"), so
# the phrase is the run of words before the box, cut at punctuation, an article or a linking word.
_ARTICLES = frozenset(
    {"a", "an", "the", "this", "that", "these", "those", "its", "their", "his", "her", "another", "some"}
)
_LINKING_WORDS = frozenset(
    {
        *("is", "are", "was", "were", "be", "been", "being", "has", "have", "had"),
        *("with", "and", "or", "but", "on", "in", "at", "near", "under", "above", "below", "behind"),
        *("beside", "next", "to", "by", "from", "into", "onto", "over", "there", "which", "who"),
        *("while", "where", "see", "sees", "shows", "showing", "contains", "containing", "including"),
    }
)
_PHRASE_STOP_WORDS = _ARTICLES | _LINKING_WORDS
_PHRASE_LOOKBACK_CHARS = 200
_MAX_PHRASE_WORDS = 6
_CLAUSE_BOUNDARY = re.compile(r"[.!?;:,()\[\]{}<>|\"\n]")
# Between two boxes of one phrase ("dogs [..], [..]", "[[..];[..]]", "dogs [..] and [..]").
_SAME_PHRASE_GAP = re.compile(r"[\s,;\[\]]*(?:(?:and|or)[\s,;\[\]]*)?", re.IGNORECASE)


def _noun_phrase_before(text: str, start: int, floor: int) -> str:
    segment = text[max(floor, start - _PHRASE_LOOKBACK_CHARS) : start]
    # "dogs [[..];[..]]" (CogVLM) and "cat [a,b,c,d;..." (Shikra): look past the opening brackets.
    clause = _CLAUSE_BOUNDARY.split(segment.rstrip("[ \t"))[-1]
    picked: list[str] = []
    for word in reversed(clause.split()):
        if word.lower().strip("*_'") in _PHRASE_STOP_WORDS or len(picked) == _MAX_PHRASE_WORDS:
            break
        picked.append(word)
    return " ".join(reversed(picked)).strip("*_' ")


# --- collecting mentions --------------------------------------------------------------------------


class _Collector:
    """Accumulates mentions and warnings for one parse; owns box repair and phrase inheritance."""

    def __init__(self, text: str, fmt: CoordinateFormat, frame_w: float, frame_h: float) -> None:
        self.text, self.fmt, self.frame_w, self.frame_h = text, fmt, frame_w, frame_h
        self.mentions: list[Mention] = []
        self.warnings: list[str] = []
        self._previous_box: tuple[int, str] | None = None  # (end of its markup, its phrase)

    def add_phrase(self, phrase: str) -> None:
        if phrase:
            self.mentions.append(Mention(phrase))

    def add_box(self, values: Coords | None, span: Span, phrase: str | None) -> None:
        """Add the box written at ``span`` (None: not four numbers); ``phrase=None``: find it before."""
        if phrase is None:
            phrase = self._phrase_before(span[0])
        self._previous_box = (span[1], phrase)
        if values is None:
            self.warn(span, "dropped: not four numbers")
            self.add_phrase(phrase)
            return
        raw = _decode(values, self.fmt, self.frame_w, self.frame_h)
        box, reason = sanitize_box(*raw.as_tuple(), self.frame_w, self.frame_h)
        if reason:
            self.warn(span, reason)
        if box is None:
            self.add_phrase(phrase)
        else:
            self.mentions.append(Mention(phrase, box, span))

    def warn(self, span: Span, reason: str) -> None:
        markup = self.text[span[0] : span[1]]
        shown = markup if len(markup) <= 80 else markup[:77] + "..."
        self.warnings.append(f"box {shown!r} at {span[0]}: {reason}")

    def _phrase_before(self, start: int) -> str:
        if self._previous_box is not None:
            previous_end, previous_phrase = self._previous_box
            if _SAME_PHRASE_GAP.fullmatch(self.text, previous_end, start):
                return previous_phrase
            return _noun_phrase_before(self.text, start, previous_end)
        return _noun_phrase_before(self.text, start, 0)

    def result(self) -> ParseResult:
        return ParseResult(self.mentions, self.warnings)


# --- the three grammars ---------------------------------------------------------------------------

_INNERMOST_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def _parse_brackets(out: _Collector) -> None:
    """``phrase [x1, y1, x2, y2]``; ``[a,b,c,d;e,f,g,h]`` holds several boxes (Shikra)."""
    for match in _INNERMOST_BRACKETS.finditer(out.text):
        groups = match.group(1).split(";")
        if len(groups) == 1:
            _add_bracket_group(out, groups[0], match.span())
            continue
        offset = match.start(1)
        for group in groups:
            stripped = group.strip()
            start = offset + group.find(stripped) if stripped else offset
            _add_bracket_group(out, group, (start, start + len(stripped)))
            offset += len(group) + 1


def _add_bracket_group(out: _Collector, group: str, span: Span) -> None:
    fields = group.split(",")
    values = [_to_float(f) for f in fields]
    numeric = all(v is not None for v in values)  # an empty group is one empty field: not numeric
    if len(fields) == 4 and (numeric or any(c.isdigit() for c in group)):
        out.add_box(_four(values), span, None)
    elif numeric:
        out.warn(span, f"dropped: {len(fields)} numbers, expected 4")
    # anything else is ordinary bracketed prose ("[sic]", "[citation needed]")


_QWEN2_MARKUP = re.compile(
    r"<\|object_ref_start\|>(?P<phrase>[^<]*)<\|object_ref_end\|>|<\|box_start\|>(?P<box>[^<]*)<\|box_end\|>"
)
_QWEN2_BOX_SEPARATORS = re.compile(r"[(),\s]+")


def _parse_qwen2_tokens(out: _Collector) -> None:
    """Refs and boxes in order; a ref directly followed by a box names it, a lone ref is a phrase."""
    pending_ref: tuple[str, int] | None = None  # (phrase, end of its markup)
    boxes_seen = 0
    for match in _QWEN2_MARKUP.finditer(out.text):
        if match.group("phrase") is not None:
            if pending_ref is not None:
                out.add_phrase(pending_ref[0])
            pending_ref = (match.group("phrase").strip(), match.end())
            continue
        boxes_seen += 1
        phrase: str | None = None
        if pending_ref is not None:
            if out.text[pending_ref[1] : match.start()].strip() == "":
                phrase = pending_ref[0]
            else:
                out.add_phrase(pending_ref[0])
            pending_ref = None
        fields = [f for f in _QWEN2_BOX_SEPARATORS.split(match.group("box")) if f]
        out.add_box(_to_coords(fields), match.span(), phrase)
    if pending_ref is not None:
        out.add_phrase(pending_ref[0])
    unterminated = out.text.count("<|box_start|>") - boxes_seen
    if unterminated > 0:
        out.warnings.append(f"{unterminated} <|box_start|> without a well-formed <|box_end|> ignored")


# A JSON object without nested objects; strings may hold braces. Qwen2.5-VL's items are such objects,
# wherever they sit (a list, a fenced block, prose around it, a truncated list).
_FLAT_JSON_OBJECT = re.compile(r"""\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\}""")
_BBOX_2D = re.compile(r'"bbox_2d"\s*:\s*(\[[^\[\]{}]*\])')
_LABEL = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _parse_qwen25_json(out: _Collector) -> None:
    for match in _FLAT_JSON_OBJECT.finditer(out.text):
        item = match.group()
        label_match = _LABEL.search(item)
        label = _json_string(label_match.group(1)).strip() if label_match else ""
        bbox = _BBOX_2D.search(item)
        if bbox is not None:
            start = match.start() + bbox.start(1)
            values = _to_coords(bbox.group(1)[1:-1].split(","))
            out.add_box(values, (start, start + len(bbox.group(1))), label)
        elif '"bbox_2d"' in item:
            out.warnings.append(f"object at {match.start()}: bbox_2d is not a flat list, box dropped")
            out.add_phrase(label)
        else:
            out.add_phrase(label)


def _json_string(raw: str) -> str:
    """Decode a JSON string body; fall back to the raw text when it is not valid JSON or not UTF-8."""
    try:
        decoded = json.loads(f'"{raw}"')
        decoded.encode("utf-8")  # a lone surrogate escape would break protobuf later
    except (ValueError, UnicodeEncodeError):
        return raw
    return str(decoded)


_GRAMMARS = {
    CoordinateFormat.QWEN25_JSON: _parse_qwen25_json,
    CoordinateFormat.QWEN2_TOKENS: _parse_qwen2_tokens,
    CoordinateFormat.BRACKET_999: _parse_brackets,
    CoordinateFormat.BRACKET_FLOAT: _parse_brackets,
}


# --- public API -----------------------------------------------------------------------------------


def parse(text: str, fmt: CoordinateFormat, frame_w: float, frame_h: float) -> ParseResult:
    """Mentions of a description, boxes in pixels of the ``frame_w x frame_h`` frame the model saw.

    Never raises on any text: malformed boxes are repaired or dropped, each with a warning.
    """
    out = _Collector(text, fmt, frame_w, frame_h)
    _GRAMMARS[fmt](out)
    return out.result()


def render(mentions: Sequence[Mention], fmt: CoordinateFormat, frame_w: float, frame_h: float) -> str:
    """A description in the native format such that ``parse`` gives the boxes back within one bin.

    Bracket formats lose mentions without a box (plain words are not mentions there), and their
    phrases come back without a leading article, as :func:`parse` reads noun phrases.
    """
    if fmt is CoordinateFormat.QWEN25_JSON:
        items = []
        for m in mentions:
            label = json.dumps(m.phrase, ensure_ascii=False)
            box = "" if m.box is None else f'"bbox_2d": {render_box(m.box, fmt, frame_w, frame_h)}, '
            items.append(f'  {{{box}"label": {label}}}')
        return "```json\n[\n" + ",\n".join(items) + "\n]\n```"
    if fmt is CoordinateFormat.QWEN2_TOKENS:
        parts = [
            f"<|object_ref_start|>{m.phrase}<|object_ref_end|>"
            + ("" if m.box is None else render_box(m.box, fmt, frame_w, frame_h))
            for m in mentions
        ]
        return ", ".join(parts)
    parts = [
        f"{m.phrase} {render_box(m.box, fmt, frame_w, frame_h)}".strip()
        for m in mentions
        if m.box is not None
    ]
    return ", ".join(parts) + "."


def replace_boxes(
    text: str,
    replacements: Sequence[tuple[Span, Box]],
    fmt: CoordinateFormat,
    frame_w: float,
    frame_h: float,
) -> str:
    """Rewrite the box markup at each span with the new box (frame pixels); the rest of the text stays.

    Spans are mention spans from :func:`parse` of this text; they must not overlap.
    """
    edits = sorted((span, _encode(box, fmt, frame_w, frame_h)) for span, box in replacements)
    return _splice(text, edits, fmt)[0]


def rewrite_mentions(
    text: str,
    mentions: Sequence[Mention],
    new_boxes: Mapping[int, NativeBox],
    fmt: CoordinateFormat,
) -> tuple[str, list[Mention]]:
    """Write new boxes (keyed by mention index; see :func:`to_native`) into those mentions' markup.

    Returns the new text and its mentions exactly as :func:`parse` would read them: the new boxes,
    every later span moved. Mentions without markup cannot take a box and are left alone.
    """
    in_text_order = sorted((m.span, i) for i, m in enumerate(mentions) if m.span is not None)
    edits = [(span, new_boxes[i].numbers) for span, i in in_text_order if i in new_boxes]
    new_text, new_spans = _splice(text, edits, fmt)
    moved = list(mentions)
    shift, replaced = 0, iter(new_spans)
    for (start, end), i in in_text_order:
        if i in new_boxes:
            new_span = next(replaced)
            moved[i] = Mention(mentions[i].phrase, new_boxes[i].box, new_span)
            shift = new_span[1] - end
        elif shift:
            moved[i] = Mention(mentions[i].phrase, mentions[i].box, (start + shift, end + shift))
    return new_text, moved


def rewrite_spans(text: str, edits: Sequence[tuple[Span, NativeBox]], fmt: CoordinateFormat) -> str:
    """The text of :func:`rewrite_mentions` given just the spans of the mentions that take a new box
    (their mentions are not rebuilt)."""
    return _splice(text, sorted((span, native.numbers) for span, native in edits), fmt)[0]


def _splice(
    text: str, edits: Sequence[tuple[Span, Numbers]], fmt: CoordinateFormat
) -> tuple[str, list[Span]]:
    """Write each edit's numbers over its span (edits in text order); return the text and new spans."""
    pieces: list[str] = []
    new_spans: list[Span] = []
    cursor = length = 0
    for (start, end), numbers in edits:
        if start < cursor or end > len(text) or start > end:
            raise ValueError(f"span {(start, end)} overlaps another or lies outside the text")
        # Shikra's multi-box brackets have no per-box brackets: keep the markup's shape.
        bracketed = text.startswith(("[", "<|box_start|>"), start, end)
        markup = _wrap(numbers, fmt) if bracketed else ", ".join(numbers)
        pieces += [text[cursor:start], markup]
        length += start - cursor
        new_spans.append((length, length + len(markup)))
        length += len(markup)
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces), new_spans


def mentions_to_image(
    mentions: Sequence[Mention], crop: Box | None, frame_w: float, frame_h: float
) -> list[Mention]:
    """Mentions with boxes moved from the model's frame to full-image pixels (proto ``Mention``)."""
    return [
        m if m.box is None else replace(m, box=frame_to_image(m.box, crop, frame_w, frame_h))
        for m in mentions
    ]


def mention_boxes_in_image(
    mentions: Sequence[Mention], crop: Box | None, frame_w: float, frame_h: float
) -> FloatArray:
    """``(k, 4)`` full-image pixel array of the mentions' boxes: the MLLM's own part of P for S_loc."""
    boxes = boxes_to_array(m.box for m in mentions if m.box is not None)
    return frame_to_image_array(boxes, crop, frame_w, frame_h)
