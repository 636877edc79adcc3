from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core import (
    Box,
    CoordinateFormat,
    Mention,
    mentions_to_image,
    parse,
    quantize,
    render,
    render_box,
    replace_boxes,
    rewrite_mentions,
    to_native,
)
from services.core.formats import strip_media_placeholders

from .strategies import FAST, THOROUGH, boxes_in, frame_sizes, one_bin, phrases

F = CoordinateFormat


def spans_text(text: str, mention: Mention) -> str:
    assert mention.span is not None
    return text[mention.span[0] : mention.span[1]]


# --- examples of each grammar ---------------------------------------------------------------------


def test_bracket_999_phrases_boxes_and_spans() -> None:
    text = (
        "In the image, a man wearing a red hat [100, 200, 300, 400] is riding a bike [10,20,30,40]"
        " and [50,60,70,80]."
    )
    result = parse(text, F.BRACKET_999, 999, 999)
    assert [(m.phrase, m.box) for m in result.mentions] == [
        ("red hat", Box(100, 200, 300, 400)),
        ("bike", Box(10, 20, 30, 40)),
        ("bike", Box(50, 60, 70, 80)),  # a second box right after a phrase belongs to it
    ]
    assert [spans_text(text, m) for m in result.mentions] == [
        "[100, 200, 300, 400]",
        "[10,20,30,40]",
        "[50,60,70,80]",
    ]
    assert result.warnings == []


def test_bracket_999_scales_bins_to_the_frame() -> None:
    (mention,) = parse("a cat [0, 0, 999, 499.5]", F.BRACKET_999, 640, 480).mentions
    assert mention.box == Box(0, 0, 640, 240)


def test_bracket_multi_box_forms() -> None:
    cogvlm = "Two dogs [[1,2,3,4];[5,6,7,8]] play."
    result = parse(cogvlm, F.BRACKET_999, 999, 999)
    assert [(m.phrase, m.box) for m in result.mentions] == [
        ("Two dogs", Box(1, 2, 3, 4)),
        ("Two dogs", Box(5, 6, 7, 8)),
    ]
    assert [spans_text(cogvlm, m) for m in result.mentions] == ["[1,2,3,4]", "[5,6,7,8]"]

    shikra = "A cat [0.1,0.2,0.3,0.4; 0.5,0.5,0.6,0.7] sleeps."
    result = parse(shikra, F.BRACKET_FLOAT, 10, 10)
    assert [m.phrase for m in result.mentions] == ["cat", "cat"]
    assert result.mentions[1].box == pytest.approx(Box(5, 5, 6, 7))
    # No per-box brackets here: each span is the four numbers.
    assert [spans_text(shikra, m) for m in result.mentions] == ["0.1,0.2,0.3,0.4", "0.5,0.5,0.6,0.7"]


def test_bracket_prose_is_not_a_box_but_malformed_boxes_warn() -> None:
    text = (
        "It [sic] shows a van [1, 2, 3] and a bus [nan, 1, 2, 3] and a car [9, 9, 1, 1]"
        " and a kite [5, 5, 5, 9]."
    )
    result = parse(text, F.BRACKET_999, 999, 999)
    assert [(m.phrase, m.box) for m in result.mentions] == [
        ("bus", None),  # the phrase stays a mention: the grounding model can still ground it
        ("car", Box(1, 1, 9, 9)),
        ("kite", None),
    ]
    reasons = " | ".join(result.warnings)
    assert "3 numbers, expected 4" in reasons and "non-finite" in reasons
    assert "swapped inverted corners" in reasons and "zero area" in reasons
    assert len(result.warnings) == 4


def test_qwen25_json_in_fences_with_prose_and_label_only_items() -> None:
    text = (
        "Sure! Here are the objects:\n```json\n[\n"
        '  {"bbox_2d": [10, 20, 300, 400], "label": "dog {with braces}"},\n'
        '  {"label": "sky"},\n'
        '  {"bbox_2d": [5, 5, 2000, 5000], "label": "caf\\u00e9"}\n'
        "]\n```\nAnything else?"
    )
    result = parse(text, F.QWEN25_JSON, 640, 480)
    assert [(m.phrase, m.box) for m in result.mentions] == [
        ("dog {with braces}", Box(10, 20, 300, 400)),
        ("sky", None),
        ("café", Box(5, 5, 640, 480)),
    ]
    assert spans_text(text, result.mentions[0]) == "[10, 20, 300, 400]"
    assert len(result.warnings) == 1 and "clipped" in result.warnings[0]


def test_qwen25_json_nested_truncated_and_malformed() -> None:
    text = (
        '{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [[1, 2, 3, 4]], "label": "b"}, '
        '{"bbox_2d": [1, 2], "label": "c"}, {"bbox_2d": [1, 2, 3, 4], "lab'
    )
    result = parse(text, F.QWEN25_JSON, 100, 100)
    assert [(m.phrase, m.box) for m in result.mentions] == [("a", Box(1, 2, 3, 4)), ("b", None), ("c", None)]
    assert len(result.warnings) == 2


