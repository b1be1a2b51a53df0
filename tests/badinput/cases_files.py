"""Bad model files (checkpoints, packed files) run through the real CLI, one row each.

Hostile files are re-signed (valid checksum / CRC) so that the check they aim at is the one
that has to refuse them; damaged files are not. Every row runs `evaluate` (which loads the
file first) unless it says otherwise; `test_files.py` asserts exit 2, one line naming the
file, no traceback, nothing created, changed or deleted, and the marker never created.
"""

from __future__ import annotations

import math
import struct

import torch

from tests.badinput import makers_files as mf
from tests.badinput.case import Case

EVAL = ("evaluate", "{bad}", "--data", "mnist5k")
_F16_NAN = struct.pack("<e", math.nan)
_F32_NAN = struct.pack("<f", math.nan)


def _meta(**changes):
    def fn(m):
        for key, value in changes.items():
            target, _, leaf = key.rpartition(".")
            node = m
            for part in filter(None, target.split(".")):
                node = node[part]
            node[leaf] = value
    return fn


def _set(tensor: str, value):
    def fn(t):
        t[tensor] = value(t[tensor]) if callable(value) else value
    return fn


def _f64_huge(t):
    out = t.double()
    out.view(-1)[0] = 1e300
    return out


def _nan_at0(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _offsets_huge(h):
    h["fc1.weight"]["data_offsets"][1] = 10 ** 12


def _fc1_record(h):
    return h["tensors"]["fc1.weight"]


def _conv1_record(h):
    return h["tensors"]["conv1.weight"]


CKPT_PAYLOADS = [Case(f"ckpt-runs-{f.replace(':', '-')}", EVAL, "{badname}",
                      mf.payload_checkpoint(f)) for f in mf.PAYLOADS]
XCPK_PAYLOADS = [Case(f"xcpk-runs-{f.replace(':', '-')}", EVAL, "{badname}",
                      mf.payload_xcpk(f)) for f in ("os:system", "builtins:open",
                                                    "shutil:rmtree")]

CKPT_CASES = [
    # damage: the checksum (or the header's own checks) must catch it
    Case("ckpt-bitflip-metadata", EVAL, "{badname}",
         mf.flip_bit("flip_meta.safetensors", lambda r: r.index(b'lenet5') + 2)),
    Case("ckpt-bitflip-data", EVAL, "{badname}",
         mf.flip_bit("flip_data.safetensors", lambda r: len(r) - 1000)),
    Case("ckpt-truncated-prefix", EVAL, "{badname}",
         mf.cut("cut_prefix.safetensors", lambda r: 5)),
    Case("ckpt-truncated-header", EVAL, "{badname}",
         mf.cut("cut_header.safetensors", lambda r: 200)),
    Case("ckpt-truncated-data", EVAL, "{badname}",
         mf.cut("cut_data.safetensors", lambda r: len(r) - 100)),
    # sizes the header claims
    Case("ckpt-header-length-2^60", EVAL, "{badname}",
         mf.raw_edit_case("huge_hlen.safetensors",
                          lambda r: struct.pack("<Q", 1 << 60) + r[8:])),
    Case("ckpt-tensor-offset-1e12", EVAL, "{badname}",
         mf.st_header_edit("huge_offset.safetensors", _offsets_huge)),
    Case("ckpt-sparse-10GiB", EVAL, "{badname}", mf.sparse_padded(10 << 30)),
    Case("ckpt-sparse-1GiB-under-the-cap", EVAL, "{badname}", mf.sparse_padded(1 << 30)),
    # malformed metadata
    Case("ckpt-version-abc", EVAL, "{badname}",
         mf.edit_case("v_abc.safetensors", meta_fn=_meta(version="abc"))),
    Case("ckpt-version-null", EVAL, "{badname}",
         mf.edit_case("v_null.safetensors", meta_fn=_meta(version=None))),
    Case("ckpt-widths-list", EVAL, "{badname}",
         mf.edit_case("w_list.safetensors", meta_fn=_meta(widths=[6, 16]))),
    Case("ckpt-width-minus-1", EVAL, "{badname}",
         mf.edit_case("w_neg.safetensors",
                      meta_fn=_meta(**{"widths.fc1": {"in": -1, "out": 120}}))),
    Case("ckpt-width-1e9", EVAL, "{badname}",
         mf.edit_case("w_huge.safetensors",
                      meta_fn=_meta(**{"widths.fc1": {"in": 400, "out": 10 ** 9}}))),
    Case("ckpt-nested-json-100k", EVAL, "{badname}",
         mf.st_metadata_text("nested.safetensors", mf.nested_json())),
    Case("ckpt-kwargs-unknown", EVAL, "{badname}",
         mf.edit_case("kw_unknown.safetensors", meta_fn=_meta(**{"model.kwargs": {"width": 8}}))),
    Case("ckpt-kwargs-wrong-type", EVAL, "{badname}",
         mf.edit_case("kw_type.safetensors", meta_fn=_meta(**{
             "model.name": "vgg11", "model.kwargs": {"width": "very wide"}}))),
    Case("ckpt-kwargs-data-argument", EVAL, "{badname}",
         mf.edit_case("kw_data.safetensors",
                      meta_fn=_meta(**{"model.kwargs": {"num_classes": 10 ** 9}}))),
    Case("ckpt-vgg-width-1e9", EVAL, "{badname}",
         mf.edit_case("vgg_huge.safetensors", meta_fn=_meta(**{
             "model.name": "vgg11", "model.kwargs": {"width": 1e9}}))),
    Case("ckpt-input-shape-huge", EVAL, "{badname}",
         mf.edit_case("shape_huge.safetensors",
                      meta_fn=_meta(**{"model.input_shape": [1, 10 ** 9, 28]}))),
    Case("ckpt-num-classes-string", EVAL, "{badname}",
         mf.edit_case("classes_str.safetensors", meta_fn=_meta(**{"model.num_classes": "ten"}))),
    # dtypes and values
    Case("ckpt-float64-1e300", EVAL, "{badname}",
         mf.edit_case("f64.safetensors", tensors_fn=_set("conv1.weight", _f64_huge))),
    Case("ckpt-float8-weights", EVAL, "{badname}",
         mf.edit_case("f8.safetensors", tensors_fn=_set(
             "conv1.weight", lambda t: t.to(torch.float8_e4m3fn)))),
    Case("ckpt-bf16-nan", EVAL, "{badname}",
         mf.edit_case("bf16_nan.safetensors", tensors_fn=_set(
             "conv1.weight", lambda t: _nan_at0(t.to(torch.bfloat16))))),
    Case("ckpt-int-weights", EVAL, "{badname}",
         mf.edit_case("int_w.safetensors", tensors_fn=_set(
             "fc1.weight", lambda t: t.to(torch.int32)))),
    Case("ckpt-nan-codebook", EVAL, "{badname}",
         mf.edit_rich_checkpoint("nan_codebook.safetensors",
                                 tensors_fn=_set("__xc__/fc1/codebook", _nan_at0))),
    Case("ckpt-nan-scale", EVAL, "{badname}",
         mf.edit_rich_checkpoint("nan_scale.safetensors",
                                 tensors_fn=_set("__xc__/conv1/scale", _nan_at0))),
    Case("ckpt-inf-activation-scale", EVAL, "{badname}",
         mf.edit_rich_checkpoint("inf_act.safetensors", tensors_fn=_set(
             "__xc__/conv1/act_scale", torch.tensor(float("inf"))))),
    Case("ckpt-bits-100000", EVAL, "{badname}",
         mf.edit_rich_checkpoint("bits_huge.safetensors",
                                 meta_fn=_meta(**{"compression.conv1.bits": 100000}))),
    Case("ckpt-scale-wrong-length", EVAL, "{badname}",
         mf.edit_rich_checkpoint("scale_len.safetensors",
                                 tensors_fn=_set("__xc__/conv1/scale", torch.ones(3)))),
    Case("ckpt-codebook-index-out-of-range", EVAL, "{badname}",
         mf.edit_rich_checkpoint("idx_range.safetensors", tensors_fn=_set(
             "__xc__/fc1/indices", lambda t: t + 100))),
    Case("ckpt-codebook-and-grid", EVAL, "{badname}",
         mf.edit_rich_checkpoint("both.safetensors", meta_fn=_meta(
             **{"compression.fc1": {"bits": 4}}), tensors_fn=_set(
             "__xc__/fc1/scale", torch.ones(120)))),
    Case("ckpt-mask-not-boolean", EVAL, "{badname}",
         mf.edit_rich_checkpoint("mask2.safetensors", tensors_fn=_set(
             "__xc__/fc1/mask", lambda t: t * 2))),
    Case("ckpt-compression-unknown-layer", EVAL, "{badname}",
         mf.edit_rich_checkpoint("unknown_layer.safetensors",
                                 meta_fn=_meta(**{"compression.fc9": {"bits": 4}}))),
]

XCPK_CASES = [
    Case("xcpk-bitflip-header", EVAL, "{badname}",
         mf.flip_bit("flip_header.xcpk", lambda r: 20, source="xcpk")),
    Case("xcpk-bitflip-payload", EVAL, "{badname}",
         mf.flip_bit("flip_payload.xcpk", lambda r: len(r) - 50, source="xcpk")),
    Case("xcpk-bitflip-crc", EVAL, "{badname}",
         mf.flip_bit("flip_crc.xcpk", lambda r: len(r) - 2, source="xcpk")),
    Case("xcpk-truncated-prefix", EVAL, "{badname}",
         mf.cut("cut_prefix.xcpk", lambda r: 6, source="xcpk")),
    Case("xcpk-truncated-header", EVAL, "{badname}",
         mf.cut("cut_header.xcpk", lambda r: 9 + mf.xcpk_header_len(r) // 2, source="xcpk")),
    Case("xcpk-truncated-payload", EVAL, "{badname}",
         mf.cut("cut_payload.xcpk", lambda r: len(r) - 300, source="xcpk")),
    Case("xcpk-zlib-bomb-3GiB", EVAL, "{badname}", mf.xcpk_bomb),
    Case("xcpk-header-length-2^31", EVAL, "{badname}",
         mf.xcpk_prefix_claims("huge_hlen.xcpk", 1 << 31)),
    Case("xcpk-version-1", EVAL, "{badname}", mf.edit_rich_xcpk("v1.xcpk", version=1)),
    Case("xcpk-version-7", EVAL, "{badname}", mf.edit_rich_xcpk("v7.xcpk", version=7)),
    Case("xcpk-header-not-object", EVAL, "{badname}", mf.raw_xcpk("list.xcpk", "[1, 2]")),
    Case("xcpk-header-nan-token", EVAL, "{badname}",
         mf.raw_xcpk("nan_token.xcpk", '{"model": {}, "tensors": {}, "data": NaN}')),
    Case("xcpk-nested-json-100k", EVAL, "{badname}",
         mf.raw_xcpk("nested.xcpk", mf.nested_json())),
    Case("xcpk-unknown-header-key", EVAL, "{badname}",
         mf.edit_rich_xcpk("key_version.xcpk", lambda h: h.update(version="abc"))),
    Case("xcpk-widths-list", EVAL, "{badname}",
         mf.edit_rich_xcpk("w_list.xcpk", lambda h: h.update(widths=[6, 16]))),
    Case("xcpk-width-minus-1", EVAL, "{badname}",
         mf.edit_rich_xcpk("w_neg.xcpk",
                           lambda h: h.update(widths={"fc1": {"in": 400, "out": -1}}))),
    Case("xcpk-width-1e9", EVAL, "{badname}",
         mf.edit_rich_xcpk("w_huge.xcpk",
                           lambda h: h.update(widths={"fc2": {"in": 10 ** 9, "out": 84}}))),
    Case("xcpk-model-name-number", EVAL, "{badname}",
         mf.edit_rich_xcpk("name_num.xcpk", lambda h: h["model"].update(name=5))),
    Case("xcpk-bits-100000", EVAL, "{badname}",
         mf.edit_rich_xcpk("bits_huge.xcpk", lambda h: _conv1_record(h).update(bits=100000))),
    Case("xcpk-k-1e9", EVAL, "{badname}",
         mf.edit_rich_xcpk("k_huge.xcpk", lambda h: _fc1_record(h).update(k=10 ** 9))),
    Case("xcpk-scale-wrong-length", EVAL, "{badname}", mf.xcpk_scale_wrong_length),
    Case("xcpk-float8-codebook", EVAL, "{badname}",
         mf.edit_rich_xcpk("f8.xcpk", lambda h: next(
             s for s in _fc1_record(h)["streams"] if s["role"] == "codebook").update(
             coding="float8_e4m3"))),
    Case("xcpk-nan-codebook", EVAL, "{badname}",
         mf.edit_rich_xcpk("nan_codebook.xcpk",
                           payload_fn=mf.overwrite_stream("fc1.weight", "codebook", _F16_NAN))),
    Case("xcpk-nan-scale", EVAL, "{badname}",
         mf.edit_rich_xcpk("nan_scale.xcpk",
                           payload_fn=mf.overwrite_stream("conv1.weight", "scales", _F32_NAN))),
    Case("xcpk-activation-scale-1e300", EVAL, "{badname}",
         mf.edit_rich_xcpk("act_huge.xcpk", lambda h: h["activations"]["conv1"].update(
             scale=1e300))),
    Case("xcpk-shape-2^31-squared", EVAL, "{badname}",
         mf.edit_rich_xcpk("shape_huge.xcpk", lambda h: _fc1_record(h).update(
             shape=[2 ** 31 - 1, 2 ** 31 - 1]))),
    Case("xcpk-stream-bytes-2^40", EVAL, "{badname}",
         mf.edit_rich_xcpk("stream_huge.xcpk", lambda h: _fc1_record(h)["streams"][0].update(
             bytes=1 << 40))),
    Case("xcpk-shape-mismatch", EVAL, "{badname}",
         mf.edit_rich_xcpk("shape_bad.xcpk", lambda h: h["tensors"]["fc3.bias"].update(
             shape=[11]))),
    Case("xcpk-unknown-encoding", EVAL, "{badname}",
         mf.edit_rich_xcpk("enc.xcpk", lambda h: _fc1_record(h).update(encoding="huffman"))),
    Case("xcpk-tensor-not-in-model", EVAL, "{badname}",
         mf.edit_rich_xcpk("extra.xcpk", lambda h: h["tensors"].update(
             {"fc9.weight": {"shape": [0], "encoding": "dense", "streams": []}}))),
    Case("xcpk-activation-unknown-layer", EVAL, "{badname}",
         mf.edit_rich_xcpk("act_layer.xcpk", lambda h: h["activations"].update(
             {"relu1": {"bits": 8, "scale": 0.1}}))),
    Case("xcpk-export-onnx", ("export", "{bad}", "--format", "onnx", "--out", "{dir}/m.onnx"),
         "{badname}", mf.flip_bit("flip_export.xcpk", lambda r: len(r) // 2, source="xcpk")),
]

WRITE_CASES = [
    # --lr beyond its range is refused before training; a model that diverges anyway is
    # never written (tests/test_checkpoint.py::test_a_diverged_model_is_not_written)
    Case("train-lr-1e30-not-written", ("train", "--lr", "1e30", "--epochs", "0.05",
                                       "--out", "{out}"), "--lr"),
]

IMPORT = ("import", "{bad}", "--model", "lenet5", "--data", "mnist5k", "--out", "{out}")


def _import_as(model: str, *extra: str) -> tuple[str, ...]:
    return ("import", "{bad}", "--model", model, "--data", "mnist5k", "--out", "{out}", *extra)


IMPORT_CASES = [
    # `xaicompress import` of a user's state dict (issue 14): refused in one line, nothing
    # written, a pickle payload never run
    Case("import-pth-pickle-payload", IMPORT, "refused unrun",
         mf.state_dict_file("evil.pth", mf.with_payload), kind="payload"),
    Case("import-pth-whole-model-object", IMPORT, "save model.state_dict()",
         mf.state_dict_file("model_object.pth", mf.pickled_model), kind="payload"),
    Case("import-pth-legacy-format", IMPORT, "legacy",
         mf.state_dict_file("legacy.pth", legacy=True)),
    Case("import-other-architecture", IMPORT, "does not fit --model lenet5 (missing: conv1",
         mf.state_dict_file("lenet300.pth", mf.other_architecture)),
    Case("import-missing-keys", IMPORT, "missing: fc3.weight, fc3.bias",
         mf.state_dict_file("no_fc3.pth", mf.without_fc3)),
    Case("import-nan-weights", IMPORT, "contains NaN",
         mf.state_dict_file("nan.pth", mf.nan_weight)),
    Case("import-not-a-state-dict", IMPORT, "not a state dict file",
         mf.raw_edit_case("junk.pth", lambda r: b"junk" * 100)),
    Case("import-factory-raises", _import_as("torchvision:resnet18", "--normalise", "imagenet",
                                             "--model-kwargs", '{{"groups": 0}}'),
         "factory failed", mf.state_dict_file("w.pth")),
    Case("import-timm-nosuchmodel", _import_as("timm:nosuchmodel"),
         "timm has no model 'nosuchmodel'", mf.state_dict_file("w.pth")),
    Case("import-model-kwargs-not-json", _import_as("lenet5", "--model-kwargs", "{{width"),
         "--model-kwargs", mf.state_dict_file("w.pth")),
]

CASES: list[Case] = [*CKPT_PAYLOADS, *XCPK_PAYLOADS, *CKPT_CASES, *XCPK_CASES, *WRITE_CASES,
                     *IMPORT_CASES]
assert len({c.id for c in CASES}) == len(CASES)
