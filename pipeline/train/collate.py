"""From a chat sample to model inputs whose labels cover only the tokens the model must learn.

The loss is on assistant tokens of messages that are not marked `"train": false` (those are
context, e.g. the wrong first guess in a Dialogue sample). What counts as an assistant token is the
chat template's decision, not ours:

1. the conversation is rendered with the processor's chat template;
2. if the template marks assistant output with {% generation %}, the tokenizer's
   `return_assistant_tokens_mask` gives the assistant tokens; otherwise (Qwen2.5-VL's stock
   template has no such markers) each assistant message's text is found by rendering the
   conversation up to it with and without the message and comparing lengths;
3. each marked token is given to the message it lies in, by rendering every prefix of the
   conversation (a prefix must render as a prefix of the whole, which is checked), and tokens of
   "train": false messages are dropped;
4. the processor expands each image placeholder into its image tokens; the mask is carried over
   the expansion by matching the two token sequences, which must agree outside the image runs.
"""
from __future__ import annotations

import bisect
import io
import math
import re
from typing import Optional

IGNORE_INDEX = -100  # label value the Hugging Face losses skip
# Inputs with one entry per token: padded in a batch. Everything else the processor returns
# (pixel_values, image_grid_thw, ...) has one entry per image or patch and is concatenated.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


class ConversationError(ValueError):
    """The chat template cannot be used to find assistant tokens for this conversation."""


def _plain(messages: list[dict]) -> list[dict]:
    """role + content only: the template must not see our "train" flag."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _trainable(message: dict) -> bool:
    return message.get("role") == "assistant" and message.get("train", True) is not False


def count_images(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")


def _image_token_id(processor) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(token_id)


def downscale(image, max_pixels: Optional[int]):
    """Cap the pixel count (so the image-token count) whatever the processor does itself."""
    from PIL import Image

    if not max_pixels or image.width * image.height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (image.width * image.height))
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, resample=Image.Resampling.BICUBIC)


class ChatEncoder:
    """Turns (messages, JPEG bytes) into input_ids/labels/attention_mask plus the processor's
    image tensors. One per DataLoader worker; holds the processor."""

    def __init__(self, processor, chat_template: Optional[str] = None, max_length: int = 2048,
                 max_pixels: Optional[int] = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chat_template = chat_template or getattr(processor, "chat_template", None) \
            or self.tokenizer.chat_template
        if not self.chat_template:
            raise ConversationError("the processor has no chat template; pass --chat-template FILE")
        self.has_generation_marks = bool(_GENERATION_TAG.search(self.chat_template))
        self.max_length = max_length
        self.max_pixels = max_pixels
        self.image_token_id = _image_token_id(processor)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id

    # -- text side: which tokens are labels -------------------------------------------------
    def _render(self, conversation: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt)

    def label_mask(self, messages: list[dict]) -> tuple[str, list[int], list[int]]:
        """(rendered text, its token ids before image expansion, 0/1 label mask per token)."""
        conversation = _plain(messages)
        text = self._render(conversation)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        # ends[i] = character where message i ends in `text`.
        ends = []
        for i in range(1, len(conversation) + 1):
            prefix = self._render(conversation[:i]) if i < len(conversation) else text
            if not text.startswith(prefix):
                raise ConversationError(
                    f"the chat template renders the first {i} messages differently inside the whole "
                    "conversation, so assistant turns cannot be located; pass a --chat-template with "
                    "{% generation %} markers")
            ends.append(len(prefix))

        if self.has_generation_marks:
            marked = self.tokenizer.apply_chat_template(
                conversation, chat_template=self.chat_template, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True)
            if list(marked["input_ids"]) != ids:
                raise ConversationError("tokenizing the rendered text differs from apply_chat_template")
            mask = list(marked["assistant_masks"])
            for t, flag in enumerate(mask):
                if not flag:
                    continue
                owner = min(bisect.bisect_right(ends, offsets[t][0]), len(conversation) - 1)
                if conversation[owner]["role"] != "assistant":
                    raise ConversationError(f"the template marks a token of a {conversation[owner]['role']} "
                                            "message as assistant output")
                if not _trainable(messages[owner]):
                    mask[t] = 0
            return text, ids, mask

        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if not _trainable(message):
                continue
            head = self._render(conversation[:i], add_generation_prompt=True) if i else ""
            if not text.startswith(head):
                raise ConversationError("the chat template's generation prompt is not how assistant turns "
                                        "start in the whole conversation; pass a --chat-template with "
                                        "{% generation %} markers")
            start, end = len(head), ends[i]
            end = start + len(text[start:end].rstrip())  # the newline after the end-of-turn token is layout
            for t, (a, b) in enumerate(offsets):
                if a < end and b > start:
                    mask[t] = 1
        return text, ids, mask

    # -- with the image: the processor expands the placeholder -------------------------------
    def _expand(self, short_ids: list[int], short_mask: list[int], long_ids: list[int]) -> list[int]:
        """Carry the mask over the image-token expansion (image tokens are never labels)."""
        out, j = [], 0
        for token, flag in zip(short_ids, short_mask):
            if token == self.image_token_id:
                start = j
                while j < len(long_ids) and long_ids[j] == self.image_token_id:
                    j += 1
                if j == start:
                    raise ConversationError("an image placeholder vanished in the processor's output")
                out.extend([0] * (j - start))
                continue
            if j >= len(long_ids) or long_ids[j] != token:
                raise ConversationError("the processor's tokens differ from the chat template's outside images")
            out.append(flag)
            j += 1
        if j != len(long_ids):
            raise ConversationError("the processor added tokens the chat template did not render")
        return out

    def encode(self, messages: list[dict], jpeg: Optional[bytes]) -> tuple[Optional[dict], str]:
        """(example, "") or (None, reason) for a sample that cannot train: several images,
        nothing to learn, or image tokens beyond max_length."""
        import torch
        from PIL import Image

        n_images = count_images(messages)
        if n_images > 1:
            return None, "several_images"  # a sample carries one photo
        if n_images == 1 and not jpeg:
            return None, "no_image"
        text, ids, mask = self.label_mask(messages)
        if not any(mask):
            return None, "no_trainable_tokens"
        images = None
        if n_images:
            with Image.open(io.BytesIO(jpeg)) as im:
                images = [downscale(im.convert("RGB"), self.max_pixels)]
        out = self.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
        long_ids = out["input_ids"][0].tolist()
        long_mask = self._expand(ids, mask, long_ids)
        labels = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(long_ids, long_mask)], dtype=torch.long)
        example = {k: v for k, v in out.items() if k not in SEQUENCE_KEYS}
        for key in SEQUENCE_KEYS:
            if key in out:
                example[key] = out[key][0]
        example["labels"] = labels
        if len(long_ids) > self.max_length:
            image_positions = [t for t, tok in enumerate(long_ids) if tok == self.image_token_id]
            if image_positions and image_positions[-1] >= self.max_length:
                return None, "too_long"  # cutting image tokens would break the model's input
            for key in SEQUENCE_KEYS:
                if key in example:
                    example[key] = example[key][: self.max_length]
            if not bool((example["labels"] != IGNORE_INDEX).any()):
                return None, "too_long"
        return example, ""


def pad_collate(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad the per-token inputs, concatenate the per-image ones."""
    import torch

    length = max(len(e["input_ids"]) for e in examples)
    batch = {}
    for key in SEQUENCE_KEYS:
        if key not in examples[0]:
            continue
        fill = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        rows = [torch.nn.functional.pad(e[key], (0, length - len(e[key])), value=fill) for e in examples]
        batch[key] = torch.stack(rows)
    return _with_per_image_inputs(batch, examples)


