"""Small tokenizers built locally (no hub access) for the tiny models of `services.modelzoo.tiny`.

Each tokenizer uses the real model family's pipeline and covers what SPR puts through it: descriptions
(colours, shapes, sizes, spatial words, COCO categories) and every coordinate format (Qwen2.5-VL JSON
`bbox_2d`, Qwen2-VL `(x1,y1),(x2,y2)`, `[x1, y1, x2, y2]`, floats 0-1).

- Qwen2 byte-level BPE and CLIP BPE (`</w>` word ends): merges learnt on a small generated corpus;
- Llama SentencePiece-style BPE with byte fallback (LLaVA-1.5): merges learnt on the same corpus;
- BERT WordPiece (Grounding DINO) and SigLIP SentencePiece unigram: assembled from the word list.

Everything here is deterministic: the corpus comes from a fixed seed, BPE merges are learnt by a small
trainer with a fixed tie-break, and vocabularies are numbered in a canonical order.
"""

from __future__ import annotations

import heapq
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from transformers import BertTokenizer, CLIPTokenizer, LlamaTokenizer, Qwen2Tokenizer, SiglipTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

CORPUS_SEED = 20250612


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


COLORS = _words("red orange yellow green blue purple pink brown black white gray grey silver gold beige")
SHAPES = _words("circle square rectangle triangle star disk ring box ball cube stripe line dot shape")
SIZES = _words("small large big tiny little medium tall short long wide narrow thin")
SPATIAL = _words(
    "left right top bottom above below under over near next to behind front center middle corner "
    "upper lower side beside between inside outside on in at of far close background foreground"
)
COMMON = _words(
    "the a an there is are was with and it this that image picture photo region area scene shows show "
    "contains containing object objects one two three four five six several some its which has have "
    "describe description locate located output format json coordinates coordinate box boxes bounding "
    "please each every mention mentioned list all visible detail details what where who how sitting "
    "standing holding lying parked walking wearing other another no yes not part whole group pair "
    "full crop cropped first second third sky grass road wall floor water tree trees building street"
)
COCO_CATEGORIES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
# Keys and markers of the coordinate formats, so that they become whole tokens.
FORMAT_WORDS = ("bbox_2d", "label", "x1", "y1", "x2", "y2")

# Qwen2-VL / Qwen2.5-VL control tokens, in the order of the real vocabulary (151643...).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Llama (Vicuna) SentencePiece ids 0-2, as in the released vocabulary; the 256 byte pieces follow them.
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# What llava-hf appends to the Vicuna vocabulary (ids 32000, 32001 there): the image placeholder, padding.
LLAVA_IMAGE_TOKEN, LLAVA_PAD_TOKEN = "<image>", "<pad>"
# Turn markers of the LLaVA-1.5 prompt ("USER: <image>\n... ASSISTANT:"), learnt as whole pieces.
LLAVA_ROLE_WORDS = ("USER", "ASSISTANT")

QWEN_VOCAB_SIZE = 2048
CLIP_VOCAB_SIZE = 2048
LLAMA_VOCAB_SIZE = 2048


def vocabulary_words() -> list[str]:
    """All single words of the description vocabulary, sorted and without duplicates."""
    words = {w for phrase in COCO_CATEGORIES for w in phrase.split()}
    words.update(COLORS, SHAPES, SIZES, SPATIAL, COMMON, FORMAT_WORDS)
    return sorted(words)


def _phrase(rng: random.Random) -> str:
    """An object phrase such as `small red car`."""
    parts = [rng.choice(SIZES)] if rng.random() < 0.3 else []
    if rng.random() < 0.5:
        parts.append(rng.choice(COLORS))
    parts.append(rng.choice(COCO_CATEGORIES) if rng.random() < 0.7 else rng.choice(SHAPES))
    return " ".join(parts)


def _box(rng: random.Random, hi: int) -> tuple[int, int, int, int]:
    x1, y1 = rng.randrange(hi), rng.randrange(hi)
    return x1, y1, rng.randrange(x1, hi + 1), rng.randrange(y1, hi + 1)


