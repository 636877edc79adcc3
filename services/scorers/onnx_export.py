"""``spr-export-onnx``: export a grounding model or a CLIP/SigLIP dual encoder to ONNX, check parity.

    spr-export-onnx MODEL_DIR OUT_DIR            # model type decides: grounding-dino, owlv2, clip, siglip
    spr-export-onnx MODEL_DIR OUT_DIR --opset 20 --tolerance 1e-3

The output folder holds the graph(s), the processor files and ``manifest.json`` (family, graphs, fixed
shapes, special tokens, source): what the ``onnx`` backends of both scorers load. After exporting, the
same inputs go through PyTorch and onnxruntime and the max abs difference of every output is printed;
the command fails (exit 1) when it is above the tolerance.

Export notes (why the graphs look the way they do):

* the TorchScript exporter is used (``dynamo=False``): the dynamo one needs onnxscript, absent here;
* Grounding DINO's text masks come in as inputs (:class:`DinoExportModule`), and its deformable
  attention traces its sampling grid as float64, which onnxruntime's GridSample rejects, so a Cast to
  float32 is inserted in front of every GridSample grid;
* shapes are fixed (the scorers pad and chunk to them), except the text batch of dual encoders and
  the text length of Grounding DINO and CLIP, which the scorers pad only as far as the longest text
  needs (``text_padding: longest`` in the manifest; parity is checked at a second length).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from transformers import PreTrainedModel, ProcessorMixin

from services.modelzoo.loading import load_clip, load_grounding_model
from services.scorers.localization import backends as grounding
from services.scorers.onnx_runtime import MANIFEST, Arrays, OnnxRunner, TorchRunner
from services.scorers.semantic import backends as semantic

DEFAULT_OPSET = 20
DEFAULT_TOLERANCE = 1e-3
DEFAULT_INT8_TOLERANCE = 0.25  # raw logits/embeddings; scores are compared in the tests


@dataclass(frozen=True)
class Parity:
    """Max abs difference between PyTorch and onnxruntime for one output of one graph."""

    graph: str
    output: int
    max_abs_diff: float
    int8: bool = False  # a dynamically quantized graph: judged against the int8 tolerance


def export_graph(
    module: torch.nn.Module,
    feed: Arrays,
    input_names: Sequence[str],
    output_names: Sequence[str],
    path: Path,
    opset: int,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> None:
    """Trace ``module`` on ``feed`` and write an onnxruntime-loadable graph to ``path``."""
    args = tuple(torch.from_numpy(feed[name]) for name in input_names)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on fixed shapes
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            dynamic_axes=dynamic_axes,
            dynamo=False,
        )
    _cast_grid_sample_grids(path)


def _cast_grid_sample_grids(path: Path) -> None:
    """Insert ``Cast(to=float)`` before each GridSample grid (see the module docstring)."""
    model = onnx.load(str(path))
    nodes: list[Any] = []
    changed = False
    for node in model.graph.node:
        if node.op_type == "GridSample":
            cast_output = node.input[1] + "_as_float"
            nodes.append(helper.make_node("Cast", [node.input[1]], [cast_output], to=TensorProto.FLOAT))
            node.input[1] = cast_output
            changed = True
        nodes.append(node)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(path))


def parity(
    graph: str, torch_runner: TorchRunner, onnx_runner: OnnxRunner, feed: Arrays, int8: bool = False
) -> list[Parity]:
    """Run both engines on ``feed``; max abs difference per output."""
    expected, got = torch_runner(feed), onnx_runner(feed)
    pairs = enumerate(zip(expected, got, strict=True))
    return [Parity(graph, i, max_abs_diff(e, g), int8) for i, (e, g) in pairs]


#: Parity checks of an export: graph role, the PyTorch runner of that graph, the feed to compare on.
Checks = list[tuple[str, TorchRunner, Arrays]]


def quantize_graphs(out: Path, graphs: dict[str, str]) -> dict[str, str]:
    """Write a dynamically quantized copy (int8 weights of MatMul/Gemm) of every graph; their names."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = {role: name.removesuffix(".onnx") + ".int8.onnx" for role, name in graphs.items()}
    for role, name in graphs.items():
        quantize_dynamic(
            out / name,
            out / quantized[role],
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    return quantized


def finish_export(
    out: Path, graphs: dict[str, str], manifest: dict[str, Any], checks: Checks, int8: bool
) -> list[Parity]:
    """Quantize (if asked), write the manifest, then compare every graph with PyTorch."""
    quantized = quantize_graphs(out, graphs) if int8 else {}
    _write_manifest(out, {**manifest, "graphs": graphs, **({"graphs_int8": quantized} if int8 else {})})
    report = [
        p for role, runner, feed in checks for p in parity(role, runner, OnnxRunner(out / graphs[role]), feed)
    ]
    for role, runner, feed in checks if int8 else []:
        report += parity(f"{role}.int8", runner, OnnxRunner(out / quantized[role]), feed, int8=True)
    return report


def max_abs_diff(expected: np.ndarray[Any, Any], got: np.ndarray[Any, Any]) -> float:
    """Max abs difference; equal entries count 0 even when infinite (DINO masks padded text with -inf)."""
    if expected.shape != got.shape:
        return float("inf")
    with np.errstate(invalid="ignore"):
        diff = np.where(expected == got, 0.0, np.abs(expected.astype(np.float64) - got))
    return float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0


# --- grounding models -----------------------------------------------------------------------------


SAMPLE_PHRASES = ("red circle", "blue square", "a person on a bike")
#: Phrases for DINO's second parity check: a text width other than the traced one.
LONGER_PHRASES = (*SAMPLE_PHRASES, "a small green striped triangle", "the dog behind the fence", "two cups")
DINO_TEXT_AXES = {
    **{name: {1: "text"} for name in ("input_ids", "token_type_ids", "attention_mask", "position_ids")},
    "text_self_attention_masks": {1: "text", 2: "text"},
}


def grounding_sample_feed(
    family: str, grounder: grounding.Grounder, phrases: Sequence[str] = SAMPLE_PHRASES
) -> Arrays:
    """A representative input (a random image, a few phrases)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    if isinstance(grounder, grounding.DinoGrounder):
        feed, _ = grounder._text_inputs(phrases)
        feed["pixel_values"] = grounder.pixels([image], grounder.image_size)
        feed["pixel_mask"] = np.ones((1, grounder.image_size, grounder.image_size), dtype=np.int64)
        return feed
    assert isinstance(grounder, grounding.OwlGrounder)
    pixels = grounder.pixels([image], grounder.image_size)
    return {**grounder.text_inputs(phrases[:2]), "pixel_values": pixels}


def export_grounding(
    model: PreTrainedModel, processor: ProcessorMixin, out: Path, opset: int, source: str, int8: bool = False
) -> list[Parity]:
    """Export a Grounding DINO / OWLv2 model to ``out/model.onnx``; parity of its two outputs."""
    family = grounding.family_of(model)
    module, names = grounding.torch_module(family, model)
    shapes = grounding.default_shapes(family, model, processor)
    special = grounding._special_tokens(model)
    torch_runner = TorchRunner(module, names)
    grounder = grounding.build_grounder(
        family, torch_runner, processor, shapes, special, family, grounding.GroundingOptions()
    )
    feed = grounding_sample_feed(family, grounder)
    dino = isinstance(grounder, grounding.DinoGrounder)
    axes = DINO_TEXT_AXES if dino else None
    export_graph(module, feed, names, ("logits", "pred_boxes"), out / "model.onnx", opset, axes)
    processor.save_pretrained(str(out))
    padding = "longest" if dino else "max_length"
    manifest = {**_manifest(family, shapes, source, special), "text_padding": padding}
    checks: Checks = [("model", torch_runner, feed)]
    if dino:
        longer = grounding_sample_feed(family, grounder, LONGER_PHRASES)
        assert longer["input_ids"].shape != feed["input_ids"].shape, "parity needs a second text width"
        checks.append(("model", torch_runner, longer))
    return finish_export(out, {"model": "model.onnx"}, manifest, checks, int8)


# --- dual encoders --------------------------------------------------------------------------------


def export_dual_encoder(
    model: PreTrainedModel, processor: ProcessorMixin, out: Path, opset: int, source: str, int8: bool = False
) -> list[Parity]:
    """Export the vision and text towers of CLIP / SigLIP; parity of every output."""
    from PIL import Image

    family = semantic.family_of(model)
    shapes = semantic.default_shapes(model, processor)
    vision = TorchRunner(semantic.VisionTower(model), semantic.VISION_INPUTS)
    text = TorchRunner(semantic.TextTower(model), semantic.TEXT_INPUTS)
    longest = semantic.pads_to_longest(family)
    encoder = semantic.DualEncoder(vision, text, processor, name=family, pad_to_longest=longest, **shapes)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    captured: dict[str, Arrays] = {}
    encoder.vision = _Capture(vision, "vision", captured)
    encoder.text = _Capture(text, "text", captured)
    encoder.encode_region(image, (10, 20, 90, 80))
    encoder.encode_texts(["a red circle.", "two people ride bikes on a street"])
    export_graph(
        vision.module,
        captured["vision"],
        semantic.VISION_INPUTS,
        ("image_embeds", "region_embeds"),
        out / "vision.onnx",
        opset,
    )
    # Texts batch on axis 0; CLIP also pads only to the longest text, so its sequence axis is dynamic too.
    text_axes = {0: "batch", 1: "sequence"} if longest else {0: "batch"}
    batch = {"input_ids": text_axes, "attention_mask": text_axes, "text_embeds": {0: "batch"}}
    export_graph(
        text.module, captured["text"], semantic.TEXT_INPUTS, ("text_embeds",), out / "text.onnx", opset, batch
    )
    graphs = {"vision": "vision.onnx", "text": "text.onnx"}
    processor.save_pretrained(str(out))
    # Parity on a text batch of another size than the traced one, so the dynamic axis is checked too.
    more_text = encoder.text_feed(["one", "a second, longer sentence with a few more words", "third."])
    checks: Checks = [("vision", vision, captured["vision"]), ("text", text, more_text)]
    manifest = {
        **_manifest(family, shapes, source, []),
        "text_padding": "longest" if longest else "max_length",
    }
    return finish_export(out, graphs, manifest, checks, int8)


class _Capture:
    """A runner that records its first feed: the exact preprocessed inputs to trace the towers on."""

    def __init__(self, runner: TorchRunner, key: str, store: dict[str, Arrays]) -> None:
        self.runner, self.key, self.store = runner, key, store

    def __call__(self, feed: Arrays) -> list[np.ndarray[Any, np.dtype[np.float32]]]:
        self.store.setdefault(self.key, feed)
        return self.runner(feed)


# --- command --------------------------------------------------------------------------------------


def _manifest(
    family: str, shapes: dict[str, int], source: str, special_tokens: Sequence[int]
) -> dict[str, Any]:
    return {
        "family": family,
        "shapes": shapes,
        "special_tokens": list(special_tokens),
        "source": source,
        "torch": torch.__version__,
    }


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def export(
    model_path: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, int8: bool = False
) -> list[Parity]:
    """Export whatever ``model_path`` holds (grounding model or dual encoder) into ``out``; with
    ``int8``, also dynamically quantized graphs (``graphs_int8`` in the manifest)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{model_path} is not a transformers checkpoint folder (no config.json)")
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    exportable = (*grounding.FAMILIES, *semantic.FAMILIES)
    if model_type not in exportable:
        raise ValueError(
            f"{model_path} holds a {model_type!r} model; spr-export-onnx exports {', '.join(exportable)}"
        )
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    if model_type in semantic.FAMILIES:
        model, processor = load_clip(model_path)
        return export_dual_encoder(model, processor, target, opset, str(model_path), int8)
    model, processor = load_grounding_model(model_path)
    return export_grounding(model, processor, target, opset, str(model_path), int8)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``spr-export-onnx``)."""
    parser = argparse.ArgumentParser(prog="spr-export-onnx", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="transformers checkpoint folder (Grounding DINO, OWLv2, CLIP, SigLIP)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--int8", action="store_true", help="also write dynamically quantized int8 graphs")
    parser.add_argument(
        "--int8-tolerance",
        type=float,
        default=DEFAULT_INT8_TOLERANCE,
        help="max abs diff allowed for the int8 graphs (weights are rounded to 8 bits)",
    )
    args = parser.parse_args(argv)
    try:
        results = export(args.model, args.out, args.opset, args.int8)
    except (FileNotFoundError, ValueError) as error:  # not a checkpoint, or one of another kind
        print(f"spr-export-onnx: error: {error}", file=sys.stderr)
        return 2
    failed = False
    for r in results:
        limit = args.int8_tolerance if r.int8 else args.tolerance
        failed |= r.max_abs_diff > limit
        print(f"parity {r.graph}[{r.output}]: max abs diff {r.max_abs_diff:.3g} (tolerance {limit})")
    worst = max(r.max_abs_diff for r in results if not r.int8)
    verdict = "FAILED" if failed else "OK"
    print(f"{verdict}: max abs diff {worst:.3g} (tolerance {args.tolerance})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
