#!/usr/bin/env python3
"""Seeds for the fuzz targets from the committed corpus (formats/vectors, fixtures/) and the
crash reproducers in regressions/. Writes fuzz/seeds/<target>/ (ignored by git).

Standard library only (no numpy, gguf-py or torch): small GGUF, zip and legacy torch files
are rebuilt or written here byte by byte; random bytes come from fixed seeds, so the seeds
are the same on every run."""
import glob
import hashlib
import json
import os
import random
import struct
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEP = b"\0CERSA\0"
TARGETS = (
    "safetensors_header",
    "cersa_checkpoint",
    "gguf_header",
    "ggml_dequant",
    "pytorch_pickle",
    "pytorch_zip",
    "pytorch_legacy",
    "index_json",
    "manifest",
    "plan",
)


def put(target, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def read(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        return f.read()


# --- GGUF -------------------------------------------------------------------------------

# GGML type id -> (elements per block, bytes per block), as src/input/gguf/ggml.rs.
QK = 256
GGML_BLOCK = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    10: (QK, 84), 11: (QK, 110), 12: (QK, 144), 13: (QK, 176), 14: (QK, 210), 15: (QK, 292),
    16: (QK, 66), 17: (QK, 74), 18: (QK, 98), 19: (QK, 50), 20: (32, 18), 21: (QK, 110),
    22: (QK, 82), 23: (QK, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (QK, 56), 30: (1, 2), 34: (QK, 54), 35: (QK, 66), 39: (32, 17), 40: (64, 36),
}
# Metadata value types: id -> struct format of a fixed-size value.
FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


class Reader:
    def __init__(self, b):
        self.b, self.pos = b, 0

    def take(self, n):
        out = self.b[self.pos:self.pos + n]
        self.pos += n
        return out

    def u(self, fmt):
        (v,) = struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))
        return v

    def value(self, t):
        if t in FIXED:
            return self.u(FIXED[t])
        if t == 8:
            return self.take(self.u("Q"))
        et, n = self.u("I"), self.u("Q")
        return (et, [self.value(et) for _ in range(n)])


def enc_value(t, v):
    if t in FIXED:
        return struct.pack("<" + FIXED[t], v)
    if t == 8:
        return gstr(v)
    et, items = v
    return struct.pack("<IQ", et, len(items)) + b"".join(enc_value(et, x) for x in items)