def coordinate_samples(rng: random.Random) -> list[str]:
    """One string per coordinate format (without Qwen control tokens, which are added tokens)."""
    phrase = _phrase(rng)
    x1, y1, x2, y2 = _box(rng, 1000)
    qwen25 = json.dumps([{"bbox_2d": list(_box(rng, 1500)), "label": phrase}])
    qwen2 = f"{phrase} ({x1},{y1}),({x2},{y2})"
    ints = f"A {phrase} [{x1 % 1000}, {y1 % 1000}, {x2 % 1000}, {y2 % 1000}]."
    floats = "[" + ", ".join(f"{v / 1000:.2f}" for v in (x1, y1, x2, y2)) + "]"
    pretty = json.dumps(json.loads(qwen25), indent=2)
    return [qwen25, f"```json\n{pretty}\n```", qwen2, ints, f"The {phrase} at {floats}."]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(COMMON) for _ in range(rng.randrange(2, 6))]
    words += [_phrase(rng), rng.choice(SPATIAL), rng.choice(COMMON), _phrase(rng)]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice((".", ",", "!", "?", ";", ":"))


def corpus(n: int = 600, seed: int = CORPUS_SEED) -> list[str]:
    """A deterministic training corpus: every word in several casings, sentences and coordinate strings.

    The word lists are repeated so that whole words win the merge budget over coordinate fragments.
    """
    rng = random.Random(seed)
    words = vocabulary_words()
    lines = [" ".join(words)] * 20 + [" ".join(w.capitalize() for w in words)] * 10
    lines += ['"' + '" "'.join(words) + '"'] * 5  # labels inside JSON strings
    for _ in range(n):
        lines.append(_sentence(rng))
        lines.extend(coordinate_samples(rng))
    return lines


def _word_counts(pipeline: Tokenizer, lines: Iterable[str], suffix: str) -> Counter[tuple[str, ...]]:
    """Pre-tokenise `lines` through `pipeline` and count each word as a tuple of byte-level symbols."""
    counts: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        text = pipeline.normalizer.normalize_str(line) if pipeline.normalizer else line
        for piece, _ in pipeline.pre_tokenizer.pre_tokenize_str(text):
            symbols = list(piece)
            symbols[-1] += suffix
            counts[tuple(symbols)] += 1
    return counts


