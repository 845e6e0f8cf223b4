"""Train a small ResNet on Fashion-MNIST and export it as committed test data.

Produces ``tests/data/fashion_resnet.onnx`` (a real, accurately trained CNN small
enough to commit) and a JSON sidecar with the preprocessing constants, the float
test accuracy measured with onnxruntime, and how the file was made.

    .venv/bin/python tools/train_fashion_mnist.py --epochs 6 --seed 0 --blocks 1,1,2

Needs the CPU torch wheel (``pip install torch==2.13.0``) and the Debian package
``dataset-fashion-mnist``. The compiler itself never imports torch.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from qcompile.quant.datasets import (  # noqa: E402  (after sys.path so the script runs from a checkout)
    FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist)

# The compiler's test suite relies on the exported graph staying inside this op set.
ALLOWED_OPS = {"Conv", "BatchNormalization", "Relu", "Add", "MaxPool",
               "GlobalAveragePool", "Flatten", "Gemm"}


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs, identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class FashionResNet(nn.Module):
    """3x3 stem then one stage per width; 28 -> 28 -> 14 -> 7 spatially."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: tuple[int, ...] = (1, 1, 1),
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # exports as GlobalAveragePool
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip + random 2-px translation (pad with background, then crop)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    bg = float((0.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)  # a black pixel, normalised
    padded = F.pad(x, (2, 2, 2, 2), value=bg)
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()  # one shift per batch: cheap, enough
    return padded[:, :, dy:dy + 28, dx:dx + 28]


def evaluate_torch(model: nn.Module, x: np.ndarray, y: np.ndarray, bs: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), bs):
            correct += (model(torch.from_numpy(x[i:i + bs])).argmax(1).numpy() == y[i:i + bs]).sum()
    return float(correct) / len(x)


def evaluate_onnx(path: Path, x: np.ndarray, y: np.ndarray, bs: int = 1000) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(x), bs):
        logits = sess.run(["logits"], {"input": x[i:i + bs]})[0]
        correct += (logits.argmax(1) == y[i:i + bs]).sum()
    return float(correct) / len(x)


def inline_identities(m: onnx.ModelProto) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of that initializer.

    The TorchScript exporter de-duplicates equal parameters (e.g. two BNs with the
    same stats) by routing one through an Identity; the compiler's op set has none.
    """
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    for node in [n for n in g.node if n.op_type == "Identity" and n.input[0] in inits]:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        g.initializer.append(copy)
        g.node.remove(node)


def export(model: nn.Module, out: Path) -> Counter:
    """Export (opset 17, dynamic batch), check the op set, write atomically."""
    model.eval()
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=out.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; this is a shared, committed file
    try:
        # do_constant_folding=False plus TrainingMode.PRESERVE (model in eval mode) keeps
        # BatchNormalization as separate nodes, so BN folding in the compiler gets exercised.
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), tmp, opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
        m = onnx.load(tmp)
        inline_identities(m)
        onnx.save(m, tmp)
        onnx.checker.check_model(m, full_check=True)
        ops = Counter(n.op_type for n in m.graph.node)
        if not set(ops) <= ALLOWED_OPS:
            extra = sorted(set(ops) - ALLOWED_OPS)
            raise SystemExit(f"exported graph has ops outside the allowed set: {extra}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (one-cycle)")
    ap.add_argument("--widths", default="16,32,64")
    ap.add_argument("--blocks", default="1,1,2", help="BasicBlocks per stage")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("-o", "--output", type=Path, default=REPO / "tests/data/fashion_resnet.onnx")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)

    widths = tuple(int(v) for v in args.widths.split(","))
    blocks = tuple(int(v) for v in args.blocks.split(","))
    model = FashionResNet(widths, blocks)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params}", flush=True)

    steps_per_epoch = len(xt) // args.batch_size  # drop the ragged last batch: steadier BN stats
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(xt[idx], gen)), yt[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = evaluate_torch(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / steps_per_epoch:.4f} "
              f"test acc {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    ops = export(model, args.output)
    onnx_acc = evaluate_onnx(args.output, x_test, y_test)
    torch_acc = evaluate_torch(model, x_test, y_test)
    print(f"onnx ops: {dict(ops)}")
    print(f"test accuracy: onnxruntime {onnx_acc:.4f}, torch {torch_acc:.4f}; "
          f"{args.output.stat().st_size} bytes")

    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    sidecar = {
        "model": args.output.name,
        "dataset": "fashion-mnist (Debian dataset-fashion-mnist)",
        "input": {"name": "input", "shape": ["N", 1, 28, 28], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["N", 10]},
        "preprocessing": {"formula": "(pixel / 255 - mean) / std",
                          "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD},
        "classes": list(FASHION_MNIST_CLASSES),
        "float_test_accuracy": round(onnx_acc, 4),
        "test_images": int(len(y_test)),
        "accuracy_measured_with": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "params": n_params,
        "widths": list(widths), "blocks": list(blocks),
        "onnx_ops": dict(sorted(ops.items())),
        "epochs": args.epochs, "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
        # Wall clock includes other load on the machine; CPU seconds are the steadier figure.
        "train_seconds": round(time.time() - t0),
        "train_cpu_seconds": round(time.process_time()),
        "torch": torch.__version__,
        "command": f".venv/bin/python tools/train_fashion_mnist.py {argv}".strip(),
    }
    side = args.output.with_suffix(".json")
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=side.parent)
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(sidecar, f, indent=2)
        f.write("\n")
    os.replace(tmp, side)
    print(f"wrote {args.output} and {side}")


if __name__ == "__main__":
    main()