def test_qwen2_tokens_refs_lone_boxes_and_lone_refs() -> None:
    text = (
        "<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>"
        "<|box_start|>(1,2),(3,4)<|box_end|> and a lonely cat <|box_start|>(500,500),(600,700)<|box_end|> "
        "under the <|object_ref_start|>sky<|object_ref_end|>. <|box_start|>(1,2"
    )
    result = parse(text, F.QWEN2_TOKENS, 1000, 500)
    assert [(m.phrase, m.box) for m in result.mentions] == [
        ("a dog", Box(10, 10, 300, 200)),
        ("a dog", Box(1, 1, 3, 2)),
        ("lonely cat", Box(500, 250, 600, 350)),
        ("sky", None),
    ]
    assert spans_text(text, result.mentions[0]) == "<|box_start|>(10,20),(300,400)<|box_end|>"
    assert result.warnings == ["1 <|box_start|> without a well-formed <|box_end|> ignored"]


@pytest.mark.parametrize("fmt", list(F))
def test_unparseable_output_is_a_candidate_without_boxes(fmt: CoordinateFormat) -> None:
    assert parse("I cannot see any objects.", fmt, 100, 100).mentions == []


@pytest.mark.parametrize("fmt", list(F))
def test_an_unusable_frame_drops_boxes_with_a_warning(fmt: CoordinateFormat) -> None:
    text = render([Mention("dog", Box(1, 1, 5, 5))], fmt, 10, 10)
    result = parse(text, fmt, 0, 10)
    assert result.boxes == [] and "unusable frame" in result.warnings[0]


def test_render_box_per_format() -> None:
    box = Box(64, 48, 320, 480)
    assert render_box(box, F.QWEN25_JSON, 640, 480) == "[64, 48, 320, 480]"
    assert render_box(box, F.QWEN2_TOKENS, 640, 480) == "<|box_start|>(100,100),(500,1000)<|box_end|>"
    assert render_box(box, F.BRACKET_999, 640, 480) == "[100, 100, 500, 999]"
    assert render_box(box, F.BRACKET_FLOAT, 640, 480) == "[0.100, 0.100, 0.500, 1.000]"


def test_mentions_to_image_undoes_the_crop() -> None:
    mentions = [Mention("dog", Box(0, 0, 400, 200), (0, 5)), Mention("sky")]
    moved = mentions_to_image(mentions, Box(100, 50, 300, 150), 400, 200)
    assert moved == [Mention("dog", Box(100, 50, 300, 150), (0, 5)), Mention("sky")]


# --- round trips ----------------------------------------------------------------------------------


@st.composite
def described_frames(draw: st.DrawFn, fmt: CoordinateFormat) -> tuple[int, int, list[Mention]]:
    frame_w, frame_h = draw(frame_sizes), draw(frame_sizes)
    # Two grid steps per side so that rounding cannot collapse a box.
    min_side = 2 * max(one_bin(fmt, frame_w), one_bin(fmt, frame_h))
    boxes = st.one_of(boxes_in(frame_w, frame_h, min_side=min_side))
    if fmt in (F.QWEN25_JSON, F.QWEN2_TOKENS):  # the only formats with box-less phrases
        boxes = st.one_of(boxes, st.none())
    mentions = draw(st.lists(st.builds(Mention, phrases, boxes), max_size=8))
    return frame_w, frame_h, mentions


@THOROUGH
@given(st.data(), st.sampled_from(list(F)))
def test_parse_of_render_gives_the_boxes_back_within_one_bin(
    data: st.DataObject, fmt: CoordinateFormat
) -> None:
    frame_w, frame_h, mentions = data.draw(described_frames(fmt))
    text = render(mentions, fmt, frame_w, frame_h)
    result = parse(text, fmt, frame_w, frame_h)
    assert result.warnings == []
    assert [m.phrase for m in result.mentions] == [m.phrase for m in mentions]
    tolerance = (one_bin(fmt, frame_w), one_bin(fmt, frame_h)) * 2
    for got, want in zip(result.mentions, mentions, strict=True):
        assert (got.box is None) == (want.box is None)
        if got.box is not None and want.box is not None:
            for g, w, tol in zip(got.box.as_tuple(), want.box.as_tuple(), tolerance, strict=True):
                assert abs(g - w) <= tol + 1e-9
            assert got.box == quantize(want.box, fmt, frame_w, frame_h)


@FAST
@given(st.lists(st.text(min_size=1).map(str.strip).filter(bool), min_size=1, max_size=5))
def test_qwen25_labels_survive_any_characters(labels: list[str]) -> None:
    mentions = [Mention(label, Box(1, 2, 30, 40)) for label in labels]
    result = parse(render(mentions, F.QWEN25_JSON, 100, 100), F.QWEN25_JSON, 100, 100)
    assert [m.phrase for m in result.mentions] == labels


