"""Complete tiny pipelines of Qwen-Image, HunyuanVideo 1.5 and LTX-2 (tests/test_more_pipelines.py), built offline.

Each has its real diffusers pipeline class, VAE, scheduler and transformer (the tiny transformer configs of
`tiny_models`), a text encoder of the architecture the pipeline expects at a width of 16, and a word-level
tokenizer built here. The tokenizers know the words of each pipeline's prompt template and its chat tokens, and
split newlines into tokens as the real ones do, so the pipelines drop the template's prefix where they expect it.
"""

from __future__ import annotations

from typing import Any

import torch
from tiny_models import PIPELINE_WORDS, tiny_qwen_image

#: Qwen-Image's prompt template (diffusers' `QwenImagePipeline.prompt_template_encode`): its words are in the
#: tiny Qwen tokenizer's vocabulary, and its prefix is 34 tokens there, as in Qwen2.5-VL's tokenizer.
QWEN_CHAT = ("<|im_start|>", "<|im_end|>")
QWEN_TEMPLATE_WORDS = (
    "system Describe the image by detailing the color , shape , size , texture , quantity , text , spatial "
    "relationships of the objects and background : user assistant"
).split()


def word_tokenizer(words: list[str], special: tuple[str, ...] = (), max_length: int = 1024) -> Any:
    """A word-level fast tokenizer over `words` (words, punctuation runs and newlines are tokens; unknown words
    map to `<unk>`) with `special` tokens kept whole, padded with `<pad>`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<unk>", "</s>", "<s>", "\n", *special]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*base, *words]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        model_max_length=max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    return tokenizer


def _qwen2_5_vl(vocab_size: int) -> torch.nn.Module:
    """A two-layer Qwen2.5-VL of width 16 (its vision tower is built, never called: prompts are text only)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": vocab_size,
            "bos_token_id": 3,
            "eos_token_id": 2,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=vocab_size,
        bos_token_id=3,
        eos_token_id=2,
        vision_start_token_id=vocab_size - 3,
        vision_end_token_id=vocab_size - 2,
        vision_token_id=vocab_size - 1,
        image_token_id=vocab_size - 1,
        video_token_id=vocab_size - 1,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_image_pipeline() -> Any:
    """Qwen-Image: Qwen2.5-VL text encoder, Qwen-Image VAE (4 latent channels, 2×2-packed into the transformer's
    16), flow-matching Euler steps; CFG runs as separate named calls when `true_cfg_scale` > 1 and a negative prompt
    is given."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    tokenizer = word_tokenizer([*QWEN_TEMPLATE_WORDS, *PIPELINE_WORDS], QWEN_CHAT)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_qwen2_5_vl(len(tokenizer) + 3),
        tokenizer=tokenizer,
        transformer=tiny_qwen_image().eval(),
    )


#: A ChatML template like Qwen's: what `apply_chat_template` renders HunyuanVideo 1.5's system message and prompt with.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def hunyuan_video15_pipeline() -> Any:
    """HunyuanVideo 1.5 text-to-video: a Qwen2.5-VL text model (ChatML prompt), a ByT5-style T5 for quoted glyph
    text, its 4-channel VAE and CFG run by a `ClassifierFreeGuidance` guider (calls named `pred_cond` /
    `pred_uncond`). The transformer takes the noisy latent, the conditioning latent and its mask: 9 channels."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers import HunyuanVideo15Transformer3DModel as Transformer
    from diffusers.guiders import ClassifierFreeGuidance
    from tiny_models import tiny_hunyuan15
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tokenizer = word_tokenizer(PIPELINE_WORDS, QWEN_CHAT)
    tokenizer.chat_template = CHATML
    qwen = Qwen2_5_VLTextConfig(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        vocab_size=len(tokenizer),
        bos_token_id=3,
        eos_token_id=2,
    )
    byt5 = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(16, 16),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    config = {**tiny_hunyuan15().config, "in_channels": 9, "text_embed_2_dim": 32, "target_size": 16}
    return HunyuanVideo15Pipeline(
        transformer=Transformer(**config).eval(),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=Qwen2_5_VLTextModel(qwen).eval(),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(byt5).eval(),
        tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=5.0),
    )


def _gemma3(vocab_size: int) -> torch.nn.Module:
    """A two-layer Gemma-3 of width 16 (its SigLIP vision tower is built, never called: prompts are text only)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "sliding_window": 16,
            "vocab_size": vocab_size,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        mm_tokens_per_image=4,
    )
    return Gemma3ForConditionalGeneration(config).eval()


def ltx2_pipeline() -> Any:
    """LTX-2 text-to-video-and-audio: a Gemma-3 text encoder whose every layer's hidden states (3 of width 16) feed the
    text connectors, a video VAE (8 latent channels, 2× spatial and temporal compression), an audio VAE (2 channels of
    2 mel bins: the transformer's 4 audio channels), a vocoder, flow-matching Euler steps. CFG runs batched in one
    call named `cond_uncond`; spatio-temporal and modality-isolation guidance, when on, add a call each per step."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler, LTX2Pipeline
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from tiny_models import tiny_ltx2

    tokenizer = word_tokenizer(PIPELINE_WORDS)
    connector = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1, "num_learnable_registers": None}
    connectors = LTX2TextConnectors(
        caption_channels=16,
        text_proj_in_factor=3,  # Gemma's embedding output and its 2 layers
        **{f"{stream}_connector_{key}": value for stream in ("video", "audio") for key, value in connector.items()},
        connector_rope_base_seq_len=32,
        rope_type="split",
    )
    vae = AutoencoderKLLTX2Video(
        latent_channels=8,
        block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        layers_per_block=(1,),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        timestep_conditioning=False,
    )
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        latent_channels=2,
        mid_block_add_attention=False,
        mel_bins=8,
    )
    vocoder = LTX2Vocoder(
        in_channels=2 * 8,  # the audio VAE's output channels times its mel bins
        hidden_channels=8,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        output_sampling_rate=16000,
    )
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        audio_vae=audio_vae.eval(),
        text_encoder=_gemma3(len(tokenizer)),
        tokenizer=tokenizer,
        connectors=connectors.eval(),
        transformer=tiny_ltx2().eval(),
        vocoder=vocoder.eval(),
    )
