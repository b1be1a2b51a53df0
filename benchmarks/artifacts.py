"""What the file formats' safety costs, measured side by side in one run.

    python benchmarks/artifacts.py [--run DIR]

DIR: a `compress` / `demo` output folder (its model.safetensors is the model measured);
without it, an untrained LeNet-5 pruned and shared like the demo's is used.

Prints: the packed header with and without the tensor shapes (bytes, zlib-compressed); the
time of each writer with and without its verify-before-rename step (checkpoint, packed
file, ONNX), medians of several runs; the time to refuse a 3 GiB zlib bomb, a valid
checkpoint padded to 1 GiB and to 10 GiB, and a packed file with one flipped bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.badinput import makers_files as mf  # noqa: E402
from xaicompress.atomic import atomic_write_bytes  # noqa: E402
from xaicompress.checkpoint import (  # noqa: E402
    Checkpoint,
    ModelSpec,
    checkpoint_bytes,
    load_checkpoint,
    save_checkpoint,
)
from xaicompress.errors import XaiCompressError  # noqa: E402
from xaicompress.export.onnx import export_onnx, onnx_bytes  # noqa: E402
from xaicompress.export.packed import load_packed, packed_bytes, write_packed  # noqa: E402
from xaicompress.export.xcpk_reader import compress_header, parse_container  # noqa: E402


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _demo_like() -> Checkpoint:
    from xaicompress.encoding import Mask
    from xaicompress.quant.codebook import share_weights

    torch.manual_seed(0)
    spec = ModelSpec("lenet5", (1, 28, 28), 10)
    ck = Checkpoint(spec.build().eval(), spec, "mnist5k")
    for name in ("fc1", "fc2", "fc3"):
        w = getattr(ck.model, name).weight.detach().abs()
        ck.state.get(name).mask = Mask(w > w.flatten().kthvalue(int(0.8 * w.numel())).values)
    ck.state.apply(ck.model)
    return share_weights(ck, "none", None, avg_bits=3.5)


def header_cost(ck: Checkpoint) -> dict[str, int]:
    raw = packed_bytes(ck)
    header = parse_container(raw).header
    bare = json.loads(json.dumps(header))
    for rec in bare["tensors"].values():
        rec.pop("shape")

    def text(h: dict) -> bytes:
        return json.dumps(h, separators=(",", ":")).encode()
    return {"file_bytes": len(raw), "header_bytes": len(compress_header(text(header))),
            "header_without_shapes": len(compress_header(text(bare))),
            "header_without_dictionary": len(zlib.compress(text(header), 9)),
            "tensors": len(header["tensors"])}


def writer_costs(ck: Checkpoint, d: Path, repeats: int) -> dict[str, tuple[float, float]]:
    """writer -> (ms without verify, ms with it): the same bytes, the same atomic write."""
    return {
        "checkpoint": (
            _median_ms(lambda: atomic_write_bytes(d / "a.safetensors", checkpoint_bytes(ck)),
                       repeats),
            _median_ms(lambda: save_checkpoint(ck, d / "b.safetensors"), repeats)),
        "packed": (
            _median_ms(lambda: atomic_write_bytes(d / "a.xcpk", packed_bytes(ck)), repeats),
            _median_ms(lambda: write_packed(ck, d / "b.xcpk"), repeats)),
        "onnx": (
            _median_ms(lambda: atomic_write_bytes(d / "a.onnx", onnx_bytes(ck)), repeats),
            _median_ms(lambda: export_onnx(ck, d / "b.onnx"), repeats)),
    }


def refusal_ms(ck: Checkpoint, d: Path) -> dict[str, float]:
    good = save_checkpoint(ck, d / "good.safetensors")
    cases = {
        "zlib bomb, 3 GiB in 3 MB (.xcpk)": (load_packed, mf.xcpk_bomb(good, d)),
        "checkpoint padded to 1 GiB": (load_checkpoint, mf.sparse_padded(1 << 30)(good, d)),
        "checkpoint padded to 10 GiB": (load_checkpoint, mf.sparse_padded(10 << 30)(good, d)),
        "packed file, one bit flipped": (load_packed, mf.flip_bit(
            "flip.xcpk", lambda r: len(r) // 2, source="xcpk")(good, d)),
    }
    out = {}
    for label, (load, path) in cases.items():
        t0 = time.perf_counter()
        try:
            load(path)
        except XaiCompressError:
            out[label] = (time.perf_counter() - t0) * 1000
        else:
            raise AssertionError(f"{label}: was not refused")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a compress/demo output folder")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ck = load_checkpoint(args.run / "model.safetensors") if args.run else _demo_like()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        h = header_cost(ck)
        print(f"packed file {h['file_bytes']} B; header {h['header_bytes']} B compressed, "
              f"{h['header_without_shapes']} B without the {h['tensors']} shapes: shapes cost "
              f"{h['header_bytes'] - h['header_without_shapes']} B "
              f"({(h['header_bytes'] - h['header_without_shapes']) / h['file_bytes']:.2%} "
              f"of the file); without the preset dictionary the header takes "
              f"{h['header_without_dictionary']} B")
        print(f"\nwriter         no verify   verify   (ms, median of {args.repeats})")
        for name, (plain, verified) in writer_costs(ck, d, args.repeats).items():
            print(f"{name:12s} {plain:10.1f} {verified:8.1f}   +{verified - plain:.1f} ms "
                  f"({verified / plain:.2f}x)")
        print("\nrefused in (ms)")
        for label, ms in refusal_ms(ck, d).items():
            print(f"  {label:36s} {ms:8.1f}")


if __name__ == "__main__":
    main()
