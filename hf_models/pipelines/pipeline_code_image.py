"""CodeImagePipeline: class-conditional images from a code GPT and a VQ tokenizer."""

from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from ..validation import check_count
from .pipeline_utils import LatentheatPipelineMixin, check_output_type


class CodeImagePipeline(LatentheatPipelineMixin, DiffusionPipeline):
    r"""
    Pipeline for class-conditional image generation over a grid of discrete codes.

    The code GPT (a Llama) samples ``[class][BOS] c_1 .. c_N`` with ``generate()`` (KV cache,
    temperature / top-k / top-p, optional classifier-free guidance); the VQ tokenizer decodes the
    ``h x w`` code grid back to pixels.

    Args:
        vq_tokenizer ([`VQTokenizerModel`]): turns images into codes and codes into images.
        code_gpt ([`CodeGPTForCausalLM`]): the autoregressive prior over code sequences.

    Example:

    ```py
    >>> import torch
    >>> from hf_models.pipelines import CodeImagePipeline
    >>> pipe = CodeImagePipeline.from_pretrained("outputs/demo")
    >>> images = pipe(class_labels=[3, 7], num_images_per_label=4, generator=torch.Generator().manual_seed(0)).images
    >>> images[0].save("three.png")
    ```
    """

    model_cpu_offload_seq = "code_gpt->vq_tokenizer"

    def __init__(self, vq_tokenizer, code_gpt):
        super().__init__()
        self.register_modules(vq_tokenizer=vq_tokenizer, code_gpt=code_gpt)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    def _class_labels(self, class_labels, num_images_per_label: int, batch_size: Optional[int]) -> Optional[torch.Tensor]:
        num_classes = self.code_gpt.config.num_classes
        check_count("num_images_per_label", num_images_per_label)
        if num_classes == 0:
            if class_labels is not None:
                raise ValueError("this code GPT is unconditional (num_classes=0): pass batch_size, not class_labels")
            return None
        if class_labels is None:
            class_labels = list(range(num_classes))
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            raise ValueError(f"class_labels contain {bad.tolist()}; allowed: 0..{num_classes - 1}")
        return labels.repeat_interleave(num_images_per_label)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[int, list, torch.Tensor]] = None,
        num_images_per_label: int = 1,
        batch_size: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""
        Args:
            class_labels (`int`, `list[int]` or `torch.LongTensor`, *optional*):
                Digits/classes to draw; defaults to every class once. Ignored shape rules: flattened.
            num_images_per_label (`int`, defaults to 1): images per entry of `class_labels`.
            batch_size (`int`, *optional*): number of images for an unconditional model.
            temperature, top_k, top_p: sampling controls, passed to `generate()`'s logits warpers.
            guidance_scale (`float`, *optional*): classifier-free guidance against the null class token.
            generator (`torch.Generator`, *optional*): the only source of randomness (same seed, same images).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` (images in [0, 1]) or
                `"latent"` (the code grids, `LongTensor` of shape `(batch, h, w)`).
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` instead of a tuple.
        """
        check_output_type(output_type)
        labels = self._class_labels(class_labels, num_images_per_label, batch_size)
        if labels is None:
            check_count("batch_size", batch_size, hint=" for an unconditional model")
        else:
            labels = labels.to(self.device)
        h = w = self.vq_tokenizer.config.latent_size
        num_codes = self.code_gpt.config.num_codes
        if num_codes != h * w:
            raise ValueError(f"code_gpt.config.num_codes={num_codes} does not match the tokenizer's {h}x{w} code grid")
        with self.progress_bar(total=num_codes) as bar:
            codes = self.code_gpt.generate_codes(
                labels,
                num_codes=num_codes,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                guidance_scale=guidance_scale,
                generator=generator,
                callback=lambda drawn: bar.update(drawn - bar.n),
                **({"batch_size": batch_size} if labels is None else {}),
            )
        codes = codes.view(-1, h, w)
        if output_type == "latent":
            images = codes
        else:
            images = self.vq_tokenizer.decode(codes).clamp(-1, 1)
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
