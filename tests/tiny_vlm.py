"""A tiny random LLaVA-style vision-language model saved like a hub checkpoint, for CPU tests.

There is no hub access in tests, so everything a real image-text-to-text checkpoint carries is
built here from configs: a SigLIP vision tower + a small Qwen2 language model joined by
LlavaForConditionalGeneration, a byte-level BPE tokenizer trained in-process (so any text encodes,
no <unk>), a LlavaProcessor with the PIL SigLIP image processor (the default one needs
torchvision, which is not installed) and a Qwen-style chat template with {% generation %} markers
so `apply_chat_template(..., return_assistant_tokens_mask=True)` works.

    path = build_tiny_vlm(tmp_path / "tiny-vlm")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
"""
from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
IMAGE_SIZE = 32   # pixels; the processor resizes every image to IMAGE_SIZE x IMAGE_SIZE
PATCH_SIZE = 8    # -> (32 / 8)^2 = 16 image tokens per image

# Qwen2-style ChatML. The assistant answer and its <|im_end|> sit inside {% generation %} so the
# assistant-token mask covers exactly what the model must learn to produce (stop token included).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- for part in parts -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

_TRAINING_TEXT = [
    "Where was this photo taken? Think about the clues in the image.",
    "The photo was taken in Paris, Ile-de-France, France, Europe.",
    "Country: Japan. Region: Kanto. City: Tokyo. Coordinates: 35.68, 139.69.",
    "The road signs, the vegetation and the architecture suggest southern Europe.",
    "You are a geolocation assistant. Answer with the country, region and city.",
    "That is not right. Look again at the licence plates and the language on the signs.",
    "latitude longitude continent country admin1 admin2 city 0123456789 -.,:;()",
]


def _train_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte -> no unknown text
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    return tok


def build_tiny_vlm(path, seed: int = 0) -> Path:
    """Write a tiny random LLaVA (SigLIP + Qwen2) checkpoint with tokenizer and processor to
    `path` and return it. Deterministic for a given seed. Takes about a second on CPU."""
    import torch
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
        Qwen2Config,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        projector_hidden_act="gelu", image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


if __name__ == "__main__":  # python tests/tiny_vlm.py OUT_DIR
    import sys

    print(build_tiny_vlm(sys.argv[1] if len(sys.argv) > 1 else "tiny-vlm"))