def parse_gguf(b):
    """(version, [(key, type, value)], [(name, ne, type, data)], alignment)."""
    r = Reader(b)
    assert r.take(4) == b"GGUF"
    version, nt, nkv = r.u("I"), r.u("Q"), r.u("Q")
    kvs = []
    align = 32
    for _ in range(nkv):
        key = r.take(r.u("Q")).decode()
        t = r.u("I")
        v = r.value(t)
        kvs.append((key, t, v))
        if key == "general.alignment":
            align = v
    infos = []
    for _ in range(nt):
        name = r.take(r.u("Q")).decode()
        ne = [r.u("Q") for _ in range(r.u("I"))]
        infos.append((name, ne, r.u("I"), r.u("Q")))
    start = -(-r.pos // align) * align
    tensors = []
    for name, ne, t, off in infos:
        blk, bb = GGML_BLOCK[t]
        n = 1
        for d in ne:
            n *= d
        tensors.append((name, ne, t, b[start + off:start + off + n // blk * bb]))
    return version, kvs, tensors, align


def write_gguf(version, kvs, tensors, align=32):
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, t, v in kvs:
        out += gstr(key) + struct.pack("<I", t) + enc_value(t, v)
    off, offsets = 0, []
    for _, _, _, data in tensors:
        offsets.append(off)
        off = -(-(off + len(data)) // align) * align
    for (name, ne, t, _), o in zip(tensors, offsets):
        out += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", t, o)
    out += b"\0" * (-len(out) % align)
    start = len(out)
    for (_, _, _, data), o in zip(tensors, offsets):
        out += b"\0" * (start + o - len(out)) + data
    return out


def one_row(tensors):
    """Each tensor cut to its first row (ne[1..] = 1), so a seed is a few KB."""
    out = []
    for name, ne, t, data in tensors:
        blk, bb = GGML_BLOCK[t]
        ne0 = ne[0] if ne else 1
        out.append((name, [ne0] + [1] * (len(ne) - 1), t, data[:ne0 // blk * bb]))
    return out


def every_type_gguf(rng):
    kvs = [
        ("general.architecture", 8, "llama"),
        ("general.name", 8, "every type"),
        ("general.alignment", 4, 32),
        ("u8", 0, 7), ("i8", 1, -7), ("u16", 2, 700), ("i16", 3, -700), ("u32", 4, 70000),
        ("i32", 5, -70000), ("f32", 6, 0.5), ("bool", 7, True), ("u64", 10, 1 << 40),
        ("i64", 11, -(1 << 40)), ("f64", 12, 0.25),
        ("tokenizer.ggml.tokens", 9, (8, [b"a", b"bc", b"\xff"])),
        ("nested", 9, (9, [(4, [1, 2]), (8, [b"x"])])),
        ("split.no", 2, 0), ("split.count", 2, 1), ("split.tensors.count", 4, len(GGML_BLOCK)),
    ]
    tensors = []
    for t, (blk, bb) in sorted(GGML_BLOCK.items()):
        n = 1 if blk > 1 else 4
        tensors.append((f"t{t}.weight", [blk * n, 2], t, rng.randbytes(bb * n * 2)))
    return write_gguf(3, kvs, tensors)


def gguf_seeds():
    rng = random.Random(20)
    by_type = {}
    for f in sorted(glob.glob(os.path.join(ROOT, "fixtures/gguf/*.gguf"))):
        version, kvs, tensors, align = parse_gguf(open(f, "rb").read())
        put("gguf_header", write_gguf(version, kvs, one_row(tensors), align))
        for _, _, t, data in tensors:
            by_type.setdefault(t, data)
    put("gguf_header", every_type_gguf(rng))
    # A part of a split model (its siblings are absent), and a header without tensors.
    split = [("general.architecture", 8, "llama"), ("split.no", 2, 0), ("split.count", 2, 2)]
    put("gguf_header", write_gguf(3, split, [("a", [32], 0, rng.randbytes(128))]))
    put("gguf_header", write_gguf(2, [("general.alignment", 4, 64)], []))
    # ggml_dequant: type id, then up to four blocks (fixture bytes where a fixture has the
    # type, random bytes otherwise).
    for t, (blk, bb) in sorted(GGML_BLOCK.items()):
        data = by_type.get(t, b"")[:4 * bb]
        if len(data) < 4 * bb:
            data = rng.randbytes(4 * bb)
        put("ggml_dequant", bytes([t]) + data)
        put("ggml_dequant", bytes([t]) + data[:bb + bb // 2])
    # cersa_loader::Quant: selector (0x80.. picks Q8_0/Q5_0/Q4_0), row length, rows.
    for sel, bb in ((0x80, 18), (0x81, 34), (0x82, 22)):
        for length in (32, 40, 64):
            rows = rng.randbytes(3 * (-(-length // 32)) * bb)
            put("ggml_dequant", bytes([sel]) + struct.pack("<H", length) + rows)
    floats = b"".join(struct.pack("<f", x) for x in (0.5, -1.0, 3.0, float("inf"), float("nan")))
    put("ggml_dequant", bytes([0x80]) + struct.pack("<H", 5) + floats * 8)


# --- PyTorch ------------------------------------------------------------------------------


def pickle_ops(b):
    """Byte offsets just past each top-level pickle of a byte string (pickletools reads the
    opcodes; nothing is executed)."""
    import io
    import pickletools

    ends, f = [], io.BytesIO(b)
    while f.tell() < len(b):
        try:
            for op, _, pos in pickletools.genops(f):
                if op.name == "STOP":
                    ends.append(f.tell())
                    break
        except Exception:
            break
    return ends


def ustr(x):
    """BINUNICODE."""
    b = x.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def state_dict_pickle(storages):
    """Protocol-2 pickle of OrderedDict{name: _rebuild_tensor_v2(storage, offset, size,
    stride, False, OrderedDict())}; storages: [(name, key, storage type, numel, offset,
    size, stride)]."""

    s = ustr

    def tup(xs):
        return b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"

    p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01("
    for name, key, stype, numel, off, size, stride in storages:
        p += s(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        p += b"(" + s("storage") + b"ctorch\n" + stype.encode() + b"\n" + s(key) + s("cpu")
        p += b"J" + struct.pack("<i", numel) + b"tQ"
        p += b"J" + struct.pack("<i", off) + tup(size) + tup(stride)
        p += b"\x89ccollections\nOrderedDict\n)RtR"
    return p + b"u."


def zip_archive(entries, zip64=False):
    """A STORED zip (local headers, central directory, end record; zip64 records and
    extended-information fields when `zip64`)."""
    out, central = b"", b""
    for name, data in entries:
        n = name.encode()
        off = len(out)
        crc = zipfile.crc32(data)
        out += b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", 20, 0, 0, 0, 0, crc, len(data), len(data), len(n), 0)
        out += n + data
        if zip64:
            extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), off)
            sizes = (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
        else:
            extra, sizes = b"", (len(data), len(data), off)
        central += b"PK\x01\x02" + struct.pack(
            "<HHHHHHIIIHHHHHII", 45, 20, 0, 0, 0, 0, crc, sizes[0], sizes[1], len(n), len(extra), 0, 0, 0, 0, sizes[2]
        ) + n + extra
    cd_off = len(out)
    out += central
    if zip64:
        rec = len(out)
        out += b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, len(entries), len(entries), len(central), cd_off)
        out += b"PK\x06\x07" + struct.pack("<IQI", 0, rec, 1)
        out += b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(central), cd_off, 0)
    return out


def tiny_torch(rng):
    tensors = [
        ("w", "0", "FloatStorage", 6, 0, (2, 3), (3, 1)),
        ("wt", "0", "FloatStorage", 6, 0, (3, 2), (1, 3)),
        ("h", "1", "HalfStorage", 4, 1, (3,), (1,)),
        ("n.b", "2", "BFloat16Storage", 2, 0, (2, 1), (1, 1)),
        ("d", "3", "DoubleStorage", 2, 0, (2,), (1,)),
        ("i", "4", "LongStorage", 1, 0, (), ()),
    ]
    pkl = state_dict_pickle(tensors)
    data = {"0": rng.randbytes(24), "1": rng.randbytes(8), "2": rng.randbytes(4), "3": rng.randbytes(16), "4": rng.randbytes(8)}
    entries = [("archive/data.pkl", pkl), ("archive/byteorder", b"little")]
    entries += [(f"archive/data/{k}", v) for k, v in data.items()] + [("archive/version", b"3\n")]
    legacy = b"\x80\x02\x8a\x0a" + bytes([0x6C, 0xFC, 0x9C, 0x46, 0xF9, 0x20, 0x6A, 0xA8, 0x50, 0x19]) + b"."
    legacy += b"\x80\x02M\xe9\x03."
    sys_info = b"(" + ustr("protocol_version") + b"M\xe9\x03" + ustr("little_endian") + b"\x88"
    sys_info += ustr("type_sizes") + b"}(" + ustr("short") + b"K\x02" + ustr("long") + b"K\x08uu."
    legacy += b"\x80\x02}" + sys_info
    legacy += pkl
    keys = list(data)
    legacy += b"\x80\x02](" + b"".join(ustr(k) for k in keys) + b"e."
    size = {"0": 4, "1": 2, "2": 2, "3": 8, "4": 8}
    for k in keys:
        legacy += struct.pack("<Q", len(data[k]) // size[k]) + data[k]
    return pkl, entries, legacy


def pytorch_seeds():
    rng = random.Random(6)
    pkl, entries, legacy = tiny_torch(rng)
    put("pytorch_pickle", pkl)
    put("pytorch_zip", zip_archive(entries))
    put("pytorch_zip", zip_archive(entries, zip64=True))
    put("pytorch_legacy", legacy)
    files = sorted(glob.glob(os.path.join(ROOT, "fixtures/pytorch/**/*.pt"), recursive=True))
    files += sorted(glob.glob(os.path.join(ROOT, "fixtures/pytorch/**/*.bin"), recursive=True))
    for f in files:
        b = open(f, "rb").read()
        if b.startswith(b"PK\x03\x04"):
            put("pytorch_zip", b)
            with zipfile.ZipFile(f) as z:
                for name in z.namelist():
                    if name.endswith("/data.pkl"):
                        put("pytorch_pickle", z.read(name))
        else:
            put("pytorch_legacy", b)
            start = 0
            for end in pickle_ops(b)[:5]:
                put("pytorch_pickle", b[start:end])
                start = end
    for end in pickle_ops(legacy)[:5]:
        put("pytorch_pickle", legacy[:end])


# --- Indexes, manifests, plans ----------------------------------------------------------------


def safetensors_file(tensors):
    """tensors: [(name, dtype, shape, data)] in data order."""
    header, off = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors)


def index_seeds():
    rng = random.Random(9)
    shards = [
        [("a.weight", "F32", [2, 3], rng.randbytes(24)), ("a.bias", "F16", [3], rng.randbytes(6))],
        # FP8 with DeepSeek-style 128x128 block scales (applied on reading).
        [("b.weight", "BF16", [4, 2], rng.randbytes(16)), ("f.weight", "F8_E4M3", [130, 2], rng.randbytes(260)),
         ("f.weight_scale_inv", "F32", [2, 1], struct.pack("<ff", 0.5, 2.0))],
        [("c.weight", "F64", [2, 2], rng.randbytes(32)), ("c.ids", "I64", [2], rng.randbytes(16))],
    ]
    weight_map = {
        t[0]: f"model-{k + 1:05}-of-00003.safetensors" for k, s in enumerate(shards) for t in s
    }
    index = json.dumps({"metadata": {"total_size": 362}, "weight_map": weight_map}, indent=2).encode()
    files = [safetensors_file(s) for s in shards]
    put("index_json", SEP.join([index] + files))
    put("index_json", SEP.join([index] + files[:2]))
    put("index_json", index)
    d = os.path.join(ROOT, "fixtures/pytorch/sharded")
    parts = [read(os.path.join(d, "pytorch_model.bin.index.json"))]
    parts += [open(f, "rb").read() for f in sorted(glob.glob(os.path.join(d, "pytorch_model-*.bin")))]
    put("index_json", SEP.join(parts))
    put("index_json", parts[0])


def manifest_seeds():
    for f in sorted(glob.glob(os.path.join(ROOT, "formats/vectors/*/*/cersa.json"))):
        put("manifest", open(f, "rb").read())


def plan_seeds():
    text = read("fixtures/minilm-excerpt/plan-q8_0-budget-0.3.json")
    put("plan", text)
    plan = json.loads(text)
    names = sorted(plan["tensors"])
    plan["tensors"][names[0]]["rank"] = None
    plan["energy_floor"] = 0.9
    plan["dtype"] = "f16"
    plan["calibration"] = {"sha256": "0" * 64, "damping": 0.01, "weights": 3, "model": {"name": "m"}}
    put("plan", json.dumps(plan, indent=1).encode())


def main():
    for case in sorted(glob.glob(os.path.join(ROOT, "formats/vectors/*/*"))):
        shards = sorted(glob.glob(os.path.join(case, "*.safetensors")))
        for s in shards:
            put("safetensors_header", open(s, "rb").read())
        manifest = open(os.path.join(case, "cersa.json"), "rb").read()
        # The target names shards cersa-0000{1,2}-of-00002; rename them in the manifest.
        parts = [manifest]
        for k, s in enumerate(shards[:2]):
            name = os.path.basename(s).encode()
            new = f"cersa-{k + 1:05}-of-00002.safetensors".encode()
            parts[0] = parts[0].replace(name, new)
            parts.append(open(s, "rb").read())
        put("cersa_checkpoint", SEP.join(parts))
    mixed = os.path.join(ROOT, "fixtures/mixed/model.safetensors")
    if os.path.getsize(mixed) < 1 << 20:
        put("safetensors_header", open(mixed, "rb").read())
    gguf_seeds()
    pytorch_seeds()
    index_seeds()
    manifest_seeds()
    plan_seeds()
    for target in TARGETS:
        for f in glob.glob(os.path.join(HERE, "regressions", target, "*")):
            put(target, open(f, "rb").read())


if __name__ == "__main__":
    main()