def _merge_word(word: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_merges(
    counts: Counter[tuple[str, ...]], max_merges: int, min_frequency: int = 2
) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair, ties broken by the pair itself.

    Written out here rather than using `tokenizers.trainers.BpeTrainer`, whose tie-breaking follows
    hash-map order and so changes from process to process. Pair counts are updated incrementally: only
    the words containing the merged pair are re-counted.
    """
    words = [list(w) for w in counts]
    freq = list(counts.values())
    pair_counts: Counter[tuple[str, str]] = Counter()
    holders: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in pairwise(word):
            pair_counts[pair] += freq[i]
            holders[pair].add(i)
    # Max-heap of (count, pair) with stale entries skipped on pop; among equal counts the smallest pair
    # comes first, so the merge order never depends on hashing.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges and heap:
        negative, best = heapq.heappop(heap)
        if pair_counts.get(best) != -negative:
            continue  # stale: the pair's count changed after this entry was pushed
        if -negative < min_frequency:
            break
        merges.append(best)
        touched: set[tuple[str, str]] = set()
        for i in sorted(holders.pop(best)):
            for pair in pairwise(words[i]):
                pair_counts[pair] -= freq[i]
                touched.add(pair)
            words[i] = _merge_word(words[i], best)
            for pair in pairwise(words[i]):
                pair_counts[pair] += freq[i]
                holders[pair].add(i)
                touched.add(pair)
        for pair in touched - {best}:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]
        pair_counts.pop(best, None)
    return merges


def train_bpe(
    pipeline: Tokenizer,
    lines: Iterable[str],
    vocab_size: int,
    *,
    specials: tuple[str, ...] = (),
    end_of_word_suffix: str = "",
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges on `lines` as seen through `pipeline`'s normaliser and pre-tokeniser.

    The vocabulary is `specials`, the 256 byte symbols (and their suffixed forms), then every merge
    result in merge order, so that any byte sequence stays encodable without an unknown token.
    """
    symbols = list(specials)
    for char in bytes_to_unicode().values():  # type: ignore[no-untyped-call]
        symbols.append(char)
        if end_of_word_suffix:
            symbols.append(char + end_of_word_suffix)
    counts = _word_counts(pipeline, lines, end_of_word_suffix)
    merges = learn_merges(counts, max_merges=vocab_size - len(symbols))
    symbols += [left + right for left, right in merges]
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    return vocab, merges


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer (about 1k tokens) with every Qwen-VL control token.

    The control tokens are added as special tokens, exactly as in the released Qwen2-VL/Qwen2.5-VL
    tokenizers: decoding with `skip_special_tokens=True` drops `<|box_start|>` and friends too.
    """
    vocab, merges = train_bpe(Qwen2Tokenizer().backend_tokenizer, corpus(), QWEN_VOCAB_SIZE)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # annotated list[str]; tokenizers wants pairs
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        errors="replace",
    )
    added = [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS[1:]]
    tokenizer.add_special_tokens({"extra_special_tokens": added})
    # Instruct checkpoints end a turn with <|im_end|>; set after adding it so ids keep the released order.
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def _llama_training_pipeline() -> Tokenizer:
    """How SentencePiece splits text while learning Llama's pieces: `▁` starts each word, and digits and
    punctuation stand alone (Llama's `split_digits`), so no merge crosses a word and numbers such as the
    0-999 bins of `[x1, y1, x2, y2]` stay one token per digit, as with the released tokenizer."""
    pipeline = Tokenizer(BPE())
    pipeline.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(),
        ]
    )
    return pipeline


def llama_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a Llama-style BPE: specials, `<0xNN>` byte pieces, `▁` and printable
    ASCII, then merge results in merge order. Anything else (newlines, non-ASCII) falls back to bytes."""
    base = ["\u2581"] + [chr(c) for c in range(33, 127)]
    lines = corpus() + [" ".join(LLAVA_ROLE_WORDS) + ":"] * 20
    counts = _word_counts(_llama_training_pipeline(), lines, "")
    # A merge may only join pieces of the vocabulary: words with byte-fallback characters learn nothing.
    allowed = set(base)
    counts = Counter({word: n for word, n in counts.items() if allowed.issuperset(word)})
    fixed = [*LLAMA_SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), *base]
    merges = learn_merges(counts, max_merges=LLAMA_VOCAB_SIZE - len(fixed))
    symbols = dict.fromkeys([*fixed, *(left + right for left, right in merges)])
    return {symbol: i for i, symbol in enumerate(symbols)}, merges


def build_llama_tokenizer() -> LlamaTokenizer:
    """A LLaVA-1.5 (Vicuna) tokenizer: Llama BPE with byte fallback, `<s>` prepended to every text, and
    llava-hf's added `<image>` and `<pad>` special tokens; pads on the left, for batched generation."""
    vocab, merges = llama_bpe()
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=4096,
        add_bos_token=True,  # built from a vocabulary it adds no <s> unless asked; the released one does
        padding_side="left",  # only saved (and so only kept by a reload) when passed here
    )
    image = AddedToken(LLAVA_IMAGE_TOKEN, special=True, normalized=False)
    pad = AddedToken(LLAVA_PAD_TOKEN, special=True, normalized=False)
    tokenizer.add_special_tokens({"extra_special_tokens": [image], "pad_token": pad})
    return tokenizer