def _with_per_image_inputs(batch: dict, examples: list[dict]) -> dict:
    """The batch plus every non-sequence input (pixel_values, image_grid_thw, ...) concatenated in
    sample order, so each image still meets its own image tokens."""
    import torch

    for key in examples[0]:
        if key in SEQUENCE_KEYS or key.startswith("_"):
            continue
        values = [e[key] for e in examples]
        batch[key] = torch.cat(values, dim=0) if hasattr(values[0], "dim") else values
    return batch


def pack_collate(packs: list[list[dict]], pad_token_id: int, flatten: bool = False) -> dict:
    """Padding-free packing: each row concatenates whole samples, with position ids restarting at
    0 for every sample and no attention mask - transformers' packed-sequence convention (as its
    DataCollatorWithFlattening): SDPA/eager build a block-diagonal causal mask from the position
    ids, flash-attention runs varlen from them. The first label of every sample is ignored so that
    no sample learns to predict the start of the next one (with padded rows that label is never
    predicted either, so packed and padded batches have the same loss).

    Rows are right-padded to the longest with a position run of their own (a sample of pad
    tokens without labels); flatten=True joins all rows into one instead (no padding at all, the
    layout for flash-attention varlen). Per-image inputs are concatenated in sample order, as
    pad_collate does, so each image still meets its own image tokens. `_seq_lens` (lengths of the
    samples, row by row, padding included as its own entry) lets the trainer build per-sample
    3D rope positions for the Qwen2-VL family."""
    import torch

    rows: list[dict] = []
    for pack in packs:
        row = {}
        for key in SEQUENCE_KEYS:
            if key == "attention_mask" or key not in pack[0]:
                continue
            parts = [e[key] for e in pack]
            if key == "labels":
                parts = [torch.cat([torch.full((1,), IGNORE_INDEX, dtype=p.dtype), p[1:]]) for p in parts]
            row[key] = torch.cat(parts)
        row["position_ids"] = torch.cat([torch.arange(len(e["input_ids"])) for e in pack])
        row["_seq_lens"] = [len(e["input_ids"]) for e in pack]
        rows.append(row)
    if flatten:
        joined = {key: torch.cat([r[key] for r in rows]) for key in rows[0] if key != "_seq_lens"}
        joined["_seq_lens"] = [n for r in rows for n in r["_seq_lens"]]
        rows = [joined]
    length = max(len(r["input_ids"]) for r in rows)
    batch: dict = {}
    for key in rows[0]:
        if key == "_seq_lens":
            continue
        fill = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        padded = []
        for r in rows:
            pad = length - len(r[key])
            tail = torch.arange(pad) if key == "position_ids" else torch.full((pad,), fill, dtype=r[key].dtype)
            padded.append(torch.cat([r[key], tail]) if pad else r[key])
        batch[key] = torch.stack(padded)
    batch["_seq_lens"] = [r["_seq_lens"] + ([length - len(r["input_ids"])] if length > len(r["input_ids"]) else [])
                         for r in rows]
    return _with_per_image_inputs(batch, [e for pack in packs for e in pack])
