"""The REC instruction of each coordinate format: what the evaluator asks and the bootstrap teaches.

Wording follows each family's released grounding prompts (Qwen2.5-VL asks for JSON `bbox_2d`, Qwen2-VL
wraps the phrase in `<|object_ref_start|>`, Ferret/Shikra ask for `[x1, y1, x2, y2]`).
"""

from __future__ import annotations

from services.core.formats import CoordinateFormat

REC_TEMPLATES: dict[CoordinateFormat, str] = {
    CoordinateFormat.QWEN25_JSON: (
        'Locate {expression} in the image and output its bbox coordinates in JSON format, as {{"bbox_2d": '
        '[x1, y1, x2, y2], "label": "<object>"}}.'
    ),
    CoordinateFormat.QWEN2_TOKENS: (
        "Find <|object_ref_start|>{expression}<|object_ref_end|> and give its bounding box."
    ),
    CoordinateFormat.BRACKET_999: "Where is {expression}? Answer with its coordinates as [x1, y1, x2, y2].",
    CoordinateFormat.BRACKET_FLOAT: "Where is {expression}? Answer with its coordinates as [x1, y1, x2, y2].",
}


def rec_instruction(expression: str, fmt: CoordinateFormat) -> str:
    """The instruction asking a model of format `fmt` for the box of `expression`."""
    return REC_TEMPLATES[fmt].format(expression=expression.strip())