@FAST
@given(st.data(), st.sampled_from(list(F)))
def test_replace_boxes_touches_only_the_box_markup(data: st.DataObject, fmt: CoordinateFormat) -> None:
    frame_w, frame_h, mentions = data.draw(described_frames(fmt))
    text = "Intro. " + render(mentions, fmt, frame_w, frame_h) + " Outro."
    parsed = parse(text, fmt, frame_w, frame_h).mentions
    old_boxes = {m.span: m.box for m in parsed if m.span is not None}
    spans = data.draw(st.lists(st.sampled_from(sorted(old_boxes)), unique=True)) if old_boxes else []
    side = min(frame_w, frame_h) / 10
    replacements = [(span, data.draw(boxes_in(frame_w, frame_h, min_side=side))) for span in spans]
    rewritten = replace_boxes(text, replacements, fmt, frame_w, frame_h)

    new_boxes = {span: quantize(box, fmt, frame_w, frame_h) for span, box in replacements}
    expected_boxes = [new_boxes.get(span, box) for span, box in old_boxes.items()]
    reparsed = parse(rewritten, fmt, frame_w, frame_h).mentions
    assert [m.phrase for m in reparsed] == [m.phrase for m in parsed]
    assert [m.box for m in reparsed if m.span is not None] == expected_boxes
    # Outside the markup nothing moved: strip every box markup and compare what is left.
    assert _without_markup(rewritten, reparsed) == _without_markup(text, parsed)


def _without_markup(text: str, mentions: list[Mention]) -> str:
    kept, cursor = [], 0
    for span in sorted(m.span for m in mentions if m.span is not None):
        kept.append(text[cursor : span[0]])
        cursor = span[1]
    return "\x00".join([*kept, text[cursor:]])


def test_to_native_and_rewrite_mentions() -> None:
    text = "A dog [10, 10, 50, 50] and a cat [100, 100, 200, 200] sleep."
    mentions = parse(text, F.BRACKET_999, 999, 999).mentions
    native = to_native(Box(10.2, 10.4, 60.3, 60.6), F.BRACKET_999, 999, 999)
    assert native is not None and native.numbers == ("10", "10", "60", "61")
    assert native.box == Box(10, 10, 60, 61)
    assert to_native(Box(10.1, 10.1, 10.2, 10.2), F.BRACKET_999, 999, 999) is None  # vanishes on the grid
    new_text, new_mentions = rewrite_mentions(text, mentions, {0: native}, F.BRACKET_999)
    assert new_text == "A dog [10, 10, 60, 61] and a cat [100, 100, 200, 200] sleep."
    assert new_mentions == parse(new_text, F.BRACKET_999, 999, 999).mentions


def test_replace_boxes_rejects_overlapping_spans() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        replace_boxes(
            "[1, 2, 3, 4]", [((0, 12), Box(0, 0, 1, 1)), ((5, 8), Box(0, 0, 1, 1))], F.BRACKET_999, 9, 9
        )


# --- fuzz: parsers never raise --------------------------------------------------------------------

_TOKENS = [
    "[", "]", "{", "}", "(", ")", ",", ";", ":", '"', "\\", " ", "\n", ".", "-", "e",
    "<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    '"bbox_2d"', '"label"', "```json", "nan", "inf", "-Infinity", "1e999", "9" * 400, "0.5",
]  # fmt: skip
_numbers = st.one_of(st.integers(-(10**30), 10**30).map(str), st.floats().map(repr))
_hostile_text = st.lists(
    st.one_of(st.sampled_from(_TOKENS), _numbers, st.text(max_size=12)), max_size=60
).map("".join)


@THOROUGH
@given(_hostile_text, st.sampled_from(list(F)), frame_sizes, frame_sizes)
def test_parsers_never_raise_and_only_return_usable_boxes(
    text: str, fmt: CoordinateFormat, frame_w: int, frame_h: int
) -> None:
    result = parse(text, fmt, frame_w, frame_h)
    assert all(isinstance(w, str) for w in result.warnings)
    spans = []
    for mention in result.mentions:
        if mention.box is None:
            assert mention.span is None
            continue
        box, span = mention.box, mention.span
        assert span is not None and 0 <= span[0] < span[1] <= len(text)
        assert 0 <= box.x1 < box.x2 <= frame_w and 0 <= box.y1 < box.y2 <= frame_h
        spans.append(span)
    # The spans can be rewritten (refinement does exactly this).
    replace_boxes(text, [(s, Box(0, 0, 1, 1)) for s in spans], fmt, frame_w, frame_h)


@pytest.mark.parametrize("fmt", list(F))
@pytest.mark.parametrize(
    "text",
    [
        "[" * 20_000,
        "{" * 20_000 + "}" * 20_000,
        '{"bbox_2d": [' + "9" * 5000 + ", 1, 2, 3]}",
        "<|box_start|>" * 5000,
        "[1e999, -1e999, 0, 1] [" + ",".join(["1"] * 10_000) + "]",
        "a " * 50_000 + "[1, 2, 3, 4]",
        "\x00\ud7ff\ufffd[1,2,3,4]",
    ],
)
def test_parsers_survive_pathological_text(text: str, fmt: CoordinateFormat) -> None:
    parse(text, fmt, 640, 480)


def test_media_placeholders_are_stripped_and_grounding_tokens_kept() -> None:
    grounded = "<|object_ref_start|>a cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    assert strip_media_placeholders(grounded + "<image><|image_pad|>") == grounded