def build_bert_tokenizer() -> BertTokenizer:
    """A lower-case BERT WordPiece tokenizer: whole words, plus characters and `##` pieces for the rest."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    pieces = ["##" + c for c in chars if c.isalnum()] + ["##_"]
    tokens = specials + chars + pieces + [w for w in vocabulary_words() if w not in chars]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=256)


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer (lower-case, `</w>` word ends) of about 1k tokens; OWLv2 uses 16 positions."""
    specials = ("<|startoftext|>", "<|endoftext|>")
    lines = [line.lower() for line in corpus()]
    vocab, merges = train_bpe(
        CLIPTokenizer().backend_tokenizer,
        lines,
        CLIP_VOCAB_SIZE,
        end_of_word_suffix="</w>",
    )
    # CLIP keeps its two special tokens at the end of the vocabulary.
    for special in specials:
        vocab[special] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # annotated list[str]; tokenizers wants pairs
        model_max_length=model_max_length,
    )


def sentencepiece_unigram_model(words: Iterable[str]) -> bytes:
    """A serialised SentencePiece unigram model: `▁word` and `word` pieces, single characters, bytes.

    Built directly rather than trained: the SentencePiece trainer took 0.2 s here and 43 s on another
    machine (another sentencepiece version), and its output depends on that version. Unigram decoding
    maximises the summed piece scores, so whole words (-1) beat spelling them out from characters (-8),
    and anything else falls back to byte pieces, so no text is unknown.
    """
    # transformers' copy of the generated protobuf module: sentencepiece's own needs protobuf >= 7.
    from transformers.utils import sentencepiece_model_pb2_new

    spm_pb2: Any = sentencepiece_model_pb2_new  # generated code, untyped

    model = spm_pb2.ModelProto()
    kinds = spm_pb2.ModelProto.SentencePiece
    for piece, kind in (("<pad>", kinds.CONTROL), ("</s>", kinds.CONTROL), ("<unk>", kinds.UNKNOWN)):
        model.pieces.add(piece=piece, score=0.0, type=kind)
    for byte in range(256):
        model.pieces.add(piece=f"<0x{byte:02X}>", score=0.0, type=kinds.BYTE)
    chars = ["\u2581"] + [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    pieces = [(c, -8.0) for c in chars] + [(p + w, -1.0) for w in words for p in ("\u2581", "")]
    for piece, score in dict(pieces).items():  # first score wins; keeps the order
        model.pieces.add(piece=piece, score=score, type=kinds.NORMAL)
    spec = model.trainer_spec
    spec.model_type = spec.UNIGRAM
    spec.vocab_size = len(model.pieces)
    spec.byte_fallback = True
    spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = 0, 1, 2, -1
    spec.pad_piece, spec.eos_piece, spec.unk_piece = "<pad>", "</s>", "<unk>"
    spec.split_digits = True
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = True
    normalizer.escape_whitespaces = True
    serialised: bytes = model.SerializeToString()
    return serialised


def build_siglip_tokenizer(workdir: Path) -> SiglipTokenizer:
    """A SigLIP SentencePiece tokenizer; its model file is written to `workdir` (SigLIP loads from a file)."""
    spm_file = workdir / "spiece.model"
    spm_file.write_bytes(sentencepiece_unigram_model(vocabulary_words()))
    return SiglipTokenizer(vocab_file=str(spm_file), model_max_length=64)


def iter_format_examples(n: int, seed: int = 0) -> Iterator[str]:
    """Coordinate-format strings (with Qwen-VL control tokens where the format has them), for checks."""
    rng = random.Random(seed)
    for _ in range(n):
        phrase = _phrase(rng)
        x1, y1, x2, y2 = _box(rng, 1000)
        yield json.dumps([{"bbox_2d": [x1, y1, x2, y2], "label": phrase}], indent=2)
        yield (
            f"<|object_ref_start|>{phrase}<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
        )
        yield f"There is a {phrase} [{x1 % 1000}, {y1 % 1000}, {x2 % 1000}, {y2 % 1000}] on the left."
        yield f"{phrase} at [{x1 / 1000:.3f}, {y1 / 1000:.3f}, {x2 / 1000:.3f}, {y2 / 1000:.3f}]"
